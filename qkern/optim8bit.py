"""8-bit AdamW: both moments stored as blockwise dynamically quantized 8-bit codes.

State format (per parameter with at least ``min_8bit_size`` elements; the layout bitsandbytes'
8-bit blockwise Adam uses, built here from its description):

* The parameter is flattened row-major and cut into blocks of ``blocksize`` (default 256)
  consecutive elements; the last block may be short.
* First moment m: uint8 codes into the *signed* dynamic map (256 float32 values in [-1, 1]: for
  i = 0..6 the 2^i midpoints of ``linspace(0.1, 1, 2^i + 1)`` scaled by 10^(i-6), both signs, plus
  0 and 1), with one float32 ``absmax = max |m|`` per block. ``m = map[code] * absmax``.
* Second moment v >= 0: codes into the *unsigned* dynamic map (the same construction with 2^(i+1)
  midpoints per decade and no negative half: 254 values plus 0 and 1), float32 absmax per block.
* Encoding a value x of a block with scale s: the code is the number of the 255 float32 midpoints
  ``mid[j] = (map[j] + map[j+1]) / 2`` with ``x > mid[j] * s`` (products rounded to float32). This
  is the nearest map entry to x / s up to the rounding of the thresholds, and it needs no division,
  so the kernel and the reference agree bit for bit.
* Smaller parameters keep float32 ``exp_avg`` / ``exp_avg_sq`` like torch's AdamW.

Memory: 2 bytes of state per parameter plus 8 bytes of absmax per 256 elements (2.03 B/param),
against 8 B/param for float32 AdamW states.

Step, per element, all in float32 from the float32 constants b1, 1-b1, b2, 1-b2 (each rounded
once from the Python floats), with t the step count after this step:

    m  = b1 * dequant(m) + (1 - b1) * g
    v  = b2 * dequant(v) + (1 - b2) * (g * g)
    p  = p * (1 - lr * wd) - (lr / bc1) * (m / (sqrt(v) / sqrt(bc2) + eps))
    bc1 = 1 - exp2(t * log2(b1)),  bc2 = 1 - exp2(t * log2(b2))
    then m and v are re-encoded (new absmax per block).

The update uses the unquantized new moments (registers), so quantization error enters only
through the stored state of the next step. Weight decay is decoupled (AdamW). The three roundings
of each moment update are kept separate (the kernel is compiled without fused multiply-add) and
divisions/square roots are IEEE, so the GPU kernel reproduces the reference's codes exactly; the
bias corrections use exp2, which may differ in the last bit between devices (relative 1e-7 on
the update). Parameters are updated in their own dtype: float32, or bfloat16/float16 rounded once
per step (no master weights, no stochastic rounding).

Non-finite gradients: before any update, one float32 sum of squares per gradient is taken (the
squared L2 norm). If any is inf or NaN (a gradient with inf/NaN, or one so large its float32 sum
of squares overflows, |g| beyond ~1e16), the whole step is skipped on that device: no parameter,
moment or step counter changes. The decision stays on the device (a 0/1 tensor the kernels
read), so ``step()`` never synchronizes with the host. This is the GradScaler policy rather than
bitsandbytes' (which zeroes the states of affected elements): a skipped step leaves the
optimizer exactly as it was.

Multi-tensor step: the states of a device live in flat buffers, one set per bucket (parameter
group x parameter dtype x 8/32-bit states), each tensor's segment starting on a quantization
block boundary; ``state[p]`` holds views into them. A step is a fixed number of launches
whatever the number of tensors: one gradient-check launch per gradient dtype (sums of squares;
its last program decides the skip flag and advances every step counter) and one update launch
per bucket, both driven by small tables (each tensor's address, size, state segment and counter;
each program's tensor and first block). The tables are built once per set of tensors; per step
only the gradient and parameter addresses are gathered and, when one changed, uploaded
(non-blocking). For the LoRA adapters of Llama-3.1-8B (448 tensors) that is 2 launches.

Limits: parameters float32/float16/bfloat16 on CUDA (Triton kernels) or CPU (reference path);
dense gradients only; blocksize a power of two in 64..4096; no amsgrad, maximize, or tensor
learning rates; gradients whose square overflows float32 are treated as non-finite (the step is
skipped). The step reads parameter and gradient addresses on the host, so it cannot be captured
in a CUDA graph, and all steps of one optimizer must run on one stream per device.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections import defaultdict
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from qkern._backend import next_power_of_2, num_sms
from qkern._backend import use_triton as _use_triton
from qkern.nf4 import _launch as _direct_launch

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QUANT_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")
_FP32_KEYS = ("exp_avg", "exp_avg_sq")
# code of 0.0 in the signed map (127 negative values sort below it)
_SIGNED_ZERO_CODE = 127


# ----------------------------------------------------------------------------------------------
# dynamic maps
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    values: list[float] = []
    for i in range(7):
        # signed: 2^i values per decade and sign; unsigned: 2^(i+1) per decade, positive only
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        # Python-scalar times float32 tensor, listed, sorted, stored as float32: the steps
        # bitsandbytes uses, so every entry is the same float32 value.
        values += (10 ** (i - 6) * means).tolist()
        if signed:
            values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry float32 dynamic map (sorted): signed for m, unsigned for v (CPU copy)."""
    return _dynamic_map_cpu(bool(signed)).clone()


@lru_cache(maxsize=2)
def _midpoints_cpu(signed: bool) -> torch.Tensor:
    q = _dynamic_map_cpu(signed)
    return (q[:-1] + q[1:]) / 2.0  # 255 float32 thresholds, strictly increasing


_device_tables: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(map [256], midpoints [255]) float32 on ``device``, cached per device."""
    key = (str(device), signed)
    if key not in _device_tables:
        _device_tables[key] = (
            _dynamic_map_cpu(signed).to(device),
            _midpoints_cpu(signed).to(device),
        )
    return _device_tables[key]


# ----------------------------------------------------------------------------------------------
# blockwise 8-bit quantization (reference)
# ----------------------------------------------------------------------------------------------


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def quantize_blockwise_ref(
    x: torch.Tensor, blocksize: int = 256, signed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` (any shape, flattened) to (uint8 codes [n], float32 absmax [ceil(n/bs)]).

    code = #{j : x > mid[j] * absmax_block}, the map entry nearest to x / absmax up to the
    float32 rounding of the thresholds. With ``signed=False`` x must be >= 0.
    """
    _check_blocksize(blocksize)
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = triton.cdiv(n, blocksize)
    padded = torch.zeros(nb * blocksize, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    blocks = padded.view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    _, mid = _tables(flat.device, signed)
    thresholds = mid[None, :] * absmax[:, None]  # (nb, 255), non-decreasing along a row
    # searchsorted (left) counts the thresholds strictly below each value
    codes = torch.searchsorted(thresholds, blocks.contiguous()).to(torch.uint8)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_ref(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256, signed: bool = True
) -> torch.Tensor:
    """float32 [n] values ``map[code] * absmax[block]`` (one rounding)."""
    _check_blocksize(blocksize)
    qmap, _ = _tables(codes.device, signed)
    n = codes.numel()
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return qmap[codes.reshape(-1).long()] * scale


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
#
# Tables (int64 unless noted; t indexes the tensors of one step on one device):
#   PTRS [2, T]  parameter and gradient addresses (rewritten when a pointer changes)
#   TAB  [3, T]  numel, start of the tensor's segment in its bucket's flat state buffers
#                (elements, a multiple of the blocksize and of 64), index of its step counter
#   PROG [2, P]  int32: tensor and first quantization block of each program (update kernel) or
#                tensor and chunk of each program (gradient check)
# A kernel turns an address into a typed pointer with ``.to(tl.pointer_type(dtype))``.


@triton.jit
def _search_step(x, thr_scale, MID, code, HALF: tl.constexpr):
    """One binary-search step: move up by HALF where x is above threshold code + HALF - 1."""
    thr = tl.load(MID + code + (HALF - 1)) * thr_scale
    return tl.where(x > thr, code + HALF, code)


@triton.jit
def _encode(x, absmax, MID):
    """Codes of x [R, C] against per-row scales absmax [R]: the count of the 255 sorted
    thresholds mid[j] * absmax_r below x, by an 8-step binary search (gathers from a 1 KB table
    that stays in L1). The largest index read is 254."""
    scale = absmax[:, None]
    code = tl.full(x.shape, 0, tl.int32)
    code = _search_step(x, scale, MID, code, 128)
    code = _search_step(x, scale, MID, code, 64)
    code = _search_step(x, scale, MID, code, 32)
    code = _search_step(x, scale, MID, code, 16)
    code = _search_step(x, scale, MID, code, 8)
    code = _search_step(x, scale, MID, code, 4)
    code = _search_step(x, scale, MID, code, 2)
    code = _search_step(x, scale, MID, code, 1)
    return code


@triton.jit
def _grad_check_kernel(
    PTRS,
    TAB,
    PROG,
    SUMSQ,
    COUNTER,
    SKIP,
    STEP,
    n_tensors,
    n_programs,
    total_programs,
    G_DTYPE: tl.constexpr,
    TILE: tl.constexpr,
    CHUNKS: tl.constexpr,
    REDUCE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Per-gradient float32 sums of squares, then (in the last program to finish) the skip flag
    and the step counters.

    Each program adds sum(g^2) over TILE * CHUNKS elements of one gradient to SUMSQ[t]
    (float32 atomics) and takes a ticket from COUNTER. The program that draws the last ticket of
    the step (``total_programs`` counts the programs of every launch of this step on the device,
    one launch per gradient dtype; launches on one stream run in order) sees every sum: SKIP =
    1.0 if any is inf or NaN (a gradient with inf/NaN, or one whose float32 sum of squares
    overflows, exactly when its float32 L2 norm is not finite), else 0.0; it advances each
    tensor's step counter by 1 - SKIP and leaves SUMSQ and COUNTER at zero for the next step.
    """
    pid = tl.program_id(0)
    t = tl.load(PROG + pid)
    chunk = tl.load(PROG + n_programs + pid).to(tl.int64)
    n = tl.load(TAB + t)
    G = tl.load(PTRS + n_tensors + t).to(tl.pointer_type(G_DTYPE))
    if ALIGNED:  # every address 16-byte aligned and every numel a multiple of 16 (host-checked)
        G = tl.multiple_of(G, 16)
        n = tl.multiple_of(n, 16)
    cols = tl.arange(0, TILE)
    acc = tl.zeros([TILE], tl.float32)
    for c in range(CHUNKS):
        offs = (chunk * CHUNKS + c) * TILE + cols
        g = tl.load(G + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += g * g
    tl.atomic_add(SUMSQ + t, tl.sum(acc, axis=0))
    # every thread's part of the sum is in before the ticket (release) is taken
    tl.debug_barrier()
    ticket = tl.atomic_add(COUNTER, 1)
    if ticket == total_programs - 1:
        idx = tl.arange(0, REDUCE)
        bad = tl.zeros([REDUCE], tl.int32)
        for start in range(0, n_tensors, REDUCE):
            live = start + idx < n_tensors
            # read through atomics (the sums live in L2), then reset for the next step
            s = tl.atomic_add(SUMSQ + start + idx, tl.zeros([REDUCE], tl.float32), mask=live)
            tl.store(SUMSQ + start + idx, tl.zeros([REDUCE], tl.float32), mask=live)
            bad = tl.where(live & ((s != s) | (s == float("inf"))), 1, bad)
        skip = tl.max(bad, axis=0).to(tl.float32)
        tl.store(SKIP, skip)
        for start in range(0, n_tensors, REDUCE):
            live = start + idx < n_tensors
            slot = tl.load(TAB + 2 * n_tensors + start + idx, mask=live, other=0)
            count = tl.load(STEP + slot, mask=live, other=0.0)
            tl.store(STEP + slot, count + (1.0 - skip), mask=live)
        tl.store(COUNTER, 0)


@triton.jit
def _adamw8bit_kernel(
    PTRS,
    TAB,
    PROG,
    M,
    V,
    M_ABSMAX,
    V_ABSMAX,
    M_QMAP,
    M_MID,
    V_QMAP,
    V_MID,
    STEP,
    SKIP,
    n_tensors,
    n_programs,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    log2_beta1,
    log2_beta2,
    eps,
    decay,
    QBLOCK: tl.constexpr,
    BLOCKS: tl.constexpr,
    QUANT: tl.constexpr,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """One AdamW step for BLOCKS quantization blocks of QBLOCK elements of one tensor (see the
    module docstring for the math); the program's tensor and first block come from PROG, the
    tensor's addresses, size, state segment and step counter from PTRS and TAB. QUANT: m/v are
    uint8 codes + float32 absmax per block in flat buffers (re-encoded after the update);
    otherwise float32 flat buffers (QBLOCK is then only the tile width). SKIP (float32 0/1):
    when 1 nothing is stored. STEP[slot]: the step count after this step."""
    pid = tl.program_id(0)
    t = tl.load(PROG + pid)
    first = tl.load(PROG + n_programs + pid)
    n = tl.load(TAB + t)
    seg = tl.load(TAB + n_tensors + t)
    slot = tl.load(TAB + 2 * n_tensors + t)
    P = tl.load(PTRS + t).to(tl.pointer_type(P_DTYPE))
    G = tl.load(PTRS + n_tensors + t).to(tl.pointer_type(G_DTYPE))
    M = M + seg
    V = V + seg
    if ALIGNED:  # every address 16-byte aligned and every numel a multiple of 16 (host-checked)
        P = tl.multiple_of(P, 16)
        G = tl.multiple_of(G, 16)
        M = tl.multiple_of(M, 16)
        V = tl.multiple_of(V, 16)
        n = tl.multiple_of(n, 16)
    n_blocks = (n + QBLOCK - 1) // QBLOCK
    rows = first + tl.arange(0, BLOCKS)
    cols = tl.arange(0, QBLOCK)
    offs = rows.to(tl.int64)[:, None] * QBLOCK + cols[None, :]
    mask = offs < n
    keep = tl.load(SKIP + tl.zeros([BLOCKS], tl.int32)) == 0.0  # the flag, once per row
    smask = mask & keep[:, None]
    rmask = (rows < n_blocks) & keep

    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANT:
        M_ABSMAX = M_ABSMAX + seg // QBLOCK
        V_ABSMAX = V_ABSMAX + seg // QBLOCK
        m_code = tl.load(M + offs, mask=mask, other=0).to(tl.int32)
        v_code = tl.load(V + offs, mask=mask, other=0).to(tl.int32)
        m_scale = tl.load(M_ABSMAX + rows, mask=rows < n_blocks, other=0.0)
        v_scale = tl.load(V_ABSMAX + rows, mask=rows < n_blocks, other=0.0)
        m = tl.load(M_QMAP + m_code) * m_scale[:, None]
        v = tl.load(V_QMAP + v_code) * v_scale[:, None]
    else:
        m = tl.load(M + offs, mask=mask, other=0.0)
        v = tl.load(V + offs, mask=mask, other=0.0)

    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)

    step = tl.load(STEP + slot)
    bc1 = 1.0 - tl.exp2(step * log2_beta1)
    bc2 = 1.0 - tl.exp2(step * log2_beta2)
    step_size = tl.div_rn(lr, bc1)
    denom = tl.div_rn(tl.sqrt_rn(v), tl.sqrt_rn(bc2)) + eps
    p = p * decay - step_size * tl.div_rn(m, denom)
    tl.store(P + offs, p.to(P_DTYPE), mask=smask)

    if QUANT:
        m_abs = tl.max(tl.where(mask, tl.abs(m), 0.0), axis=1)
        v_abs = tl.max(tl.where(mask, v, 0.0), axis=1)
        tl.store(M + offs, _encode(m, m_abs, M_MID).to(tl.uint8), mask=smask)
        tl.store(V + offs, _encode(v, v_abs, V_MID).to(tl.uint8), mask=smask)
        tl.store(M_ABSMAX + rows, m_abs, mask=rmask)
        tl.store(V_ABSMAX + rows, v_abs, mask=rmask)
    else:
        tl.store(M + offs, m, mask=smask)
        tl.store(V + offs, v, mask=smask)


# ----------------------------------------------------------------------------------------------
# launchers and the reference step
# ----------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Segment starts in the flat state buffers are multiples of this many elements (and of the
# blocksize): 64 B for codes, 256 B for float32 states, so every segment is 16-byte aligned.
_SEG_ALIGN = 64
# Gradient check: programs of 16 x 1024 elements (64 KB of float32 gradient each). Few programs
# keep the two atomics per program cheap (~2.6 K programs for the 42 M adapter elements of
# Llama-3.1-8B), and 16 loads in flight per thread are enough to stream at full bandwidth.
_CHECK_TILE, _CHECK_CHUNKS = 1024, 16
_REDUCE = 1024  # tensors per step of the last program's loops


def _f32(x: float) -> float:
    """x rounded once to float32, to nearest (what a float kernel argument receives)."""
    return float(np.float32(x))


@lru_cache(maxsize=64)
def _constants(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> dict:
    """The float32 scalars both paths use, each rounded once from float64."""
    b1, b2 = betas
    return dict(
        lr=_f32(lr),
        beta1=_f32(b1),
        one_minus_beta1=_f32(1.0 - b1),
        beta2=_f32(b2),
        one_minus_beta2=_f32(1.0 - b2),
        # log2(0) = -inf gives bc = 1 - exp2(-inf) = 1: beta = 0 means no bias correction needed
        log2_beta1=_f32(math.log2(b1)) if b1 > 0 else -math.inf,
        log2_beta2=_f32(math.log2(b2)) if b2 > 0 else -math.inf,
        eps=_f32(eps),
        decay=_f32(1.0 - lr * weight_decay),
    )


@lru_cache(maxsize=64)
def _scalar_args(lr: float, betas: tuple[float, float], eps: float, wd: float) -> tuple:
    c = _constants(lr, betas, eps, wd)
    return (c["lr"], c["beta1"], c["one_minus_beta1"], c["beta2"], c["one_minus_beta2"],
            c["log2_beta1"], c["log2_beta2"], c["eps"], c["decay"])  # fmt: skip


def _tile(n_total: int, n_max: int, qblock: int, device: torch.device) -> tuple[int, int]:
    """(BLOCKS, num_warps) of the update kernel for tensors of n_total elements, largest n_max.

    Memory-bound (about 16 B per element for float32 params: p r/w 8, g 4, codes r/w 4): enough
    elements per program (up to 4096) to amortize the per-block absmax and table loads, and
    enough programs (two per SM) to fill the card when there is little work (a lone 16 x 4096
    LoRA matrix: 128 programs of 512); no wider than the largest tensor, whose last tile is
    masked. Not autotuned: the kernel updates its arguments in place, so timing candidates would
    apply the step several times.
    """
    elems = max(256, min(4096, next_power_of_2(triton.cdiv(n_total, 2 * num_sms(device)))))
    elems = min(elems, max(qblock, next_power_of_2(n_max)))
    blocks = max(1, elems // qblock)
    return blocks, 4 if qblock * blocks >= 1024 else 2


def _device_ctx(device: torch.device):
    if device.type == "cuda" and device.index is not None:
        if device.index != torch.cuda.current_device():
            return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch_update(
    ptrs: torch.Tensor,
    tab: torch.Tensor,
    prog: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    step: torch.Tensor,
    skip: torch.Tensor,
    scalars: tuple,
    meta: dict,
    compiled: dict | None,
) -> None:
    """One update launch over the programs of ``prog`` ([2, P] int32). ``compiled``: the
    direct-launch cache of the caller, whose tables and state buffers stay the same between
    calls (so the meta's ALIGNED is all that varies)."""
    n_tensors, n_programs = tab.shape[1], prog.shape[1]
    m, v, m_absmax, v_absmax = state
    quant = meta["QUANT"]
    dev = m.device
    m_qmap, m_mid = _tables(dev, True) if quant else (m, m)
    v_qmap, v_mid = _tables(dev, False) if quant else (m, m)
    args = (ptrs, tab, prog, m, v, m_absmax, v_absmax, m_qmap, m_mid, v_qmap, v_mid, step, skip,
            n_tensors, n_programs, *scalars)  # fmt: skip
    # the tables and state buffers are fixed for a compiled dict's owner; only ALIGNED varies
    if compiled is None:  # a one-off launch (adamw8bit_step): the JIT's own dispatch
        _adamw8bit_kernel[(n_programs,)](*args, **meta)
    else:
        _direct_launch(_adamw8bit_kernel, (n_programs,), args, meta, compiled, (meta["ALIGNED"],))


def _sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    return x.double().sqrt().to(torch.float32)


def adamw8bit_step_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    blocksize: int,
    skip: torch.Tensor | None = None,
) -> None:
    """The same step as the kernel in plain PyTorch (CPU path and test oracle), in place (the
    state tensors are overwritten, not replaced).

    ``state["step"]`` already holds the count after this step; ``skip`` (0/1 tensor) leaves
    everything unchanged when 1.
    """
    if skip is not None and bool(skip):
        return
    c = {k: torch.tensor(v, dtype=torch.float32, device=param.device) for k, v in
         _constants(lr, tuple(betas), eps, weight_decay).items()}  # fmt: skip
    n = param.numel()
    g = grad.detach().reshape(-1).to(torch.float32)
    p = param.detach().reshape(-1).to(torch.float32)
    quant = "exp_avg_q" in state
    if quant:
        m = dequantize_blockwise_ref(state["exp_avg_q"], state["exp_avg_absmax"], blocksize, True)
        v = dequantize_blockwise_ref(
            state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], blocksize, False
        )
    else:
        m, v = state["exp_avg"], state["exp_avg_sq"]
    m = c["beta1"] * m + c["one_minus_beta1"] * g
    v = c["beta2"] * v + c["one_minus_beta2"] * (g * g)
    t = state["step"].to(torch.float32)
    bc1 = 1.0 - torch.exp2(t * c["log2_beta1"])
    bc2 = 1.0 - torch.exp2(t * c["log2_beta2"])
    step_size = c["lr"] / bc1
    # torch's vectorized float32 sqrt on CPU is not correctly rounded; the float64 root rounded
    # once to float32 is (53 >= 2 * 24 + 2 bits), and equals the kernel's IEEE sqrt_rn
    denom = _sqrt_f32(v) / _sqrt_f32(bc2) + c["eps"]
    p = p * c["decay"] - step_size * (m / denom)
    param.data.copy_(p.view(param.shape).to(param.dtype))
    if quant:
        assert state["exp_avg_q"].numel() == n
        for key, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
            codes, absmax = quantize_blockwise_ref(x, blocksize, signed)
            state[key + "_q"].copy_(codes)
            state[key + "_absmax"].copy_(absmax)
    else:
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)


def adamw8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    blocksize: int,
    skip: torch.Tensor,
) -> None:
    """One step for one parameter: the Triton kernel on CUDA (or under the interpreter when
    forced), else :func:`adamw8bit_step_ref`. Same contract as the reference (the optimizer
    steps all its tensors together; this is the one-tensor form)."""
    if not _use_triton(param, grad):
        adamw8bit_step_ref(
            param, grad, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            blocksize=blocksize, skip=skip,
        )  # fmt: skip
        return
    dev = param.device
    contiguous = param.is_contiguous()
    work = param.detach() if contiguous else param.detach().contiguous()
    g = grad.detach().contiguous()
    quant = "exp_avg_q" in state
    if quant:
        bufs = tuple(state[k] for k in ("exp_avg_q", "exp_avg_sq_q", "exp_avg_absmax",
                                        "exp_avg_sq_absmax"))  # fmt: skip
        qblock = blocksize
    else:
        bufs = (state["exp_avg"], state["exp_avg_sq"], state["exp_avg"], state["exp_avg"])
        qblock = 256
    n = work.numel()
    blocks, warps = _tile(n, n, qblock, dev)
    n_programs = triton.cdiv(triton.cdiv(n, qblock), blocks)
    addrs = [work.data_ptr(), g.data_ptr()] + [b.data_ptr() for b in bufs[:2]]
    aligned = n % 16 == 0 and all(a % 16 == 0 for a in addrs)
    # [ptrs (2) | numel, segment 0, step slot 0]; pageable -> device copies are staged at once
    host = torch.tensor(addrs[:2] + [n, 0, 0], dtype=torch.int64)
    table = host.to(dev, non_blocking=True)
    prog = torch.zeros(2, n_programs, dtype=torch.int32, device=dev)
    prog[1] = torch.arange(0, n_programs * blocks, blocks, dtype=torch.int32, device=dev)
    meta = dict(QBLOCK=qblock, BLOCKS=blocks, QUANT=quant, P_DTYPE=_TL_DTYPES[work.dtype],
                G_DTYPE=_TL_DTYPES[g.dtype], ALIGNED=aligned, num_warps=warps,
                enable_fp_fusion=False)  # fmt: skip
    step = state["step"].reshape(1)
    with _device_ctx(dev):
        _launch_update(table[:2].view(2, 1), table[2:].view(3, 1), prog, bufs, step, skip,
                       _scalar_args(lr, tuple(betas), eps, weight_decay), meta, None)  # fmt: skip
    if not contiguous:
        param.data.copy_(work)


# ----------------------------------------------------------------------------------------------
# flat state storage and the per-step plan
# ----------------------------------------------------------------------------------------------


def _nonfinite_flag(grads: list[torch.Tensor]) -> torch.Tensor:
    """float32 0-dim tensor: 1.0 when any gradient's float32 L2 norm is inf/NaN, else 0.0
    (the reference path's form of the gradient check kernel). No host synchronization."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    finite = [torch.stack(torch._foreach_norm(gs)).isfinite().all() for gs in by_dtype.values()]
    all_finite = finite[0] if len(finite) == 1 else torch.stack(finite).all()
    return (~all_finite).to(torch.float32)


class _Bucket:
    """The states of the parameters of one group, dtype and kind (8-bit or 32-bit) on one
    device, in flat buffers: parameter j's segment starts at ``segs[j]`` elements, a multiple
    of the blocksize (so no quantization block straddles two tensors) and of _SEG_ALIGN; its
    absmax entries start at segs[j] / blocksize."""

    def __init__(self, group: int, dtype: torch.dtype, quant: bool, blocksize: int, device):
        self.group, self.dtype, self.quant = group, dtype, quant
        self.blocksize = blocksize
        self.qblock = blocksize if quant else 256  # quantization block, or just the tile width
        self.align = max(blocksize, _SEG_ALIGN) if quant else _SEG_ALIGN
        self.device = device
        self.numels: list[int] = []
        self.segs: list[int] = []
        self.size = 0

    def add(self, n: int) -> int:
        self.numels.append(n)
        self.segs.append(self.size)
        self.size += triton.cdiv(n, self.align) * self.align
        return len(self.segs) - 1

    def allocate(self) -> None:
        kw = dict(device=self.device)
        if self.quant:
            # fresh states: m = 0 is code 127 of the signed map, v = 0 code 0 of the unsigned one
            self.m = torch.full((self.size,), _SIGNED_ZERO_CODE, dtype=torch.uint8, **kw)
            self.v = torch.zeros(self.size, dtype=torch.uint8, **kw)
            self.m_absmax = torch.zeros(self.size // self.blocksize, dtype=torch.float32, **kw)
            self.v_absmax = torch.zeros(self.size // self.blocksize, dtype=torch.float32, **kw)
        else:
            self.m = torch.zeros(self.size, dtype=torch.float32, **kw)
            self.v = torch.zeros(self.size, dtype=torch.float32, **kw)
            self.m_absmax = self.v_absmax = self.m  # unused by the 32-bit kernel
        for buf in (self.m, self.v, self.m_absmax, self.v_absmax):
            assert buf.data_ptr() % 16 == 0, "allocator returned a misaligned buffer"

    def views(self, j: int) -> dict[str, torch.Tensor]:
        s, n = self.segs[j], self.numels[j]
        if not self.quant:
            return {"exp_avg": self.m[s : s + n], "exp_avg_sq": self.v[s : s + n]}
        a, nb = s // self.blocksize, triton.cdiv(n, self.blocksize)
        return {
            "exp_avg_q": self.m[s : s + n],
            "exp_avg_absmax": self.m_absmax[a : a + nb],
            "exp_avg_sq_q": self.v[s : s + n],
            "exp_avg_sq_absmax": self.v_absmax[a : a + nb],
        }


class _Storage:
    """Every state of one device: buckets of flat buffers plus one float32 vector of step
    counters. ``opt.state[p]`` holds views into them (what state_dict() saves); a layout change
    (new parameters with state, a loaded state_dict) builds a new storage and copies the states
    over."""

    def __init__(self, device, entries: list[tuple[int, torch.Tensor, bool]], groups, state):
        self.device = device
        self.signature = tuple((gi, id(p), p.dtype, p.numel(), quant) for gi, p, quant in entries)
        self.state = state
        buckets: dict[tuple, _Bucket] = {}
        where = []
        for gi, p, quant in entries:
            key = (gi, p.dtype, quant)
            if key not in buckets:
                buckets[key] = _Bucket(gi, p.dtype, quant, groups[gi]["blocksize"], device)
            where.append((buckets[key], buckets[key].add(p.numel())))
        self.buckets = list(buckets.values())
        for b in self.buckets:
            b.allocate()
        self.steps = torch.zeros(len(entries), dtype=torch.float32, device=device)
        self.slot: dict[int, tuple[int, int, int]] = {}  # id(p) -> (bucket, index in it, step)
        self.views: list[tuple[dict, dict]] = []
        index = {id(b): i for i, b in enumerate(self.buckets)}
        for i, ((_, p, _), (bucket, j)) in enumerate(zip(entries, where)):
            views = bucket.views(j)
            views["step"] = self.steps[i]
            st = state[p]
            for key, view in views.items():
                if key in st:  # an existing state (a loaded one, or from an older layout)
                    view.copy_(st[key].reshape(view.shape))
            st.update(views)
            self.slot[id(p)] = (index[id(bucket)], j, i)
            self.views.append((st, views))

    def holds(self, signature: tuple, state) -> bool:
        """Whether this storage is the current layout of ``signature``'s states."""
        return (
            signature == self.signature
            and state is self.state
            and all(all(st.get(k) is v for k, v in views.items()) for st, views in self.views)
        )


class _DevicePlan:
    """The tensors stepped together on one device (parameters with a gradient), with the
    tables the kernels read, built once and reused while the set of tensors stays the same."""

    def __init__(self, device, storage: _Storage, active: list[tuple[int, torch.Tensor]]):
        self.device = device
        self.storage = storage
        self.groups = [gi for gi, _ in active]
        self.params = [p for _, p in active]
        self.slots = [storage.slot[id(p)] for p in self.params]
        self.gdtypes = [p.grad.dtype for p in self.params]
        # a gradient dtype may differ from the parameter's only where grad_dtype allows it;
        # then the dtypes are compared every step (else torch guarantees them)
        self.check_dtypes = any(
            getattr(p, "grad_dtype", p.dtype) != p.dtype or g != p.dtype
            for p, g in zip(self.params, self.gdtypes)
        )
        self.kernel_tables: dict | None = None

    # -- the reference path (CPU, or forced) -------------------------------------------------

    def grads(self) -> list[torch.Tensor] | None:
        grads = list(map(_GRAD, self.params))
        if any(g is None for g in grads):
            return None
        if self.check_dtypes and [g.dtype for g in grads] != self.gdtypes:
            return None
        return grads

    def step_reference(self, grads: list[torch.Tensor], groups: list[dict]) -> None:
        views = self.storage.views
        states = [views[s][1] for _, _, s in self.slots]
        skip = _nonfinite_flag(grads)
        keep = 1.0 - skip
        torch._foreach_add_([st["step"] for st in states], [keep] * len(states))
        for gi, p, g, st in zip(self.groups, self.params, grads, states):
            h = groups[gi]
            adamw8bit_step_ref(
                p, g, st, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                weight_decay=h["weight_decay"], blocksize=h["blocksize"], skip=skip,
            )  # fmt: skip

    # -- the Triton path --------------------------------------------------------------------

    def _build_kernel_tables(self) -> dict:
        """Device tables for this set of tensors (non-blocking uploads; once per plan)."""
        dev = self.device
        n = len(self.params)
        numels = [p.numel() for p in self.params]
        buckets = self.storage.buckets
        segs = [buckets[b].segs[j] for b, j, _ in self.slots]
        slots = [s for _, _, s in self.slots]
        tab = torch.tensor([numels, segs, slots], dtype=torch.int64).to(dev, non_blocking=True)

        def upload(rows: list[list[int]]) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.int32).view(2, -1).to(dev, non_blocking=True)

        # update launches: one per (bucket, gradient dtype)
        members: dict[tuple[int, torch.dtype], list[int]] = defaultdict(list)
        for t, ((b, _, _), gd) in enumerate(zip(self.slots, self.gdtypes)):
            members[(b, gd)].append(t)
        updates = []
        for (b, gd), ts in members.items():
            bucket = buckets[b]
            sizes = [numels[t] for t in ts]
            blocks, warps = _tile(sum(sizes), max(sizes), bucket.qblock, dev)
            prog_t, prog_b = [], []
            for t, size in zip(ts, sizes):
                k = triton.cdiv(triton.cdiv(size, bucket.qblock), blocks)
                prog_t += [t] * k
                prog_b += range(0, k * blocks, blocks)
            meta = dict(QBLOCK=bucket.qblock, BLOCKS=blocks, QUANT=bucket.quant,
                        P_DTYPE=_TL_DTYPES[bucket.dtype], G_DTYPE=_TL_DTYPES[gd],
                        num_warps=warps, enable_fp_fusion=False)  # fmt: skip
            state = (bucket.m, bucket.v, bucket.m_absmax, bucket.v_absmax)
            updates.append((bucket, upload([prog_t, prog_b]), state, meta, {},
                            all(s % 16 == 0 for s in sizes)))  # fmt: skip
        # gradient check launches: one per gradient dtype, all sharing one ticket counter
        chunk = _CHECK_TILE * _CHECK_CHUNKS
        by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
        for t, gd in enumerate(self.gdtypes):
            by_dtype[gd].append(t)
        checks = []
        for gd, ts in by_dtype.items():
            prog_t, prog_c = [], []
            for t in ts:
                k = triton.cdiv(numels[t], chunk)
                prog_t += [t] * k
                prog_c += range(k)
            meta = dict(G_DTYPE=_TL_DTYPES[gd], TILE=_CHECK_TILE, CHUNKS=_CHECK_CHUNKS,
                        REDUCE=_REDUCE, num_warps=4)  # fmt: skip
            checks.append((upload([prog_t, prog_c]), meta, {},
                           all(numels[t] % 16 == 0 for t in ts)))  # fmt: skip
        return dict(
            tab=tab,
            ptrs=torch.zeros(2, n, dtype=torch.int64, device=dev),
            host_ptrs=None,  # the addresses last uploaded
            aligned=False,
            param_ptrs=None,  # the parameters' own addresses when their layout was last checked
            param_shapes=[(p.dtype, p.numel()) for p in self.params],  # what the tables assume
            noncontig=[],
            updates=updates,
            checks=checks,
            total_checks=sum(c[0].shape[1] for c in checks),
            sumsq=torch.zeros(n, dtype=torch.float32, device=dev),
            counter=torch.zeros(1, dtype=torch.int32, device=dev),
            skip=torch.zeros(1, dtype=torch.float32, device=dev),
        )

    def prepare_kernels(self) -> tuple | None:
        """Gather this step's addresses and upload them if they changed (no host sync).

        Returns what must stay alive until the launches are queued (contiguous copies) and the
        (parameter, contiguous work copy) pairs to copy back, or None when the plan no longer
        fits (a gradient went away, became sparse or changed dtype)."""
        kt = self.kernel_tables
        if kt is None:
            kt = self.kernel_tables = self._build_kernel_tables()
        params = self.params
        grads = list(map(_GRAD, params))
        try:
            gptrs = list(map(_DATA_PTR, grads))
        except (TypeError, RuntimeError):  # None, or a gradient without strided storage
            return None
        if self.check_dtypes and [g.dtype for g in grads] != self.gdtypes:
            return None
        hold = []
        if not all(map(_IS_CONTIGUOUS, grads)):
            for t, g in enumerate(grads):
                if not g.is_contiguous():
                    hold.append(g.contiguous())
                    gptrs[t] = hold[-1].data_ptr()
        pptrs = list(map(_DATA_PTR, params))
        if pptrs != kt["param_ptrs"]:  # first step, or a parameter was given new storage
            # new storage may also mean a new dtype or size (p.data = p.data.half()): the
            # tables and state layout were built for the old ones, so the plan must be rebuilt
            shapes = [(p.dtype, p.numel()) for p in params]
            if kt["param_shapes"] != shapes:
                return None
            kt["param_ptrs"] = pptrs
            kt["noncontig"] = [t for t, p in enumerate(params) if not p.is_contiguous()]
        work = []
        if kt["noncontig"]:
            pptrs = list(pptrs)
            for t in kt["noncontig"]:
                w = params[t].detach().contiguous()
                work.append((params[t], w))
                pptrs[t] = w.data_ptr()
        host = pptrs + gptrs
        if host != kt["host_ptrs"]:
            arr = np.array(host, dtype=np.int64)
            kt["aligned"] = int(np.bitwise_or.reduce(arr)) % 16 == 0
            # a pageable host -> device copy is staged before it returns: no sync, and the
            # array may go away
            kt["ptrs"].copy_(torch.from_numpy(arr).view(2, -1), non_blocking=True)
            kt["host_ptrs"] = host
        return hold, work

    def step_kernels(self, prepared: tuple, groups: list[dict]) -> None:
        kt = self.kernel_tables
        _, work = prepared
        ptrs, tab, steps, skip = kt["ptrs"], kt["tab"], self.storage.steps, kt["skip"]
        n = tab.shape[1]
        with _device_ctx(self.device):
            for prog, meta, compiled, n16 in kt["checks"]:
                aligned = kt["aligned"] and n16
                args = (ptrs, tab, prog, kt["sumsq"], kt["counter"], skip, steps, n,
                        prog.shape[1], kt["total_checks"])  # fmt: skip
                _direct_launch(_grad_check_kernel, (prog.shape[1],), args,
                               {**meta, "ALIGNED": aligned}, compiled, (aligned,))  # fmt: skip
            for bucket, prog, state, meta, compiled, n16 in kt["updates"]:
                h = groups[bucket.group]
                scalars = _scalar_args(h["lr"], tuple(h["betas"]), h["eps"], h["weight_decay"])
                meta = {**meta, "ALIGNED": kt["aligned"] and n16}
                _launch_update(ptrs, tab, prog, state, steps, skip, scalars, meta, compiled)
        for p, w in work:
            p.data.copy_(w)


_GRAD = operator.attrgetter("grad")
_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous


class _Plan:
    """Per-device plans plus what they were built from (checked at every step, cheaply)."""

    def __init__(self, opt: torch.optim.Optimizer, devices: list[_DevicePlan], idle: list):
        self.devices = devices
        self.idle = idle  # parameters without a gradient at build time
        self.state = opt.state
        self.n_state = len(opt.state)
        self.param_groups = opt.param_groups
        self.param_lists = [(g["params"], len(g["params"])) for g in opt.param_groups]

    def current(self, opt: torch.optim.Optimizer) -> bool:
        groups = opt.param_groups
        if (
            opt.state is not self.state
            or len(opt.state) != self.n_state
            or groups is not self.param_groups
            or len(groups) != len(self.param_lists)
        ):
            return False
        for g, (params, n) in zip(groups, self.param_lists):
            if g["params"] is not params or len(params) != n:
                return False
        return all(p.grad is None for p in self.idle)


# ----------------------------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------------------------


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise-quantized moments (module docstring: format, math, policy).

    Args:
        params: parameters or parameter groups (float32/float16/bfloat16).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay is decoupled; the
            default here is 0.0).
        blocksize: elements per quantization block (power of two, 64..4096).
        min_8bit_size: parameters with fewer elements keep float32 moments.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        blocksize: int = 256,
        min_8bit_size: int = 4096,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            blocksize=blocksize,
            min_8bit_size=min_8bit_size,
        )
        _check_hparams(defaults)
        self._plan: _Plan | None = None
        self._storage: dict = {}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        # unpickling, deepcopy and load_state_dict: the layout is rebuilt at the next step
        super().__setstate__(state)
        self._plan, self._storage = None, {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hparams(group)
        for p in group["params"]:
            if not p.is_floating_point() or p.dtype not in _PARAM_DTYPES:
                raise TypeError(
                    f"AdamW8bit params must be float32, float16 or bfloat16, got {p.dtype}"
                )
        self._plan = None

    def _make_plan(self) -> _Plan:
        """Validate the gradients, create the states of parameters stepped for the first time,
        (re)pack the states into flat buffers where the layout changed, and build the plans."""
        entries: dict[torch.device, list] = defaultdict(list)
        active: dict[torch.device, list] = defaultdict(list)
        idle = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.numel() == 0:
                    continue
                g, st = p.grad, self.state.get(p)
                if g is None:
                    idle.append(p)
                    if not st:
                        continue
                elif g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                elif g.dtype not in _PARAM_DTYPES:
                    raise TypeError(f"AdamW8bit gradients must be floating point, got {g.dtype}")
                quant = "exp_avg_q" in st if st else p.numel() >= group["min_8bit_size"]
                entries[p.device].append((gi, p, quant))
                if g is not None:
                    active[p.device].append((gi, p))
        storage = {}
        for dev, ents in entries.items():
            old = self._storage.get(dev)
            signature = tuple((gi, id(p), p.dtype, p.numel(), quant) for gi, p, quant in ents)
            if old is not None and old.holds(signature, self.state):
                storage[dev] = old
            else:
                storage[dev] = _Storage(dev, ents, self.param_groups, self.state)
        self._storage = storage
        devices = [_DevicePlan(dev, storage[dev], act) for dev, act in active.items()]
        return _Plan(self, devices, idle)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "AdamW8bit.step cannot be captured in a CUDA graph (its pointer tables are "
                "uploaded from the host when tensors change); use torch.optim.AdamW(..., "
                "capturable=True) for captured steps"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for _attempt in range(2):
            plan = self._plan
            if plan is None or not plan.current(self):
                plan = self._plan = self._make_plan()
            work = []
            for dp in plan.devices:
                if _use_triton(dp.params[0]):
                    work.append((dp, True, dp.prepare_kernels()))
                else:
                    work.append((dp, False, dp.grads()))
            if all(w[2] is not None for w in work):
                break
            self._plan = None  # the gradients no longer fit the plan: rebuild once
        else:  # pragma: no cover - a fresh plan always fits the gradients it was built from
            raise RuntimeError("AdamW8bit: could not build a step plan")
        for dp, kernels, prepared in work:
            if kernels:
                dp.step_kernels(prepared, self.param_groups)
            else:
                dp.step_reference(prepared, self.param_groups)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, keeping the float32 states in float32.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the parameter's
        dtype (it assumes moments live in the parameter dtype); ours are float32 by design
        (absmax, small-tensor moments, step), so they are restored from the saved tensors. They
        are packed into the flat layout at the next step.
        """
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        for saved_group, group in zip(saved_groups, self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                if pid not in saved_state:
                    continue
                st = self.state[p]
                for key, value in saved_state[pid].items():
                    if isinstance(value, torch.Tensor):
                        dtype = torch.float32 if value.is_floating_point() else value.dtype
                        # a copy: stepping must not write into the caller's state_dict
                        st[key] = value.detach().to(device=p.device, dtype=dtype).clone()
                _check_loaded_state(st, p, group)


def _check_loaded_state(st: dict, p: torch.Tensor, group: dict) -> None:
    n = p.numel()
    if "step" not in st:
        raise ValueError("loaded state has no 'step'")
    if "exp_avg_q" in st:
        nb = triton.cdiv(n, group["blocksize"])
        shapes = {k: tuple(st[k].shape) for k in _QUANT_KEYS}
        want = {"exp_avg_q": (n,), "exp_avg_sq_q": (n,)}
        want.update(exp_avg_absmax=(nb,), exp_avg_sq_absmax=(nb,))
        if shapes != want or st["exp_avg_q"].dtype != torch.uint8:
            raise ValueError(
                f"loaded 8-bit state does not fit a parameter of {n} elements with blocksize "
                f"{group['blocksize']}: shapes {shapes}, expected {want}"
            )
    elif all(k in st for k in _FP32_KEYS):
        if any(st[k].numel() != n for k in _FP32_KEYS):
            raise ValueError(f"loaded 32-bit state does not fit a parameter of {n} elements")
    else:
        raise ValueError(f"loaded state has unknown keys {sorted(st)}")
    st["step"] = st["step"].reshape(())


def _check_hparams(h: dict) -> None:
    lr, betas, eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
    if isinstance(lr, torch.Tensor) or not isinstance(lr, (int, float)) or not lr >= 0.0:
        raise ValueError(f"lr must be a float >= 0, got {lr!r}")
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if not isinstance(wd, (int, float)) or not wd >= 0.0:
        raise ValueError(f"weight_decay must be a float >= 0, got {wd!r}")
    _check_blocksize(h["blocksize"])
    ms = h["min_8bit_size"]
    if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {ms!r}")
