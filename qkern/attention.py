"""Flash attention in Triton: forward, backward, GQA, packed sequences, windows, softcap, decode.

``flash_attention(q, k, v, causal=True, softmax_scale=None, window=None, softcap=None,
cu_seqlens=None, max_seqlen=None, cu_seqlens_k=None, max_seqlen_k=None)``

Shapes
    * batched: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D); output (B, Sq, Hq, D).
    * packed ("varlen"): q (Tq, Hq, D), k and v (Tk, Hkv, D) with ``cu_seqlens`` (int32, documents
      + 1 entries, 0 first, non-decreasing, last = Tq) giving each document's token range. Keys use
      ``cu_seqlens_k`` when given (documents with fewer queries than keys: prefill chunks or decode
      against a KV cache), else ``cu_seqlens``. A document attends only within itself.

Masks (per document, ``lq`` queries, ``lk`` keys)
    Query i sits at absolute position ``pos = i + lk - lq`` (bottom-right alignment: the last query
    faces the last key). It sees key j when ``j <= pos`` (causal) and ``pos - left <= j <= pos +
    right`` for ``window=(left, right)``; -1 leaves a side unbounded. Mistral's sliding window W is
    ``causal=True, window=(W - 1, 0)``. A query that sees no key outputs 0 (and gets 0 gradient).

Math
    s = softmax_scale * q·k (default 1/sqrt(D)); with ``softcap=c`` (Gemma-2) s = c·tanh(s/c),
    applied before masking; out = softmax(s) v, computed blockwise with an online softmax in fp32.
    The forward saves the log-sum-exp per query row in base 2 (``lse2 = log2 sum_j exp(s_j)``;
    +inf for rows that see no key) for the backward, which recomputes the probabilities.

GQA/MQA: Hq must be a multiple of Hkv; query head h reads K/V head ``h // (Hq // Hkv)``. K/V are
never repeated in memory; the dK/dV kernel sums the whole group in registers.

Limits: float16, bfloat16 and float32 inputs, all three of one dtype (float32 uses exact fp32
products on FMA units with small tiles: slow, meant for tests); head dim a multiple of 8 in
[16, 256] (non-powers of two are padded to the next power of two inside the kernels: 80 and 96
run as 128); the last dimension is made contiguous if it is not. Dropout, attention bias/ALiBi
and returning the LSE are not supported. Sequence lengths are arbitrary. For packed input on
CUDA, cu_seqlens values are checked only when max_seqlen (and max_seqlen_k) are not given,
because checking them needs a host sync; passing them promises they are right.

Design notes, memory arithmetic and H100 measurements: docs/kernels/attention.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qkern._backend import (
    check_float,
    check_same_device,
    interpreter_enabled,
    next_power_of_2,
    num_sms,
    pick_configs,
    use_triton,
)

LOG2E = 1.4426950408889634
# "unbounded" window side inside the kernels: larger than any sequence, small enough that
# position arithmetic (positions < 2^26 in practice) stays inside int32
_BIG = 1 << 30

Window = tuple[int, int] | None


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh(x) = 1 - 2 / (exp(2x) + 1); exp2 overflowing to inf gives exactly 1, underflow -1."""
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _load_tile(
    ptrs, rows, n_rows, offs_d, D: tl.constexpr, D_PAD: tl.constexpr, CHECK_ROWS: tl.constexpr
):
    """Load a (rows, D_PAD) tile; rows >= n_rows (when checked) and padded columns read as 0."""
    if CHECK_ROWS:
        if D == D_PAD:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    else:
        if D == D_PAD:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _key_range(m0, lq, lk, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks a query block [m0, m0 + BLOCK_M) must visit, split in three runs.

    Query i (position i + lk - lq) sees keys [pos - left, pos + right] ∩ [0, lk) (causal is
    right = 0). Returns n_start <= f_lo <= f_hi <= n_end: [n_start, f_lo) and [f_hi, n_end) hold
    partly visible blocks (need the mask), [f_lo, f_hi) blocks every valid row sees whole (no mask
    math at all). f_lo, f_hi are multiples of BLOCK_N unless clamped to n_end.
    """
    off = lk - lq
    m_last = tl.minimum(m0 + BLOCK_M, lq) - 1
    n_start = (tl.maximum(m0 + off - left, 0) // BLOCK_N) * BLOCK_N
    n_end = tl.maximum(tl.minimum(m_last + off + right + 1, lk), n_start)
    f_lo = (tl.maximum(m_last + off - left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    f_lo = tl.minimum(tl.maximum(f_lo, n_start), n_end)
    f_hi = (tl.maximum(tl.minimum(m0 + off + right + 1, lk), 0) // BLOCK_N) * BLOCK_N
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), n_end)
    return n_start, f_lo, f_hi, n_end


@triton.jit
def _query_range(n0, lq, lk, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks a key block [n0, n0 + BLOCK_N) must visit (the transpose of _key_range).

    Key j is seen by queries i with j - off - right <= i <= j - off + left, i in [0, lq).
    Returns m_start <= f_lo <= f3 <= m_end: [m_start, f_lo) and [f3, m_end) need the mask,
    [f_lo, f3) does not (rows >= lq there are loaded as zeros and add nothing).
    """
    off = lk - lq
    n_last = tl.minimum(n0 + BLOCK_N, lk) - 1
    m_start = (tl.maximum(n0 - off - right, 0) // BLOCK_M) * BLOCK_M
    m_end = tl.maximum(tl.minimum(n_last - off + left + 1, lq), m_start)
    f_lo = (tl.maximum(n_last - off - right, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    f_lo = tl.minimum(tl.maximum(f_lo, m_start), m_end)
    f_hi = (tl.maximum(n0 - off + left + 1, 0) // BLOCK_M) * BLOCK_M
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), m_end)
    # the unmasked loop walks whole blocks from f_lo; the masked tail starts where it stopped
    f3 = f_lo + (f_hi - f_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    f3 = tl.minimum(f3, tl.maximum(m_end, f_lo))
    return m_start, f_lo, f3, m_end


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d, lo, hi, lq,
    lk, left, right, qk_scale, cap_scale, D: tl.constexpr, D_PAD: tl.constexpr,
    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi): running max m_i, sum l_i, unnormalized acc.

    Scores are in base 2: s2 = log2(e)·s, so exp(s - m) = exp2(s2 - m2) and the scale is one
    multiply (qk_scale = scale·log2 e, or with softcap qk_scale = scale/c, cap_scale = c·log2 e).
    """
    off = lk - lq
    pos = offs_m + off
    # loop-invariant int32 offsets plus a scalar step: a loop-carried tensor of 64-bit pointers
    # would keep two registers per element alive across iterations
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + start_n * stride_ks + k_offs
        v_ptrs = v_base + start_n * stride_vs + v_offs
        # (loads are written out rather than calling a helper: the interpreter pays per call)
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < lk) & (offs_d[None, :] < D), other=0.0)
        elif D == D_PAD:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if SOFTCAP:
            s = _tanh(qk * qk_scale) * cap_scale
        else:
            s = qk * qk_scale
        if MASKED:
            vis = (
                (cols[None, :] < lk)
                & (cols[None, :] >= pos[:, None] - left)
                & (cols[None, :] <= pos[:, None] + right)
            )
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with nothing visible yet keeps m = -inf; subtract 0 there to avoid inf - inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < lk) & (offs_d[None, :] < D), other=0.0)
        elif D == D_PAD:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


def _fwd_configs() -> list:
    if interpreter_enabled():  # small blocks so CPU tests cross block boundaries
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # Hopper candidates. Shared memory per stage is BLOCK_N·D_PAD·2 bytes for K and for V
    # (BLOCK_N = 128, D = 128: 64 KiB a stage) plus Q's BLOCK_M·D_PAD·2 = 32 KiB, against
    # 227 KiB per block: 3 stages at BLOCK_N = 128, 4 at 64. Registers: the fp32 accumulator
    # BLOCK_M·D_PAD·4 = 64 KiB is 64 registers/thread at 8 warps; 4 warps would hold 128 and
    # spill at D = 128 (checked by compiling for sm_90), so all candidates use 8.
    return pick_configs(
        [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        ]
    )


def _pruner(d256: list, fp32: list):
    """An early_config_prune: exact-fp32 inputs and D_PAD = 256 get their own config lists.

    fp32 with input_precision="ieee" has no tensor-core path, so its dots run on FMA units with
    every operand in registers: only small tiles compile in reasonable time without spilling
    (fp32 exists for tests). D_PAD = 256 doubles every tile.
    """

    def prune(configs: list, named_args: dict, **kwargs) -> list:
        if interpreter_enabled():
            return configs
        if kwargs.get("PREC", named_args.get("PREC")) == "ieee":
            chosen = fp32
        elif kwargs.get("D_PAD", named_args.get("D_PAD", 128)) > 128:
            chosen = d256
        else:
            chosen = configs
        return chosen if _TUNE_ALL else chosen[:1]

    return prune


# The GPU test suite sets this False so each kernel variant compiles one config (the first,
# a sound default) instead of timing all of them: compile time dominates short test runs.
_TUNE_ALL = True

_FP32_MN = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
_FP32_SPLIT = [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]

# D_PAD = 256 doubles every tile. These compile without register spills for sm_90 and fit
# shared memory (fwd 128x32: Q 64 KiB + 2 stages of K/V 2·32 KiB = 128 KiB).
_D256_FWD = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]
_D256_DKDV = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=2),
]
_D256_DQ = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]
_D256_SPLIT = [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2)]

_KEY = ["bucket_q", "bucket_k", "D_PAD", "CAUSAL", "SOFTCAP", "VARLEN"]


@triton.autotune(
    configs=_fwd_configs(),
    key=_KEY,
    prune_configs_by={"early_config_prune": _pruner(_D256_FWD, _FP32_MN)},
)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, cu_q, cu_k, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads, group, qk_scale, cap_scale, left, right, bucket_q, bucket_k,
    D: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """O[b, i, h] = sum_j softmax_j(s_ij) V[b, j, h // group], LSE[b, h, i] = log2 sum_j exp(s_ij).

    Grid (batch·Hq, query blocks). Causal runs the query blocks in reverse so the longest rows
    start first and the short ones fill the tail of the launch. Q heads of one group are adjacent
    on axis 0, so their shared K/V blocks are read from L2.
    """
    pid_bh = tl.program_id(0)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    if CAUSAL:
        m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        m_block = tl.program_id(1)
    b64 = b.to(tl.int64)
    if VARLEN:
        q_start = tl.load(cu_q + b).to(tl.int64)
        lq = (tl.load(cu_q + b + 1) - q_start).to(tl.int32)
        k_start = tl.load(cu_k + b).to(tl.int64)
        lk = (tl.load(cu_k + b + 1) - k_start).to(tl.int32)
    else:
        q_start = b64 * 0
        lq = seqlen_q
        k_start = b64 * 0
        lk = seqlen_k
    m0 = m_block * BLOCK_M
    if m0 >= lq:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q_base = Q + b64 * stride_qb + q_start * stride_qs + h * stride_qh
    k_base = K + b64 * stride_kb + k_start * stride_ks + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vs + hk * stride_vh
    q = _load_tile(
        q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, lq, offs_d, D, D_PAD, True
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    n_start, f_lo, f_hi, n_end = _key_range(m0, lq, lk, left, right, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
        n_start, f_lo, lq, lk, left, right, qk_scale, cap_scale,
        D, D_PAD, True, SOFTCAP, PREC, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
        f_lo, f_hi, lq, lk, left, right, qk_scale, cap_scale,
        D, D_PAD, False, SOFTCAP, PREC, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
        f_hi, n_end, lq, lk, left, right, qk_scale, cap_scale,
        D, D_PAD, True, SOFTCAP, PREC, BLOCK_N,
    )  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))
    row_ok = offs_m < lq
    o_ptrs = O + b64 * stride_ob + q_start * stride_os + h * stride_oh
    o_ptrs += offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    lse_ptrs = LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)


def _split_configs() -> list:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # decode is bandwidth bound: K/V blocks of 64-128 rows, few warps, deep pipelining
    return pick_configs(
        [
            triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        ]
    )


@triton.autotune(
    configs=_split_configs(),
    key=["bucket_k", "D_PAD", "BLOCK_M", "SOFTCAP", "VARLEN"],
    prune_configs_by={"early_config_prune": _pruner(_D256_SPLIT, _FP32_SPLIT)},
)
@triton.jit
def _attn_fwd_split_kernel(
    Q, K, V, OP, LP, cu_q, cu_k, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, seqlen_q, seqlen_k, max_q, n_kv_heads, group, qk_scale,
    cap_scale, left, right, keys_per_split, bucket_k, D: tl.constexpr, D_PAD: tl.constexpr,
    SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Split-KV forward for few queries ("flash-decoding"): one program per (batch, KV head, split).

    Its BLOCK_M rows are every (query head of the group, query) pair, row r = g·max_q + i, so a
    K/V block is read once for the whole group. Each split covers keys [split·keys_per_split,
    (split+1)·keys_per_split) and writes its normalized partial output OP and base-2 LSE LP
    (-inf when it saw no key); _attn_split_combine_kernel merges the splits.
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    b64 = b.to(tl.int64)
    if VARLEN:
        q_start = tl.load(cu_q + b).to(tl.int64)
        lq = (tl.load(cu_q + b + 1) - q_start).to(tl.int32)
        k_start = tl.load(cu_k + b).to(tl.int64)
        lk = (tl.load(cu_k + b + 1) - k_start).to(tl.int32)
    else:
        q_start = b64 * 0
        lq = seqlen_q
        k_start = b64 * 0
        lk = seqlen_k
    off = lk - lq
    r = tl.arange(0, BLOCK_M)
    g = r // max_q
    i = r % max_q
    row_ok = (g < group) & (i < lq)
    h = hk * group + g
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b64 * stride_qb + q_start * stride_qs
    q_ptrs += i[:, None] * stride_qs + h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b64 * stride_kb + k_start * stride_ks + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vs + hk * stride_vh
    # keys this split covers that any row can see (row i = 0 has the leftmost window start)
    lo = tl.maximum(split * keys_per_split, tl.maximum(off - left, 0))
    hi = tl.minimum((split + 1) * keys_per_split, lk)
    pos = i + off
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < hi) & (offs_d[None, :] < D)
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if SOFTCAP:
            s = _tanh(qk * qk_scale) * cap_scale
        else:
            s = qk * qk_scale
        vis = (
            (cols[None, :] < hi)
            & (cols[None, :] >= pos[:, None] - left)
            & (cols[None, :] <= pos[:, None] + right)
        )
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    rows = group * max_q
    r_ok = r < rows
    base = pid_bh.to(tl.int64) * tl.num_programs(1) + split
    op_ptrs = OP + base * rows * D + r[:, None] * D + offs_d[None, :]
    tl.store(op_ptrs, out, mask=r_ok[:, None] & (offs_d[None, :] < D))
    tl.store(LP + base * rows + r, lse, mask=r_ok)


@triton.jit
def _attn_split_combine_kernel(
    OP, LP, O, LSE, cu_q, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, seqlen_q, max_q,
    n_kv_heads, group, n_splits, D: tl.constexpr, D_PAD: tl.constexpr, VARLEN: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    """Merge the split partials of one row: lse = log2 sum_s 2^lse_s, o = sum_s 2^(lse_s-lse)·o_s.

    Grid (batch·Hkv, group·max_q). A row no split saw gets output 0 and LSE +inf.
    """
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    g = r // max_q
    i = r % max_q
    b64 = b.to(tl.int64)
    if VARLEN:
        q_start = tl.load(cu_q + b).to(tl.int64)
        lq = (tl.load(cu_q + b + 1) - q_start).to(tl.int32)
    else:
        q_start = b64 * 0
        lq = seqlen_q
    if i >= lq:
        return
    h = hk * group + g
    rows = group * max_q
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < n_splits
    base = pid_bh.to(tl.int64) * n_splits + offs_s
    lse_s = tl.load(LP + base * rows + r, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_s - m_use)
    w_sum = tl.sum(w, 0)
    o_s = tl.load(
        OP + (base * rows + r)[:, None] * D + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    out = tl.sum(o_s * w[:, None], 0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    lse = tl.where(w_sum == 0.0, float("inf"), m_use + tl.log2(w_sum))
    o_ptrs = O + b64 * stride_ob + (q_start + i) * stride_os + h * stride_oh + offs_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_d < D)
    tl.store(LSE + b64 * stride_lb + h * stride_lh + q_start + i, lse)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, cu_q, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, seqlen_q, n_heads, D: tl.constexpr, D_PAD: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta[b, h, i] = sum_d dO[b, i, h, d]·O[b, i, h, d] in fp32 (= sum_j P_ij dP_ij)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    b64 = b.to(tl.int64)
    if VARLEN:
        q_start = tl.load(cu_q + b).to(tl.int64)
        lq = (tl.load(cu_q + b + 1) - q_start).to(tl.int32)
    else:
        q_start = b64 * 0
        lq = seqlen_q
    m0 = tl.program_id(1) * BLOCK_M
    if m0 >= lq:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m[:, None] < lq) & (offs_d[None, :] < D)
    o = tl.load(
        O + b64 * stride_ob + (q_start + offs_m[:, None]) * stride_os + h * stride_oh
        + offs_d[None, :],
        mask=mask,
        other=0.0,
    ).to(tl.float32)  # fmt: skip
    do = tl.load(
        DO + b64 * stride_dob + (q_start + offs_m[:, None]) * stride_dos + h * stride_doh
        + offs_d[None, :],
        mask=mask,
        other=0.0,
    ).to(tl.float32)  # fmt: skip
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, delta, mask=offs_m < lq)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, offs_m, offs_n,
    offs_d, lo, hi, lq, lk, left, right, qk_scale, cap_scale, D: tl.constexpr,
    D_PAD: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """For query blocks [lo, hi): dV += Pᵀ dO, dK += dSᵀ Q (times the scale, applied later).

    Works on transposed tiles (keys × queries): Pᵀ = exp2(s2ᵀ - lse2), dPᵀ = V dOᵀ,
    dSᵀ = Pᵀ ∘ (dPᵀ - delta) ∘ (1 - tanh²) with softcap.
    """
    off = lk - lq
    q_offs = offs_m[:, None] * stride_qs + offs_d[None, :]
    do_offs = offs_m[:, None] * stride_dos + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = q_base + start_m * stride_qs + q_offs
        do_ptrs = do_base + start_m * stride_dos + do_offs
        # rows >= lq read as zeros, so even unmasked blocks may run past the document's end
        if D == D_PAD:
            q = tl.load(q_ptrs, mask=rows[:, None] < lq, other=0.0)
            do = tl.load(do_ptrs, mask=rows[:, None] < lq, other=0.0)
        else:
            q = tl.load(q_ptrs, mask=(rows[:, None] < lq) & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_ptrs, mask=(rows[:, None] < lq) & (offs_d[None, :] < D), other=0.0)
        lse = tl.load(lse_base + rows, mask=rows < lq, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows < lq, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PREC)
        if SOFTCAP:
            t = _tanh(qk_t * qk_scale)
            s_t = t * cap_scale
        else:
            s_t = qk_t * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            pos = rows + off
            vis = (
                (rows[None, :] < lq)
                & (offs_n[:, None] >= pos[None, :] - left)
                & (offs_n[:, None] <= pos[None, :] + right)
            )
            p_t = tl.where(vis, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t * t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


def _dkdv_configs() -> list:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # dK and dV accumulators are 2·BLOCK_N·D_PAD fp32 = 128 KiB at BLOCK_N = D = 128, i.e. 128
    # registers/thread at 8 warps, plus K and V (64 more): the Q/dO blocks streamed per step stay
    # small. Compiled for sm_90 at D = 128: 16x128 has no spills, 32x128 spills ~30 bytes,
    # 64x128 ~250 bytes (4-warp variants spill kilobytes and are left out).
    return pick_configs(
        [
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        ]
    )


@triton.autotune(
    configs=_dkdv_configs(),
    key=_KEY,
    prune_configs_by={"early_config_prune": _pruner(_D256_DKDV, _FP32_MN)},
)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, cu_q, cu_k, stride_qb, stride_qs, stride_qh, stride_kb,
    stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_kv_heads, group, qk_scale, cap_scale, sm_scale, left, right, bucket_q,
    bucket_k, D: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block of one KV head, summed over the group's query heads in registers.

    Grid (batch·Hkv, key blocks); for causal masks the low key blocks (seen by most queries, the
    heaviest) come first in launch order.
    """
    pid_bh = tl.program_id(0)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    b64 = b.to(tl.int64)
    if VARLEN:
        q_start = tl.load(cu_q + b).to(tl.int64)
        lq = (tl.load(cu_q + b + 1) - q_start).to(tl.int32)
        k_start = tl.load(cu_k + b).to(tl.int64)
        lk = (tl.load(cu_k + b + 1) - k_start).to(tl.int32)
    else:
        q_start = b64 * 0
        lq = seqlen_q
        k_start = b64 * 0
        lk = seqlen_k
    n0 = tl.program_id(1) * BLOCK_N
    if n0 >= lk:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k = _load_tile(
        K + b64 * stride_kb + k_start * stride_ks + hk * stride_kh
        + offs_n[:, None] * stride_ks + offs_d[None, :],
        offs_n, lk, offs_d, D, D_PAD, True,
    )  # fmt: skip
    v = _load_tile(
        V + b64 * stride_vb + k_start * stride_vs + hk * stride_vh
        + offs_n[:, None] * stride_vs + offs_d[None, :],
        offs_n, lk, offs_d, D, D_PAD, True,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    m_start, f_lo, f3, m_end = _query_range(n0, lq, lk, left, right, BLOCK_M, BLOCK_N)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b64 * stride_qb + q_start * stride_qs + h * stride_qh
        do_base = DO + b64 * stride_dob + q_start * stride_dos + h * stride_doh
        lse_base = LSE + b64 * stride_lb + h * stride_lh + q_start
        delta_base = DELTA + b64 * stride_lb + h * stride_lh + q_start
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
            offs_m, offs_n, offs_d, m_start, f_lo, lq, lk, left, right, qk_scale, cap_scale,
            D, D_PAD, True, SOFTCAP, PREC, BLOCK_M,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
            offs_m, offs_n, offs_d, f_lo, f3, lq, lk, left, right, qk_scale, cap_scale,
            D, D_PAD, False, SOFTCAP, PREC, BLOCK_M,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
            offs_m, offs_n, offs_d, f3, m_end, lq, lk, left, right, qk_scale, cap_scale,
            D, D_PAD, True, SOFTCAP, PREC, BLOCK_M,
        )  # fmt: skip
    dk = dk * sm_scale
    mask = (offs_n[:, None] < lk) & (offs_d[None, :] < D)
    dk_ptrs = DK + b64 * stride_dkb + (k_start + offs_n[:, None]) * stride_dks + hk * stride_dkh
    tl.store(dk_ptrs + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask)
    dv_ptrs = DV + b64 * stride_dvb + (k_start + offs_n[:, None]) * stride_dvs + hk * stride_dvh
    tl.store(dv_ptrs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d, lo, hi,
    lq, lk, left, right, qk_scale, cap_scale, D: tl.constexpr, D_PAD: tl.constexpr,
    MASKED: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """For key blocks [lo, hi): dQ += dS K with dS = P ∘ (dO Vᵀ - delta) (∘ (1 - tanh²))."""
    off = lk - lq
    pos = offs_m + off
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + start_n * stride_ks + k_offs
        v_ptrs = v_base + start_n * stride_vs + v_offs
        if MASKED:
            kv_mask = (cols[:, None] < lk) & (offs_d[None, :] < D)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif D == D_PAD:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if SOFTCAP:
            t = _tanh(qk * qk_scale)
            s = t * cap_scale
        else:
            s = qk * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            vis = (
                (cols[None, :] < lk)
                & (cols[None, :] >= pos[:, None] - left)
                & (cols[None, :] <= pos[:, None] + right)
            )
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


def _dq_configs() -> list:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # Q, dO and the dQ accumulator stay resident (3·BLOCK_M·D_PAD), K and V stream; at D = 128
    # the two 8-warp configs compile without spills for sm_90, 64x64 at 4 warps spills ~20 bytes
    return pick_configs(
        [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        ]
    )


@triton.autotune(
    configs=_dq_configs(),
    key=_KEY,
    prune_configs_by={"early_config_prune": _pruner(_D256_DQ, _FP32_MN)},
)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, cu_q, cu_k, stride_qb, stride_qs, stride_qh, stride_kb,
    stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh, stride_lb, stride_lh, seqlen_q, seqlen_k, n_heads, group,
    qk_scale, cap_scale, sm_scale, left, right, bucket_q, bucket_k, D: tl.constexpr,
    D_PAD: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ of one query block (FA2-style separate kernel: no atomics, deterministic)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    if CAUSAL:
        m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        m_block = tl.program_id(1)
    b64 = b.to(tl.int64)
    if VARLEN:
        q_start = tl.load(cu_q + b).to(tl.int64)
        lq = (tl.load(cu_q + b + 1) - q_start).to(tl.int32)
        k_start = tl.load(cu_k + b).to(tl.int64)
        lk = (tl.load(cu_k + b + 1) - k_start).to(tl.int32)
    else:
        q_start = b64 * 0
        lq = seqlen_q
        k_start = b64 * 0
        lk = seqlen_k
    m0 = m_block * BLOCK_M
    if m0 >= lq:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < lq
    q = _load_tile(
        Q + b64 * stride_qb + (q_start + offs_m[:, None]) * stride_qs + h * stride_qh
        + offs_d[None, :],
        offs_m, lq, offs_d, D, D_PAD, True,
    )  # fmt: skip
    do = _load_tile(
        DO + b64 * stride_dob + (q_start + offs_m[:, None]) * stride_dos + h * stride_doh
        + offs_d[None, :],
        offs_m, lq, offs_d, D, D_PAD, True,
    )  # fmt: skip
    lse = tl.load(LSE + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(
        DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, mask=row_ok, other=0.0
    )
    k_base = K + b64 * stride_kb + k_start * stride_ks + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vs + hk * stride_vh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    n_start, f_lo, f_hi, n_end = _key_range(m0, lq, lk, left, right, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
        n_start, f_lo, lq, lk, left, right, qk_scale, cap_scale, D, D_PAD, True, SOFTCAP, PREC,
        BLOCK_N,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
        f_lo, f_hi, lq, lk, left, right, qk_scale, cap_scale, D, D_PAD, False, SOFTCAP, PREC,
        BLOCK_N,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
        f_hi, n_end, lq, lk, left, right, qk_scale, cap_scale, D, D_PAD, True, SOFTCAP, PREC,
        BLOCK_N,
    )  # fmt: skip
    dq = dq * sm_scale
    dq_ptrs = DQ + b64 * stride_dqb + (q_start + offs_m[:, None]) * stride_dqs + h * stride_dqh
    tl.store(
        dq_ptrs + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < D),
    )


# ---------------------------------------------------------------------------------------------
# Host side: validation, launchers, autograd
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Everything about one call except the tensors being differentiated."""

    causal: bool
    scale: float
    left: int  # -1 = unbounded
    right: int
    softcap: float | None
    cu_q: torch.Tensor | None
    cu_k: torch.Tensor | None
    max_q: int
    max_k: int

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None

    def kernel_window(self) -> tuple[int, int]:
        """(left, right) as the kernels use them: causal folded into right, unbounded = _BIG."""
        left = self.left if self.left >= 0 else _BIG
        right = self.right if self.right >= 0 else _BIG
        if self.causal:
            right = min(right, 0)
        return left, right

    def scores(self) -> tuple[float, float]:
        """(qk_scale, cap_scale) so the kernels' base-2 score is qk·qk_scale or
        cap_scale·tanh(qk·qk_scale)."""
        if self.softcap is None:
            return self.scale * LOG2E, 1.0
        return self.scale / self.softcap, self.softcap * LOG2E


def _normalize_window(window: Window) -> tuple[int, int]:
    """(left, right) with -1 for an unbounded side; validates the user's value."""
    if window is None:
        return (-1, -1)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a (left, right) pair of ints, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        w = -1 if w is None else w
        if not isinstance(w, int) or isinstance(w, bool) or w < -1:
            raise ValueError(f"window {side} must be an int >= 0 or -1 (unbounded), got {w!r}")
        out.append(w)
    return out[0], out[1]


def _check_cu_seqlens(cu: torch.Tensor, name: str) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(
            f"{name} must be 1-D with documents + 1 >= 2 entries, got {tuple(cu.shape)}"
        )


def _check_cu_values(cu: torch.Tensor, name: str, total: int, tensor_name: str) -> int:
    """Value checks (a host sync on CUDA); returns the longest document."""
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    lengths = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(
            f"{name} must end at the token count of {tensor_name} ({total}), got {vals[-1]}"
        )
    return max(lengths)


def _check_max(value: int | None, name: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float | None,
    window: Window,
    softcap: float | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_k: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Spec]:
    """Validate a call; return q, k, v with a contiguous last dim and the call's _Spec."""
    check_float(q, "q")
    check_float(k, "k")
    check_float(v, "v")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k)
    varlen = cu_seqlens is not None
    if cu_seqlens_k is not None and not varlen:
        raise ValueError("cu_seqlens_k needs cu_seqlens (packed input)")
    if not varlen and (max_seqlen is not None or max_seqlen_k is not None):
        raise ValueError("max_seqlen/max_seqlen_k are only for packed input with cu_seqlens")
    want = 3 if varlen else 4
    layout = "(tokens, heads, head_dim)" if varlen else "(batch, seq, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            hint = "" if varlen else " (pass cu_seqlens for packed 3-D input)"
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}{hint}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}"
        )
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {k.shape[-1]}")
    if d % 8 != 0 or not 16 <= d <= 256:
        raise ValueError(f"head_dim must be a multiple of 8 in [16, 256], got {d}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if softmax_scale is not None and not (
        isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
    ):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    if softcap is not None and not (
        isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0
    ):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    left, right = _normalize_window(window)
    _check_max(max_seqlen, "max_seqlen")
    _check_max(max_seqlen_k, "max_seqlen_k")
    cu_q = cu_k = None
    if varlen:
        _check_cu_seqlens(cu_seqlens, "cu_seqlens")
        cu_q = cu_seqlens.contiguous()
        cu_k = cu_q if cu_seqlens_k is None else cu_seqlens_k.contiguous()
        if cu_seqlens_k is not None:
            _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
            if cu_seqlens_k.numel() != cu_seqlens.numel():
                raise ValueError(
                    f"cu_seqlens_k must have as many entries as cu_seqlens, got "
                    f"{cu_seqlens_k.numel()} and {cu_seqlens.numel()}"
                )
        elif q.shape[0] != k.shape[0]:
            raise ValueError(
                f"q has {q.shape[0]} tokens but k has {k.shape[0]}: pass cu_seqlens_k when the "
                "documents' key lengths differ from their query lengths"
            )
        given_k = max_seqlen_k if cu_seqlens_k is not None else max_seqlen
        # value checks need the numbers on the host: free on CPU, a sync on CUDA, so on CUDA they
        # run only when the caller did not already supply the lengths
        if not cu_q.is_cuda or max_seqlen is None or given_k is None:
            real_q = _check_cu_values(cu_q, "cu_seqlens", q.shape[0], "q")
            name_k = "cu_seqlens" if cu_seqlens_k is None else "cu_seqlens_k"
            real_k = _check_cu_values(cu_k, name_k, k.shape[0], "k")
            for given, real, nm in (
                (max_seqlen, real_q, "max_seqlen"),
                (given_k, real_k, "max_seqlen_k"),
            ):
                if given is not None and given < real:
                    raise ValueError(f"{nm}={given} is smaller than the longest document ({real})")
            max_q = real_q if max_seqlen is None else max_seqlen
            max_k = real_k if given_k is None else given_k
        else:
            max_q, max_k = max_seqlen, given_k
    else:
        max_q, max_k = q.shape[1], k.shape[1]
    # the kernels index rows with a unit stride in the head dimension
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    spec = _Spec(
        causal=bool(causal),
        scale=scale,
        left=left,
        right=right,
        softcap=None if softcap is None else float(softcap),
        cu_q=cu_q,
        cu_k=cu_k,
        max_q=int(max_q),
        max_k=int(max_k),
    )
    return q, k, v, spec


def _new_output(like: torch.Tensor) -> torch.Tensor:
    """Allocation of kernel outputs (out, dq, dk, dv); the tests swap in NaN-filled buffers."""
    return torch.empty_like(like)


def _new_buffer(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """fp32 per-row or partial-result buffer (LSE, delta, split partials); swapped in tests too."""
    return torch.empty(shape, device=device, dtype=torch.float32)


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, seq, head) strides; packed tensors have no batch dimension (stride 0)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_layout(q: torch.Tensor, spec: _Spec) -> tuple[tuple[int, ...], tuple[int, int]]:
    """Shape of the per-row LSE/delta buffer and its (batch, head) strides.

    Batched: (B, Hq, Sq); packed: (Hq, Tq) indexed with the document's token offset.
    """
    if spec.varlen:
        hq, tq = q.shape[1], q.shape[0]
        return (hq, tq), (0, tq)
    b, sq, hq = q.shape[0], q.shape[1], q.shape[2]
    return (b, hq, sq), (hq * sq, sq)


def _batch(q: torch.Tensor, spec: _Spec) -> int:
    return spec.cu_q.numel() - 1 if spec.varlen else q.shape[0]


def _bucket(n: int) -> int:
    """Autotune key for a length: the next power of two up to 2048, beyond which the best blocks
    no longer change; varlen calls with new max lengths then rarely retune."""
    return min(next_power_of_2(max(n, 1)), 2048)


def _num_splits(batch: int, hkv: int, group: int, spec: _Spec, device: torch.device) -> int:
    """How many KV splits the decode path uses, 0 = use the regular forward.

    The regular forward pads every query block to BLOCK_M = 128 rows and re-reads K/V once per
    query head; with few queries (group·Sq <= 64) it is far better to put the group's heads in the
    rows and split the keys so batch·Hkv·splits programs fill the GPU (about 2 per SM), each split
    at least 256 keys.
    """
    if group * spec.max_q > 64 or spec.max_k < 256:
        return 0
    programs = batch * hkv
    want = triton.cdiv(2 * num_sms(device), max(programs, 1))
    return max(1, min(want, triton.cdiv(spec.max_k, 256), 64))


def _attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec, num_splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernels; returns (out, lse2). ``num_splits`` forces the split-KV path."""
    varlen = spec.varlen
    batch = _batch(q, spec)
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    group = hq // hkv
    d_pad = max(16, next_power_of_2(d))
    out = _new_output(q)
    lse_shape, (slb, slh) = _lse_layout(q, spec)
    lse = _new_buffer(lse_shape, q.device)
    if q.numel() == 0:
        return out, lse
    left, right = spec.kernel_window()
    qk_scale, cap_scale = spec.scores()
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    cu_q = spec.cu_q if varlen else lse  # any tensor: unused when not VARLEN
    cu_k = spec.cu_k if varlen else lse
    seqlen_q = 0 if varlen else q.shape[1]
    seqlen_k = 0 if varlen else k.shape[1]
    splits = _num_splits(batch, hkv, group, spec, q.device) if num_splits is None else num_splits
    if splits > 0 and spec.max_q > 0:
        rows = group * spec.max_q
        block_m = max(16, next_power_of_2(rows))
        keys_per_split = triton.cdiv(triton.cdiv(max(spec.max_k, 1), splits), 128) * 128
        splits = max(1, triton.cdiv(max(spec.max_k, 1), keys_per_split))
        # partials: fp32 out (batch·Hkv·splits·rows·D) and LSE; for decode (rows = group) that is
        # splits·Hq·D floats per sequence, small next to the K/V it summarizes
        o_part = _new_buffer((batch * hkv * splits * rows * d,), q.device)
        l_part = _new_buffer((batch * hkv * splits * rows,), q.device)
        _attn_fwd_split_kernel[(batch * hkv, splits)](
            q, k, v, o_part, l_part, cu_q, cu_k,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
            seqlen_q, seqlen_k, spec.max_q, hkv, group, qk_scale, cap_scale, left, right,
            keys_per_split, _bucket(spec.max_k),
            D=d, D_PAD=d_pad, SOFTCAP=spec.softcap is not None, VARLEN=varlen, PREC=prec,
            BLOCK_M=block_m,
        )  # fmt: skip
        _attn_split_combine_kernel[(batch * hkv, rows)](
            o_part, l_part, out, lse, cu_q, *_strides(out, varlen), slb, slh,
            seqlen_q, spec.max_q, hkv, group, splits,
            D=d, D_PAD=d_pad, VARLEN=varlen, SPLITS_PAD=max(2, next_power_of_2(splits)),
        )  # fmt: skip
        return out, lse

    def grid(meta: dict) -> tuple[int, int]:
        return (batch * hq, triton.cdiv(spec.max_q, meta["BLOCK_M"]))

    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        slb, slh, seqlen_q, seqlen_k, hq, group, qk_scale, cap_scale, left, right,
        _bucket(spec.max_q), _bucket(spec.max_k),
        D=d, D_PAD=d_pad, CAUSAL=spec.causal, SOFTCAP=spec.softcap is not None, VARLEN=varlen,
        PREC=prec,
    )  # fmt: skip
    return out, lse


def _attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spec: _Spec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """delta = rowsum(dO∘O), then dK/dV (per KV head, group summed in-kernel), then dQ."""
    varlen = spec.varlen
    batch = _batch(q, spec)
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    group = hq // hkv
    d_pad = max(16, next_power_of_2(d))
    do = do if do.stride(-1) == 1 else do.contiguous()
    dq, dk, dv = _new_output(q), _new_output(k), _new_output(v)
    if k.numel() == 0 or q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse_shape, (slb, slh) = _lse_layout(q, spec)
    delta = _new_buffer(lse_shape, q.device)
    left, right = spec.kernel_window()
    qk_scale, cap_scale = spec.scores()
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    cu_q = spec.cu_q if varlen else lse
    cu_k = spec.cu_k if varlen else lse
    seqlen_q = 0 if varlen else q.shape[1]
    seqlen_k = 0 if varlen else k.shape[1]
    flags = dict(
        D=d,
        D_PAD=d_pad,
        CAUSAL=spec.causal,
        SOFTCAP=spec.softcap is not None,
        VARLEN=varlen,
        PREC=prec,
    )
    # delta: 4096 elements of O and of dO per program = 32 fp32 values each per thread (4 warps)
    block = max(16, 4096 // d_pad)
    _attn_bwd_delta_kernel[(batch * hq, triton.cdiv(spec.max_q, block))](
        out, do, delta, cu_q, *_strides(out, varlen), *_strides(do, varlen), slb, slh,
        seqlen_q, hq, D=d, D_PAD=d_pad, VARLEN=varlen, BLOCK_M=block,
    )  # fmt: skip
    buckets = (_bucket(spec.max_q), _bucket(spec.max_k))

    def grid_kv(meta: dict) -> tuple[int, int]:
        return (batch * hkv, triton.cdiv(spec.max_k, meta["BLOCK_N"]))

    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
        *_strides(dk, varlen), *_strides(dv, varlen), slb, slh,
        seqlen_q, seqlen_k, hkv, group, qk_scale, cap_scale, spec.scale, left, right, *buckets,
        **flags,
    )  # fmt: skip

    def grid_q(meta: dict) -> tuple[int, int]:
        return (batch * hq, triton.cdiv(spec.max_q, meta["BLOCK_M"]))

    _attn_bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq, cu_q, cu_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
        *_strides(dq, varlen), slb, slh,
        seqlen_q, seqlen_k, hq, group, qk_scale, cap_scale, spec.scale, left, right, *buckets,
        **flags,
    )  # fmt: skip
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec
    ) -> torch.Tensor:
        out, lse = _attention_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _attention_backward(do, q, k, v, out, lse, ctx.spec)
        return dq, dk, dv, None


# ---------------------------------------------------------------------------------------------
# Reference and public API
# ---------------------------------------------------------------------------------------------


def visible_mask(
    lq: int, lk: int, causal: bool, window: Window = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean (lq, lk) matrix: which keys each query of one document may attend to.

    Query i sits at absolute position ``pos = i + lk - lq`` (bottom-right alignment). It sees key
    j when ``j <= pos`` (if causal) and ``pos - left <= j <= pos + right`` for each bounded side of
    ``window``.
    """
    left, right = _normalize_window(window)
    pos = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    mask = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= pos
    if left >= 0:
        mask &= j >= pos - left
    if right >= 0:
        mask &= j <= pos + right
    return mask


def _attention_dense_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    window: Window,
    softcap: float | None,
    upcast: bool,
) -> torch.Tensor:
    """Plain softmax attention for (B, Sq, Hq, D) / (B, Sk, Hkv, D); rows that see no key give 0."""
    out_dtype = q.dtype
    if upcast:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if k.shape[1] == 0:  # no keys at all: every row sees nothing
        return torch.zeros_like(q, dtype=out_dtype) + 0 * q.sum()
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)  # (B, Hq, Sq, D)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)  # repeated K/V: fine for a reference
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    s = qh @ kh.transpose(-1, -2)
    if not upcast:
        s = s.float()
    s = s * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    mask = visible_mask(q.shape[1], k.shape[1], causal, window, q.device)
    s = s.masked_fill(~mask, float("-inf"))
    # softmax that gives 0 (not NaN) for rows where every key is masked
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = p.to(vh.dtype) @ vh
    return out.transpose(1, 2).to(out_dtype)


def flash_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: Window = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference attention with the semantics of :func:`flash_attention` (no input checks).

    Materializes the (Sq, Sk) scores per document and repeats K/V over GQA groups: for tests and
    the CPU path. ``upcast=True`` computes in float32 (float64 for float64 inputs);
    ``upcast=False`` runs the matrix products in the input dtype (softmax in float32), i.e. what
    plain PyTorch in that dtype gives — the tests' error budget.
    """
    del max_seqlen, max_seqlen_k  # only size the kernels' grids
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        return _attention_dense_ref(q, k, v, causal, scale, window, softcap, upcast)
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    cq, ck = cu_seqlens.tolist(), cu_k.tolist()
    outs = [q.new_zeros((0, *q.shape[1:]))]
    for d in range(len(cq) - 1):
        qd = q[cq[d] : cq[d + 1]].unsqueeze(0)
        kd = k[ck[d] : ck[d + 1]].unsqueeze(0)
        vd = v[ck[d] : ck[d + 1]].unsqueeze(0)
        outs.append(_attention_dense_ref(qd, kd, vd, causal, scale, window, softcap, upcast)[0])
    return torch.cat(outs, dim=0)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: Window = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Softmax attention, differentiable in q, k, v; output has q's shape and dtype.

    Args:
        q: (B, Sq, Hq, D), or (Tq, Hq, D) packed with ``cu_seqlens``.
        k, v: (B, Sk, Hkv, D), or (Tk, Hkv, D) packed; Hq must be a multiple of Hkv.
        causal: causal mask, aligned bottom-right when a document has fewer queries than keys.
        softmax_scale: score scale, default 1/sqrt(D).
        window: (left, right) keys visible before/after a query's position, -1 = unbounded.
        softcap: Gemma-2 logit cap c: s = c·tanh(s/c) before masking.
        cu_seqlens: int32 (documents + 1,) token offsets of packed input (queries, and keys unless
            ``cu_seqlens_k`` is given).
        max_seqlen: longest query document (computed from cu_seqlens when None).
        cu_seqlens_k, max_seqlen_k: the same for keys when they differ from the queries'.
    """
    q, k, v, spec = _prepare(
        q, k, v, causal, softmax_scale, window, softcap, cu_seqlens, max_seqlen, cu_seqlens_k,
        max_seqlen_k,
    )  # fmt: skip
    if use_triton(q, k, v):
        return _FlashAttention.apply(q, k, v, spec)
    return flash_attention_ref(
        q, k, v, spec.causal, spec.scale, (spec.left, spec.right), spec.softcap, spec.cu_q,
        None, spec.cu_k,
    )  # fmt: skip
