"""SwiGLU activation: h = silu(gate) * up, forward and backward.

With s = sigmoid(g) = 1 / (1 + exp(-g)) and silu(g) = g * s:

    forward    h     = g * s * u
    backward   dgate = dh * u * s * (1 + g * (1 - s))      (d silu/dg = s + g*s*(1-s))
               dup   = dh * g * s

All arithmetic is in float32 (float64 for float64 inputs) with one rounding per output; PyTorch's
eager ``F.silu(g) * u`` rounds silu(g) to the input dtype first, so the kernel is at least as
accurate. The backward recomputes s from gate instead of saving it: the forward saves gate and
up only (which the caller holds anyway when they are views of one projection output).

Memory traffic: forward reads g, u and writes h (3 tensors); backward reads dh, g, u and writes
dgate, dup (5 tensors). At (16384, 14336) bf16 one tensor is 470 MB, so fwd+bwd moves 3.76 GB.

In-place backward (``swiglu(gate, up, inplace_backward=True)``): dgate and dup are written into
gate's and up's buffers, so the backward allocates nothing of activation size (saves 2 tensors,
940 MB at the size above). Only use it when gate and up are intermediates nobody reads after the
forward (for example the outputs of two projections feeding only this op); autograd's saved-tensor
version check cannot see the overwrite, because it happens inside this op's own backward.

Limits: gate and up of one shape (any leading dims) and one dtype in float16, bfloat16, float32,
float64; rows may be strided (a (M, 2I) gate_up tensor split in two works without a copy) but
the last dimension must have unit stride (otherwise a copy is made).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.graph import increment_version
from triton.runtime.autotuner import Autotuner, Heuristics

from qkern._backend import (
    check_float,
    check_same_device,
    get_backend,
    next_power_of_2,
    pick_configs,
)
from qkern._backend import use_triton as _use_triton
from qkern.nf4 import _launch
from qkern.rms_norm import _align_bits, _ik, _rows_of

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Elementwise streaming: a program moves a (ROWS, BLOCK_N) tile with ROWS * BLOCK_N = BLOCK
# elements: BLOCK_N = min(BLOCK, next_pow2(N)) columns of ROWS rows (several rows only when rows
# are narrower than BLOCK). 1024-8192 elements (2-16 KB per bf16 tensor) per program keep enough
# loads in flight per SM; the tuner picks per width. The 8192 tile (16 warps, 16 values per thread
# and tensor) halves the programs per row of the 4096 one: at (16384, 14336) both kernels already
# stream at ~97% of copy bandwidth, and the larger tile trims per-program index work and tails.
_CONFIGS = [
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 1024}, num_warps=8),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=16),
    triton.Config({"BLOCK": 8192}, num_warps=16),
]


def _tile(args: dict) -> dict:
    """Derive the tile from the tuned BLOCK and the row width N."""
    block_n = min(args["BLOCK"], next_power_of_2(args["N"]))
    return {"BLOCK_N": block_n, "ROWS": args["BLOCK"] // block_n}


_heuristics = triton.heuristics(
    {"BLOCK_N": lambda a: _tile(a)["BLOCK_N"], "ROWS": lambda a: _tile(a)["ROWS"]}
)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# H may alias G (the fused MLP writes h over g): the autotuner then runs the kernel several times
# on one buffer, so G is restored between its trials (one copy per tuned shape).
@triton.autotune(configs=pick_configs(_CONFIGS), key=["N"], restore_value=["G"])
@_heuristics
@triton.jit
def _swiglu_fwd_kernel(
    G,
    U,
    H,
    M,
    N,
    stride_g,
    stride_u,
    stride_h,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
):
    """h = g * sigmoid(g) * u on a (ROWS, BLOCK_N) tile, computed in ACC."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(H + rows * stride_h + cols, (g * s * u).to(H.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=pick_configs(_CONFIGS),
    key=["N", "STORE_H"],
    # in-place calls write dgate/dup (and h) over gate/up (and dh) while the tuner re-runs them
    restore_value=["DH", "G", "U"],
)
@_heuristics
@triton.jit
def _swiglu_bwd_kernel(
    DH,
    G,
    U,
    DG,
    DU,
    HOUT,
    M,
    N,
    stride_dh,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    stride_hout,
    ACC: tl.constexpr,
    STORE_H: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
):
    """dg = dh*u*s*(1 + g*(1-s)), du = dh*g*s with s = sigmoid(g) recomputed; with STORE_H also
    h = g*s*u (the forward output, for callers that need it in backward). Each element is read
    before it is written by the same program, so DG/DU/HOUT may alias G/U/DH."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    dh = tl.load(DH + rows * stride_dh + cols, mask=mask, other=0.0).to(ACC)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    dg = dh * u * s * (1.0 + g * (1.0 - s))
    du = dh * silu
    tl.store(DG + rows * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(HOUT + rows * stride_hout + cols, (silu * u).to(HOUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers (2-D (M, N) views given as row strides, unit stride along N)
# ----------------------------------------------------------------------------------------------
#
# Host time per call: the autotuners run once per shape key (N and the dtypes, as their own
# cache key) on the first call, with restore_value guarding the aliasing calls (h over g,
# gradients over their inputs) while they time candidates; the chosen config is then kept in
# _PLANS and every later call launches the JIT kernel directly through qkern.nf4._launch (no
# autotuner, heuristics or JIT dispatch, a tuple grid). N-D tensors are passed as
# (rows, row stride), so no view or reshape op runs per call.

_COMPILED: dict = {}  # nf4._launch's cache: (device, launch key) -> compiled kernel
_PLANS: dict = {}  # (direction, N, dtypes...) -> (ROWS, BLOCK_N, compile-time arguments)
_CONTIG = torch.contiguous_format


def _jit_of(kernel):
    """The JIT function under the autotuner and heuristics wrappers."""
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


_FWD_JIT = _jit_of(_swiglu_fwd_kernel)
_BWD_JIT = _jit_of(_swiglu_bwd_kernel)


def _grid(m: int, n: int):
    return lambda meta: (-(-m // meta["ROWS"]), -(-n // meta["BLOCK_N"]))


def _plan(pk: tuple, tuner, n: int, extra: dict) -> tuple:
    """Record the config the tuner just ran for ``pk``: tile, warps and stages."""
    cfg = tuner.best_config.all_kwargs()
    tile = _tile({"BLOCK": cfg["BLOCK"], "N": n})
    meta = {**cfg, **extra, **tile}
    _PLANS[pk] = plan = (tile["ROWS"], tile["BLOCK_N"], meta)
    return plan


def _fwd(g, u, h, m: int, n: int, sg: int, su: int, sh: int) -> None:
    """h = silu(g) * u on m rows of width n with the given row strides (m * n > 0)."""
    pk = ("fwd", n, g.dtype, u.dtype, h.dtype)
    plan = _PLANS.get(pk)
    args = (g, u, h, m, n, sg, su, sh)
    if plan is None:
        acc = _acc(g.dtype)
        _swiglu_fwd_kernel[_grid(m, n)](*args, ACC=acc)
        _plan(pk, _swiglu_fwd_kernel, n, {"ACC": acc})
        return
    rows, block_n, meta = plan
    al = _align_bits(g.data_ptr(), u.data_ptr(), h.data_ptr())
    _launch(
        _FWD_JIT,
        (-(-m // rows), -(-n // block_n), 1),
        args,
        meta,
        _COMPILED,
        (pk, _ik(m), sg, su, sh, al),
    )


def _bwd(dh, g, u, dg, du, hout, m: int, n: int, strides: tuple, store_h: bool) -> None:
    """dgate into dg, dup into du (and h into hout when ``store_h``); ``strides`` are the six
    row strides in argument order (m * n > 0)."""
    pk = ("bwd", n, store_h, dh.dtype, g.dtype, u.dtype, dg.dtype, du.dtype, hout.dtype)
    plan = _PLANS.get(pk)
    args = (dh, g, u, dg, du, hout, m, n, *strides)
    if plan is None:
        acc = _acc(g.dtype)
        _swiglu_bwd_kernel[_grid(m, n)](*args, ACC=acc, STORE_H=store_h)
        _plan(pk, _swiglu_bwd_kernel, n, {"ACC": acc, "STORE_H": store_h})
        return
    rows, block_n, meta = plan
    al = _align_bits(
        dh.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), hout.data_ptr()
    )
    _launch(
        _BWD_JIT,
        (-(-m // rows), -(-n // block_n), 1),
        args,
        meta,
        _COMPILED,
        (pk, _ik(m), strides, al),
    )


def swiglu_forward_2d(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None):
    """h = silu(g) * u for 2-D g, u (unit stride along the last dim); ``out`` may be given."""
    m, n = g.shape
    h = torch.empty((m, n), dtype=g.dtype, device=g.device) if out is None else out
    if m * n:
        _fwd(g, u, h, m, n, g.stride(0), u.stride(0), h.stride(0))
    return h


def swiglu_backward_2d(
    dh: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    dg: torch.Tensor,
    du: torch.Tensor,
    h_out: torch.Tensor | None = None,
) -> None:
    """Write dgate into ``dg`` and dup into ``du`` (and h into ``h_out`` when given). Any output
    may be the same buffer as an input (in-place), element by element."""
    m, n = g.shape
    if m * n == 0:
        return
    hout = h_out if h_out is not None else dg
    strides = (dh.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0), hout.stride(0))
    _bwd(dh, g, u, dg, du, hout, m, n, strides, h_out is not None)


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h in gate's shape (contiguous)."""
    n = gate.shape[-1]
    g, sg = _rows_of(gate, n)
    u, su = _rows_of(up, n)
    h = torch.empty_like(g) if sg == n else torch.empty_like(g, memory_format=_CONTIG)
    numel = g.numel()
    if numel:
        _fwd(g, u, h, numel // n, n, sg, su, n)
    return h


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper; saves gate and up, recomputes sigmoid(gate) in backward.

    Per fwd+bwd the host issues, besides the autograd bookkeeping, the output allocations (h;
    dgate and dup unless in place) and two direct launches: no view or reshape op (N-D inputs
    are passed as row strides), and no autotuner or JIT dispatch after the first call of a
    shape."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool):
        h = _forward(gate, up)
        ctx.save_for_backward(gate, up)
        ctx.inplace_backward = inplace_backward
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        n = gate.shape[-1]
        g, sg = _rows_of(gate, n)
        u, su = _rows_of(up, n)
        dh, sdh = _rows_of(dh, n)
        if ctx.inplace_backward:
            dg, du, sdg, sdu = g, u, sg, su
        else:
            dg = torch.empty_like(dh) if sdh == n else torch.empty_like(dh, memory_format=_CONTIG)
            du = torch.empty_like(dg)
            sdg = sdu = n
        numel = g.numel()
        if numel:
            _bwd(dh, g, u, dg, du, dg, numel // n, n, (sdh, sg, su, sdg, sdu, sdg), False)
        if ctx.inplace_backward:
            # gate/up now hold the gradients: a second backward through this graph must fail
            # the saved-tensor version check instead of reading gradients as activations
            increment_version(gate)
            increment_version(up)
        return dg, du, None


# ----------------------------------------------------------------------------------------------
# reference and public API
# ----------------------------------------------------------------------------------------------


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """PyTorch eager SwiGLU, ``F.silu(gate) * up`` in the inputs' dtype (differentiable)."""
    return torch.nn.functional.silu(gate) * up


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_float(gate, "gate", _DTYPES)
    check_float(up, "up", _DTYPES)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate and up must have one dtype, got {gate.dtype} and {up.dtype}")
    if gate.dim() == 0:
        raise ValueError("gate and up must have at least one dimension")
    if gate.device != up.device:
        check_same_device(gate=gate, up=up)


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """``silu(gate) * up``; ``inplace_backward=True`` writes the gradients into gate's and up's
    buffers during backward (see the module docstring for when that is safe)."""
    _check(gate, up)
    # use_triton's answer without its call for the common case (CUDA tensors, backend "auto")
    if not (gate.is_cuda and up.is_cuda and get_backend() == "auto") and not _use_triton(gate, up):
        return swiglu_ref(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up, bool(inplace_backward))
    return _forward(gate, up)  # inference: no autograd node
