"""RMSNorm: y = (x / sqrt(mean(x^2) + eps)) * weight over the last dimension, forward and backward.

Numerics follow Llama's RMSNorm as HuggingFace implements it, in this order:

    rstd = 1 / sqrt(mean(float32(x)^2) + eps)       # statistics in float32
    xhat = round_to(x.dtype, float32(x) * rstd)      # normalised row, rounded to the input dtype
    y    = round_to(x.dtype, xhat * weight)          # product in float32, rounded once

The reference :func:`rms_norm_ref` and the kernels use the same order, so on bf16 inputs with a bf16
weight the result equals HF's ``weight * hidden.to(input_dtype)`` up to the float32 summation order
of the mean. The output dtype is always ``x.dtype`` (HF returns float32 when the weight is float32
and x is not; we do not). Float64 inputs compute in float64 end to end (used by gradient checks).

Backward, with g = dy * weight and xhat = float32(x) * rstd (the roundings to x.dtype are
treated as identity for dx, as autograd does through HF's casts):

    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * round_to(x.dtype, xhat)     # the factor the forward multiplied w by

dw is accumulated per program over a contiguous block of rows into a float32 partial buffer of
shape (programs, N) and reduced once afterwards by a small kernel that sums the partial rows in
float32 and writes dw in the weight's dtype (one launch instead of torch's sum and cast): no
atomics, deterministic. The number of programs (2 to 8 per SM, tuned) trades load overlap
against partial-buffer traffic: 132 SMs * 4 * 4096 * 4 B = 8.6 MB written and read back,
against 671 MB moved by fwd+bwd at 16384 x 4096 bf16. When
the weight does not require a gradient (frozen norms in QLoRA) the backward is a separate
straight-line kernel computing dx only, one row per program like the forward.

Limits: x of any leading shape with a last dimension of at most 65536 elements (one row is held in
registers; efficient up to ~16K); dtypes float16, bfloat16, float32, float64 (weight of any of
these). No in-place variant: the forward output cannot overwrite x because the backward needs
x, and x is the residual stream that stays alive anyway, so the forward saves only x (by
reference) and rstd (4 B per row).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qkern._backend import (
    check_float,
    check_same_device,
    get_backend,
    next_power_of_2,
    num_sms,
    pick_configs,
)
from qkern._backend import use_triton as _use_triton
from qkern.nf4 import _launch

MAX_WIDTH = 65536
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Backward with dW: P programs per SM each loop over a contiguous block of rows and keep one
# float32 dW partial row. P must cover what the SM can keep resident (registers: a 4096-wide row
# pair in flight plus w and the dW accumulator is ~100 registers per thread at 8 warps, so ~2
# programs of 8 warps fit) while the partial buffer stays small: at N=4096 and 132 SMs, P=4 writes
# 528 x 16 KiB = 8.6 MB and reads it back, 2.6% of the 671 MB fwd+bwd moves; P=8 doubles that.
# The tuner picks P with num_warps; the host reads the choice back to know how many partial rows
# to reduce.
_BWD_DW_CONFIGS = [(4, 8), (2, 8), (2, 16), (8, 8)]  # (programs per SM, num_warps)
_BWD_DW_MAX_PER_SM = max(p for p, _ in _BWD_DW_CONFIGS)
_sms_cache: dict[tuple[str, int | None], int] = {}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _sms(device: torch.device) -> int:
    """SM count of ``device``, cached (the property lookup costs microseconds per call)."""
    key = (device.type, device.index)
    sms = _sms_cache.get(key)
    if sms is None:
        sms = _sms_cache[key] = num_sms(device if device.type == "cuda" else None)
    return sms


@functools.lru_cache(maxsize=64)
def _row_tile(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for a program holding ROWS whole rows of width n in registers.

    Wide rows (hidden sizes) get one row per program: BLOCK_N = next_pow2(n), so a 4096-wide
    bf16 row is one 8 KiB load. Narrow rows (head-dim norms, tests) are packed until a program
    holds ~2048 elements, else most lanes would idle. num_warps gives each thread ~16 values per
    row tensor (a 4096 row: 8 warps x 32 lanes x 16; two 16-byte loads per thread in bf16).
    These kernels are straight-line streams (load, reduce, store), bandwidth bound whatever the
    exact warp count, so the choice is fixed rather than tuned: an autotuned launch costs extra
    host time per call, and at 16384 x 4096 one kernel runs ~0.06-0.1 ms on the GPU.
    """
    block_n = next_power_of_2(n)
    rows = max(1, min(64, 2048 // block_n))
    num_warps = min(32, max(4, rows * block_n // 512))
    return block_n, rows, num_warps


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    M,
    N,
    stride_x,
    stride_y,
    eps,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """ROWS rows per program. rstd_r = 1/sqrt(sum_j x_rj^2 / N + eps) in ACC (float32, or float64
    for float64 input); y_rj = round(round(x_rj * rstd_r) * w_j), rounding to Y's dtype."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    mean_sq = tl.sum(x * x, axis=1) / N
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    xhat = (x * rstd[:, None]).to(Y.dtype.element_ty).to(ACC)
    y = xhat * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _dx_tile(x, dy, w, rstd, N):
    """dx = rstd*(g - xhat*sum(g*xhat)/N) per row of a (ROWS, BLOCK_N) tile, g = dy*w,
    xhat = x*rstd (unrounded: autograd differentiates the float32 math). Returns (dx, xhat)."""
    xhat = x * rstd[:, None]
    g = dy * w[None, :]
    c = tl.sum(g * xhat, axis=1) / N
    return (g - xhat * c[:, None]) * rstd[:, None], xhat


@triton.jit
def _rms_norm_bwd_dx_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    M,
    N,
    stride_dy,
    stride_x,
    stride_dx,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Backward without dW (frozen weight): ROWS rows per program, like the forward; dx only."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    dx, _ = _dx_tile(x, dy, w, rstd, N)
    tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=pick_configs(
        [triton.Config({"PROGRAMS_PER_SM": p}, num_warps=w) for p, w in _BWD_DW_CONFIGS]
    ),
    key=["N", "BLOCK_N", "ROWS"],
)
@triton.jit
def _rms_norm_bwd_dw_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PART,
    M,
    N,
    stride_dy,
    stride_x,
    stride_dx,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # sets the grid (host side) only
):
    """Backward with dW. Program p of P handles rows [p*R, min((p+1)*R, M)), R = a multiple of
    ROWS near M/P, ROWS rows per step; w is loaded once per program. Per row dx as in _dx_tile;
    dw_p = sum over its rows of dy*round(xhat) (the forward multiplied w by the rounded xhat),
    stored at DW_PART[p, :] in ACC; the host sums the P partial rows.

    The next step's x and dy are loaded before the current step is reduced and stored, so each
    program keeps one row pair (16 KiB at 4096 bf16) in flight while it computes: a plain loop
    would wait a full memory latency per row."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    r = tl.arange(0, ROWS)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    rows_per_program = tl.cdiv(tl.cdiv(M, tl.num_programs(0)), ROWS) * ROWS
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, M)  # start >= end: no rows, dw_p = 0
    first = start + r
    fmask = (first < end)[:, None] & cmask[None, :]
    x_next = tl.load(X + first[:, None] * stride_x + cols[None, :], mask=fmask, other=0.0)
    dy_next = tl.load(DY + first[:, None] * stride_dy + cols[None, :], mask=fmask, other=0.0)
    for i in range(0, tl.cdiv(end - start, ROWS)):
        x = x_next.to(ACC)
        dy = dy_next.to(ACC)
        rows = start + i * ROWS + r
        rmask = rows < end
        nxt = rows + ROWS
        nmask = (nxt < end)[:, None] & cmask[None, :]
        x_next = tl.load(X + nxt[:, None] * stride_x + cols[None, :], mask=nmask, other=0.0)
        dy_next = tl.load(DY + nxt[:, None] * stride_dy + cols[None, :], mask=nmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        dx, xhat = _dx_tile(x, dy, w, rstd, N)
        mask = rmask[:, None] & cmask[None, :]
        dx_ptrs = DX + rows[:, None] * stride_dx + cols[None, :]
        tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)
        # rows past the end were loaded as 0 (x, dy and rstd), so they add nothing
        dw += tl.sum(dy * xhat.to(X.dtype.element_ty).to(ACC), axis=0)
    tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw, mask=cmask)


@triton.jit
def _rms_norm_dw_sum_kernel(
    PART,
    DW,
    P,
    N,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dw_j = sum_p PART[p, j] over the P partial rows (contiguous, row stride N), accumulated
    in ACC and rounded once to DW's dtype. One program per BLOCK_N columns; it reads BLOCK_P
    partial rows per step, every load of a step issued at once."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    r = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        rows = (p0 + r).to(tl.int64)
        mask = (rows < P)[:, None] & cmask[None, :]
        part = tl.load(PART + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(part, axis=0)
    tl.store(DW + cols, acc.to(DW.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
#
# Host time per call counts: at 16384 x 4096 bf16 the whole fwd+bwd is ~0.2 ms of GPU time and a
# model runs two norms per layer, so the launchers avoid per-call work that cannot change
# between calls. Every kernel is launched through qkern.nf4._launch (the compiled kernel cached
# per device and specialization, no JITFunction.run dispatch); compile-time arguments come from
# a plan cached per shape key (_PLANS); the dW kernel's autotuner runs once per key and its
# choice is then launched directly; N-D inputs are passed as (rows, row stride) without a view
# op; outputs are allocated with empty_like (the cheapest allocation call).

_COMPILED: dict = {}  # nf4._launch's cache: (device, launch key) -> compiled kernel
_PLANS: dict = {}  # plan key -> grid divisor and compile-time arguments of one launch
_CONTIG = torch.contiguous_format


def _ik(v: int) -> int:
    """An int kernel argument as far as Triton specializes on it: equal to 1, divisible by 16
    or not, 32- or 64-bit (the int part of qkern.nf4._spec_key, as one small int)."""
    if v == 1:
        return 1
    return (2 if v & 15 else 3) + (4 if v > 0x7FFFFFFF else 0)


def _align_bits(*ptrs: int) -> int:
    """Bit i set when pointer i is not 16-byte aligned (Triton specializes pointers on that); the
    common all-aligned case costs one OR per pointer and one test."""
    acc = 0
    for p in ptrs:
        acc |= p
    if not acc & 15:
        return 0
    bits = 0
    for i, p in enumerate(ptrs):
        if p & 15:
            bits |= 1 << i
    return bits


def _row_stride(t: torch.Tensor) -> int:
    """Stride between consecutive rows of ``t`` seen as (rows, t.shape[-1]) without a copy:
    every leading dimension must collapse into one strided dimension and the last one must have
    unit stride; -1 when that is not so (the caller copies). Contiguous tensors give the width
    (callers test ``is_contiguous()`` first, which is cheaper)."""
    shape, stride = t.shape, t.stride()
    n = shape[-1]
    if n != 1 and stride[-1] != 1:
        return -1
    rs = -1
    nxt = 0
    for i in range(len(shape) - 2, -1, -1):
        size = shape[i]
        if size == 1:
            continue
        if rs < 0:
            rs, nxt = stride[i], stride[i] * size
        elif stride[i] != nxt:
            return -1
        else:
            nxt *= size
    return n if rs < 0 else rs


def _fwd_plan(pk: tuple) -> tuple:
    _, n, x_dtype, *_ = pk
    block_n, rows, num_warps = _row_tile(n)
    meta = {"ACC": _tl_acc(x_dtype), "ROWS": rows, "BLOCK_N": block_n, "num_warps": num_warps}
    _PLANS[pk] = plan = (rows, meta)
    return plan


def _fwd_launch(x, sx: int, m: int, n: int, weight, eps: float, y, rstd) -> None:
    """The forward kernel on m rows of x (row stride sx) into y (contiguous) and rstd."""
    pk = ("fwd", n, x.dtype, weight.dtype, y.dtype, rstd.dtype)
    rows, meta = _PLANS.get(pk) or _fwd_plan(pk)
    al = _align_bits(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr())
    _launch(
        _rms_norm_fwd_kernel,
        (-(-m // rows), 1, 1),
        (x, weight, y, rstd, m, n, sx, n, eps),
        meta,
        _COMPILED,
        (pk, _ik(m), sx, al),
    )


def _bwd_align(dy, x, weight, rstd, dx) -> int:
    """The pointer-alignment part of both backward kernels' launch keys."""
    return _align_bits(
        dy.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), dx.data_ptr()
    )


def _dx_launch(dy, sdy: int, x, sx: int, m: int, n: int, weight, rstd, dx) -> None:
    """Backward without dW: dx (contiguous) only, ROWS rows per program."""
    pk = ("dx", n, x.dtype, weight.dtype, dy.dtype, dx.dtype)
    rows, meta = _PLANS.get(pk) or _fwd_plan(pk)
    al = _bwd_align(dy, x, weight, rstd, dx)
    _launch(
        _rms_norm_bwd_dx_kernel,
        (-(-m // rows), 1, 1),
        (dy, x, weight, rstd, dx, m, n, sdy, sx, n),
        meta,
        _COMPILED,
        (pk, _ik(m), sdy, sx, al),
    )


def _dw_tune(pk: tuple, args: tuple, m: int, n: int, x) -> torch.Tensor:
    """First dW backward for a plan key: the autotuner picks the programs per SM (grid and
    partial rows depend on it); the choice becomes the key's plan. Returns the partial rows."""
    block_n, rows, _ = _row_tile(n)
    steps = -(-m // rows)
    sms = _sms(x.device)
    # sized for the largest P a config may pick; only the chosen config's rows are summed
    part = x.new_empty((min(steps, _BWD_DW_MAX_PER_SM * sms), n), dtype=_acc_dtype(x.dtype))
    acc = _tl_acc(x.dtype)
    _rms_norm_bwd_dw_kernel[lambda meta: (min(steps, meta["PROGRAMS_PER_SM"] * sms),)](
        *args[:5], part, *args[5:], ACC=acc, ROWS=rows, BLOCK_N=block_n
    )
    cfg = _rms_norm_bwd_dw_kernel.best_config
    cap = cfg.kwargs["PROGRAMS_PER_SM"] * sms
    meta = {**cfg.all_kwargs(), "ACC": acc, "ROWS": rows, "BLOCK_N": block_n}
    # the partial sum: BLOCK_N = 32 columns (128-byte row segments) per program, so N = 4096
    # gives 128 programs; each step loads up to 8192 floats (32 per thread at 8 warps), so the
    # 528 rows of P = 4 on 132 SMs take three steps
    sum_n = min(32, next_power_of_2(n))
    sum_meta = {
        "ACC": acc,
        "BLOCK_P": min(next_power_of_2(cap), 8192 // sum_n),
        "BLOCK_N": sum_n,
        "num_warps": 8,
    }
    _PLANS[pk] = (rows, cap, meta, sum_n, sum_meta)
    return part[: min(steps, cap)]


def _dw_launch(dy, sdy: int, x, sx: int, m: int, n: int, weight, rstd, dx) -> torch.Tensor:
    """Backward with dW: dx into ``dx`` (contiguous); returns dw in weight's dtype. P programs
    per SM (tuned once per key) each write one float32 partial row, summed by a second kernel."""
    pk = ("dw", n, x.dtype, weight.dtype, dy.dtype, dx.dtype, x.get_device())
    plan = _PLANS.get(pk)
    args = (dy, x, weight, rstd, dx, m, n, sdy, sx, n)
    if plan is None:
        part = _dw_tune(pk, args, m, n, x)
        rows, cap, meta, sum_n, sum_meta = _PLANS[pk]
    else:
        rows, cap, meta, sum_n, sum_meta = plan
        programs = -(-m // rows)
        if programs > cap:
            programs = cap
        part = x.new_empty((programs, n), dtype=_acc_dtype(x.dtype))
        al = _bwd_align(dy, x, weight, rstd, dx)
        _launch(
            _rms_norm_bwd_dw_kernel.fn,
            (programs, 1, 1),
            (*args[:5], part, *args[5:]),
            meta,
            _COMPILED,
            (pk, _ik(m), sdy, sx, al, part.data_ptr() & 15 == 0),
        )
    programs = part.shape[0]
    dw = torch.empty_like(weight)
    _launch(
        _rms_norm_dw_sum_kernel,
        (-(-n // sum_n), 1, 1),
        (part, dw, programs, n),
        sum_meta,
        _COMPILED,
        ("sum", pk, _ik(programs), _align_bits(part.data_ptr(), dw.data_ptr())),
    )
    return dw


def _rms_norm_fwd(
    x2: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    y: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
):
    """y (M, N) and rstd (M,) for 2-D x2 with unit stride along N; ``y`` (contiguous) and
    ``rstd`` may be given."""
    m, n = x2.shape
    if y is None:
        y = x2.new_empty((m, n))
    elif not y.is_contiguous():
        raise ValueError("y must be contiguous")
    if rstd is None:
        rstd = x2.new_empty((m,), dtype=_acc_dtype(x2.dtype))
    if m:
        _fwd_launch(x2, x2.stride(0), m, n, weight, float(eps), y, rstd)
    return y, rstd


def _rms_norm_bwd(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
    dx: torch.Tensor | None = None,
):
    """dx (M, N), and dw (N,) in weight's dtype when ``compute_dw``, for 2-D dy2 and x2 with
    unit stride along N; ``dx`` (contiguous) may be given."""
    m, n = x2.shape
    if dx is None:
        dx = x2.new_empty((m, n))
    elif not dx.is_contiguous():
        raise ValueError("dx must be contiguous")
    if m == 0:
        return dx, (torch.zeros_like(weight) if compute_dw else None)
    args = (dy2, dy2.stride(0), x2, x2.stride(0), m, n, weight, rstd, dx)
    if not compute_dw:
        _dx_launch(*args)
        return dx, None
    return dx, _dw_launch(*args)


def _rows_of(t: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """(t, row stride) when t's rows are one strided dimension with unit stride along n, else
    (a contiguous copy, n)."""
    if t.is_contiguous():
        return t, n
    rs = _row_stride(t)
    return (t, rs) if rs >= 0 else (t.contiguous(), n)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """y in x's shape (contiguous), the x the kernel read (x itself unless its rows needed a
    copy), its row stride and rstd."""
    n = x.shape[-1]
    x, sx = _rows_of(x, n)
    m = x.numel() // n if n else 0
    y = torch.empty_like(x) if sx == n else torch.empty_like(x, memory_format=_CONTIG)
    rstd = x.new_empty(m, dtype=_acc_dtype(x.dtype))
    if m:
        _fwd_launch(x, sx, m, n, weight, eps, y, rstd)
    return y, x, sx, rstd


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RMSNorm kernels. Saves x, weight and rstd (one float per
    row); x by reference (a copy only when its rows are not one strided dimension).

    Per fwd+bwd the host issues, besides the autograd bookkeeping, the output allocations (y,
    rstd; dx, and with dW the partial buffer and dw) and two or three direct launches: no view,
    reshape or reduction op, and no autotuner or JIT dispatch after the first call of a shape."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, x, sx, rstd = _forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.sx = sx
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        n = x.shape[-1]
        m = rstd.shape[0]
        dy, sdy = _rows_of(dy, n)
        dx = torch.empty_like(dy) if sdy == n else torch.empty_like(dy, memory_format=_CONTIG)
        needs = ctx.needs_input_grad
        dw = None
        if m == 0:
            dw = torch.zeros_like(weight) if needs[1] else None
        elif needs[1]:
            dw = _dw_launch(dy, sdy, x, ctx.sx, m, n, weight, rstd, dx)
        else:
            _dx_launch(dy, sdy, x, ctx.sx, m, n, weight, rstd, dx)
        return (dx if needs[0] else None), dw, None


# ----------------------------------------------------------------------------------------------
# reference and public API
# ----------------------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-PyTorch RMSNorm in the order stated in the module docstring (differentiable)."""
    acc = _acc_dtype(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = (xf * rstd).to(x.dtype)
    return (xhat.to(acc) * weight.to(acc)).to(x.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_float(x, "x", _DTYPES)
    check_float(weight, "weight", _DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one)")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match the last dimension of x "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if x.device != weight.device:
        check_same_device(x=x, weight=weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape); output in ``x.dtype``.

    Gradients flow to ``x`` and, when it requires grad, to ``weight``.
    """
    _check(x, weight, eps)
    # use_triton's answer without its call for the common case (CUDA tensors, backend "auto")
    if not (x.is_cuda and weight.is_cuda and get_backend() == "auto") and not _use_triton(
        x, weight
    ):
        return rms_norm_ref(x, weight, eps)
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(
            f"rms_norm kernel supports rows up to {MAX_WIDTH} elements, got {x.shape[-1]}"
        )
    if not weight.is_contiguous():  # the kernels read w with unit stride
        weight = weight.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, float(eps))
    return _forward(x, weight, float(eps))[0]  # inference: no autograd node


class RMSNorm(torch.nn.Module):
    """``y = rms_norm(x, weight, eps)`` with a trainable ``weight`` initialised to ones."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
