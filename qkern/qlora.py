"""QLoRA linear: a frozen NF4/FP4 weight plus a trainable low-rank adapter.

Math (x: [..., K], W: [N, K] stored 4-bit, A: [r, K], B: [N, r], s = alpha/r or alpha/sqrt(r)):

    y  = x·Wᵀ + s·(d(x)·Aᵀ)·Bᵀ (+ bias)        d = inverted dropout: d(x) = x ⊙ m / (1-p)
    u  = dY·B                                   [M, r], computed once, used twice
    dX = dY·W + s·(u·A) ⊙ m / (1-p)             (without dropout: dY·W + s·u·A)
    dA = s·uᵀ·d(x)      dB = s·dYᵀ·(d(x)·Aᵀ)     dbias = Σ_rows dY

d(x)·Aᵀ ([M, r], tiny) is kept from the forward for dB. W never gets a gradient.

Two execution strategies, chosen by the number of rows M of x (all leading dims flattened):

* **M > NF4_MATMUL_MAX_M (training)**: W is dequantized once per forward and once per backward
  into a cached, reused workspace (one buffer per device/dtype/slot, sized for the largest weight
  seen), then cuBLAS does the big GEMM. At M=8192, 4096x4096 the GEMM is 2·M·N·K = 275 GFLOP
  ≈ 0.40 ms at ~690 TFLOP/s, while writing the bf16 W is 32 MiB ≈ 15 µs at ~3 TB/s (< 4%);
  a fused dequant-in-the-mainloop GEMM could at best save those 15 µs and would have to match
  cuBLAS on Hopper (wgmma/TMA) to win, so dequant+cuBLAS is the design for large M.
  The adapter adds two skinny GEMMs (r=16): x·Aᵀ reads x once (64 MiB, ~22 µs) and the
  s·t·Bᵀ term is written straight into the output buffer, which the big GEMM then accumulates
  into (beta=1), so no separate add pass exists (see ``_LORA_FIRST``).
* **M <= NF4_MATMUL_MAX_M (decode, small batches)**: ``nf4_matmul``, a Triton kernel that
  streams the packed bytes once and dequantizes in registers; the bf16 weight never exists.
  Reading 4096x4096 NF4 is 8.4 MB (+0.26 MB absmax) ≈ 3 µs at 3 TB/s, against 33.5 MB for the
  bf16 weight: split-K over many programs keeps all SMs streaming (see ``_nf4_matmul_kernel``).

Dropout: the mask is never stored. The forward draws a 31-bit seed from the CPU generator and
a Philox counter-based generator (``tl.rand(seed, m*K + k)``) rebuilds the same mask in the
backward. Storing it would cost M·K bytes (bool) per layer — 32 MiB at M=8192, K=4096, as much
as half the layer's input — while regenerating costs only ALU in kernels that read x anyway
(the forward's x·Aᵀ and the backward's dA both stream x and apply the mask in registers, so
d(x) is never materialised in memory). Drawing the seed from the CPU generator keeps
activation checkpointing exact: ``torch.utils.checkpoint`` restores the CPU RNG state before
recomputing. The reference path (CPU) uses ``torch.rand`` instead, so the two backends draw
different masks for the same torch seed; ``lora_dropout_mask`` rebuilds the Triton path's mask.

Limits:
* compute dtype = x.dtype in {float16, bfloat16, float32}; A, B (and bias) are in x.dtype or
  float32 (cast to x.dtype for the matmuls; their gradients come back in their own dtype).
* ``nf4_matmul`` needs K % 32 == 0 (chunks of 32 or 64 elements that never straddle a quant
  block, for any blocksize >= 32); other K fall back to dequant + matmul. Any N and M.
* the workspace and the split-K scratch are per device and assume one CUDA stream: do not run
  two qkern QLoRA ops concurrently on different streams of one device.
* the dropout kernels are tuned for r <= 128 (larger r works, with register spills).
* GPU numbers: see docs/kernels/qlora.md ("Measured"); block-size candidates are Hopper guesses
  until measured.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from torch import nn

from qkern._backend import (
    check_float,
    check_same_device,
    interpreter_enabled,
    next_power_of_2,
    num_sms,
    pick_configs,
    use_triton,
)

# _block_absmax: the format module's own block-scale decode, shared so the fused kernel rounds
# exactly like dequantize_4bit (double quant: two fp32 roundings, never an FMA)
from qkern.nf4 import QuantState, _block_absmax, dequantize_4bit, quantize_4bit

# Largest number of rows for which the forward uses the fused small-M kernel instead of
# dequant + cuBLAS. The fused kernel reads 4 bits per weight instead of 16 (+ the dequant write),
# so it wins while the GEMM is memory bound; past some M the tensor-core GEMM on the bf16 weight
# is faster. Provisional value; bench_qlora's "crossover" rows measure it on the card.
NF4_MATMUL_MAX_M = 32

# Order of the two GEMMs that produce y in the large-M forward (and dX in the backward):
# True: the skinny LoRA GEMM writes s·t·Bᵀ (+bias) into y, then the big GEMM accumulates into it
# (cuBLAS beta=1 reads y in its epilogue, overlapped with the mainloop). False: the big GEMM
# writes y, then the skinny GEMM reads and rewrites it (one extra M·N read + write, ~42 µs at
# 8192x4096 bf16). bench_qlora times both.
_LORA_FIRST = True


# --------------------------------------------------------------------------------------------
# Reused buffers
# --------------------------------------------------------------------------------------------

_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _cached_buffer(key: tuple, numel: int, dtype: torch.dtype, device: torch.device, zero=False):
    """A flat buffer of at least ``numel`` elements, kept between calls under ``key``.

    Grows (never shrinks) to the largest request, so a model whose layers have a few weight
    shapes allocates the largest once, not one buffer per layer or per shape.
    """
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACES.pop(key, None)
        buf = (torch.zeros if zero else torch.empty)(max(numel, 1), dtype=dtype, device=device)
        _WORKSPACES[key] = buf
    return buf


def clear_workspaces() -> None:
    """Free every cached dequantization workspace and split-K scratch buffer."""
    _WORKSPACES.clear()


def dequant_workspace(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype, slot: int = 0
) -> torch.Tensor:
    """W dequantized to ``dtype`` into a cached buffer, as an [N, K] view.

    The view is valid until the next call with the same (device, dtype, slot): use it within one
    op's forward or backward and never keep it. Ops that need two weights at once use two slots.
    """
    numel = math.prod(state.shape)
    buf = _cached_buffer(("dequant", packed.device, dtype, slot), numel, dtype, packed.device)
    out = buf[:numel].view(tuple(state.shape))
    dequantize_4bit(packed, state, out=out)
    return out


def _move_state(state: QuantState, device: torch.device) -> QuantState:
    """The same quant state with every tensor field on ``device`` (dtypes unchanged)."""
    changes = {}
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if isinstance(v, torch.Tensor) and v.device != device:
            changes[f.name] = v.to(device)
    return dataclasses.replace(state, **changes) if changes else state


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


def _nf4_matmul_configs() -> list:
    # BLOCK_N rows of W per program; a program streams BLOCK_N x CHUNK/2 bytes per iteration
    # (64 rows x 32 B = 2 KiB at blocksize 64). Several resident programs per SM plus split-K
    # keep enough bytes in flight to approach the bandwidth.
    cfgs = [(64, 4, 2), (128, 4, 2), (128, 8, 3), (256, 8, 2)]
    return pick_configs(
        [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in cfgs]
    )


_NF4_CONFIGS = _nf4_matmul_configs()
_NF4_BLOCK_NS = [c.kwargs["BLOCK_N"] for c in _NF4_CONFIGS]


@triton.autotune(configs=_NF4_CONFIGS, key=["N", "K", "BLOCK_M"])
@triton.jit
def _nf4_matmul_kernel(
    x_ptr,
    q_ptr,
    absmax_ptr,
    nabs_ptr,
    ncode_ptr,
    code_ptr,
    bias_ptr,
    y_ptr,
    part_ptr,
    lock_ptr,
    M,
    N,
    K,
    row_bytes,
    stride_xm,
    stride_ym,
    offset,
    BLOCKSIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    IS_FP32: tl.constexpr,
    EXACT_MUL: tl.constexpr,
):
    """y[m, n] = Σ_k x[m, k] · W[n, k] (+ bias[n]) with W read from the packed 4-bit codes.

    W[n, k] = dtype(code[nibble(n·K + k)] · absmax[(n·K + k) // BLOCKSIZE]); flat element e lives
    in byte e // 2, high nibble when e is even. K % CHUNK == 0 and CHUNK | BLOCKSIZE, so each
    CHUNK-wide piece of a row starts at an even flat index and lies inside one quant block: per
    iteration a program loads a [BLOCK_N, CHUNK/2] byte tile (even columns in the high nibbles,
    odd columns in the low ones) and one absmax per row.

    Grid (N tiles, splits, M tiles): split s covers a contiguous range of CHUNKs of K. With more
    than one split, each program stores its fp32 partial tile, then bumps a per-tile counter; the
    program that arrives last sums the partials in split order (deterministic), adds the bias,
    writes y and resets the counter to 0 for the next launch.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    n_split = tl.num_programs(1)
    HALF: tl.constexpr = CHUNK // 2
    dt = x_ptr.dtype.element_ty

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rc = tl.arange(0, HALF)
    n_ok = rn < N
    m_ok = rm < M
    row_start = rn.to(tl.int64) * K  # flat element index of W[n, 0]
    # byte offsets built from row_bytes = K/2 (a multiple of 16, which the compiler is told
    # through argument specialisation) and c·HALF, so each row's HALF bytes load as 16 B vectors
    row_byte = rn.to(tl.int64) * row_bytes

    n_chunks = K // CHUNK
    per_split = tl.cdiv(n_chunks, n_split)
    c_begin = pid_s * per_split
    c_end = tl.minimum(c_begin + per_split, n_chunks)

    x_rows = x_ptr + rm[:, None] * stride_xm
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    for c in range(c_begin, c_end):
        k0 = c * CHUNK
        el = row_start + k0
        byte_ptrs = q_ptr + (row_byte + c * HALF)[:, None] + rc[None, :]
        packed = tl.load(byte_ptrs, mask=n_ok[:, None], other=0)
        am = _block_absmax(
            el // BLOCKSIZE, n_ok, absmax_ptr, nabs_ptr, ncode_ptr, offset, DOUBLE_QUANT, EXACT_MUL
        )
        hi = (packed >> 4).to(tl.int32)
        lo = (packed & 15).to(tl.int32)
        w_even = (tl.load(code_ptr + hi) * am[:, None]).to(dt)  # W[:, k0 + 2j]
        w_odd = (tl.load(code_ptr + lo) * am[:, None]).to(dt)  # W[:, k0 + 2j + 1]
        xk = k0 + 2 * rc
        x_even = tl.load(x_rows + xk[None, :], mask=m_ok[:, None], other=0.0)
        x_odd = tl.load(x_rows + (xk + 1)[None, :], mask=m_ok[:, None], other=0.0)
        if USE_DOT:
            if IS_FP32:
                acc = tl.dot(x_even, tl.trans(w_even), acc=acc, input_precision="ieee")
                acc = tl.dot(x_odd, tl.trans(w_odd), acc=acc, input_precision="ieee")
            else:
                acc = tl.dot(x_even, tl.trans(w_even), acc=acc)
                acc = tl.dot(x_odd, tl.trans(w_odd), acc=acc)
        else:
            # one row of x: plain FMAs, reduced over the chunk axis once at the end
            acc2 += w_even.to(tl.float32) * x_even.to(tl.float32)
            acc2 += w_odd.to(tl.float32) * x_odd.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(acc2, axis=1)[None, :]

    out_mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if n_split == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(dt), mask=out_mask)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        tl.store(part_ptr + (pid_s * M + rm)[:, None] * N + rn[None, :], acc, mask=out_mask)
        # every thread's partial store happens before the (single-thread) release of the counter
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1)
        if arrived == n_split - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, n_split):
                total += tl.load(
                    part_ptr + (s * M + rm)[:, None] * N + rn[None, :],
                    mask=out_mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(dt), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


def _dropout_configs() -> list:
    # Skinny GEMMs against r <= 128 columns: memory bound on x (M·K elements). BLOCK_M x BLOCK_K
    # tiles of x (32x128 bf16 = 8 KiB) per iteration; the r columns stay in registers.
    cfgs = [(32, 64, 4, 2), (32, 128, 4, 3), (64, 128, 8, 3)]
    return pick_configs(
        [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in cfgs
        ]
    )


@triton.jit
def _dropped(x, rows, cols, K, seed, p, scale, dt: tl.constexpr):
    """d(x) = x / (1 - p) where Philox rand(seed, row·K + col) >= p, else 0; rounded to ``dt``."""
    keep = tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p
    return tl.where(keep, x.to(tl.float32) * scale, 0.0).to(dt)


@triton.autotune(configs=_dropout_configs(), key=["K", "R_PAD"])
@triton.jit
def _lora_down_dropout_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    M,
    K,
    R,
    stride_xm,
    seed,
    p,
    scale,
    R_PAD: tl.constexpr,
    IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """t[m, j] = Σ_k d(x)[m, k] · A[j, k]: the adapter's down projection of the dropped-out
    input, with the mask generated in registers (d(x) never touches memory)."""
    pid = tl.program_id(0)
    dt = x_ptr.dtype.element_ty
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    r_ok = rr < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        xd = _dropped(x, rm, rk, K, seed, p, scale, dt)
        # other=0 matters: a garbage value times a zero of x would still poison the sum
        a_t = tl.load(
            a_ptr + rr[None, :] * K + rk[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0
        )
        if IS_FP32:
            acc = tl.dot(xd, a_t, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(xd, a_t, acc=acc)
    tl.store(t_ptr + rm[:, None] * R + rr[None, :], acc.to(dt), mask=m_ok[:, None] & r_ok[None, :])


@triton.autotune(configs=_dropout_configs(), key=["K", "R_PAD"])
@triton.jit
def _lora_grad_a_dropout_kernel(
    u_ptr,
    x_ptr,
    part_ptr,
    M,
    K,
    R,
    stride_xm,
    rows_per_split,
    seed,
    p,
    scale,
    R_PAD: tl.constexpr,
    IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """part[s, j, k] = Σ_{m in split s} u[m, j] · d(x)[m, k], with u = dY·B.

    Grid (K tiles, row splits); the host sums the fp32 partials over s in a fixed order. The mask
    is regenerated from the forward's seed, so d(x) is again never stored.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    k_ok = rk < K
    r_ok = rr < R
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = rm < m_end
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        xd = _dropped(x, rm, rk, K, seed, p, scale, dt)
        u = tl.load(
            u_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )
        if IS_FP32:
            acc = tl.dot(tl.trans(u), xd, acc=acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(u), xd, acc=acc)
    tl.store(
        part_ptr + (pid_s * R + rr)[:, None] * K + rk[None, :],
        acc,
        mask=r_ok[:, None] & k_ok[None, :],
    )


@triton.autotune(configs=_dropout_configs(), key=["K", "R_PAD"])
@triton.jit
def _lora_grad_x_dropout_kernel(
    dx_ptr,
    u_ptr,
    a_ptr,
    M,
    K,
    R,
    seed,
    p,
    scale,
    scaling,
    R_PAD: tl.constexpr,
    IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx[m, k] += s · (u·A)[m, k] · m[m, k] / (1-p): the adapter's input gradient, masked like
    the forward's input, added to dY·W already in dx (u·A is never stored)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    dt = dx_ptr.dtype.element_ty
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    k_ok = rk < K
    r_ok = rr < R
    u = tl.load(u_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0)
    a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0)
    if IS_FP32:
        v = tl.dot(u, a, input_precision="ieee")
    else:
        v = tl.dot(u, a)
    v = (v * scaling).to(dt)  # s·(u·A) rounded to the compute dtype, as a separate GEMM would be
    offs = rm[:, None] * K + rk[None, :]
    mask = m_ok[:, None] & k_ok[None, :]
    keep = tl.rand(seed, offs) >= p
    dx = tl.load(dx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dx += tl.where(keep, v.to(tl.float32) * scale, 0.0)
    tl.store(dx_ptr + offs, dx.to(dt), mask=mask)


@triton.jit
def _dropout_mask_kernel(out_ptr, n, seed, p, BLOCK: tl.constexpr):
    """out[e] = rand(seed, e) >= p for flat index e = m·K + k: the kept-element mask."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, offs) >= p
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < n)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _nf4_chunk(k: int, blocksize: int) -> int | None:
    """Elements of a row handled per kernel iteration, or None when K is unsupported."""
    for chunk in (64, 32):
        if k % chunk == 0 and blocksize % chunk == 0:
            return chunk
    return None


def nf4_matmul_supported(in_features: int, state: QuantState) -> bool:
    """Whether ``nf4_matmul`` runs its fused kernel for this weight (else dequant + matmul)."""
    return _nf4_chunk(in_features, state.blocksize) is not None


def _nf4_matmul_launch(
    x2: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    m, k = x2.shape
    n = state.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device) if out is None else out
    if m == 0:
        return y
    chunk = _nf4_chunk(k, state.blocksize)
    if m == 1:
        block_m, use_dot = 1, False
    else:
        block_m, use_dot = min(64, max(16, next_power_of_2(m))), True
    m_tiles = triton.cdiv(m, block_m)
    n_chunks = k // chunk
    # ~4 programs per SM: enough bytes in flight per SM to hide DRAM latency. 4096x4096 at
    # BLOCK_N=128: 32 N tiles x 16 splits of 4 chunks = 512 programs of 128 rows x 256 columns.
    target = 4 * num_sms(x2.device)

    def splits(block_n: int) -> int:
        s = min(n_chunks, max(1, triton.cdiv(target, triton.cdiv(n, block_n) * m_tiles)))
        return triton.cdiv(n_chunks, triton.cdiv(n_chunks, s))  # no empty split

    max_split = max(splits(bn) for bn in _NF4_BLOCK_NS)
    part = _cached_buffer(("nf4mm_part", x2.device), max_split * m * n, torch.float32, x2.device)
    n_locks = m_tiles * triton.cdiv(n, min(_NF4_BLOCK_NS))
    locks = _cached_buffer(("nf4mm_lock", x2.device), n_locks, torch.int32, x2.device, zero=True)
    dq = state.double_quant
    absmax = state.absmax
    nabs = state.nested_absmax if dq else absmax
    ncode = state.nested_code if dq else state.code
    offset = float(state.offset) if dq and state.offset is not None else 0.0

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), splits(meta["BLOCK_N"]), m_tiles)

    _nf4_matmul_kernel[grid](
        x2,
        packed,
        absmax,
        nabs,
        ncode,
        state.code,
        bias if bias is not None else y,
        y,
        part,
        locks,
        m,
        n,
        k,
        k // 2,
        x2.stride(0),
        y.stride(0),
        offset,
        BLOCKSIZE=state.blocksize,
        CHUNK=chunk,
        DOUBLE_QUANT=dq,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        USE_DOT=use_dot,
        IS_FP32=x2.dtype == torch.float32,
        EXACT_MUL=not interpreter_enabled(),  # inline PTX mul.rn on the GPU only
    )
    return y


def _r_pad(r: int) -> int:
    return max(16, next_power_of_2(r))


def _lora_down_dropout(x2: torch.Tensor, a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """t = d(x)·Aᵀ with the mask of ``seed`` ([M, r], x2.dtype)."""
    m, k = x2.shape
    r = a.shape[0]
    t = torch.empty(m, r, dtype=x2.dtype, device=x2.device)
    if m == 0:
        return t
    _lora_down_dropout_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
        x2,
        a,
        t,
        m,
        k,
        r,
        x2.stride(0),
        seed,
        p,
        _dropout_scale(p),
        R_PAD=_r_pad(r),
        IS_FP32=x2.dtype == torch.float32,
    )
    return t


def _lora_grad_a_dropout(
    u: torch.Tensor, x2: torch.Tensor, p: float, seed: int, scaling: float
) -> torch.Tensor:
    """s·uᵀ·d(x) in fp32 ([r, K])."""
    m, k = x2.shape
    r = u.shape[1]
    if m == 0:
        return torch.zeros(r, k, dtype=torch.float32, device=x2.device)
    # Split the rows so that (K tiles x splits) gives ~4 programs per SM; each split's fp32
    # partial is r x K (256 KiB at r=16, K=4096), summed by the host in split order.
    target = 4 * num_sms(x2.device)
    k_tiles_min = triton.cdiv(k, 128)
    n_split = max(1, min(triton.cdiv(m, 128), triton.cdiv(target, k_tiles_min)))
    rows_per_split = triton.cdiv(m, n_split)
    n_split = triton.cdiv(m, rows_per_split)
    part = torch.empty(n_split, r, k, dtype=torch.float32, device=x2.device)
    _lora_grad_a_dropout_kernel[lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), n_split)](
        u,
        x2,
        part,
        m,
        k,
        r,
        x2.stride(0),
        rows_per_split,
        seed,
        p,
        _dropout_scale(p),
        R_PAD=_r_pad(r),
        IS_FP32=x2.dtype == torch.float32,
    )
    return part.sum(0).mul_(scaling)


def _lora_grad_x_dropout_(
    dx: torch.Tensor, u: torch.Tensor, a: torch.Tensor, p: float, seed: int, scaling: float
) -> None:
    """dx += s·(u·A) ⊙ mask / (1-p), in place ([M, K], contiguous)."""
    m, k = dx.shape
    r = u.shape[1]
    if m == 0:
        return
    _lora_grad_x_dropout_kernel[
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))
    ](
        dx,
        u,
        a,
        m,
        k,
        r,
        seed,
        p,
        _dropout_scale(p),
        scaling,
        R_PAD=_r_pad(r),
        IS_FP32=dx.dtype == torch.float32,
    )


def lora_dropout_mask(
    seed: int, shape: tuple[int, int], p: float, device: torch.device | str
) -> torch.Tensor:
    """The keep-mask (bool, ``shape`` = (M, K)) that the Triton path draws for ``seed`` and ``p``.

    Element (m, k) is kept when Philox ``rand(seed, m·K + k) >= p``; kept elements are scaled by
    1/(1 - p). This is how tests (and users) recover the mask a training step used.
    """
    m, k = shape
    out = torch.empty(m * k, dtype=torch.int8, device=device)
    block = 1024
    if m * k:
        _dropout_mask_kernel[(triton.cdiv(m * k, block),)](out, m * k, seed, p, BLOCK=block)
    return out.view(m, k).bool()


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _validate(x, packed, state, lora_a, lora_b, scaling, bias, dropout) -> None:
    check_float(x, "x")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    if len(state.shape) != 2:
        raise ValueError(f"state.shape must be [out_features, in_features], got {state.shape}")
    n, k = (int(d) for d in state.shape)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 tensor of 4-bit codes")
    if packed.numel() != (n * k + 1) // 2:
        raise ValueError(
            f"packed has {packed.numel()} bytes but the quant state's shape ({n}, {k}) needs "
            f"{(n * k + 1) // 2}"
        )
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x.shape[-1] must equal in_features={k} of the quantized weight ({n}, {k}), "
            f"got x.shape={tuple(x.shape)}"
        )
    allowed = (x.dtype, torch.float32)
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (or both None)")
    if lora_a is not None:
        check_float(lora_a, "lora_a", allowed)
        check_float(lora_b, "lora_b", allowed)
        if lora_a.dtype != lora_b.dtype:
            raise TypeError(f"lora_a ({lora_a.dtype}) and lora_b ({lora_b.dtype}) dtypes differ")
        if lora_a.dim() != 2 or lora_a.shape[1] != k:
            raise ValueError(f"lora_a must be (r, in_features={k}), got {tuple(lora_a.shape)}")
        if lora_b.dim() != 2 or lora_b.shape[0] != n:
            raise ValueError(f"lora_b must be (out_features={n}, r), got {tuple(lora_b.shape)}")
        if lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(
                f"rank mismatch: lora_a has r={lora_a.shape[0]} rows, lora_b has "
                f"r={lora_b.shape[1]} columns"
            )
        if lora_a.shape[0] == 0:
            raise ValueError("lora rank r=0: pass lora_a=None, lora_b=None for no adapter")
        if not math.isfinite(float(scaling)):
            raise ValueError(f"scaling must be finite, got {scaling}")
    if bias is not None:
        check_float(bias, "bias", allowed)
        if bias.shape != (n,):
            raise ValueError(f"bias must be (out_features={n},), got {tuple(bias.shape)}")
    if not 0.0 <= float(dropout) <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    check_same_device(x=x, packed=packed, lora_a=lora_a, lora_b=lora_b, bias=bias)
    if state.absmax.device != packed.device:
        raise ValueError(
            f"quant state tensors are on {state.absmax.device} but packed is on "
            f"{packed.device}: move the state with the weight"
        )


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class _QLoRALinearFunction(torch.autograd.Function):
    """y2 = x2·Wᵀ + s·(d(x2)·Aᵀ)·Bᵀ + bias on 2-D x2 [M, K]; see the module docstring."""

    @staticmethod
    def forward(ctx, x2, packed, state, lora_a, lora_b, scaling, bias, p, seed, small_m):
        dt = x2.dtype
        m, k = x2.shape
        n = state.shape[0]
        has_lora = lora_a is not None
        a = lora_a.to(dt) if has_lora else None
        b = lora_b.to(dt) if has_lora else None
        bias_c = bias.to(dt) if bias is not None else None
        t = None
        if has_lora:
            t = _lora_down_dropout(x2, a, p, seed) if p > 0 else x2 @ a.t()

        if small_m:
            y = _nf4_matmul_launch(x2, packed, state, bias_c)
            if has_lora:
                y.addmm_(t, b.t(), alpha=scaling)
        else:
            w = dequant_workspace(packed, state, dt)
            if has_lora and _LORA_FIRST:
                if bias_c is not None:
                    y = torch.addmm(bias_c, t, b.t(), alpha=scaling)
                else:
                    y = torch.empty(m, n, dtype=dt, device=x2.device)
                    y.addmm_(t, b.t(), beta=0, alpha=scaling)
                y.addmm_(x2, w.t())
            else:
                y = torch.addmm(bias_c, x2, w.t()) if bias_c is not None else x2 @ w.t()
                if has_lora:
                    y.addmm_(t, b.t(), alpha=scaling)

        need_a = has_lora and ctx.needs_input_grad[3]
        need_b = has_lora and ctx.needs_input_grad[4]
        ctx.save_for_backward(
            x2 if need_a else None,  # only dA reads x (the mask comes from the seed)
            t if need_b else None,
            lora_a,
            lora_b,
            packed,
        )
        ctx.state, ctx.scaling, ctx.p, ctx.seed = state, scaling, p, seed
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, t, lora_a, lora_b, packed = ctx.saved_tensors
        state, s, p, seed = ctx.state, ctx.scaling, ctx.p, ctx.seed
        need_x, need_a, need_b = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[3],
            ctx.needs_input_grad[4],
        )
        need_bias = ctx.needs_input_grad[6]
        g = gy.contiguous()
        dt = g.dtype
        m, n = g.shape
        k = state.shape[1]
        has_lora = lora_a is not None
        dx = da = db = dbias = None

        u = None
        if has_lora and (need_x or need_a):
            u = g @ lora_b.to(dt)  # [M, r], shared by dX and dA
        if need_x:
            w = dequant_workspace(packed, state, dt)
            if has_lora and p == 0:
                # dX = s·u·A + dY·W: the skinny GEMM writes, the big one accumulates (beta=1)
                dx = torch.empty(m, k, dtype=dt, device=g.device)
                dx.addmm_(u, lora_a.to(dt), beta=0, alpha=s)
                dx.addmm_(g, w)
            else:
                dx = g @ w
                if has_lora:
                    # the adapter saw d(x): its input gradient is masked and scaled like x was
                    _lora_grad_x_dropout_(dx, u, lora_a.to(dt), p, seed, s)
        if need_a:
            if p > 0:
                da = _lora_grad_a_dropout(u, x2, p, seed, s)
            else:
                da = torch.empty(u.shape[1], k, dtype=dt, device=g.device)
                da.addmm_(u.t(), x2, beta=0, alpha=s)
            da = da.to(lora_a.dtype)
        if need_b:
            db = torch.empty(n, t.shape[1], dtype=dt, device=g.device)
            db.addmm_(g.t(), t, beta=0, alpha=s)
            db = db.to(lora_b.dtype)
        if need_bias:
            dbias = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, None, None, da, db, None, dbias, None, None, None


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def qlora_linear_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = True,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch QLoRA linear (autograd does the backward); computes in x.dtype.

    W = dequantize_4bit(...) in fp32, cast to x.dtype (the same rounding as dequantizing straight
    to x.dtype, and exact in float64). Dropout (when ``training`` and p > 0) keeps elements where
    ``dropout_mask`` is True (drawn with ``torch.rand`` when None) and scales them by 1/(1-p),
    rounding x·(1/(1-p)) to x.dtype once as the kernels do.
    """
    w = dequantize_4bit(packed, state, dtype=torch.float32).to(x.dtype)
    y = x @ w.t()
    if lora_a is not None:
        xd = x
        if training and dropout > 0:
            if dropout_mask is None:
                dropout_mask = torch.rand(x.shape, device=x.device) >= dropout
            wide = torch.promote_types(x.dtype, torch.float32)
            scaled = (x.to(wide) * _dropout_scale(dropout)).to(x.dtype)
            xd = torch.where(dropout_mask.view(x.shape), scaled, torch.zeros_like(x))
        y = y + scaling * ((xd @ lora_a.to(x.dtype).t()) @ lora_b.to(x.dtype).t())
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _draw_seed() -> int:
    # CPU generator: no device sync, and restored by torch.utils.checkpoint before recompute
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def qlora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = True,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ (+ bias), W given as packed 4-bit codes + ``state``.

    ``lora_a`` (r, in) and ``lora_b`` (out, r) get gradients, ``bias`` only if it requires grad,
    W never. ``x`` may have any leading shape; its dtype is the compute dtype. Dropout applies
    when ``training`` and ``dropout`` > 0; ``dropout_seed`` fixes the Triton path's mask
    (see :func:`lora_dropout_mask`), otherwise a seed is drawn from the CPU generator.
    Without an adapter (lora_a = lora_b = None) this is the frozen 4-bit linear.
    """
    _validate(x, packed, state, lora_a, lora_b, scaling, bias, dropout)
    has_lora = lora_a is not None
    p = float(dropout) if (training and has_lora) else 0.0
    if not use_triton(x, packed, lora_a, lora_b, bias):
        return qlora_linear_ref(x, packed, state, lora_a, lora_b, scaling, bias, p, True)
    n, k = (int(d) for d in state.shape)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != k):
        x2 = x2.contiguous()
    seed = 0
    if p > 0:
        seed = _draw_seed() if dropout_seed is None else int(dropout_seed)
    small_m = x2.shape[0] <= NF4_MATMUL_MAX_M and nf4_matmul_supported(k, state)
    y2 = _QLoRALinearFunction.apply(
        x2, packed, state, lora_a, lora_b, float(scaling), bias, p, seed, small_m
    )
    return y2.view(*x.shape[:-1], n)


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x·Wᵀ (+ bias) reading W straight from its packed 4-bit codes (no dequantized copy).

    For small M (decode); any leading shape of x; ``out`` (optional) is a contiguous
    [..., out_features] buffer of x's dtype. Needs K % 32 == 0 (see :func:`nf4_matmul_supported`);
    other K, and CPU tensors outside the interpreter, fall back to dequant + matmul. No autograd:
    use :func:`qlora_linear` for training.
    """
    _validate(x, packed, state, None, None, 1.0, bias, 0.0)
    n, k = (int(d) for d in state.shape)
    out_shape = (*x.shape[:-1], n)
    if out is not None and (
        tuple(out.shape) != out_shape or out.dtype != x.dtype or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous {out_shape} tensor of {x.dtype}, got "
            f"{tuple(out.shape)} of {out.dtype}"
        )
    x2 = x.reshape(-1, k).contiguous()
    y2 = None if out is None else out.view(-1, n)
    bias_c = bias.to(x.dtype) if bias is not None else None
    if use_triton(x, packed, bias) and nf4_matmul_supported(k, state):
        y2 = _nf4_matmul_launch(x2, packed, state, bias_c, y2)
    else:
        w = dequantize_4bit(packed, state, dtype=torch.float32).to(x.dtype)
        res = torch.addmm(bias_c, x2, w.t()) if bias_c is not None else x2 @ w.t()
        y2 = res if y2 is None else y2.copy_(res)
    return y2.view(out_shape)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


class QLoRALinear(nn.Module):
    """A linear layer with a frozen 4-bit weight and an optional LoRA adapter.

    ``packed`` (uint8 buffer) and ``quant_state`` hold W [out_features, in_features]; the state's
    tensors follow the module through ``.to()``/``.cuda()`` (and keep their dtypes). ``bias`` is
    a frozen Parameter (or None). ``add_adapter`` creates ``lora_A`` (r, in) and ``lora_B``
    (out, r), the only trainable parameters by default.
    """

    def __init__(
        self, packed: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if not isinstance(quant_state, QuantState):
            raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
        if len(quant_state.shape) != 2:
            raise ValueError(
                f"quant_state.shape must be [out_features, in_features], got {quant_state.shape}"
            )
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise TypeError("packed must be a uint8 tensor of 4-bit codes")
        self.out_features, self.in_features = (int(d) for d in quant_state.shape)
        if packed.numel() != (self.out_features * self.in_features + 1) // 2:
            raise ValueError(
                f"packed has {packed.numel()} bytes, quant state shape {tuple(quant_state.shape)} "
                f"needs {(self.out_features * self.in_features + 1) // 2}"
            )
        self.register_buffer("packed", packed)
        self.quant_state = _move_state(quant_state, packed.device)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(
                    f"bias must be (out_features={self.out_features},), got {tuple(bias.shape)}"
                )
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.r = 0
        self.scaling = 0.0
        self.lora_dropout = 0.0

    @classmethod
    def from_linear(
        cls,
        linear_or_weight: nn.Linear | torch.Tensor,
        bias: torch.Tensor | None = None,
        blocksize: int = 64,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
    ) -> QLoRALinear:
        """Quantize an ``nn.Linear`` (or a [out, in] weight tensor) into a QLoRALinear."""
        if isinstance(linear_or_weight, nn.Linear):
            weight = linear_or_weight.weight
            if bias is None and linear_or_weight.bias is not None:
                bias = linear_or_weight.bias
        elif isinstance(linear_or_weight, torch.Tensor):
            weight = linear_or_weight
        else:
            raise TypeError(
                "from_linear takes an nn.Linear or a weight tensor, got "
                f"{type(linear_or_weight).__name__}"
            )
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        packed, state = quantize_4bit(
            weight.detach(),
            blocksize=blocksize,
            quant_type=quant_type,
            compress_statistics=compress_statistics,
        )
        return cls(packed, state, None if bias is None else bias.detach())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # the buffer moved with fn; the state follows its device but keeps its own dtypes
        self.quant_state = _move_state(self.quant_state, self.packed.device)
        return self

    def add_adapter(
        self,
        r: int,
        lora_alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Create (or replace) the adapter: B = 0, A Kaiming-uniform(a=√5) like PEFT, or
        Gaussian with std 1/r (``init="gaussian"``). s = alpha/r, or alpha/√r with rsLoRA."""
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        dev = self.packed.device
        a = torch.empty(r, self.in_features, dtype=torch.float32, device=dev)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        else:
            nn.init.normal_(a, std=1.0 / r, generator=generator)
        self.lora_A = nn.Parameter(a.to(dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=dev))
        self.r = r
        self.scaling = float(lora_alpha) / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = float(dropout)

    def base_weight(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dequantized frozen weight W [out_features, in_features] in ``dtype``."""
        if out is not None:
            if out.shape != (self.out_features, self.in_features) or out.dtype != dtype:
                raise ValueError(
                    f"out must be ({self.out_features}, {self.in_features}) of {dtype}, got "
                    f"{tuple(out.shape)} of {out.dtype}"
                )
            return dequantize_4bit(self.packed, self.quant_state, out=out)
        return dequantize_4bit(self.packed, self.quant_state, dtype=dtype)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W + s·B·A computed in fp32, returned in ``dtype``."""
        w = self.base_weight(torch.float32)
        if self.r > 0:
            w.addmm_(self.lora_B.float(), self.lora_A.float(), alpha=self.scaling)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 and (self.lora_A is not None or self.lora_B is not None):
            raise ValueError("r=0 but lora_A/lora_B are set: call add_adapter to set r")
        return qlora_linear(
            x,
            self.packed,
            self.quant_state,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.bias,
            self.lora_dropout,
            training=self.training,
        )

    def extra_repr(self) -> str:
        st = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"quant_type={st.quant_type}, blocksize={st.blocksize}, "
            f"double_quant={st.double_quant}, bias={self.bias is not None}, r={self.r}, "
            f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout:g}"
        )
