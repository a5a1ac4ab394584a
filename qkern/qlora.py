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
  ≈ 0.40 ms at ~690 TFLOP/s, while writing the bf16 W is 32 MiB ≈ 10 µs at ~4 TB/s (< 3%);
  a fused dequant-in-the-mainloop GEMM could at best save those µs and would have to match
  cuBLAS on Hopper (wgmma/TMA) to win, so dequant+cuBLAS is the design for large M.
  The adapter adds two skinny GEMMs (r=16): x·Aᵀ reads x once (64 MiB, ~16 µs) and the
  s·t·Bᵀ term is written straight into the output buffer, which the big GEMM then accumulates
  into (beta=1), so no separate add pass exists (see ``_LORA_FIRST``).
* **M <= NF4_MATMUL_MAX_M (decode, small batches)**: ``nf4_matmul``, a Triton split-K kernel
  that streams the packed bytes once and dequantizes them in registers (CUDA-core FMAs for
  M <= 4 or tensor cores from M = 2, or the native CUDA kernel of csrc/nf4_small_m.cu for
  16-bit x where it can run: whichever a one-time timing per shape finds faster);
  the bf16 weight never exists. Reading 4096x4096 NF4 is 8.4 MB
  (+0.26 MB absmax) ≈ 2 µs at 4.2 TB/s, against 33.5 MB for the bf16 weight (see
  ``_nf4_matmul_kernel`` and ``_nf4_plan``). At that size the host time per call matters as
  much: after the first call of a shape, a call validates through caches and runs one direct
  launch and one allocation (see "nf4_matmul host path"); with nothing to differentiate
  (decode, eval) the forward skips the autograd Function.

Dropout: the mask is drawn once per forward by a counter-based generator (Philox4x32-10, one
call per 4 elements, seeded from the CPU generator) inside the kernel that computes d(x)·Aᵀ, so
d(x) never touches memory; that kernel also stores the mask as bits (M·K/8 bytes, 1/16 of a bf16
x) for the two backward kernels (dA, and the masked part of dX). Drawing the seed from the CPU
generator keeps activation checkpointing exact: ``torch.utils.checkpoint`` restores the CPU RNG
state before recomputing. The reference path (CPU) uses ``torch.rand`` instead, so the two
backends draw different masks for the same torch seed; ``lora_dropout_mask`` rebuilds the
Triton path's mask.

Limits:
* compute dtype = x.dtype in {float16, bfloat16, float32}; A, B (and bias) are in x.dtype or
  float32 (cast to x.dtype for the matmuls; their gradients come back in their own dtype).
* ``nf4_matmul`` needs K % 32 == 0 (chunks of 32 or 64 elements that never straddle a quant
  block, for any blocksize >= 32); other K fall back to dequant + matmul. Any N and M (it is
  meant for small M: each 32-row tile of x repeats the dequant work).
* ``nf4_matmul`` rounds differently in its two variants: the FMA one (M <= 4) multiplies by
  the exact float32 weight, the tensor-core one (M >= 2) by the weight rounded to the compute
  dtype, as dequantize_4bit does. For M in 2..4 the tuned choice of the GPU decides which;
  both are within the tolerance of a matmul in the compute dtype. Set ``NF4_MATMUL_CONFIG``
  to fix one.
* the workspace and the split-K scratch are per device and assume one CUDA stream: do not run
  two qkern QLoRA ops concurrently on different streams of one device.
* ``nf4_matmul`` keeps validated launch entries per quant state (see "nf4_matmul host path"):
  change a state by assigning its fields, never by resizing its tensors in place.
* the dropout kernels are tuned for r <= 128 (larger r works, with register spills).
* GPU numbers: see docs/kernels/qlora.md ("Measured").
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref

import torch
import triton
import triton.language as tl
from torch import nn

from qkern import _native
from qkern._backend import (
    check_float,
    check_same_device,
    get_backend,
    interpreter_enabled,
    next_power_of_2,
    num_sms,
    pick_configs,
    use_triton,
)

# _block_absmax: the format module's own block-scale decode, shared so the fused kernel rounds
# exactly like dequantize_4bit (double quant: two fp32 roundings, never an FMA); _plan_for: its
# validation of a (packed, state) pair, cached on the state; _launch: direct launch of a
# compiled kernel (see "nf4_matmul host path")
from qkern.nf4 import (
    QuantState,
    _block_absmax,
    _launch,
    _plan_for,
    dequantize_4bit,
    quantize_4bit,
)

# Largest number of rows for which the forward uses the fused small-M kernel instead of
# dequant + cuBLAS. The fused kernel reads 4 bits per weight instead of 16 plus the dequant pass;
# its cost is the dequant ALU per weight (FMA GEMV for M <= 2, tensor cores for M <= 32 in one
# row tile), flat in M up to 32 rows and growing per 32-row tile after that, while dequant +
# cuBLAS costs ~10 µs (4096x4096) / ~35 µs (14336x4096) of dequant on an H200 plus a bf16 GEMM
# that is flat in M. Measured on an H200 (bench_qlora's "crossover" rows): the fused kernel still
# wins at 16 rows (27.3 vs 27.7 µs at 4096x4096, 58.6 vs 80.9 µs at 14336x4096) and loses at 32
# (32.3 vs 28.3, 81.0 vs 78.3 µs), so the switch is at 16 (the prediction, 64-128, was wrong:
# the kernel costs 3-4x what its instruction count suggested).
NF4_MATMUL_MAX_M = 16

# Order of the two GEMMs that produce y in the large-M forward (and dX in the backward):
# True: the skinny LoRA GEMM writes s·t·Bᵀ (+bias) into y, then the big GEMM accumulates into it
# (cuBLAS beta=1 reads y in its epilogue, overlapped with the mainloop). False: the big GEMM
# writes y, then the skinny GEMM reads and rewrites it (one extra M·N read + write). Measured on
# an H200 at 4096->4096: True 1.210 ms, False 1.248 ms fwd+bwd.
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
    """Free every cached dequantization workspace, split-K scratch buffer and launch plan."""
    _WORKSPACES.clear()
    _NF4_PLANS.clear()
    _MM_CACHE.clear()


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
# Triton kernels: small-M matmul on the packed weight
# --------------------------------------------------------------------------------------------


@triton.jit
def _unpack_x_pairs(words, X_KIND: tl.constexpr):
    """Two adjacent elements of x from one word, as float32 (exact): (x[2j], x[2j+1]).

    X_KIND 0: bf16 pairs in an int32 (little endian: x[2j] in the low half; a bf16 is the top
    half of a float32, so each half is one shift or mask away). 1: fp16 pairs in an int32.
    2: fp32 pairs in an int64.
    """
    if X_KIND == 0:
        even = (words << 16).to(tl.float32, bitcast=True)
        odd = (words & -65536).to(tl.float32, bitcast=True)
    elif X_KIND == 1:
        even = (words & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        even = words.to(tl.int32).to(tl.float32, bitcast=True)
        odd = (words >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return even, odd


@triton.jit
def _code_pair(packed, code_ptr, code_addr, DECODE: tl.constexpr):
    """The float32 code values of the high and the low nibble of each byte of ``packed``.

    The 16-entry table (64 bytes, one L1 line) is gathered per nibble. DECODE 0: address =
    table + 4·q (one wide multiply-add per lookup). DECODE 1: the table sits at a 64-byte
    aligned address, so entry q lives at ``code_addr | 4·q``: one OR on the low address word,
    fused with the nibble mask into one 3-input logic op.
    """
    b = packed.to(tl.int32)
    if DECODE == 1:
        hi = ((b >> 2) & 0x3C).to(tl.int64)
        lo = ((b << 2) & 0x3C).to(tl.int64)
        w_hi = tl.load((code_addr | hi).to(tl.pointer_type(tl.float32)))
        w_lo = tl.load((code_addr | lo).to(tl.pointer_type(tl.float32)))
    else:
        w_hi = tl.load(code_ptr + (b >> 4))
        w_lo = tl.load(code_ptr + (b & 15))
    return w_hi, w_lo


@triton.jit
def _nf4_sub_fma(
    acc,
    c,
    c_end,
    q_rows,
    rtv,
    n_ok4,
    el_row3,
    n_ok3,
    absmax_ptr,
    nabs_ptr,
    ncode_ptr,
    code_ptr,
    code_addr,
    offset,
    x_rows,
    m_ok4,
    SUB: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EXACT_MUL: tl.constexpr,
    X_KIND: tl.constexpr,
    DECODE: tl.constexpr,
):
    """acc[m, n, t] += absmax(n, c) · Σ_v x[m, k(c, t, v)] · code[q(n, k(c, t, v))] (CUDA cores).

    Sub-chunk c of every row is SUB elements = SUB/2 bytes inside one quant block, seen as a
    [BLOCK_M, BLOCK_N, T, VEC] tile: each thread holds VEC contiguous bytes (one vector load)
    of a row, and sums their 2·VEC products in registers; the block scale multiplies that sum
    once. The [.., T] partial sums stay per thread across the whole K loop (no cross-thread
    reduction until the end). Sub-chunks at or past ``c_end`` add 0 (their bytes load as 0 and
    their scale as 0).
    """
    HALF: tl.constexpr = SUB // 2
    k_ok = rtv * 0 + c < c_end  # [1, 1, T, VEC], constant along VEC: vector loads stay whole
    packed = tl.load(q_rows + c * HALF + rtv, mask=n_ok4 & k_ok, other=0)
    el3 = el_row3 + c * SUB  # [1, BLOCK_N, 1] flat index of the sub-chunk's first element
    am = _block_absmax(
        el3 // BLOCKSIZE,
        n_ok3 & (el3 * 0 + c < c_end),
        absmax_ptr,
        nabs_ptr,
        ncode_ptr,
        offset,
        DOUBLE_QUANT,
        EXACT_MUL,
    )
    words = tl.load(x_rows + c * HALF + rtv, mask=m_ok4 & k_ok, other=0)  # [BLOCK_M, 1, T, VEC]
    x_even, x_odd = _unpack_x_pairs(words, X_KIND)
    w_hi, w_lo = _code_pair(packed, code_ptr, code_addr, DECODE)  # [1, BLOCK_N, T, VEC]
    part = tl.sum(x_even * w_hi + x_odd * w_lo, axis=3)  # [BLOCK_M, BLOCK_N, T], in-thread
    return acc + part * am


@triton.jit
def _sub_tile(c, c_end, q_rows, rh2, n_ok2, k_ok, el_row, n_ok, absmax_ptr, nabs_ptr, ncode_ptr,
              offset, SUB: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
              EXACT_MUL: tl.constexpr):  # fmt: skip
    """The tensor-core variants' [BLOCK_N, SUB/2] packed bytes of sub-chunk c and the rows'
    block scales ([BLOCK_N, 1]); bytes of sub-chunks at or past c_end load as 0."""
    packed = tl.load(q_rows + c * (SUB // 2) + rh2, mask=n_ok2 & k_ok, other=0)
    el = el_row + c * SUB
    am = _block_absmax(
        el // BLOCKSIZE,
        n_ok & (el * 0 + c < c_end),
        absmax_ptr,
        nabs_ptr,
        ncode_ptr,
        offset,
        DOUBLE_QUANT,
        EXACT_MUL,
    )
    return packed, am[:, None]


@triton.jit
def _nf4_sub_dot(
    acc,
    c,
    c_end,
    q_rows,
    rh2,
    n_ok2,
    el_row,
    n_ok,
    absmax_ptr,
    nabs_ptr,
    ncode_ptr,
    code_ptr,
    code_addr,
    offset,
    x_rows,
    m_ok2,
    SUB: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EXACT_MUL: tl.constexpr,
    X_KIND: tl.constexpr,
    DECODE: tl.constexpr,
    cdt: tl.constexpr,
):
    """acc[m, n] += Σ_{k in sub-chunk c} x[m, k] · W[n, k] on tensor cores (BLOCK_M >= 16).

    W[n, k] = cdt(fp32(code · absmax)), rounded once exactly as dequantize_4bit rounds, built
    in registers for the sub-chunk's even and odd columns; two dots (even, odd) accumulate in
    fp32.
    """
    HALF: tl.constexpr = SUB // 2
    k_ok = rh2 * 0 + c < c_end  # [1, HALF]
    packed, am = _sub_tile(c, c_end, q_rows, rh2, n_ok2, k_ok, el_row, n_ok, absmax_ptr,
                           nabs_ptr, ncode_ptr, offset, SUB, BLOCKSIZE, DOUBLE_QUANT,
                           EXACT_MUL)  # fmt: skip
    w_even, w_odd = _code_pair(packed, code_ptr, code_addr, DECODE)  # [BLOCK_N, HALF]
    w_even = (w_even * am).to(cdt)
    w_odd = (w_odd * am).to(cdt)
    words = tl.load(x_rows + c * HALF + rh2, mask=m_ok2 & k_ok, other=0)  # [BLOCK_M, HALF]
    x_even, x_odd = _unpack_x_pairs(words, X_KIND)
    if X_KIND == 2:
        acc = tl.dot(x_even, tl.trans(w_even), acc=acc, input_precision="ieee")
        acc = tl.dot(x_odd, tl.trans(w_odd), acc=acc, input_precision="ieee")
    else:
        acc = tl.dot(x_even.to(cdt), tl.trans(w_even), acc=acc)
        acc = tl.dot(x_odd.to(cdt), tl.trans(w_odd), acc=acc)
    return acc


@triton.jit
def _nf4_sub_dot_t(
    acc,
    c,
    c_end,
    q_rows,
    rh2,
    n_ok2,
    el_row,
    n_ok,
    absmax_ptr,
    nabs_ptr,
    ncode_ptr,
    code_ptr,
    code_addr,
    offset,
    xt_rows,
    rk,
    m_ok_t,
    SUB: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    EXACT_MUL: tl.constexpr,
    X_KIND: tl.constexpr,
    DECODE: tl.constexpr,
    cdt: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """acc[n, m] += Σ_{k in sub-chunk c} W[n, k] · x[m, k]: _nf4_sub_dot with the roles swapped.

    W (rounded exactly as in _nf4_sub_dot) is the dot's first operand, built in registers as
    one [BLOCK_N, SUB] tile (even and odd columns interleaved back into k order), and x the
    second, a [SUB, BLOCK_M] tile loaded transposed in its own dtype: on Hopper the first
    operand of a warpgroup MMA may come from registers, the second must sit in shared memory,
    so only the small x tile takes the trip through shared memory, not the dequantized W.

    PAIRS (16-bit x only): ``code_addr`` is instead the 1 KB table of each byte value's two
    codes already in the compute dtype (_pair_table, 1024-byte aligned): one 4-byte gather per
    byte gives both weights, and the block scale multiplies the MMA's fp32 result for the
    sub-chunk (BLOCK_N x BLOCK_M products) rather than every weight. W is then cdt(code), not
    cdt(code · absmax): the scale is applied in fp32 after the products (same order of error,
    not dequantize_4bit's bits).
    """
    k_ok = rh2 * 0 + c < c_end  # [1, SUB / 2]
    packed, am = _sub_tile(c, c_end, q_rows, rh2, n_ok2, k_ok, el_row, n_ok, absmax_ptr,
                           nabs_ptr, ncode_ptr, offset, SUB, BLOCKSIZE, DOUBLE_QUANT,
                           EXACT_MUL)  # fmt: skip
    if PAIRS:
        # little endian: the low half of a table word is the high nibble's code (element 2j)
        at = (code_addr | (packed.to(tl.int32) << 2).to(tl.int64)).to(tl.pointer_type(tl.int32))
        words = tl.load(at)  # [BLOCK_N, SUB / 2]
        first = words.to(tl.int16).to(cdt, bitcast=True)
        second = (words >> 16).to(tl.int16).to(cdt, bitcast=True)
        w = tl.interleave(first, second)  # [BLOCK_N, SUB] codes, k order
    else:
        w_even, w_odd = _code_pair(packed, code_ptr, code_addr, DECODE)  # [BLOCK_N, SUB / 2]
        w = tl.interleave((w_even * am).to(cdt), (w_odd * am).to(cdt))  # [BLOCK_N, SUB], k order
    xt = tl.load(xt_rows + c * SUB + rk, mask=m_ok_t & (rk * 0 + c < c_end), other=0)
    if PAIRS:
        acc += tl.dot(w, xt) * am
    elif X_KIND == 2:
        acc = tl.dot(w, xt, acc=acc, input_precision="ieee")
    else:
        acc = tl.dot(w, xt, acc=acc)
    return acc


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
    stride_xw,
    stride_ym,
    subs_per_split,
    offset,
    BLOCKSIZE: tl.constexpr,
    SUB: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VEC: tl.constexpr,
    UNROLL: tl.constexpr,
    USE_DOT: tl.constexpr,
    DECODE: tl.constexpr,
    X_KIND: tl.constexpr,
    EXACT_MUL: tl.constexpr,
):
    """y[m, n] = Σ_k x[m, k] · W[n, k] (+ bias[n]), W read as packed 4-bit codes.

    W[n, k] = code[nibble(n·K + k)] · absmax[(n·K + k) // BLOCKSIZE]; byte j of a row holds
    elements 2j (high nibble) and 2j + 1 (low nibble). A program owns BLOCK_N rows of W,
    BLOCK_M rows of x and a contiguous range of sub-chunks of K (split-K); a sub-chunk is SUB
    (32 or 64) elements of a row, inside one quant block, so its scale is decoded once per row.
    The loop body handles UNROLL sub-chunks, whose loads are all in flight together. x is read
    through a word view (one load per two elements, split exactly into the element of the high
    nibble and that of the low one).

    * USE_DOT = 0: CUDA-core FMAs on the exact float32 codes. Each thread streams VEC
      contiguous bytes per row and sub-chunk (16: one 16-byte load) and keeps its partial sums
      in registers for the whole K range; the block scale multiplies each thread's per-block
      sum; the threads' partials are added once at the end. W is never rounded to the compute
      dtype: y is as accurate as a float32 matmul on the dequantized weight (BLOCK_M x the
      FMAs per weight, so for small M).
    * USE_DOT = 1 (BLOCK_M >= 16 rows of x, rows past M masked): W is rounded to the compute
      dtype per sub-chunk exactly as dequantize_4bit rounds it and goes through tensor cores;
      the per-weight cost is the dequant, independent of M.
    * USE_DOT = 2: the same products as y^T = W·x^T (_nf4_sub_dot_t), so W is the operand that
      can stay in registers. USE_DOT = 3: the same with the byte-pair code table (16-bit x;
      it rounds differently, see _nf4_sub_dot_t).

    The launcher passes num_stages = 1: software pipelining would turn the code-table gathers
    into 4-byte asynchronous copies through shared memory.

    Split-K: with more than one split each program stores its fp32 partial tile, then bumps a
    per-tile counter; the program that arrives last sums the partials in split order
    (deterministic), adds the bias, writes y and resets the counter to 0 for the next launch.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    n_split = tl.num_programs(1)
    HALF: tl.constexpr = SUB // 2

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    rn64 = rn.to(tl.int64)
    rm64 = rm.to(tl.int64)
    # row_bytes = K/2 is a multiple of 16 (specialised by the launcher), so each thread's VEC
    # bytes of a row load as one vector
    byte_row = rn64 * row_bytes
    el_row = rn64 * K  # flat index of W[n, 0]
    # x is read as words of two elements (the launcher passes a word-aligned x): the pointer is
    # reinterpreted here, so the host needs no view of x
    if X_KIND == 2:
        x_words = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    else:
        x_words = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    x_rows = x_words + rm64 * stride_xw  # words
    code_addr = code_ptr.to(tl.int64)  # 64-byte aligned when DECODE == 1 (see _code_pair)

    n_sub = K // SUB
    c_begin = pid_s * subs_per_split
    c_end = tl.minimum(c_begin + subs_per_split, n_sub)
    if USE_DOT >= 2:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        rh2 = tl.arange(0, HALF)[None, :]
        q_rows = q_ptr + byte_row[:, None]
        n_ok2 = n_ok[:, None]
        rk = tl.arange(0, SUB)[:, None]  # [SUB, 1]
        xt_rows = x_ptr + (rm64 * stride_xw * 2)[None, :]  # [1, BLOCK_M] elements
        m_ok_t = m_ok[None, :]
        for c in range(c_begin, c_end, UNROLL):
            for u in tl.static_range(UNROLL):
                acc_t = _nf4_sub_dot_t(
                    acc_t, c + u, c_end, q_rows, rh2, n_ok2, el_row, n_ok, absmax_ptr,
                    nabs_ptr, ncode_ptr, code_ptr, code_addr, offset, xt_rows, rk, m_ok_t, SUB,
                    BLOCKSIZE, DOUBLE_QUANT, EXACT_MUL, X_KIND, DECODE, y_ptr.dtype.element_ty,
                    USE_DOT == 3,
                )  # fmt: skip
        total_mn = tl.trans(acc_t)
    elif USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        rh2 = tl.arange(0, HALF)[None, :]
        q_rows = q_ptr + byte_row[:, None]
        n_ok2 = n_ok[:, None]
        x_rows2 = x_rows[:, None]
        m_ok2 = m_ok[:, None]
        for c in range(c_begin, c_end, UNROLL):
            for u in tl.static_range(UNROLL):
                acc = _nf4_sub_dot(
                    acc, c + u, c_end, q_rows, rh2, n_ok2, el_row, n_ok, absmax_ptr, nabs_ptr,
                    ncode_ptr, code_ptr, code_addr, offset, x_rows2, m_ok2, SUB, BLOCKSIZE,
                    DOUBLE_QUANT, EXACT_MUL, X_KIND, DECODE, y_ptr.dtype.element_ty,
                )  # fmt: skip
        total_mn = acc
    else:
        T: tl.constexpr = HALF // VEC
        rt = tl.arange(0, T)
        rv = tl.arange(0, VEC)
        rtv = (rt[:, None] * VEC + rv[None, :])[None, None, :, :]  # [1, 1, T, VEC] byte/word
        q_rows = q_ptr + byte_row[None, :, None, None]  # [1, BLOCK_N, 1, 1]
        n_ok4 = n_ok[None, :, None, None]
        el_row3 = el_row[None, :, None]  # [1, BLOCK_N, 1]
        n_ok3 = n_ok[None, :, None]
        x_rows4 = x_rows[:, None, None, None]  # [BLOCK_M, 1, 1, 1]
        m_ok4 = m_ok[:, None, None, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N, T), dtype=tl.float32)
        for c in range(c_begin, c_end, UNROLL):
            for u in tl.static_range(UNROLL):
                acc = _nf4_sub_fma(
                    acc, c + u, c_end, q_rows, rtv, n_ok4, el_row3, n_ok3, absmax_ptr, nabs_ptr,
                    ncode_ptr, code_ptr, code_addr, offset, x_rows4, m_ok4, SUB, BLOCKSIZE,
                    DOUBLE_QUANT, EXACT_MUL, X_KIND, DECODE,
                )  # fmt: skip
        total_mn = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]: the one cross-thread reduction

    dt = y_ptr.dtype.element_ty
    out_mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = y_ptr + rm64[:, None] * stride_ym + rn[None, :]
    if n_split == 1:
        if HAS_BIAS:
            total_mn += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, total_mn.to(dt), mask=out_mask)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        part_rows = part_ptr + rm64[:, None] * N + rn[None, :]  # split s adds s·M·N
        tl.store(part_rows + pid_s.to(tl.int64) * M * N, total_mn, mask=out_mask)
        # every thread's partial store happens before the (single-thread) release of the counter
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1)
        if arrived == n_split - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, n_split):
                total += tl.load(
                    part_rows + s * M * N, mask=out_mask, other=0.0, cache_modifier=".cg"
                )
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(dt), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


# --------------------------------------------------------------------------------------------
# Triton kernels: LoRA dropout
# --------------------------------------------------------------------------------------------
#
# The keep-mask of element (m, k) comes from one Philox4x32-10 call per 4 elements: with
# k = 128·g + 32·j + i (g a group of 128 columns, j in 0..3 a quarter, i in 0..31), the call
# with counter m·KC + 32·g + i (KC = 32·ceil(K/128) counters per row) gives four 32-bit outputs
# and output j decides column 128·g + 32·j + i: kept when (output >> 1) >= ceil(p·2^31), so
# P(keep) = 1 - ceil(p·2^31)/2^31 (p = 1 drops everything exactly). A kernel working on
# [BLOCK_M, 32]-column quarters uses all four outputs of each call (tl.rand per element would
# spend a whole Philox call, ~90 integer ops, on each element and discard three outputs).
#
# The forward computes the mask once and stores it as bits (1 bit per element: M·K/8 bytes,
# 1/16 of a bf16 x): word m·KW + (k >> 5), bit k & 31, with KW = 4·ceil(K/128) words per row.
# The two backward kernels read the bits instead of re-running Philox.


def _dropout_configs() -> list:
    # Backward kernels: memory bound on x or dx (M·K elements) once the mask is read from bits.
    # BLOCK_M rows x 128 columns per step (32x128 bf16 = 8 KiB), walked in 32-column quarters
    # (one mask word per row); the r columns stay in registers.
    cfgs = [(32, 4, 2), (16, 4, 2), (64, 8, 2), (32, 4, 3)]
    return pick_configs(
        [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in cfgs]
    )


def _down_configs() -> list:
    # the forward walks K in groups of 128 columns (4 Philox quarters); only BLOCK_M varies
    cfgs = [(32, 4), (16, 4), (64, 8)]
    return pick_configs(
        [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=2) for bm, w in cfgs]
    )


@triton.jit
def _down_quarter(
    acc,
    rnd,
    x_ptr,
    a_ptr,
    rm,
    m_ok,
    k0,
    ri,
    rr,
    r_ok,
    K,
    stride_xm,
    thresh,
    scale,
    IS_FP32: tl.constexpr,
):
    """acc += d(x)[:, k0:k0+32] · A[:, k0:k0+32]ᵀ for one quarter, kept where (rnd >> 1) >=
    thresh; returns the new acc and the quarter's 32 keep bits per row as one int32."""
    dt = x_ptr.dtype.element_ty
    cols = k0 + ri
    k_ok = cols < K
    x = tl.load(
        x_ptr + rm[:, None] * stride_xm + cols[None, :],
        mask=m_ok[:, None] & k_ok[None, :],
        other=0.0,
    )
    keep = (rnd >> 1).to(tl.int32) >= thresh
    xd = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(dt)
    # other=0 matters: a garbage value times a zero of x would still poison the sum
    a_t = tl.load(
        a_ptr + rr[None, :] * K + cols[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0
    )
    if IS_FP32:
        acc = tl.dot(xd, a_t, acc=acc, input_precision="ieee")
    else:
        acc = tl.dot(xd, a_t, acc=acc)
    # disjoint bits: their sum is their OR
    word = tl.sum(tl.where(keep, 1 << ri[None, :], 0), axis=1)
    return acc, word


@triton.autotune(configs=_down_configs(), key=["K", "R_PAD"])
@triton.jit
def _lora_down_dropout_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    bits_ptr,
    M,
    K,
    R,
    stride_xm,
    KC,
    KW,
    seed,
    thresh,
    scale,
    R_PAD: tl.constexpr,
    IS_FP32: tl.constexpr,
    WRITE_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """t[m, j] = Σ_k d(x)[m, k] · A[j, k], d(x) = x ⊙ keep / (1-p) built in registers from one
    Philox call per 4 elements (see the section comment); also stores the keep bits."""
    pid = tl.program_id(0)
    dt = x_ptr.dtype.element_ty
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ri = tl.arange(0, 32)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    r_ok = rr < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    ctr_row = rm[:, None] * KC + ri[None, :]
    bits_row = bits_ptr + rm * KW
    for g in range(0, tl.cdiv(K, 128)):
        r0, r1, r2, r3 = tl.randint4x(seed, ctr_row + g * 32)
        k0 = g * 128
        acc, w0 = _down_quarter(
            acc, r0, x_ptr, a_ptr, rm, m_ok, k0, ri, rr, r_ok, K, stride_xm, thresh, scale, IS_FP32
        )
        acc, w1 = _down_quarter(
            acc, r1, x_ptr, a_ptr, rm, m_ok, k0 + 32, ri, rr, r_ok, K, stride_xm, thresh, scale,
            IS_FP32,
        )  # fmt: skip
        acc, w2 = _down_quarter(
            acc, r2, x_ptr, a_ptr, rm, m_ok, k0 + 64, ri, rr, r_ok, K, stride_xm, thresh, scale,
            IS_FP32,
        )  # fmt: skip
        acc, w3 = _down_quarter(
            acc, r3, x_ptr, a_ptr, rm, m_ok, k0 + 96, ri, rr, r_ok, K, stride_xm, thresh, scale,
            IS_FP32,
        )  # fmt: skip
        if WRITE_BITS:
            tl.store(bits_row + 4 * g, w0, mask=m_ok)
            tl.store(bits_row + 4 * g + 1, w1, mask=m_ok)
            tl.store(bits_row + 4 * g + 2, w2, mask=m_ok)
            tl.store(bits_row + 4 * g + 3, w3, mask=m_ok)
    tl.store(t_ptr + rm[:, None] * R + rr[None, :], acc.to(dt), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _keep_quarter(bits_ptr, rm, m_ok, word, ri, KW):
    """Keep-mask [BLOCK_M, 32] of columns 32·word + ri from the stored bits: one int32 per row."""
    w = tl.load(bits_ptr + rm * KW + word, mask=m_ok, other=0)
    return ((w[:, None] >> ri[None, :]) & 1) != 0


@triton.jit
def _grad_a_quarter(
    acc, u_t, x_ptr, bits_ptr, rm, m_ok, k0, ri, K, stride_xm, KW, scale, IS_FP32: tl.constexpr
):
    """acc [R_PAD, 32] += uᵀ · d(x)[:, k0:k0+32] for one 32-column quarter."""
    dt = x_ptr.dtype.element_ty
    cols = k0 + ri
    x = tl.load(
        x_ptr + rm[:, None] * stride_xm + cols[None, :],
        mask=m_ok[:, None] & (cols < K)[None, :],
        other=0.0,
    )
    keep = _keep_quarter(bits_ptr, rm, m_ok, k0 // 32, ri, KW)
    xd = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(dt)
    if IS_FP32:
        acc = tl.dot(u_t, xd, acc=acc, input_precision="ieee")
    else:
        acc = tl.dot(u_t, xd, acc=acc)
    return acc


@triton.autotune(configs=_dropout_configs(), key=["K", "R_PAD"])
@triton.jit
def _lora_grad_a_dropout_kernel(
    u_ptr,
    x_ptr,
    bits_ptr,
    part_ptr,
    M,
    K,
    R,
    stride_xm,
    KW,
    rows_per_split,
    scale,
    scaling,
    R_PAD: tl.constexpr,
    IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """part[s, j, k] = s_lora · Σ_{m in split s} u[m, j] · d(x)[m, k], with u = dY·B.

    Grid (groups of 128 columns, row splits); the host sums the fp32 partials over s in a fixed
    order. The mask comes from the forward's bits, one int32 per row and 32-column quarter, so
    d(x) is again never stored.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    k0 = pid_k * 128
    ri = tl.arange(0, 32)
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(m_begin + rows_per_split, M)
    acc0 = tl.zeros((R_PAD, 32), dtype=tl.float32)
    acc1 = tl.zeros((R_PAD, 32), dtype=tl.float32)
    acc2 = tl.zeros((R_PAD, 32), dtype=tl.float32)
    acc3 = tl.zeros((R_PAD, 32), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = rm < m_end
        u = tl.load(
            u_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )
        u_t = tl.trans(u)
        acc0 = _grad_a_quarter(
            acc0, u_t, x_ptr, bits_ptr, rm, m_ok, k0, ri, K, stride_xm, KW, scale, IS_FP32
        )
        acc1 = _grad_a_quarter(
            acc1, u_t, x_ptr, bits_ptr, rm, m_ok, k0 + 32, ri, K, stride_xm, KW, scale, IS_FP32
        )
        acc2 = _grad_a_quarter(
            acc2, u_t, x_ptr, bits_ptr, rm, m_ok, k0 + 64, ri, K, stride_xm, KW, scale, IS_FP32
        )
        acc3 = _grad_a_quarter(
            acc3, u_t, x_ptr, bits_ptr, rm, m_ok, k0 + 96, ri, K, stride_xm, KW, scale, IS_FP32
        )
    rows = part_ptr + (pid_s * R + rr)[:, None] * K
    cols = k0 + ri[None, :]
    tl.store(rows + cols, acc0 * scaling, mask=r_ok[:, None] & (cols < K))
    cols += 32
    tl.store(rows + cols, acc1 * scaling, mask=r_ok[:, None] & (cols < K))
    cols += 32
    tl.store(rows + cols, acc2 * scaling, mask=r_ok[:, None] & (cols < K))
    cols += 32
    tl.store(rows + cols, acc3 * scaling, mask=r_ok[:, None] & (cols < K))


@triton.jit
def _grad_x_quarter(dx_ptr, u, a_ptr, bits_ptr, rm, m_ok, k0, ri, rr, r_ok, K, KW, scale, scaling,
                    IS_FP32: tl.constexpr):  # fmt: skip
    """dx[:, k0:k0+32] += s·(u·A[:, k0:k0+32]) ⊙ keep / (1-p) for one 32-column quarter."""
    dt = dx_ptr.dtype.element_ty
    cols = k0 + ri
    k_ok = cols < K
    a = tl.load(
        a_ptr + rr[:, None] * K + cols[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0
    )
    if IS_FP32:
        v = tl.dot(u, a, input_precision="ieee")
    else:
        v = tl.dot(u, a)
    v = (v * scaling).to(dt)  # s·(u·A) rounded to the compute dtype, as a separate GEMM would be
    keep = _keep_quarter(bits_ptr, rm, m_ok, k0 // 32, ri, KW)
    offs = rm[:, None] * K + cols[None, :]
    mask = m_ok[:, None] & k_ok[None, :]
    dx = tl.load(dx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dx += tl.where(keep, v.to(tl.float32) * scale, 0.0)
    tl.store(dx_ptr + offs, dx.to(dt), mask=mask)


# dx is read and written in place (it already holds dY·W): restore_value makes the autotuner
# put it back after every timing run, else the first call of a new key returns dx with the
# adapter term added once per timing run
@triton.autotune(configs=_dropout_configs(), key=["K", "R_PAD"], restore_value=["dx_ptr"])
@triton.jit
def _lora_grad_x_dropout_kernel(
    dx_ptr,
    u_ptr,
    a_ptr,
    bits_ptr,
    M,
    K,
    R,
    KW,
    scale,
    scaling,
    R_PAD: tl.constexpr,
    IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dx[m, k] += s · (u·A)[m, k] · keep[m, k] / (1-p): the adapter's input gradient, masked like
    the forward's input, added to dY·W already in dx (u·A is never stored). Grid (row tiles,
    groups of 128 columns), each group in four 32-column quarters (one mask word per row)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ri = tl.arange(0, 32)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    r_ok = rr < R
    u = tl.load(u_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0)
    k0 = pid_k * 128
    _grad_x_quarter(dx_ptr, u, a_ptr, bits_ptr, rm, m_ok, k0, ri, rr, r_ok, K, KW, scale, scaling,
                    IS_FP32)  # fmt: skip
    _grad_x_quarter(dx_ptr, u, a_ptr, bits_ptr, rm, m_ok, k0 + 32, ri, rr, r_ok, K, KW, scale,
                    scaling, IS_FP32)  # fmt: skip
    _grad_x_quarter(dx_ptr, u, a_ptr, bits_ptr, rm, m_ok, k0 + 64, ri, rr, r_ok, K, KW, scale,
                    scaling, IS_FP32)  # fmt: skip
    _grad_x_quarter(dx_ptr, u, a_ptr, bits_ptr, rm, m_ok, k0 + 96, ri, rr, r_ok, K, KW, scale,
                    scaling, IS_FP32)  # fmt: skip


@triton.jit
def _dropout_mask_kernel(out_ptr, M, K, KC, seed, thresh, BLOCK_M: tl.constexpr):
    """out[m, k] = keep(m, k) as int8, drawn exactly as _lora_down_dropout_kernel draws it."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ri = tl.arange(0, 32)
    r0, r1, r2, r3 = tl.randint4x(seed, rm[:, None] * KC + g * 32 + ri[None, :])
    rows = out_ptr + rm[:, None] * K
    m_ok = rm[:, None] < M
    cols = g * 128 + ri[None, :]
    tl.store(rows + cols, ((r0 >> 1).to(tl.int32) >= thresh).to(tl.int8), mask=m_ok & (cols < K))
    cols += 32
    tl.store(rows + cols, ((r1 >> 1).to(tl.int32) >= thresh).to(tl.int8), mask=m_ok & (cols < K))
    cols += 32
    tl.store(rows + cols, ((r2 >> 1).to(tl.int32) >= thresh).to(tl.int8), mask=m_ok & (cols < K))
    cols += 32
    tl.store(rows + cols, ((r3 >> 1).to(tl.int32) >= thresh).to(tl.int8), mask=m_ok & (cols < K))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _dropout_threshold(p: float) -> int:
    """Keep an element when (32-bit Philox output >> 1) >= this: ceil(p·2^31) in [0, 2^31]."""
    return min(1 << 31, max(0, math.ceil(p * (1 << 31))))


def _nf4_chunk(k: int, blocksize: int) -> int | None:
    """Elements of a row per sub-chunk (never straddling a quant block), or None when K is
    unsupported."""
    for chunk in (64, 32):
        if k % chunk == 0 and blocksize % chunk == 0:
            return chunk
    return None


def nf4_matmul_supported(in_features: int, state: QuantState) -> bool:
    """Whether ``nf4_matmul`` runs its fused kernel for this weight (else dequant + matmul)."""
    return _nf4_chunk(in_features, state.blocksize) is not None


# Candidate configurations of _nf4_matmul_kernel, timed once per (M, N, K, blocksize, double
# quant, dtype, bias, device) on the GPU; the interpreter takes the first one that applies.
#   DOT: 1 / 2 / 3 tensor cores (BLOCK_M = 16 or 32; 2 = W as the MMA's first operand; 3 = the
#     same with the byte-pair code table, 16-bit x only) or 0 CUDA-core FMAs (BLOCK_M = M
#     rounded up to a power of two, only for M <= _FMA_MAX_M: BLOCK_M FMAs per weight and
#     BLOCK_M·2·VEC x values per thread and sub-chunk in registers).
#   BLOCK_N rows of W per program; VEC bytes per thread and row of a sub-chunk (FMA: 16 = one
#     16-byte load, 32 weights); UNROLL sub-chunks per loop iteration; DECODE (see _code_pair).
#   PER_SM: split K so that the grid has about PER_SM programs per SM, all resident at once
#     (one wave); 0 = no split (one program per row tile owns all of K).
#   DOT 4: the native CUDA kernel of csrc/nf4_small_m.cu (16-bit x, M <= 16; see
#     _native_supported): blocks of num_warps warps splitting K, each walking row tiles of 16;
#     PER_SM = resident blocks per SM the registers must allow (halved for M > 8), which sizes
#     the grid to one wave (see _native_configure); it rounds like DOT 3. Without a usable
#     native kernel it runs as the DOT 3 configuration _NATIVE_STANDIN.
# Memory arithmetic (H200: ~4.2 TB/s at ~1 µs loaded latency needs ~4 MB in flight, ~32 KB per
# SM): an FMA program of 4 warps with BLOCK_N = 64, SUB = 64 (32 bytes per row) and UNROLL = 4
# loads 64 x 32 x 4 = 8 KB per iteration (one 16-byte vector per thread and sub-chunk); 8 of
# them per SM keep 64 KB in flight if they fit in the register file (<= 64 registers per thread
# at 4 warps). BLOCK_N = 128 with UNROLL = 2 is the same 8 KB in fewer, fatter programs (4 per
# SM). The dot programs stream 64 rows x 32 bytes x UNROLL per iteration (4 KB at UNROLL = 2).
# The grids at 4096x4096, M = 1, BLOCK_N = 64: 64 row tiles x 16 splits of 4 sub-chunks
# (PER_SM = 8: 1056 target, 1024 programs); at 14336x4096: 224 x 4 splits of 16 sub-chunks.
_FMA_MAX_M = 4
_NF4_MM_KEYS = ("DOT", "BLOCK_N", "VEC", "UNROLL", "DECODE", "num_warps", "PER_SM")
_NF4_MM_CONFIGS = tuple(
    dict(zip(_NF4_MM_KEYS, c))
    for c in (
        (0, 64, 16, 4, 1, 4, 8),
        (0, 128, 16, 2, 1, 4, 4),
        (0, 64, 16, 4, 0, 4, 8),
        (0, 64, 8, 4, 1, 4, 8),
        (0, 32, 8, 8, 1, 4, 0),
        (1, 64, 16, 2, 1, 4, 8),
        (1, 64, 16, 4, 1, 4, 4),
        (1, 128, 16, 2, 1, 8, 4),
        (2, 64, 16, 2, 1, 4, 8),
        (2, 64, 16, 4, 1, 4, 4),
        (2, 128, 16, 2, 1, 8, 4),
        (3, 64, 16, 2, 1, 4, 8),
        (3, 64, 16, 4, 1, 4, 4),
        (3, 128, 16, 2, 1, 8, 4),
        (4, 16, 16, 4, 1, 8, 2),
        (4, 16, 16, 4, 1, 4, 4),
        (4, 16, 16, 4, 1, 4, 3),
    )
)

# Forces one configuration (a dict like the entries above) for every new launch entry: tests
# cover each variant with it, measurements compare them. None: tune (GPU) or the first that
# applies (interpreter). Entries already built keep their configuration (clear_workspaces()).
NF4_MATMUL_CONFIG: dict | None = None

# False: no timing of the candidates, each new shape takes the first that applies (the GPU test
# suite sets this: timing every candidate per shape dominates its run time).
_NF4_TUNE = True
_NF4_TUNED: dict[tuple, dict] = {}


def _nf4_candidates(
    m: int, dtype: torch.dtype = torch.bfloat16, native: bool = False
) -> list[dict]:
    """The configurations that apply to M rows of x in ``dtype``: FMA ones up to _FMA_MAX_M, x·Wᵀ
    dot ones from 2, W·xᵀ dot ones from 1, the byte-pair ones from 1 for 16-bit x, and the native
    ones for 16-bit x and M <= 16 when ``native`` (the native kernel runs for this weight)."""
    half = dtype != torch.float32
    fits = {0: m <= _FMA_MAX_M, 1: m >= 2, 2: True, 3: half, 4: native and half and m <= 16}
    return [c for c in _NF4_MM_CONFIGS if fits[c["DOT"]]]


# what a forced native configuration runs when the native kernel cannot (same rounding)
_NATIVE_STANDIN = dict(zip(_NF4_MM_KEYS, (3, 64, 16, 2, 1, 4, 8)))


def _native_supported(m: int, k: int, state: QuantState, dtype: torch.dtype, device) -> bool:
    """Whether csrc/nf4_small_m.cu runs this call: a CUDA device where native kernels load,
    16-bit x, M <= 16, K a multiple of 64 and a power-of-two blocksize >= 64 (a 64-element chunk
    of a row then lies in one quant block), NF4 or FP4 codes in a 16-entry table, N·K < 2^31."""
    return (
        dtype in (torch.bfloat16, torch.float16)
        and 1 <= m <= 16
        and k % 64 == 0
        and state.blocksize >= 64
        and state.blocksize & (state.blocksize - 1) == 0
        and state.code.numel() == 16
        and math.prod(state.shape) < 2**31  # the kernel indexes W with 32-bit integers
        and _native.available(device)
        and torch.device(device) not in _NATIVE_BROKEN
    )


@dataclasses.dataclass
class _NF4Plan:
    """Launch parameters of ``_nf4_matmul_kernel`` for one (M, N, K, blocksize, config)."""

    grid: tuple[int, int, int]
    block_m: int
    chunk: int
    subs_per_split: int
    config: dict
    part: torch.Tensor
    locks: torch.Tensor
    exact_mul: bool  # inline PTX mul.rn on the GPU only (the interpreter has no PTX)


_NF4_PLANS: dict[tuple, _NF4Plan] = {}


def _nf4_plan(m: int, n: int, k: int, blocksize: int, device: torch.device, cfg: dict) -> _NF4Plan:
    """Grid and split-K of configuration ``cfg`` for this shape (see _NF4_MM_CONFIGS).

    The row tiles x K-splits x M tiles grid is sized for one wave of about PER_SM programs per
    SM: splits = that target // (row tiles x M tiles), capped so each split gets at least one
    loop iteration, then rounded so that no split is empty. M tiles are the slowest grid axis.
    The split-K partials stay in L2 (at most splits x M x N x 4 B: 16 x 4096 x 4 = 256 KB at
    M = 1) and their sum is deterministic (see _nf4_matmul_kernel).
    """
    key = (m, n, k, blocksize, device, tuple(sorted(cfg.items())))
    plan = _NF4_PLANS.get(key)
    if plan is not None:
        return plan
    chunk = _nf4_chunk(k, blocksize)
    unroll = cfg["UNROLL"]
    block_m = (16 if m <= 16 else 32) if cfg["DOT"] else next_power_of_2(m)
    m_tiles = triton.cdiv(m, block_m)
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    n_sub = k // chunk
    splits = 1
    if cfg["PER_SM"]:
        splits = cfg["PER_SM"] * num_sms(device) // (m_tiles * n_tiles)  # at most one wave
        splits = max(1, min(triton.cdiv(n_sub, unroll), splits))
    per_split = triton.cdiv(n_sub, splits)
    per_split = triton.cdiv(per_split, unroll) * unroll  # whole loop iterations where possible
    splits = triton.cdiv(n_sub, per_split)  # no empty split
    # split-K scratch, shared by every plan of the device (one stream; see the module limits):
    # fp32 partials and per-tile arrival counters that the kernel leaves at zero
    part = _cached_buffer(("nf4mm_part", device), splits * m * n, torch.float32, device)
    locks = _cached_buffer(("nf4mm_lock", device), m_tiles * n_tiles, torch.int32, device, True)
    plan = _NF4Plan(
        grid=(n_tiles, splits, m_tiles),
        block_m=block_m,
        chunk=chunk,
        subs_per_split=per_split,
        config=cfg,
        part=part,
        locks=locks,
        exact_mul=not interpreter_enabled(),
    )
    _NF4_PLANS[key] = plan
    return plan


_X_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}

# Tables derived from a code table (an aligned copy, byte-pair words per dtype), keyed by
# (id(code table), what): an entry goes when its code table dies, before the id can be reused.
# (A WeakKeyDictionary cannot hold tensors: its lookups compare keys with ==.)
_CODE_DERIVED: dict[tuple, torch.Tensor] = {}


def _derived(code: torch.Tensor, what, build) -> torch.Tensor:
    """``build(code)``, made once per code table and ``what`` and kept while the table lives
    (code tables are read-only, see QuantState)."""
    key = (id(code), what)
    table = _CODE_DERIVED.get(key)
    if table is None:
        table = _CODE_DERIVED[key] = build(code)
        weakref.finalize(code, _CODE_DERIVED.pop, key, None)
    return table


def _aligned_code(code: torch.Tensor) -> torch.Tensor:
    """The code table at a 64-byte aligned address (the kernel ORs 4·q into it, _code_pair).

    Tables made by quantize_4bit are fresh allocations (aligned); one sliced out of a loaded
    file may not be, and gets a copy (a fresh allocation is at least 256-byte aligned).
    """
    if code.data_ptr() % 64 == 0:
        return code
    return _derived(code, "aligned", torch.clone)


def _pair_words(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = code.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    b = torch.arange(256, device=code.device)
    words = bits[b >> 4] | (bits[b & 15] << 16)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    backing = torch.empty(512, dtype=torch.int32, device=code.device)  # 2 KB: room to align
    start = (-backing.data_ptr() % 1024) // 4
    table = backing[start : start + 256]
    table.copy_(words)
    return table


def _pair_table(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 table of the 256 byte values: word b = bits(dtype(code[b >> 4])) in the low half
    (element 2j of a row: the byte's high nibble) and bits(dtype(code[b & 15])) in the high
    half, at a 1024-byte aligned address (the kernel ORs 4·b into it)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the byte-pair code table is for 16-bit x, got {dtype}")
    return _derived(code, dtype, lambda c: _pair_words(c, dtype))


# ---- nf4_matmul host path -------------------------------------------------------------------
#
# At decode the kernel reads 8.4 MB (4096x4096) in a few µs, so the Python around the launch
# decides the time per call. Per call the launcher does only what can change between calls:
# the state's cached validation (qkern.nf4._plan_for: identity compares of its fields and the
# packed tensor's dtype, size and device), one dict lookup of the launch entry for (x.shape,
# x.dtype, bias dtype, backend mode), device / contiguity / alignment checks of x (and of bias
# and out when given), the output allocation (none when ``out`` is given) and one direct launch
# of the compiled kernel (qkern.nf4._launch: skips Triton's per-call argument specialization).
# Everything else — the full validation, the plan, the compile-time arguments, the state's
# pointers — is built once per entry. No zero-fill: the split-K counters are left at zero by
# the kernel itself.


class _MMEntry:
    """nf4_matmul's launch arguments for one (state, x.shape, x.dtype, bias dtype, mode)."""

    __slots__ = (
        "fused",
        "m",
        "out_shape",
        "bias_shape",
        "dtype",
        "device",
        "word",
        "grid",
        "mid",
        "tail",
        "meta",
        "compiled",
        "config",
        "native",
        "keep",
    )


# id(state) -> (weak reference to the state, the state's validated nf4 plan, {key: _MMEntry}).
# The entries live as long as the state and are rebuilt when a field of the state is reassigned
# (the nf4 plan is then rebuilt, and no longer the one stored here). At most _MM_MAX_KEYS keys
# per state (distinct x shapes); past that the state's entries start over.
_MM_CACHE: dict[int, tuple] = {}
_MM_MAX_KEYS = 64


def _mm_entries(state: QuantState, plan) -> dict:
    """The launch entries of ``state`` (whose current nf4 plan is ``plan``)."""
    cached = _MM_CACHE.get(id(state))
    if cached is not None and cached[1] is plan:
        return cached[2]
    entries: dict = {}
    sid = id(state)
    # the callback drops the entries when the state dies, before its id can be reused
    ref = weakref.ref(state, lambda _, c=_MM_CACHE: c.pop(sid, None))
    _MM_CACHE[sid] = (ref, plan, entries)
    return entries


def _mm_entry(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None,
    entries: dict,
    key: tuple,
) -> _MMEntry:
    """Validate the call in full and build (and keep) its launch entry."""
    _validate(x, packed, state, None, None, 1.0, bias, 0.0)
    n, k = (int(d) for d in state.shape)
    e = _MMEntry()
    e.m = math.prod(x.shape[:-1])
    e.out_shape = torch.Size((*x.shape[:-1], n))
    e.bias_shape = torch.Size((n,))
    e.dtype = x.dtype
    e.device = packed.device
    e.fused = use_triton(x, packed, bias) and nf4_matmul_supported(k, state)
    e.config = None
    if e.fused and e.m > 0:
        # x is read as words of two elements: its data must be word aligned
        e.word = 8 if x.dtype == torch.float32 else 4
        native = _native_supported(e.m, k, state, e.dtype, e.device)
        cfg = NF4_MATMUL_CONFIG
        if cfg is None:
            cands = pick_configs(_nf4_candidates(e.m, e.dtype, native))
            # no timing inside a CUDA-graph capture (it synchronizes): an untuned shape met
            # there for the first time takes the first candidate
            capturing = e.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            if len(cands) == 1 or capturing or not _NF4_TUNE:
                cfg = _NF4_TUNED.get(_nf4_tune_key(e, state, bias), cands[0])
            else:
                cfg = _nf4_tune(e, x, packed, state, bias, cands)
        if cfg["DOT"] == 4 and not native:
            cfg = _NATIVE_STANDIN
        _mm_configure(e, state, bias, _runnable_config(cfg, state.code, e.dtype, e.device))
    if len(entries) >= _MM_MAX_KEYS:
        entries.clear()
    entries[key] = e
    return e


def _runnable_config(cfg: dict, code: torch.Tensor, dtype: torch.dtype, device) -> dict:
    """``cfg``, or the nearest configuration that runs here without building a table.

    The byte-pair table (DOT 3) exists for 16-bit x only: fp32 x takes the W-first variant of
    the same shape. Inside a CUDA-graph capture nothing may be allocated and filled for later
    eager calls (the fill would only be recorded): a code table that has no byte-pair table /
    aligned copy yet takes the W-first variant / the add-addressed decode instead. (The native
    configurations make the same checks, and more, in _native_configure.)
    """
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if cfg["DOT"] == 3 and (
        dtype == torch.float32 or (capturing and (id(code), dtype) not in _CODE_DERIVED)
    ):
        cfg = {**cfg, "DOT": 2}
    if (
        cfg["DOT"] < 3
        and cfg["DECODE"] == 1
        and capturing
        and code.data_ptr() % 64
        and (id(code), "aligned") not in _CODE_DERIVED
    ):
        cfg = {**cfg, "DECODE": 0}
    return cfg


def _mm_configure(e: _MMEntry, state: QuantState, bias: torch.Tensor | None, cfg: dict) -> None:
    """Fill entry ``e``'s launch arguments for configuration ``cfg``."""
    n, k = (int(d) for d in state.shape)
    if cfg["DOT"] == 4:
        if _native_configure(e, state, bias, cfg):
            return
        cfg = _runnable_config(_NATIVE_STANDIN, state.code, e.dtype, e.device)
    plan = _nf4_plan(e.m, n, k, state.blocksize, e.device, cfg)
    dq = state.nested_absmax is not None
    e.config = cfg
    e.grid = plan.grid
    # kernel arguments between (x, packed) and (bias, y), then after them
    e.mid = (
        state.absmax,
        state.nested_absmax if dq else state.absmax,
        state.nested_code if dq else state.code,
        _pair_table(state.code, e.dtype)
        if cfg["DOT"] == 3
        else (_aligned_code(state.code) if cfg["DECODE"] == 1 else state.code),
    )
    e.tail = (
        plan.part,
        plan.locks,
        e.m,
        n,
        k,
        k // 2,  # bytes per row of W
        k // 2,  # words per row of x
        n,  # elements per row of y
        plan.subs_per_split,
        float(state.offset) if dq else 0.0,
    )
    e.meta = {
        "BLOCKSIZE": state.blocksize,
        "SUB": plan.chunk,
        "DOUBLE_QUANT": dq,
        "HAS_BIAS": bias is not None,
        "BLOCK_M": plan.block_m,
        "BLOCK_N": cfg["BLOCK_N"],
        "VEC": min(cfg["VEC"], plan.chunk // 2),
        "UNROLL": cfg["UNROLL"],
        "USE_DOT": cfg["DOT"],
        "DECODE": cfg["DECODE"],
        "X_KIND": _X_KIND[e.dtype],
        "EXACT_MUL": plan.exact_mul,
        "num_warps": cfg["num_warps"],
        "num_stages": 1,
    }
    e.compiled = {}


# devices where compiling or loading the native kernel failed once (it is not offered there
# again; the failure was reported as a warning)
_NATIVE_BROKEN: set[torch.device] = set()


def _native_configure(e: _MMEntry, state: QuantState, bias: torch.Tensor | None, cfg: dict) -> bool:
    """Entry ``e`` for the native kernel (csrc/nf4_small_m.cu): the compiled variant, its grid
    and its argument slots, of which a call rewrites x, packed, bias and y. False (``e``
    untouched) when it cannot run here: inside a CUDA-graph capture unless the variant is
    loaded and the scratch buffers exist (loading a module or filling a new buffer cannot be
    captured), or when compiling / loading fails (a warning; the device is then marked broken).

    One wave: ``resident`` = blocks per SM (PER_SM; half of it with two MMA column tiles,
    whose registers allow fewer) x SMs. K is split when there are fewer row tiles than resident
    blocks (whole groups of 4 chunks per split); the blocks of a split walk its row tiles
    (grid.x = min(tiles, resident / splits)). Split-K scratch: fp32 partials [tiles, splits,
    16, 8·NT] and per-tile counters the kernel leaves at zero."""
    n, k = (int(d) for d in state.shape)
    dq = state.nested_absmax is not None
    nt = 1 if e.m <= 8 else 2
    warps = cfg["num_warps"]
    per_sm = cfg["PER_SM"] if nt == 1 else max(1, cfg["PER_SM"] // 2)
    defines = dict(
        X_F16=int(e.dtype == torch.float16), NT=nt, DQ=int(dq), HAS_BIAS=int(bias is not None),
        WARPS=warps, MIN_BLOCKS=per_sm,
    )  # fmt: skip
    tiles = triton.cdiv(n, 16)
    groups = triton.cdiv(k // 64, 4)
    resident = per_sm * num_sms(e.device)
    splits = max(1, min(groups, resident // tiles))
    per_split = triton.cdiv(groups, splits) * 4  # chunks
    splits = triton.cdiv(k // 64, per_split)
    grid_x = min(tiles, triton.cdiv(resident, splits))
    part_key, part_numel = ("nf4native_part", e.device), tiles * splits * 16 * 8 * nt
    lock_key = ("nf4native_lock", e.device)
    if e.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        ready = _native.loaded("nf4_small_m.cu", "nf4_small_m", defines, e.device) and all(
            key in _WORKSPACES and _WORKSPACES[key].numel() >= numel
            for key, numel in ((part_key, part_numel), (lock_key, tiles))
        )
        if not ready or (id(state.code), e.dtype) not in _CODE_DERIVED:
            return False
    try:
        kernel = _native.kernel("nf4_small_m.cu", "nf4_small_m", defines, e.device)
    except (RuntimeError, OSError) as err:
        _NATIVE_BROKEN.add(e.device)
        warnings.warn(
            f"qkern: the native small-M kernel is unavailable on {e.device} ({err}); "
            "using the Triton kernels",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    part = _cached_buffer(part_key, part_numel, torch.float32, e.device)
    locks = _cached_buffer(lock_key, tiles, torch.int32, e.device, True)
    pair = _pair_table(state.code, e.dtype)
    e.config = cfg
    e.grid = (grid_x, splits)
    e.mid = (kernel, warps * 32)
    e.tail = None
    e.meta = None
    e.compiled = None
    e.native = _native.Args(
        "pppppppppp" + "iiiiid",
        (
            0,  # x
            0,  # packed
            state.absmax.data_ptr(),
            (state.nested_absmax if dq else state.absmax).data_ptr(),
            (state.nested_code if dq else state.code).data_ptr(),
            pair.data_ptr(),
            0,  # bias
            0,  # y
            part.data_ptr(),
            locks.data_ptr(),
            e.m,
            n,
            k,
            state.blocksize.bit_length() - 1,
            per_split,
            float(state.offset) if dq else 0.0,
        ),
    )
    # the state's tensors and the scratch must outlive the entry's raw pointers
    e.keep = (state.absmax, state.nested_absmax, state.nested_code, state.code, pair, part, locks)
    return True


def _native_run(
    e: _MMEntry, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor
) -> None:
    """One launch of the native kernel for entry ``e`` (x, packed, bias and y as in _mm_run)."""
    if x.data_ptr() % 16 or not x.is_contiguous():
        x = x.clone(memory_format=torch.contiguous_format)  # 16-byte loads of x
    if packed.data_ptr() % 8 or not packed.is_contiguous():
        packed = packed.clone(memory_format=torch.contiguous_format)  # 8-byte loads of W
    b = None
    if bias is not None:
        b = _as(bias, e.dtype)
        if not b.is_contiguous():
            b = b.contiguous()
    kernel, block = e.mid
    stream = torch.cuda.current_stream(e.device).cuda_stream
    switch = torch.cuda.current_device() != e.device.index
    # the entry's argument slots are shared: one launch at a time fills them (ctypes releases
    # the GIL inside the driver call)
    with _native.LAUNCH_LOCK:
        args = e.native
        args.set(0, x.data_ptr())
        args.set(1, packed.data_ptr())
        if b is not None:
            args.set(6, b.data_ptr())
        args.set(7, y.data_ptr())
        if switch:
            with torch.cuda.device(e.device):  # the driver launches in the current context
                kernel.launch(e.grid, block, args.params, stream)
        else:
            kernel.launch(e.grid, block, args.params, stream)


def _nf4_tune_key(e: _MMEntry, state: QuantState, bias: torch.Tensor | None) -> tuple:
    n, k = (int(d) for d in state.shape)
    dq = state.nested_absmax is not None
    return (e.m, n, k, state.blocksize, dq, e.dtype, bias is not None, e.device)


def _nf4_tune(
    e: _MMEntry,
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None,
    cands: list[dict],
) -> dict:
    """The fastest of ``cands`` for this call's shape, timed once per tuning key (cold L2, as
    triton's do_bench flushes it between runs) and kept for every later entry of that key."""
    key = _nf4_tune_key(e, state, bias)
    best = _NF4_TUNED.get(key)
    if best is None:
        from triton.testing import do_bench

        y = x.new_empty(e.out_shape)

        def timed(cfg: dict) -> float:
            trial = _MMEntry()
            trial.m, trial.out_shape, trial.dtype, trial.word = e.m, e.out_shape, e.dtype, e.word
            trial.fused = True
            trial.device = e.device
            _mm_configure(trial, state, bias, cfg)
            fn = lambda: _mm_run(trial, x, packed, bias, y)  # noqa: E731
            try:
                return do_bench(fn, warmup=5, rep=20, return_mode="median")
            except triton.runtime.errors.OutOfResources:  # e.g. too many registers: skip it
                return math.inf

        best = _NF4_TUNED[key] = min(cands, key=timed)
    return best


def _mm_lookup(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None
) -> _MMEntry:
    """The launch entry of this call; validates in full on a miss, raises on bad input."""
    plan = _plan_for(packed, state)  # packed + state, validated in full once per state
    if not isinstance(x, torch.Tensor) or not (bias is None or isinstance(bias, torch.Tensor)):
        _validate(x, packed, state, None, None, 1.0, bias, 0.0)
    key = (x.shape, x.dtype, None if bias is None else bias.dtype, get_backend())
    entries = _mm_entries(state, plan)
    e = entries.get(key)
    if e is None:
        e = _mm_entry(x, packed, state, bias, entries, key)
    elif x.device != e.device or (
        bias is not None and (bias.shape != e.bias_shape or bias.device != e.device)
    ):
        _validate(x, packed, state, None, None, 1.0, bias, 0.0)
        raise ValueError("x or bias does not match the quantized weight")  # not reached
    return e


def _mm_run(
    e: _MMEntry,
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """One launch of _nf4_matmul_kernel for a fused entry (``out`` already checked)."""
    # x.new_empty: x has the entry's dtype and device (checked by the lookup), and it is the
    # cheapest allocation call
    y = x.new_empty(e.out_shape) if out is None else out
    if e.m == 0:
        return y
    if e.compiled is None:
        _native_run(e, x, packed, bias, y)
        return y
    xp = x.data_ptr()
    if xp % e.word or not x.is_contiguous():
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh buffer is word aligned
        xp = x.data_ptr()
    if not packed.is_contiguous():
        packed = packed.contiguous()
    b = y
    if bias is not None:
        b = _as(bias, e.dtype)
        if not b.is_contiguous():
            b = b.contiguous()
    # Triton specializes pointers on 16-byte alignment; every other argument is fixed per entry
    # (the state's tensors, the split-K scratch, the sizes). A fresh y is 16-byte aligned.
    _launch(
        _nf4_matmul_kernel,
        e.grid,
        (x, packed, *e.mid, b, y, *e.tail),
        e.meta,
        e.compiled,
        (
            xp % 16 == 0,
            packed.data_ptr() % 16 == 0,
            b is y or b.data_ptr() % 16 == 0,
            out is None or y.data_ptr() % 16 == 0,
        ),
    )
    return y


def _nf4_matmul_fallback(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    e: _MMEntry,
) -> torch.Tensor:
    """Dequant + matmul: the reference backend, CPU tensors outside the interpreter, and K that
    the kernel does not support."""
    n, k = state.shape
    x2 = x.reshape(-1, k).contiguous()
    w = dequantize_4bit(packed, state, dtype=torch.float32).to(x.dtype)
    bias_c = None if bias is None else _as(bias, x.dtype)
    res = torch.addmm(bias_c, x2, w.t()) if bias_c is not None else x2 @ w.t()
    if out is None:
        return res.view(e.out_shape)
    out.view(-1, n).copy_(res)
    return out


def _r_pad(r: int) -> int:
    return max(16, next_power_of_2(r))


def _mask_words(k: int) -> int:
    """int32 words of keep bits per row (see the dropout section)."""
    return 4 * triton.cdiv(k, 128)


def _lora_down_dropout(
    x2: torch.Tensor, a: torch.Tensor, p: float, seed: int, write_bits: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(t = d(x)·Aᵀ [M, r] in x2.dtype, keep bits [M, KW] int32 or None) for ``seed``."""
    m, k = x2.shape
    r = a.shape[0]
    t = torch.empty(m, r, dtype=x2.dtype, device=x2.device)
    kw = _mask_words(k)
    bits = torch.empty(m, kw, dtype=torch.int32, device=x2.device) if write_bits else None
    if m == 0:
        return t, bits
    _lora_down_dropout_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
        x2,
        a,
        t,
        t if bits is None else bits,
        m,
        k,
        r,
        x2.stride(0),
        32 * triton.cdiv(k, 128),
        kw,
        seed,
        _dropout_threshold(p),
        _dropout_scale(p),
        R_PAD=_r_pad(r),
        IS_FP32=x2.dtype == torch.float32,
        WRITE_BITS=bits is not None,
    )
    return t, bits


def _lora_grad_a_dropout(
    u: torch.Tensor, x2: torch.Tensor, bits: torch.Tensor, p: float, scaling: float
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
    _lora_grad_a_dropout_kernel[(triton.cdiv(k, 128), n_split)](
        u,
        x2,
        bits,
        part,
        m,
        k,
        r,
        x2.stride(0),
        bits.shape[1],
        rows_per_split,
        _dropout_scale(p),
        scaling,
        R_PAD=_r_pad(r),
        IS_FP32=x2.dtype == torch.float32,
    )
    return part[0] if n_split == 1 else part.sum(0)


def _lora_grad_x_dropout_(
    dx: torch.Tensor, u: torch.Tensor, a: torch.Tensor, bits: torch.Tensor, p: float, scaling: float
) -> None:
    """dx += s·(u·A) ⊙ mask / (1-p), in place ([M, K], contiguous)."""
    m, k = dx.shape
    r = u.shape[1]
    if m == 0:
        return
    _lora_grad_x_dropout_kernel[
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, 128))
    ](
        dx,
        u,
        a,
        bits,
        m,
        k,
        r,
        bits.shape[1],
        _dropout_scale(p),
        scaling,
        R_PAD=_r_pad(r),
        IS_FP32=dx.dtype == torch.float32,
    )


def lora_dropout_mask(
    seed: int, shape: tuple[int, int], p: float, device: torch.device | str
) -> torch.Tensor:
    """The keep-mask (bool, ``shape`` = (M, K)) that the Triton path draws for ``seed`` and ``p``.

    Element (m, k) with k = 128·g + 32·j + i is kept when output j of Philox4x32-10 at counter
    m·32·ceil(K/128) + 32·g + i, shifted right by one, is >= ceil(p·2^31); kept elements are
    scaled by 1/(1 - p). This is how tests (and users) recover the mask a training step used.
    """
    m, k = shape
    out = torch.empty(m, k, dtype=torch.int8, device=device)
    block_m = 16
    if m * k:
        _dropout_mask_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, 128))](
            out, m, k, 32 * triton.cdiv(k, 128), seed, _dropout_threshold(p), BLOCK_M=block_m
        )
    return out.bool()


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _validate(x, packed, state, lora_a, lora_b, scaling, bias, dropout) -> None:
    # plain attribute checks only: this runs on every qlora_linear call, so it is kept to a few
    # µs of host time; (packed, state) is checked in full once per state (qkern.nf4._plan_for:
    # sizes, dtypes, devices of every field), then by identity of its fields
    check_float(x, "x")
    _plan_for(packed, state)
    if len(state.shape) != 2:
        raise ValueError(f"state.shape must be [out_features, in_features], got {state.shape}")
    n, k = state.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x.shape[-1] must equal in_features={k} of the quantized weight ({n}, {k}), "
            f"got x.shape={tuple(x.shape)}"
        )
    dev = packed.device
    same_device = x.device == dev
    if lora_a is not None or lora_b is not None:
        if lora_a is None or lora_b is None:
            raise ValueError("lora_a and lora_b must be given together (or both None)")
        allowed = (x.dtype, torch.float32)
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
        if not math.isfinite(scaling):
            raise ValueError(f"scaling must be finite, got {scaling}")
        same_device = same_device and lora_a.device == dev and lora_b.device == dev
    if bias is not None:
        check_float(bias, "bias", (x.dtype, torch.float32))
        if bias.shape != (n,):
            raise ValueError(f"bias must be (out_features={n},), got {tuple(bias.shape)}")
        same_device = same_device and bias.device == dev
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    if not same_device:
        check_same_device(x=x, packed=packed, lora_a=lora_a, lora_b=lora_b, bias=bias)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # .to() of a tensor already in dtype still costs a dispatcher round trip: skip it
    return t if t.dtype == dtype else t.to(dtype)


class _QLoRALinearFunction(torch.autograd.Function):
    """y2 = x2·Wᵀ + s·(d(x2)·Aᵀ)·Bᵀ + bias on 2-D x2 [M, K]; see the module docstring."""

    @staticmethod
    def forward(ctx, x2, packed, state, lora_a, lora_b, scaling, bias, p, seed, small_m):
        dt = x2.dtype
        m, k = x2.shape
        n = state.shape[0]
        has_lora = lora_a is not None
        need_x = ctx.needs_input_grad[0]
        need_a = has_lora and ctx.needs_input_grad[3]
        need_b = has_lora and ctx.needs_input_grad[4]
        a = _as(lora_a, dt) if has_lora else None
        b = _as(lora_b, dt) if has_lora else None
        bias_c = None if bias is None else _as(bias, dt)
        t = bits = None
        if has_lora:
            if p > 0:
                # the keep bits are stored only when a backward kernel will read them
                t, bits = _lora_down_dropout(x2, a, p, seed, write_bits=need_a or need_x)
            else:
                t = x2 @ a.t()

        if small_m:
            y = nf4_matmul(x2, packed, state, bias_c)
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

        ctx.save_for_backward(
            x2 if need_a else None,  # only dA reads x (the mask comes from the bits)
            t if need_b else None,
            bits,
            lora_a,
            lora_b,
            packed,
        )
        ctx.state, ctx.scaling, ctx.p = state, scaling, p
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, t, bits, lora_a, lora_b, packed = ctx.saved_tensors
        state, s, p = ctx.state, ctx.scaling, ctx.p
        need_x, need_a, need_b = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[3],
            ctx.needs_input_grad[4],
        )
        need_bias = ctx.needs_input_grad[6]
        g = gy if gy.is_contiguous() else gy.contiguous()
        dt = g.dtype
        m, n = g.shape
        k = state.shape[1]
        has_lora = lora_a is not None
        dx = da = db = dbias = None

        u = a = None
        if has_lora and (need_x or need_a):
            u = g @ _as(lora_b, dt)  # [M, r], shared by dX and dA
            a = _as(lora_a, dt)
        if need_x:
            w = dequant_workspace(packed, state, dt)
            if has_lora and p == 0:
                # dX = s·u·A + dY·W: the skinny GEMM writes, the big one accumulates (beta=1)
                dx = torch.empty(m, k, dtype=dt, device=g.device)
                dx.addmm_(u, a, beta=0, alpha=s)
                dx.addmm_(g, w)
            else:
                dx = g @ w
                if has_lora:
                    # the adapter saw d(x): its input gradient is masked and scaled like x was
                    _lora_grad_x_dropout_(dx, u, a, bits, p, s)
        if need_a:
            if p > 0:
                da = _lora_grad_a_dropout(u, x2, bits, p, s)
            else:
                da = torch.empty(u.shape[1], k, dtype=dt, device=g.device)
                da.addmm_(u.t(), x2, beta=0, alpha=s)
            da = _as(da, lora_a.dtype)
        if need_b:
            db = torch.empty(n, t.shape[1], dtype=dt, device=g.device)
            db.addmm_(g.t(), t, beta=0, alpha=s)
            db = _as(db, lora_b.dtype)
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


def _any_requires_grad(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _small_m_forward(x2, packed, state, lora_a, lora_b, scaling, bias) -> torch.Tensor:
    """y2 = x2·Wᵀ (+ bias) + s·(x2·Aᵀ)·Bᵀ for M <= NF4_MATMUL_MAX_M rows, without dropout: the
    fused kernel writes x2·Wᵀ (+ bias), the adapter's rank-r product is added in place."""
    dt = x2.dtype
    y = nf4_matmul(x2, packed, state, bias)
    y.addmm_(x2 @ _as(lora_a, dt).t(), _as(lora_b, dt).t(), alpha=scaling)
    return y


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
    scaling = float(scaling)
    dropout = float(dropout)
    if (
        lora_a is None
        and lora_b is None
        and 0.0 <= dropout <= 1.0
        and isinstance(x, torch.Tensor)
        and x.dim() > 0
        and x.numel() <= NF4_MATMUL_MAX_M * x.shape[-1]
        and not (torch.is_grad_enabled() and _any_requires_grad(x, bias))
    ):
        # the frozen 4-bit linear with nothing to differentiate (decode, eval): nf4_matmul's
        # cached validation and launch, when its kernel runs and M is small
        e = _mm_lookup(x, packed, state, bias)
        if e.fused and e.m <= NF4_MATMUL_MAX_M:
            return _mm_run(e, x, packed, bias, None)
    _validate(x, packed, state, lora_a, lora_b, scaling, bias, dropout)
    has_lora = lora_a is not None
    p = dropout if (training and has_lora) else 0.0
    if not use_triton(x, packed, lora_a, lora_b, bias):
        return qlora_linear_ref(x, packed, state, lora_a, lora_b, scaling, bias, p, True)
    n, k = state.shape
    if (
        has_lora
        and p == 0
        and x.numel() <= NF4_MATMUL_MAX_M * k
        and not (torch.is_grad_enabled() and _any_requires_grad(x, lora_a, lora_b, bias))
        and nf4_matmul_supported(k, state)
    ):
        # decode / eval with an adapter: nothing to differentiate, so no autograd node and
        # nothing saved; the same kernels as the forward of _QLoRALinearFunction (the same y)
        x2 = x if x.dim() == 2 else x.reshape(-1, k)
        y2 = _small_m_forward(x2, packed, state, lora_a, lora_b, scaling, bias)
        return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], n)
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != k):
        x2 = x2.contiguous()
    seed = 0
    if p > 0:
        seed = _draw_seed() if dropout_seed is None else int(dropout_seed)
    small_m = x2.shape[0] <= NF4_MATMUL_MAX_M and nf4_matmul_supported(k, state)
    if p > 0 and x2.is_cuda and not FUSED_DROPOUT_ON_CUDA:
        y2 = _qlora_linear_masked(x2, packed, state, lora_a, lora_b, scaling, bias, p, seed)
    else:
        y2 = _QLoRALinearFunction.apply(
            x2, packed, state, lora_a, lora_b, scaling, bias, p, seed, small_m
        )
    return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], n)


# The fused dropout kernels run on CUDA. (An H200 benchmark once measured a wrong dX with them
# at M=8192: the in-place dX kernel was autotuned without restoring dx between timing runs, so
# the first call of each new K added the adapter term once per run. False sends CUDA tensors
# with dropout through the composed path below instead: the same seeded mask applied in
# PyTorch around the frozen NF4 linear, one more pass over x and a saved bool mask.)
FUSED_DROPOUT_ON_CUDA = True


def _qlora_linear_masked(x2, packed, state, lora_a, lora_b, scaling, bias, p, seed):
    """y = x·Wᵀ (+ bias) + s·(dropout(x)·Aᵀ)·Bᵀ with the mask the fused kernels would draw."""
    keep = lora_dropout_mask(seed, (x2.shape[0], x2.shape[1]), p, x2.device)
    wide = torch.promote_types(x2.dtype, torch.float32)
    xd = torch.where(keep, (x2.to(wide) * _dropout_scale(p)).to(x2.dtype), torch.zeros_like(x2))
    base = _QLoRALinearFunction.apply(x2, packed, state, None, None, 1.0, bias, 0.0, 0, False)
    t = xd @ lora_a.to(x2.dtype).t()
    return base + scaling * (t @ lora_b.to(x2.dtype).t())


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
    use :func:`qlora_linear` for training. A bias in x's dtype avoids a cast per call.

    The first call for a state, x shape, x dtype and bias dtype validates everything and keeps
    the launch; later calls check devices, the shapes of bias and out and the alignment of x
    (see "nf4_matmul host path").
    """
    e = _mm_lookup(x, packed, state, bias)
    if out is not None and not (
        isinstance(out, torch.Tensor)
        and out.dtype is e.dtype
        and out.shape == e.out_shape
        and out.device == e.device
        and out.is_contiguous()
    ):
        got = f"{tuple(out.shape)} of {out.dtype}" if isinstance(out, torch.Tensor) else type(out)
        raise ValueError(
            f"out must be a contiguous {tuple(e.out_shape)} tensor of {e.dtype} on {e.device}, "
            f"got {got}"
        )
    if not e.fused:
        return _nf4_matmul_fallback(x, packed, state, bias, out, e)
    return _mm_run(e, x, packed, bias, out)


# --------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------


def init_lora_a(a: torch.Tensor, init: str, generator: torch.Generator | None = None) -> None:
    """Initialize a LoRA A matrix (r, in) in place: ``"kaiming"`` is Kaiming-uniform with
    a = √5 (gain √(2/6), bound 1/√in: PEFT's default), ``"gaussian"`` is N(0, 1/r²)."""
    if init == "kaiming":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    elif init == "gaussian":
        nn.init.normal_(a, std=1.0 / a.shape[0], generator=generator)
    else:
        raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")


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
        # drawn where the generator lives (a CPU generator gives the same A on any device)
        a = torch.empty(
            r, self.in_features, dtype=torch.float32,
            device=generator.device if generator is not None else dev,
        )  # fmt: skip
        init_lora_a(a, init, generator)
        self.lora_A = nn.Parameter(a.to(device=dev, dtype=dtype))
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
