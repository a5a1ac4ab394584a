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
because checking them needs a host sync; passing them promises they are right. The decode
path reuses one workspace (partials and arrival counters) per device: do not run two decode
calls concurrently on different CUDA streams of one device.

Design notes, memory arithmetic and measurements: docs/kernels/attention.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

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
from qkern.nf4 import _launch

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
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, pos, offs_n,
    offs_d, lo, hi, lk, left, right, qk_scale, cap_scale, D: tl.constexpr,
    D_PAD: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi): running max m_i, sum l_i, unnormalized acc.

    ``pos`` is each row's query position in key coordinates (causal alignment bottom-right:
    query i of lq sees keys up to i + lk - lq); MASKED blocks check the sequence end and each
    row's visible range [pos - left, pos + right], the others are seen whole by every real row,
    so their loads carry no predicates and their scores no compares. The dense forward and the
    decode kernel (rows = a KV head's query group, TMA and WS off) share this loop.

    Scores are in base 2: s2 = log2(e)·s, so exp(s - m) = exp2(s2 - m2) and the scale is one
    multiply (qk_scale = scale·log2 e, or with softcap qk_scale = scale/c, cap_scale = c·log2 e).
    TMA: K/V tiles come through the document's tensor descriptors (rows >= lk read as zeros by
    the hardware, no address or mask registers). WS: the loop is warp-specialized (producer
    warps issue the loads, consumer warps the dots and the softmax).
    """
    # loop-invariant int32 offsets plus a scalar step: a loop-carried tensor of 64-bit pointers
    # would keep two registers per element alive across iterations
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        cols = start_n + offs_n
        k_ptrs = k_base + start_n * stride_ks + k_offs
        v_ptrs = v_base + start_n * stride_vs + v_offs
        # (loads are written out rather than calling a helper: the interpreter pays per call)
        if TMA:
            k = k_desc.load([start_n, 0])
        elif MASKED:
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
        if TMA:
            v = v_desc.load([start_n, 0])
        elif MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < lk) & (offs_d[None, :] < D), other=0.0)
        elif D == D_PAD:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


def _cfg(
    block_m: int | None, block_n: int | None, warps: int, stages: int, tma: bool = False,
    ws: bool = False,
) -> triton.Config:  # fmt: skip
    """An autotune candidate; TMA (tensor-descriptor loads) and WS (warp-specialized loop) are
    compile-time variants the autotuner times side by side with the plain ones."""
    meta = {"TMA": tma, "WS": ws}
    if block_m is not None:
        meta["BLOCK_M"] = block_m
    if block_n is not None:
        meta["BLOCK_N"] = block_n
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def _fwd_configs() -> list:
    if interpreter_enabled():  # small blocks so CPU tests cross block boundaries
        return [_cfg(32, 16, 4, 1)]
    # Hopper candidates. Shared memory per stage is BLOCK_N·D_PAD·2 bytes for K and for V
    # (BLOCK_N = 64, D = 128: 32 KiB a stage) plus Q's BLOCK_M·D_PAD·2 bytes, against 227 KiB
    # per block. Registers: the fp32 accumulator BLOCK_M·D_PAD·4 = 64 KiB at BLOCK_M = 128 is
    # 64 registers/thread at 8 warps (one 64-row wgmma per warpgroup). Compiled for sm_90 with
    # Triton 3.6 at D = 128 (registers / spill stack / shared memory):
    #   pointer 128x64 8w:       255 / 320 B / 48 KiB (the same binary at 3, 4 or 5 stages:
    #                            the pointer loads are not multi-buffered, stages change nothing)
    #   pointer 128x32 8w 4s:    252 / none  / 40 KiB
    #   TMA 128x64 8w 4s:        141 / none  / 161 KiB;  TMA 128x128 8w 3s: 187 / none / 225 KiB
    #   TMA 64x64 4w 2s:         164 / none  / 81 KiB, i.e. two blocks of one warpgroup per SM
    #                            (the 8-warp candidates fit one block per SM)
    #   TMA + WS 128x64 8w 2s:   142 / none  / 96 KiB
    # The first entry is the default when only one config is compiled (tests); TMA entries are
    # dropped when the launch cannot use descriptors, WS entries while _WARP_SPECIALIZE is off.
    # Measured on an H200 (D = 128, B8 S2048) and dropped: pointer 128x128 (spills 1.4 KB) and
    # TMA + WS 128x128 2s (0.923 ms against the pointer 128x64's 0.768).
    return pick_configs(
        [
            _cfg(128, 64, 8, 4),
            _cfg(128, 32, 8, 4),
            _cfg(128, 64, 8, 4, tma=True),
            _cfg(128, 128, 8, 3, tma=True),
            _cfg(64, 64, 4, 2, tma=True),
            _cfg(128, 64, 8, 2, tma=True, ws=True),
        ]
    )


def _pruner(d256: list, fp32: list):
    """An early_config_prune: exact-fp32 inputs and D_PAD = 256 get their own config lists.

    fp32 with input_precision="ieee" has no tensor-core path, so its dots run on FMA units with
    every operand in registers: only small tiles compile in reasonable time without spilling
    (fp32 exists for tests). D_PAD = 256 doubles every tile. TMA candidates need TMA_OK (the
    launcher checked the alignment descriptors require), WS ones need _WARP_SPECIALIZE.
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
        tma_ok = kwargs.get("TMA_OK", named_args.get("TMA_OK", False))
        # warp-specialized candidates only where they were checked on the GPU: the probe and
        # the GPU tests run them at D_PAD = 128 (dense and packed, window, softcap)
        ws_ok = _WARP_SPECIALIZE and kwargs.get("D_PAD", named_args.get("D_PAD", 128)) == 128
        chosen = [
            c
            for c in chosen
            if (tma_ok or not c.kwargs.get("TMA")) and (ws_ok or not c.kwargs.get("WS"))
        ]
        return chosen if _TUNE_ALL else chosen[:1]

    return prune


# The GPU test suite sets this False so each kernel variant compiles one config (the first,
# a sound default) instead of timing all of them: compile time dominates short test runs.
_TUNE_ALL = True
# Warp-specialized candidates (tl.range(..., warp_specialize=True)) take part in autotuning only
# when this is True. Whether Triton lowers them for a given GPU and version is checked once by
# probe_warp_specialization() in a child process, because a failing lowering can abort the
# process instead of raising; the benchmark runs that probe and then sets this.
_WARP_SPECIALIZE = False
# TMA (tensor-descriptor) candidates take part when this is True and the inputs allow it
# (CUDA, D a power of two, 16-byte aligned base and strides).
_USE_TMA = True


def _tma_alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for the descriptors kernels build on the device (128 bytes each)."""
    del alignment, stream  # the caching allocator's blocks are 512-byte aligned, stream-ordered
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _tma_ok(d: int, *tensors: torch.Tensor) -> bool:
    """Whether the TMA candidates may run: descriptors need a power-of-two D here (the tile is
    the whole row), a 16-byte aligned base and 16-byte multiples for every row stride.

    Also installs the scratch allocator descriptors need. Triton keeps it per thread context,
    and autograd runs the backward on its own thread, so every launcher calls this.
    """
    if not _USE_TMA or d != next_power_of_2(d):
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(st == 0 or st * size % 16 for st in t.stride()[:-1]):
            return False
    if not interpreter_enabled():
        triton.set_allocator(_tma_alloc)
    return True


def _force_configs(fwd: list, dkdv: list, dq: list) -> None:
    """Make the three dense kernels tune over exactly these candidates (tests, probes)."""
    for kernel, configs in (
        (_attn_fwd_kernel, fwd),
        (_attn_bwd_dkdv_kernel, dkdv),
        (_attn_bwd_dq_kernel, dq),
    ):
        kernel.configs = list(configs)
        kernel.cache.clear()


def _warp_specialization_selfcheck() -> None:
    """Run forward and backward with only warp-specialized TMA candidates on a small bf16 case
    and raise unless they match the float32 reference (run in a child process by
    probe_warp_specialization)."""
    global _WARP_SPECIALIZE
    _WARP_SPECIALIZE = True
    _force_configs(
        [_cfg(128, 64, 8, 2, tma=True, ws=True)],
        [_cfg(64, 128, 8, 2, tma=True, ws=True)],
        [_cfg(128, 64, 8, 2, tma=True, ws=True)],
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, 700, h, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        for h in (4, 1, 1)
    )
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, causal=True)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = flash_attention_ref(*ref_leaves, causal=True)
    refs = torch.autograd.grad(ref, ref_leaves, do.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *refs)):
        err = ((a.float() - b).norm() / b.norm()).item()
        if not err < 2e-2:
            raise AssertionError(f"warp-specialized {name}: relative error {err:.3g}")


def probe_warp_specialization(timeout_s: float = 180.0) -> bool:
    """Whether this GPU and Triton build run the warp-specialized candidates correctly.

    Checked in a child process (compile failures in that lowering can abort the process, and
    a wrong synchronization could hang it). True means _WARP_SPECIALIZE may be set.
    """
    import subprocess
    import sys

    code = "from qkern.attention import _warp_specialization_selfcheck as f; f()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def enable_warp_specialization(timeout_s: float = 180.0) -> bool:
    """Let the warp-specialized candidates take part in autotuning when a child process runs
    them correctly on this GPU and Triton build (``probe_warp_specialization``); returns whether
    they do. Measured on an H200 with Triton 3.6, the warp-specialized dK/dV kernel is the
    fastest backward candidate (see docs/kernels/attention.md)."""
    global _WARP_SPECIALIZE
    _WARP_SPECIALIZE = probe_warp_specialization(timeout_s)
    for kernel in (_attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel):
        kernel.cache.clear()  # shapes tuned before take the new candidates into account
    return _WARP_SPECIALIZE


_FP32_MN = [_cfg(32, 32, 4, 1)]
_FP32_SPLIT = [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]

# D_PAD = 256 doubles every tile. These compile without register spills for sm_90 and fit
# shared memory (fwd 128x32: Q 64 KiB + 2 stages of K/V 2·32 KiB = 128 KiB).
_D256_FWD = [_cfg(64, 64, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)]
_D256_DKDV = [_cfg(32, 32, 8, 2), _cfg(16, 64, 8, 2)]
_D256_DQ = [_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)]
_D256_SPLIT = [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2)]

_KEY = ["bucket_q", "bucket_k", "D_PAD", "CAUSAL", "SOFTCAP", "VARLEN", "TMA_OK"]


@triton.jit
def _fwd_ranges(
    q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, pos, offs_n, offs_d, lo, f_lo, f_hi,
    hi, lk, left, right, qk_scale, cap_scale, BLOCK_M: tl.constexpr, D: tl.constexpr,
    D_PAD: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """(acc, l_i, m_i) of a row tile over keys [lo, hi): _fwd_inner masked on the edge ranges
    [lo, f_lo) and [f_hi, hi), unmasked on the whole blocks [f_lo, f_hi) every real row sees."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, pos, offs_n,
        offs_d, lo, f_lo, lk, left, right, qk_scale, cap_scale,
        D, D_PAD, True, SOFTCAP, PREC, BLOCK_N, TMA, WS,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, pos, offs_n,
        offs_d, f_lo, f_hi, lk, left, right, qk_scale, cap_scale,
        D, D_PAD, False, SOFTCAP, PREC, BLOCK_N, TMA, WS,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, pos, offs_n,
        offs_d, f_hi, hi, lk, left, right, qk_scale, cap_scale,
        D, D_PAD, True, SOFTCAP, PREC, BLOCK_N, TMA, WS,
    )  # fmt: skip
    return acc, l_i, m_i


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
    VARLEN: tl.constexpr, PREC: tl.constexpr, TMA_OK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """O[b, i, h] = sum_j softmax_j(s_ij) V[b, j, h // group], LSE[b, h, i] = log2 sum_j exp(s_ij).

    Grid (batch·Hq, query blocks). Causal runs the query blocks in reverse so the longest rows
    start first and the short ones fill the tail of the launch. Q heads of one group are adjacent
    on axis 0, so their shared K/V blocks are read from L2. TMA (only with TMA_OK: D = D_PAD,
    16-byte aligned rows) loads Q, K, V through per-document tensor descriptors of shape
    (length, D), whose out-of-range rows the hardware fills with zeros.
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
    if TMA:
        q_desc = tl.make_tensor_descriptor(q_base, [lq, D_PAD], [stride_qs, 1], [BLOCK_M, D_PAD])
        k_desc = tl.make_tensor_descriptor(k_base, [lk, D_PAD], [stride_ks, 1], [BLOCK_N, D_PAD])
        v_desc = tl.make_tensor_descriptor(v_base, [lk, D_PAD], [stride_vs, 1], [BLOCK_N, D_PAD])
        q = q_desc.load([m0, 0])
    else:
        k_desc = k_base  # unused
        v_desc = v_base
        q = _load_tile(
            q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m, lq, offs_d, D, D_PAD,
            True,
        )  # fmt: skip
    n_start, f_lo, f_hi, n_end = _key_range(m0, lq, lk, left, right, BLOCK_M, BLOCK_N)
    pos = offs_m + (lk - lq)
    acc, l_i, m_i = _fwd_ranges(
        q, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, pos, offs_n, offs_d, n_start,
        f_lo, f_hi, n_end, lk, left, right, qk_scale, cap_scale,
        BLOCK_M, D, D_PAD, SOFTCAP, PREC, BLOCK_N, TMA, WS,
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
    """Decode (split-KV) candidates, the default first: ``BLOCK_N`` keys per step, warps, stages,
    and ``PER_SM``, the programs per SM the split count aims at (see _num_splits).

    Decode reads each K/V byte once and does 2 FLOPs per byte: it is a pure stream, and what
    matters is the bytes in flight. A pipeline stage holds one K and one V tile, 2·BLOCK_N·D_PAD·2
    bytes (D = 128, bf16: 32 KiB at BLOCK_N = 64, 64 KiB at 128); with S stages, S − 1 tiles are in
    flight while one is used. At ~4.3 TB/s and ~1 µs of DRAM latency an H100/H200 needs ~4 MB in
    flight, ~32 KiB per SM: two resident programs of 64x3 or one of 128x3 cover it, and more
    programs per SM (smaller splits) keep it covered while the last programs drain. The tile has
    only group·Sq real rows (padded to 16): registers hold a 16x128 fp32 accumulator (16 per
    thread at 4 warps), so 4 warps suffice and 8 only help issue loads.
    """
    if interpreter_enabled():  # small blocks so CPU tests cross block and split boundaries
        return [triton.Config({"BLOCK_N": 16, "PER_SM": 2}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": 64, "PER_SM": 4}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "PER_SM": 2}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "PER_SM": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "PER_SM": 2}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "PER_SM": 4}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "PER_SM": 1}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 32, "PER_SM": 8}, num_warps=4, num_stages=6),
    ]


# lengths, window sides and the split size change from call to call (a decode step adds a key):
# not specializing them on divisibility keeps one compiled kernel (and one direct-launch entry)
@triton.jit
def _merge_splits(
    OP, LP, O, LSE, pid_bh, n_splits, rows, r, i, h, row_ok, offs_d, b64, q_start, stride_ob,
    stride_os, stride_oh, stride_lb, stride_lh, D: tl.constexpr, D_PAD: tl.constexpr,
    WRITE_LSE: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Merge the n_splits partials of a (batch, KV head) tile, every row at once, as a running
    log-sum-exp: lse = log2 sum_s 2^lse_s, o = sum_s 2^(lse_s - lse)·o_s. A row no split saw
    gets output 0 and LSE +inf. The partials were written by other programs of this launch:
    loads bypass L1 (.cg), which is not coherent across SMs."""
    r_ok = r < rows
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m_use = tl.zeros([BLOCK_M], dtype=tl.float32)
    w_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    base = pid_bh.to(tl.int64) * n_splits * rows
    for s in range(0, n_splits):
        row = base + s * rows + r
        lse_s = tl.load(LP + row, mask=r_ok, other=float("-inf"), cache_modifier=".cg")
        o_s = tl.load(
            OP + row[:, None] * D + offs_d[None, :],
            mask=r_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
            cache_modifier=".cg",
        )
        m_new = tl.maximum(m, lse_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(lse_s - m_use)
        acc = acc * alpha[:, None] + o_s * w[:, None]
        w_sum = w_sum * alpha + w
        m = m_new
    out = acc / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]
    o_ptrs = O + b64 * stride_ob + (q_start + i[:, None]) * stride_os
    o_ptrs += h[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    if WRITE_LSE:
        lse = tl.where(w_sum == 0.0, float("inf"), m_use + tl.log2(w_sum))
        tl.store(LSE + b64 * stride_lb + h * stride_lh + q_start + i, lse, mask=row_ok)


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "max_q", "left", "right", "keys_per_split"])
def _attn_fwd_split_kernel(
    Q, K, V, O, LSE, OP, LP, CNT, cu_q, cu_k, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
    stride_kh, stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb,
    stride_lh, seqlen_q, seqlen_k, max_q, n_kv_heads, group, qk_scale, cap_scale, left, right,
    keys_per_split, D: tl.constexpr, D_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr, WRITE_LSE: tl.constexpr,
    FUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Decode forward ("flash-decoding"): one program per (batch, KV head, split of the keys).

    Its BLOCK_M rows are every (query head of the group, query) pair, row r = g·max_q + i, so a
    K/V block is read once for the whole group and the dots have group·Sq real rows. Split s
    covers keys [s·keys_per_split, (s+1)·keys_per_split) (a multiple of BLOCK_N, so only the
    sequence's last block is partial). SPLIT: write the split's normalized fp32 output OP and
    base-2 LSE LP (-inf when it saw no key) for _attn_split_combine_kernel; else (one split)
    write O and, with WRITE_LSE, LSE (+inf for a row that sees nothing) directly.

    SPLIT and FUSED: no combine launch. After writing its partials, each program increments
    CNT[batch·Hkv + KV head] (int32, zero at launch) with acq_rel semantics; the program that
    sees splits − 1 arrivals before its own is the last of its tile: every other split's
    partials are visible to it (their writes precede their release), so it resets the counter
    to zero for the next launch and merges them (_merge_splits). Nobody waits on anybody, so
    the order in which programs run (or the interpreter's sequential order) does not matter.
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
    pos = i + off
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b64 * stride_qb + q_start * stride_qs
    q_ptrs += i[:, None] * stride_qs + h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b64 * stride_kb + k_start * stride_ks + hk * stride_kh
    v_base = V + b64 * stride_vb + k_start * stride_vs + hk * stride_vh
    # Keys any real row sees: [max(off - left, 0), lk) (row 0 has the leftmost window start;
    # right >= 0, so the last row reaches lk). Keys every real row sees: [lk - 1 - left,
    # off + right] (the last row's window start, the first row's end). Within the split, the
    # whole blocks inside the second range run unmasked; the edges run masked.
    s_lo = split * keys_per_split
    hi = tl.minimum(s_lo + keys_per_split, lk)
    lo = tl.maximum(s_lo, (tl.maximum(off - left, 0) // BLOCK_N) * BLOCK_N)
    f_lo = (tl.maximum(lk - 1 - left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    f_lo = tl.minimum(tl.maximum(f_lo, lo), tl.maximum(hi, lo))
    f_hi = (tl.minimum(tl.maximum(off + right + 1, 0), lk) // BLOCK_N) * BLOCK_N
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), tl.maximum(hi, f_lo))
    acc, l_i, m_i = _fwd_ranges(
        q, k_base, v_base, k_base, v_base, stride_ks, stride_vs, pos, offs_n, offs_d, lo, f_lo,
        f_hi, hi, lk, left, right, qk_scale, cap_scale,
        BLOCK_M, D, D_PAD, SOFTCAP, PREC, BLOCK_N, False, False,
    )  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if SPLIT:
        rows = group * max_q
        r_ok = r < rows
        base = pid_bh.to(tl.int64) * tl.num_programs(1) + split
        op_ptrs = OP + base * rows * D + r[:, None] * D + offs_d[None, :]
        tl.store(op_ptrs, out, mask=r_ok[:, None] & (offs_d[None, :] < D))
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(LP + base * rows + r, lse, mask=r_ok)
        if FUSED:
            n_splits = tl.num_programs(1)
            # every thread's partial stores precede the (single-thread) release below
            tl.debug_barrier()
            arrived = tl.atomic_add(CNT + pid_bh, 1, sem="acq_rel")
            if arrived == n_splits - 1:
                tl.debug_barrier()  # the acquire above precedes every thread's loads
                tl.store(CNT + pid_bh, 0)
                _merge_splits(
                    OP, LP, O, LSE, pid_bh, n_splits, rows, r, i, h, row_ok, offs_d, b64,
                    q_start, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, D, D_PAD,
                    WRITE_LSE, BLOCK_M,
                )  # fmt: skip
    else:
        o_ptrs = O + b64 * stride_ob + (q_start + i[:, None]) * stride_os
        o_ptrs += h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
        if WRITE_LSE:
            lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))
            tl.store(LSE + b64 * stride_lb + h * stride_lh + q_start + i, lse, mask=row_ok)


@triton.jit(do_not_specialize=["seqlen_q", "max_q", "n_splits"])
def _attn_split_combine_kernel(
    OP, LP, O, LSE, cu_q, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, seqlen_q, max_q,
    n_kv_heads, group, n_splits, D: tl.constexpr, D_PAD: tl.constexpr, VARLEN: tl.constexpr,
    WRITE_LSE: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    """Merge the split partials of one row: lse = log2 sum_s 2^lse_s, o = sum_s 2^(lse_s-lse)·o_s.

    Grid (batch·Hkv, group·max_q). A row no split saw gets output 0 and LSE +inf. The partials
    (splits·rows·D fp32 per (batch, KV head)) were just written and are read from L2.
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
    o_ptrs = O + b64 * stride_ob + (q_start + i) * stride_os + h * stride_oh + offs_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_d < D)
    if WRITE_LSE:
        lse = tl.where(w_sum == 0.0, float("inf"), m_use + tl.log2(w_sum))
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
    dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_base, delta_base, stride_qs, stride_dos,
    offs_m, offs_n, offs_d, lo, hi, lq, lk, left, right, qk_scale, cap_scale, D: tl.constexpr,
    D_PAD: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """For query blocks [lo, hi): dV += Pᵀ dO, dK += dSᵀ Q (times the scale, applied later).

    Works on transposed tiles (keys × queries): Pᵀ = exp2(s2ᵀ - lse2), dPᵀ = V dOᵀ,
    dSᵀ = Pᵀ ∘ (dPᵀ - delta) ∘ (1 - tanh²) with softcap.
    """
    off = lk - lq
    q_offs = offs_m[:, None] * stride_qs + offs_d[None, :]
    do_offs = offs_m[:, None] * stride_dos + offs_d[None, :]
    for start_m in tl.range(lo, hi, BLOCK_M, warp_specialize=WS):
        rows = start_m + offs_m
        q_ptrs = q_base + start_m * stride_qs + q_offs
        do_ptrs = do_base + start_m * stride_dos + do_offs
        # rows >= lq read as zeros, so even unmasked blocks may run past the document's end
        if TMA:
            q = q_desc.load([start_m, 0])
            do = do_desc.load([start_m, 0])
        elif D == D_PAD:
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
        return [_cfg(16, 32, 4, 1)]
    # dK and dV accumulators are 2·BLOCK_N·D_PAD fp32 = 128 KiB at BLOCK_N = D = 128, i.e. 128
    # registers/thread at 8 warps, plus K and V (64 more): the Q/dO blocks streamed per step stay
    # small. Compiled for sm_90 at D = 128 with Triton 3.6, every variant spills (stack frame
    # 0.4 / 1.0 / 1.8 KB at BLOCK_M = 16 / 32 / 64 with pointer loads); TMA roughly halves it
    # (32x128: 0.46 KB). TMA + WS (BLOCK_M x BLOCK_N, stages: stack, shared memory): 64x128 2s
    # 0.54 KB, 129 KiB; 64x128 3s 0.98 KB, 162 KiB; 64x64 2s 0.18 KB, 97 KiB; 128x64 2s 1.5 KB,
    # 162 KiB. 4-warp variants spill kilobytes. Measured on an H200 (D = 128, B8 S2048): TMA + WS
    # 64x128 2s 1.463 ms, TMA 32x128 1.674, pointer 1.718 (16x128 pointer dropped).
    return pick_configs(
        [
            _cfg(32, 128, 8, 3),
            _cfg(32, 128, 8, 3, tma=True),
            _cfg(64, 128, 8, 2, tma=True, ws=True),
            _cfg(64, 128, 8, 3, tma=True, ws=True),
            _cfg(64, 64, 8, 2, tma=True, ws=True),
            _cfg(128, 64, 8, 2, tma=True, ws=True),
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
    VARLEN: tl.constexpr, PREC: tl.constexpr, TMA_OK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
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
        if TMA:
            q_desc = tl.make_tensor_descriptor(
                q_base, [lq, D_PAD], [stride_qs, 1], [BLOCK_M, D_PAD]
            )
            do_desc = tl.make_tensor_descriptor(
                do_base, [lq, D_PAD], [stride_dos, 1], [BLOCK_M, D_PAD]
            )
        else:
            q_desc = q_base  # unused
            do_desc = do_base
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_base, delta_base, stride_qs,
            stride_dos, offs_m, offs_n, offs_d, m_start, f_lo, lq, lk, left, right, qk_scale,
            cap_scale, D, D_PAD, True, SOFTCAP, PREC, BLOCK_M, TMA, WS,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_base, delta_base, stride_qs,
            stride_dos, offs_m, offs_n, offs_d, f_lo, f3, lq, lk, left, right, qk_scale,
            cap_scale, D, D_PAD, False, SOFTCAP, PREC, BLOCK_M, TMA, WS,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_base, delta_base, stride_qs,
            stride_dos, offs_m, offs_n, offs_d, f3, m_end, lq, lk, left, right, qk_scale,
            cap_scale, D, D_PAD, True, SOFTCAP, PREC, BLOCK_M, TMA, WS,
        )  # fmt: skip
    dk = dk * sm_scale
    mask = (offs_n[:, None] < lk) & (offs_d[None, :] < D)
    dk_ptrs = DK + b64 * stride_dkb + (k_start + offs_n[:, None]) * stride_dks + hk * stride_dkh
    tl.store(dk_ptrs + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask)
    dv_ptrs = DV + b64 * stride_dvb + (k_start + offs_n[:, None]) * stride_dvs + hk * stride_dvh
    tl.store(dv_ptrs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, offs_m, offs_n,
    offs_d, lo, hi, lq, lk, left, right, qk_scale, cap_scale, D: tl.constexpr,
    D_PAD: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    """For key blocks [lo, hi): dQ += dS K with dS = P ∘ (dO Vᵀ - delta) (∘ (1 - tanh²))."""
    off = lk - lq
    pos = offs_m + off
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        cols = start_n + offs_n
        k_ptrs = k_base + start_n * stride_ks + k_offs
        v_ptrs = v_base + start_n * stride_vs + v_offs
        if TMA:
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        elif MASKED:
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
        return [_cfg(32, 16, 4, 1)]
    # Q, dO and the dQ accumulator stay resident (3·BLOCK_M·D_PAD), K and V stream. Triton 3.6
    # for sm_90 at D = 128 (spill stack, shared memory): 128x64 8w 0.5 KB with pointer loads;
    # TMA 128x64 3s 56 B, 4s 56 B / 193 KiB; TMA 64x64 4w 2s 32 B / 97 KiB (two blocks per SM);
    # 128x128 TMA 0.5 KB and pointer 64x64 4w 1.4 KB (left out). Measured on an H200 (D = 128,
    # B8 S2048): pointer 128x64 0.875 ms, TMA 0.876, TMA + WS 128x64 1.101 (dropped).
    return pick_configs(
        [
            _cfg(128, 64, 8, 3),
            _cfg(128, 32, 8, 3),
            _cfg(128, 64, 8, 3, tma=True),
            _cfg(128, 64, 8, 4, tma=True),
            _cfg(64, 64, 4, 2, tma=True),
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
    PREC: tl.constexpr, TMA_OK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, WS: tl.constexpr,
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
    if TMA:
        k_desc = tl.make_tensor_descriptor(k_base, [lk, D_PAD], [stride_ks, 1], [BLOCK_N, D_PAD])
        v_desc = tl.make_tensor_descriptor(v_base, [lk, D_PAD], [stride_vs, 1], [BLOCK_N, D_PAD])
    else:
        k_desc = k_base  # unused
        v_desc = v_base
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    n_start, f_lo, f_hi, n_end = _key_range(m0, lq, lk, left, right, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, offs_m,
        offs_n, offs_d, n_start, f_lo, lq, lk, left, right, qk_scale, cap_scale, D, D_PAD, True,
        SOFTCAP, PREC, BLOCK_N, TMA, WS,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, offs_m,
        offs_n, offs_d, f_lo, f_hi, lq, lk, left, right, qk_scale, cap_scale, D, D_PAD, False,
        SOFTCAP, PREC, BLOCK_N, TMA, WS,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, offs_m,
        offs_n, offs_d, f_hi, n_end, lq, lk, left, right, qk_scale, cap_scale, D, D_PAD, True,
        SOFTCAP, PREC, BLOCK_N, TMA, WS,
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


# ---- decode (split-KV) launcher ---------------------------------------------------------------
#
# Decode runs once per layer per generated token, and its GPU time is tens of microseconds (B8
# Sk8192 D128: 268 MB of K/V, ~63 µs at 4.25 TB/s), so host time per call counts. Everything
# that does not change from one token to the next (configuration, compile-time arguments,
# strides, launch keys) is computed once into a _DecodePlan, cached by the call's fixed
# properties; a call then allocates its outputs, derives the split from the key length and
# launches the compiled kernels directly (_launch: no per-call argument specialization, no
# autotuner wrapper). Without autograd (no_grad, or inputs that need no gradient)
# flash_attention calls _decode_forward itself: no LSE is written and no autograd node is built.

_DECODE_MAX_ROWS = 64  # group·Sq rows of one decode tile; more go to the regular forward
# Shorter key ranges take the regular forward too: there the call is host-bound either way, and
# a packed batch then runs the same kernel as its documents run alone (bitwise equal results).
_DECODE_MIN_K = 256
_DECODE_TUNE_MIN_K = 1024  # shorter decodes take the default config (they are host-bound)
_DECODE_INTERPRET = interpreter_enabled()  # fixed before triton was imported
_SPLIT_CONFIGS = _split_configs()
_DECODE_CHOICE: dict = {}  # tuning key -> chosen triton.Config
_DECODE_TIMES: dict = {}  # tuning key -> [(config, ms)] of every timed candidate (for bench)
_DECODE_COMPILED: dict = {}  # direct-launch entries of the combine kernel (see _launch)
_DECODE_PLANS: dict = {}
_DECODE_SMS: dict = {}
# One launch per decode call: the last split of each tile merges the partials (see
# _attn_fwd_split_kernel); off = a separate combine launch, partials allocated per call.
_DECODE_FUSED = True
_DECODE_WS: dict = {}  # device -> (partials, arrival counters) of the fused path
_DECODE_WS_OLD: list = []
_DECODE_WS_VIEWS: dict = {}
# Validated no-grad batched decode calls: call key (see _fast_key) -> {key-length bucket (the
# exponent of its next power of two): plan}; a hit skips _prepare.
_DECODE_FAST: dict = {}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _decode_sms(device: torch.device) -> int:
    n = _DECODE_SMS.get(device)
    if n is None:
        n = _DECODE_SMS[device] = num_sms(device if device.type == "cuda" else None)
    return n


def _decode_candidates(dtype: torch.dtype, d_pad: int) -> list:
    """Decode configs for a dtype/head dim: exact fp32 and D_PAD = 256 get small tiles."""
    if _DECODE_INTERPRET:
        return _SPLIT_CONFIGS
    if dtype == torch.float32:
        return _FP32_SPLIT
    return _D256_SPLIT if d_pad > 128 else _SPLIT_CONFIGS


def _num_splits(
    batch: int,
    hkv: int,
    group: int,
    spec: _Spec,
    device: torch.device,
    config: triton.Config | None = None,
) -> int:
    """Key splits of the decode path; 0 = the regular forward (group·Sq > 64 rows, or fewer
    than _DECODE_MIN_K keys).

    The regular forward pads every query block to BLOCK_M = 128 rows and re-reads K/V once per
    query head; with few queries the decode kernel puts the group's heads in the rows (K/V read
    once per KV head) and splits the keys so that batch·Hkv·splits programs fill the GPU:
    floor(PER_SM·SMs / (batch·Hkv)) splits (a floor, so a launch never spills a few programs
    into an extra round), each of at least two key blocks (a pipeline needs blocks to overlap).
    """
    if group * spec.max_q > _DECODE_MAX_ROWS or spec.max_k < _DECODE_MIN_K:
        return 0
    cfg = config if config is not None else _SPLIT_CONFIGS[0]
    return _splits_for(cfg, batch * hkv, spec.max_k, _decode_sms(device))


def _splits_for(cfg: triton.Config, programs: int, max_k: int, sms: int) -> int:
    want = cfg.kwargs.get("PER_SM", 2) * sms // max(programs, 1)
    blocks = _cdiv(max(max_k, 1), cfg.kwargs["BLOCK_N"])
    return max(1, min(want, _cdiv(blocks, 2), 256))


@dataclass
class _DecodePlan:
    """Everything about a decode call that stays fixed from one generated token to the next."""

    cfg: triton.Config
    batch: int
    hkv: int
    group: int
    rows: int
    lse_shape: tuple[int, ...]
    head_args: tuple  # strides, lse strides (split kernel, after the 9 tensors)
    tail_args: tuple  # head counts, scales, window (split kernel, after the lengths)
    combine_strides: tuple
    meta: dict  # split kernel's compile-time arguments, SPLIT / WRITE_LSE / FUSED set per call
    key: tuple  # its direct-launch key, pointer alignments added per call
    d: int
    d_pad: int
    varlen: bool
    # direct-launch entries of this plan's kernels, keyed (device, per-call key): a short key
    # to hash per call (the plan's own key is fixed)
    compiled: dict = field(default_factory=dict)


def _decode_plan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec, cfg: triton.Config
) -> _DecodePlan:
    varlen = spec.varlen
    batch = _batch(q, spec)
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    group = hq // hkv
    rows = group * spec.max_q
    lse_shape, (slb, slh) = _lse_layout(q, spec)
    # out has q's layout (empty_like keeps the strides of a dense tensor)
    sq, sk, sv = _strides(q, varlen), _strides(k, varlen), _strides(v, varlen)
    so = sq if q.is_contiguous() else _strides(torch.empty_like(q), varlen)
    left, right = spec.kernel_window()
    qk_scale, cap_scale = spec.scores()
    d_pad = max(16, next_power_of_2(d))
    block_m = max(16, next_power_of_2(rows))
    softcap = spec.softcap is not None
    meta = dict(
        D=d, D_PAD=d_pad, SOFTCAP=softcap, VARLEN=varlen,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", SPLIT=True, WRITE_LSE=True,
        FUSED=True, BLOCK_M=block_m, BLOCK_N=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    # what Triton specializes on that may differ between calls sharing these compile-time
    # arguments: strides and head counts (by value: a superset of their divisibility) and, added
    # per call, pointer alignment and which buffers are real (SPLIT, WRITE_LSE)
    key = (q.dtype, d, softcap, varlen, block_m, *cfg.kwargs.values(), cfg.num_warps,
           cfg.num_stages, sq, sk, sv, so, slb, slh, hkv, group)  # fmt: skip
    return _DecodePlan(
        cfg=cfg, batch=batch, hkv=hkv, group=group, rows=rows, lse_shape=lse_shape,
        head_args=(*sq, *sk, *sv, *so, slb, slh),
        tail_args=(hkv, group, qk_scale, cap_scale, left, right),
        combine_strides=(*so, slb, slh), meta=meta, key=key, d=d, d_pad=d_pad, varlen=varlen,
    )  # fmt: skip


def _decode_workspace_ready(device: torch.device, n: int, d: int, n_cnt: int) -> bool:
    """False only inside a CUDA-graph capture that would have to create or grow the workspace."""
    if (device, n, d, n_cnt) in _DECODE_WS_VIEWS or device.type != "cuda":
        return True
    if not torch.cuda.is_current_stream_capturing():
        return True
    ws = _DECODE_WS.get(device)
    return ws is not None and ws[0].numel() >= n * (d + 1) and ws[1].numel() >= n_cnt


def _decode_workspace(device: torch.device, n: int, d: int, n_cnt: int) -> tuple:
    """(fp32 partial outputs of n rows of d, their n LSEs, int32 arrival counters of at least
    n_cnt entries, all zero) for the fused decode path, kept per device and grown
    geometrically; the views are cached too (slicing a tensor costs microseconds of host time).

    Reusing them saves two allocations per call. Launches on one stream run in order and each
    launch leaves the counters at zero; two decode calls running at the same time on different
    streams of one device would share them: set _DECODE_FUSED = False for that. Outgrown buffers
    stay referenced (_DECODE_WS_OLD): a captured CUDA graph may still use them.
    """
    views = _DECODE_WS_VIEWS.get((device, n, d, n_cnt))
    if views is not None:
        return views
    n_part = n * (d + 1)
    ws = _DECODE_WS.get(device)
    if ws is None or ws[0].numel() < n_part or ws[1].numel() < n_cnt:
        if ws is not None:
            _DECODE_WS_OLD.append(ws)
        n_part = max(n_part, 2 * ws[0].numel() if ws is not None else 0, 1 << 16)
        n_cnt = max(n_cnt, 2 * ws[1].numel() if ws is not None else 0, 1024)
        ws = _DECODE_WS[device] = (
            torch.empty(n_part, device=device, dtype=torch.float32),
            torch.zeros(n_cnt, device=device, dtype=torch.int32),
        )
        for key in [key for key in _DECODE_WS_VIEWS if key[0] == device]:
            del _DECODE_WS_VIEWS[key]
    views = _DECODE_WS_VIEWS[(device, n, d, n_cnt)] = (ws[0][: n * d], ws[0][n * d :], ws[1])
    return views


def _decode_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    plan: _DecodePlan,
    splits: int,
    max_q: int,
    max_k: int,
    cu_q: torch.Tensor | None,
    cu_k: torch.Tensor | None,
) -> None:
    """The split kernel (and, with more than one split and _DECODE_FUSED off, the combine) for
    one plan; cu_q / cu_k are None for batched input."""
    block_n = plan.meta["BLOCK_N"]
    n_keys = max(max_k, 1)
    # whole blocks per split, so only the sequence's last block is partial
    keys_per_split = _cdiv(_cdiv(n_keys, splits), block_n) * block_n
    splits = _cdiv(n_keys, keys_per_split)
    split = splits > 1
    fused = split and _DECODE_FUSED
    write_lse = lse is not None
    lse_arg = lse if write_lse else out  # never touched without WRITE_LSE
    grid0 = plan.batch * plan.hkv
    cnt = out  # never touched without FUSED
    if split:
        # partials: splits·rows fp32 outputs of D and their LSEs per (batch, KV head); for
        # decode (rows = group) that is splits·Hq·(D+1) floats per sequence, ~1% of the K/V
        n = grid0 * splits * plan.rows
        if fused and not _decode_workspace_ready(q.device, n, plan.d, grid0):
            # creating or growing the workspace inside a CUDA-graph capture would only record
            # the zero-fill of its counters, leaving them garbage for later eager calls: this
            # call takes the separate combine with per-call partials instead
            fused = False
        if fused:
            o_part, l_part, cnt = _decode_workspace(q.device, n, plan.d, grid0)
        else:
            ws = _new_buffer((n * (plan.d + 1),), q.device)
            o_part, l_part = ws[: n * plan.d], ws[n * plan.d :]
    else:
        o_part = l_part = out  # never touched without SPLIT
    if cu_q is None:
        cu_q = cu_k = out  # unused without VARLEN
        seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    else:
        seqlen_q = seqlen_k = 0
    aligned = (q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16, out.data_ptr() % 16,
               cu_q.data_ptr() % 16, cu_k.data_ptr() % 16)  # fmt: skip
    meta = plan.meta
    if meta["SPLIT"] != split or meta["WRITE_LSE"] != write_lse or meta["FUSED"] != fused:
        meta = {**meta, "SPLIT": split, "WRITE_LSE": write_lse, "FUSED": fused}
    _launch(
        _attn_fwd_split_kernel, (grid0, splits, 1),
        (q, k, v, out, lse_arg, o_part, l_part, cnt, cu_q, cu_k, *plan.head_args, seqlen_q,
         seqlen_k, max_q, *plan.tail_args, keys_per_split),
        meta, plan.compiled, (split, write_lse, fused, aligned),
    )  # fmt: skip
    if not split or fused:
        return
    spad = max(2, next_power_of_2(splits))
    _launch(
        _attn_split_combine_kernel, (grid0, plan.rows, 1),
        (o_part, l_part, out, lse_arg, cu_q, *plan.combine_strides, seqlen_q, max_q,
         plan.hkv, plan.group, splits),
        dict(D=plan.d, D_PAD=plan.d_pad, VARLEN=plan.varlen, WRITE_LSE=write_lse,
             SPLITS_PAD=spad),
        _DECODE_COMPILED, ("combine", *plan.key, write_lse, spad, aligned),
    )  # fmt: skip


def _decode_config(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec, need_lse: bool
) -> triton.Config:
    """The decode configuration: the default below _DECODE_TUNE_MIN_K keys, on CPU, in CUDA-graph
    capture or when _TUNE_ALL is off; otherwise every candidate is timed once per key (next power
    of two of the key length, batch·Hkv, rows, head dim, dtype, softcap, varlen), as an autotuner
    would, and the fastest kept. Times include the combine: the split count is part of the
    choice."""
    d_pad = max(16, next_power_of_2(q.shape[-1]))
    cands = _decode_candidates(q.dtype, d_pad)
    if len(cands) == 1 or not _TUNE_ALL or spec.max_k < _DECODE_TUNE_MIN_K or not q.is_cuda:
        return cands[0]
    batch, hkv = _batch(q, spec), k.shape[-2]
    group = q.shape[-2] // hkv
    key = (
        next_power_of_2(spec.max_k), batch * hkv, group * spec.max_q, q.shape[-1], q.dtype,
        spec.softcap is not None, spec.varlen, q.device,
    )  # fmt: skip
    best = _DECODE_CHOICE.get(key)
    if best is not None:
        return best
    if torch.cuda.is_current_stream_capturing():
        return cands[0]
    from triton.testing import do_bench

    out = _new_output(q)
    lse = _new_buffer(_lse_layout(q, spec)[0], q.device) if need_lse else None
    sms = _decode_sms(q.device)
    timed = []
    for cfg in cands:
        plan = _decode_plan(q, k, v, spec, cfg)
        splits = _splits_for(cfg, batch * hkv, spec.max_k, sms)
        try:
            ms = do_bench(
                lambda plan=plan, splits=splits: _decode_launch(
                    q, k, v, out, lse, plan, splits, spec.max_q, spec.max_k, spec.cu_q, spec.cu_k
                ),
                warmup=5,
                rep=20,
                return_mode="median",
            )
        except Exception:  # a candidate that does not compile or fit on this card
            ms = float("inf")
        timed.append((cfg, ms))
    _DECODE_TIMES[key] = timed
    best = _DECODE_CHOICE[key] = min(timed, key=lambda t: t[1])[0]
    return best


def _decode_get_plan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec, need_lse: bool
) -> tuple[_DecodePlan, bool]:
    """The cached plan of a call (tuned on first use) and whether it was cached (it is not when
    made during CUDA-graph capture, which may have skipped tuning)."""
    max_k = spec.max_k
    pkey = (
        q.shape, q.stride(), k.shape[0], k.shape[-2], k.stride(), v.stride(), q.dtype, q.device,
        spec.max_q, spec.varlen, spec.causal, spec.left, spec.right, spec.softcap, spec.scale,
        1 << (max_k - 1).bit_length() if max_k > 0 else 0, need_lse,
        spec.cu_q.numel() if spec.varlen else 0,
    )  # fmt: skip
    plan = _DECODE_PLANS.get(pkey)
    if plan is not None:
        return plan, True
    cfg = _decode_config(q, k, v, spec, need_lse)
    plan = _decode_plan(q, k, v, spec, cfg)
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return plan, False
    if len(_DECODE_PLANS) >= 256:
        _DECODE_PLANS.clear()  # many distinct call shapes: start over rather than grow
    _DECODE_PLANS[pkey] = plan
    return plan, True


def _decode_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: _Spec,
    num_splits: int | None = None,
    need_lse: bool = True,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode forward: (out, lse2), lse2 None unless ``need_lse``. ``num_splits`` and
    ``config`` force the split count and the configuration (tests, benchmarks)."""
    if config is None:
        plan = _decode_get_plan(q, k, v, spec, need_lse)[0]
    else:
        plan = _decode_plan(q, k, v, spec, config)
    out = _new_output(q)
    lse = _new_buffer(plan.lse_shape, q.device) if need_lse else None
    if q.numel() == 0 or spec.max_q == 0:
        return out, lse
    if num_splits is None:
        num_splits = _splits_for(plan.cfg, plan.batch * plan.hkv, spec.max_k, _decode_sms(q.device))
    _decode_launch(
        q, k, v, out, lse, plan, max(1, num_splits), spec.max_q, spec.max_k, spec.cu_q, spec.cu_k
    )
    return out, lse


def _is_number(x) -> bool:
    return type(x) in (int, float)


def _fast_eligible(q, k, v, causal, softmax_scale, window, softcap) -> bool:
    """Whether a call may use (and fill) the validated-call cache: tensors whose last dimension
    is contiguous as given (``_prepare`` would copy the others, and the cached plan's strides are
    the copy's), and options of exactly the types ``_prepare`` accepts, so that a value that only
    hashes equal to a validated one (``True`` for ``1``, ``1.0`` for ``1``) still gets its error."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return False
    if not (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1) or type(causal) is not bool:
        return False
    if not (softmax_scale is None or _is_number(softmax_scale)):
        return False
    if not (softcap is None or _is_number(softcap)):
        return False
    return window is None or (
        type(window) is tuple and len(window) == 2 and all(type(w) is int for w in window)
    )


def _fast_key(q, k, v, causal, softmax_scale, window, softcap) -> tuple:
    """What _prepare's verdict on a batched call depends on, except k's and v's length: shapes,
    strides, dtypes, devices, options and the backend (a list window raises TypeError on hashing:
    no fast path)."""
    return (
        q.shape, q.stride(), k.shape[0], k.shape[2:], k.stride(), v.shape[0], v.shape[2:],
        v.stride(), q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, causal,
        softmax_scale, window, softcap, get_backend(),
    )  # fmt: skip


def _decode_fast(entry: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """A no-grad batched decode call whose key was validated before: None when it does not
    apply (lengths differ, too few keys, a new key-length bucket not planned yet), else the
    output: one allocation and one launch."""
    sk = k.shape[1]
    if v.shape[1] != sk or sk < _DECODE_MIN_K:
        return None
    plan = entry.get((sk - 1).bit_length())  # the plan's key-length bucket (next power of 2)
    if plan is None:
        return None
    out = _new_output(q)
    if q.shape[1] == 0 or q.shape[0] == 0:
        return out
    splits = _splits_for(plan.cfg, plan.batch * plan.hkv, sk, _decode_sms(q.device))
    _decode_launch(q, k, v, out, None, plan, splits, q.shape[1], sk, None, None)
    return out


def _fast_register(fkey: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec):
    """After a validated no-grad batched decode call: remember its key and plan for _decode_fast."""
    if not (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
        return  # _prepare copied an input: the fast path cannot
    plan, cached = _decode_get_plan(q, k, v, spec, False)
    if not cached:
        return
    if len(_DECODE_FAST) >= 256 and fkey not in _DECODE_FAST:
        _DECODE_FAST.clear()  # many distinct call shapes: start over rather than grow
    _DECODE_FAST.setdefault(fkey, {})[(spec.max_k - 1).bit_length()] = plan


def _decode_eligible(q: torch.Tensor, k: torch.Tensor, spec: _Spec) -> bool:
    """Whether the forward takes the decode kernel (see _num_splits)."""
    group = q.shape[-2] // k.shape[-2]
    return group * spec.max_q <= _DECODE_MAX_ROWS and spec.max_k >= _DECODE_MIN_K


def _attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec, num_splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernels; returns (out, lse2). ``num_splits`` forces the split-KV path."""
    if num_splits is not None or _decode_eligible(q, k, spec):
        return _decode_forward(q, k, v, spec, num_splits)
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

    def grid(meta: dict) -> tuple[int, int]:
        return (batch * hq, triton.cdiv(spec.max_q, meta["BLOCK_M"]))

    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        slb, slh, seqlen_q, seqlen_k, hq, group, qk_scale, cap_scale, left, right,
        _bucket(spec.max_q), _bucket(spec.max_k),
        D=d, D_PAD=d_pad, CAUSAL=spec.causal, SOFTCAP=spec.softcap is not None, VARLEN=varlen,
        PREC=prec, TMA_OK=_tma_ok(d, q, k, v),
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
        TMA_OK=_tma_ok(d, q, k, v, do),
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
    no_grad = not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    )
    fkey = None
    if (
        no_grad
        and cu_seqlens is None
        and max_seqlen is None
        and max_seqlen_k is None
        and _fast_eligible(q, k, v, causal, softmax_scale, window, softcap)
    ):
        # a batched no-grad call: decode steps repeat one key but for the growing KV length
        fkey = _fast_key(q, k, v, causal, softmax_scale, window, softcap)
        entry = _DECODE_FAST.get(fkey)
        if entry is not None:
            out = _decode_fast(entry, q, k, v)
            if out is not None:
                return out
    q, k, v, spec = _prepare(
        q, k, v, causal, softmax_scale, window, softcap, cu_seqlens, max_seqlen, cu_seqlens_k,
        max_seqlen_k,
    )  # fmt: skip
    if use_triton(q, k, v):
        if no_grad and _decode_eligible(q, k, spec):
            out = _decode_forward(q, k, v, spec, need_lse=False)[0]  # no LSE, no autograd node
            if fkey is not None:
                _fast_register(fkey, q, k, v, spec)
            return out
        return _FlashAttention.apply(q, k, v, spec)
    return flash_attention_ref(
        q, k, v, spec.causal, spec.scale, (spec.left, spec.right), spec.softcap, spec.cu_q,
        None, spec.cu_k,
    )  # fmt: skip
