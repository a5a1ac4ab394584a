"""Decode path of flash attention (split-KV): few queries against a long KV range.

Compares the decode kernels (split kernel + LSE combine) with the float64 reference over
hypothesis-drawn shapes: GQA ratios 1/4/8, 1-4 queries, odd key lengths, windows, softcap,
packed rows of different key lengths (including 1 and 0 keys), forced split counts. CPU runs go
through the Triton interpreter in float32/float16 (decode blocks of 16 keys there, so a few
hundred keys cross many blocks and splits); bf16 and realistic sizes are @pytest.mark.gpu.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkern
from qkern import attention as attn
from qkern.attention import LOG2E, flash_attention, flash_attention_ref, visible_mask
from tests.helpers import assert_close_rule

# the dense attention tests' device, dtypes, tolerances and warning filters
from tests.test_attention import ATOL, DEV, DT, ON_GPU, pytestmark  # noqa: F401

D = 32  # head dim of the CPU tests (64 and 128 run on the GPU)


def _randn(*shape: int, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).to(DEV)


@pytest.fixture(autouse=True)
def _poisoned_and_untuned(monkeypatch):
    """Outputs and fp32 partial buffers start as NaN (unwritten elements show); on a GPU every
    decode call takes the first config instead of timing candidates (compile time)."""
    monkeypatch.setattr(attn, "_new_output", lambda like: torch.full_like(like, float("nan")))
    monkeypatch.setattr(
        attn,
        "_new_buffer",
        lambda shape, device: torch.full(shape, float("nan"), device=device, dtype=torch.float32),
    )
    monkeypatch.setattr(attn, "_TUNE_ALL", False)
    # the fused path's reused partials start as NaN too; fresh validated-call cache
    dev = torch.device(DEV)
    nan = torch.full((1 << 16,), float("nan"), device=dev)
    monkeypatch.setattr(attn, "_DECODE_WS", {dev: (nan, torch.zeros(1024, device=dev).int())})
    monkeypatch.setattr(attn, "_DECODE_WS_VIEWS", {})
    monkeypatch.setattr(attn, "_DECODE_FAST", {})


def _lse_oracle(q, k, lq: int, lk: int, kw: dict) -> torch.Tensor:
    """log2 sum_j exp(s_ij) over the visible keys, (Hq, lq) for one document (float64)."""
    group = q.shape[-2] // k.shape[-2]
    s = torch.einsum("ihd,jhd->hij", q.double(), k.double().repeat_interleave(group, 1))
    s = s * kw.get("softmax_scale", 1 / math.sqrt(q.shape[-1]))
    if kw.get("softcap"):
        s = kw["softcap"] * torch.tanh(s / kw["softcap"])
    s = s.masked_fill(~visible_mask(lq, lk, kw["causal"], kw.get("window"), s.device), -math.inf)
    lse = torch.logsumexp(s, -1) * LOG2E
    return torch.where(torch.isfinite(lse), lse, torch.full_like(lse, math.inf))


def _check(q, k, v, num_splits=None, config=None, lse_too=True, **kw) -> torch.Tensor:
    """Run _decode_forward; compare out (and the base-2 LSE) with the float64 reference."""
    q, k, v, spec = attn._prepare(
        q, k, v, kw["causal"], kw.get("softmax_scale"), kw.get("window"), kw.get("softcap"),
        kw.get("cu_seqlens"), None, kw.get("cu_seqlens_k"), None,
    )  # fmt: skip
    with qkern.backend("triton"):
        out, lse = attn._decode_forward(q, k, v, spec, num_splits=num_splits, config=config)
    ref = flash_attention_ref(q.double(), k.double(), v.double(), **kw)
    low = flash_attention_ref(q, k, v, upcast=False, **kw)
    vmax = v.abs().max().item() if v.numel() else 1.0
    assert_close_rule(out, ref, low, atol=ATOL[q.dtype] * max(1.0, vmax))
    if lse_too:
        if spec.varlen:
            cq = spec.cu_q.tolist()
            ck = spec.cu_k.tolist()
            want = torch.cat(
                [
                    _lse_oracle(q[cq[i] : cq[i + 1]], k[ck[i] : ck[i + 1]], cq[i + 1] - cq[i],
                                ck[i + 1] - ck[i], kw)
                    for i in range(len(cq) - 1)
                ],
                dim=1,
            )  # fmt: skip
        else:
            want = torch.stack(
                [_lse_oracle(q[b], k[b], q.shape[1], k.shape[1], kw) for b in range(q.shape[0])]
            )
        got = lse.double().cpu()
        want = want.cpu()
        inf = torch.isinf(want)
        assert torch.equal(torch.isinf(got), inf), "rows without keys must have LSE +inf"
        assert_close_rule(got[~inf], want[~inf], None, atol=4 * ATOL[q.dtype], name="lse")
    return out


HEADS = st.sampled_from([(2, 2), (4, 1), (8, 2), (8, 1)])  # GQA ratios 1, 4, 4, 8


@settings(max_examples=8)
@given(
    heads=HEADS,
    sq=st.integers(1, 4),
    sk=st.integers(1, 130),
    batch=st.integers(1, 2),
    causal=st.booleans(),
    window=st.sampled_from([None, (17, 0), (40, 3), (-1, 0)]),
    softcap=st.sampled_from([None, 5.0]),
    splits=st.sampled_from([None, 1, 3, 7]),
)
def test_decode_matches_reference(heads, sq, sk, batch, causal, window, softcap, splits):
    torch.manual_seed(sq * 1000 + sk)
    hq, hkv = heads
    q, k, v = _randn(batch, sq, hq, D), _randn(batch, sk, hkv, D), _randn(batch, sk, hkv, D)
    _check(q, k, v, num_splits=splits, causal=causal, window=window, softcap=softcap)


@settings(max_examples=8)
@given(
    heads=HEADS,
    lk=st.lists(st.integers(0, 100), min_size=1, max_size=3),
    sq=st.integers(1, 2),
    window=st.sampled_from([None, (9, 0)]),
    softcap=st.sampled_from([None, 7.0]),
    splits=st.sampled_from([None, 2, 5]),
)
def test_decode_varlen(heads, lk, sq, window, softcap, splits):
    """Packed rows with different key lengths (1 and 0 included): each row's queries attend
    bottom-right aligned within their own row's keys only."""
    torch.manual_seed(sum(lk) + sq)
    hq, hkv = heads
    lq = [min(sq, n) if n else sq for n in lk]
    q, k, v = _randn(sum(lq), hq, D), _randn(sum(lk), hkv, D), _randn(sum(lk), hkv, D)
    kw = dict(causal=True, window=window, softcap=softcap, cu_seqlens=_cu(lq))
    kw["cu_seqlens_k"] = _cu(lk)
    out = _check(q, k, v, num_splits=splits, **kw)
    cq = _cu(lq).tolist()
    for i, n in enumerate(lk):
        if n == 0:  # a row with no keys outputs zeros
            assert torch.all(out[cq[i] : cq[i + 1]] == 0)


def test_long_decode_default_splits_crosses_all_runs():
    """Odd long KV, GQA 4, default split choice (several splits on the interpreter's 4 "SMs"),
    with a window that starts mid-split: masked edge, unmasked middle, masked tail blocks."""
    torch.manual_seed(1)
    q, k, v = _randn(1, 1, 8, D), _randn(1, 333, 2, D), _randn(1, 333, 2, D)
    _, _, _, spec = attn._prepare(q, k, v, True, None, None, None, None, None, None, None)
    assert attn._num_splits(1, 2, 4, spec, q.device) > 1
    _check(q, k, v, causal=True)
    _check(q, k, v, causal=True, window=(150, 0), softcap=3.0, softmax_scale=0.7)


def test_every_config_candidate_on_the_interpreter():
    """Each CPU candidate (and a GPU-like one with bigger blocks) gives the same result."""
    torch.manual_seed(2)
    q, k, v = _randn(2, 2, 4, D), _randn(2, 301, 1, D), _randn(2, 301, 1, D)
    for cfg in [*attn._split_configs(), attn.triton.Config({"BLOCK_N": 32, "PER_SM": 8})]:
        _check(q, k, v, config=cfg, causal=True, window=(100, 0))


def test_public_api_takes_decode_path_without_grad_and_autograd_with_grad(monkeypatch):
    """No grad needed: flash_attention calls the decode kernels directly (no LSE, no graph).
    q requiring grad: the autograd function runs (decode forward inside) and gradients flow."""
    torch.manual_seed(3)
    q, k, v = _randn(2, 1, 8, D), _randn(2, 300, 2, D), _randn(2, 300, 2, D)
    calls = []
    real = attn._decode_forward

    def spy(*a, **kw):
        calls.append(kw.get("need_lse", True))
        return real(*a, **kw)

    monkeypatch.setattr(attn, "_decode_forward", spy)
    ref = flash_attention_ref(q.double(), k.double(), v.double(), causal=True)
    low = flash_attention_ref(q, k, v, upcast=False, causal=True)
    with qkern.backend("triton"):
        out = flash_attention(q, k, v, causal=True)
        assert calls == [False] and not out.requires_grad
        assert_close_rule(out, ref, low, atol=ATOL[DT])
        qg = q.clone().requires_grad_()
        out_g = flash_attention(qg, k, v, causal=True)
        assert calls == [False, True] and out_g.grad_fn is not None
        assert torch.equal(out_g.detach(), out)
        (dq,) = torch.autograd.grad(out_g, qg, torch.ones_like(out_g))
    q64 = q.double().requires_grad_()
    (dq_ref,) = torch.autograd.grad(
        flash_attention_ref(q64, k.double(), v.double(), causal=True), q64, torch.ones_like(q64)
    )
    assert_close_rule(dq, dq_ref, None, atol=50 * ATOL[DT], name="dq")


@pytest.mark.parametrize("fused", [True, False])
def test_merged_combine_by_last_split(monkeypatch, fused):
    """One launch (the last split of each tile merges) or a separate combine launch: both right
    for many split counts, and the fused path leaves every arrival counter at zero."""
    monkeypatch.setattr(attn, "_DECODE_FUSED", fused)
    torch.manual_seed(5)
    q, k, v = _randn(2, 2, 8, D), _randn(2, 301, 2, D), _randn(2, 301, 2, D)
    for splits in (2, 7):
        _check(q, k, v, num_splits=splits, causal=True, window=(100, 0), softcap=4.0)
        _check(q, k, v, num_splits=splits, causal=False, lse_too=False)
    lk = [300, 0, 1, 77]
    qp = _randn(4, 4, D)
    kp, vp = _randn(sum(lk), 1, D), _randn(sum(lk), 1, D)
    _check(qp, kp, vp, num_splits=6, causal=True, cu_seqlens=_cu([1] * 4), cu_seqlens_k=_cu(lk))
    counters = attn._DECODE_WS[torch.device(DEV)][1]
    assert int(counters.abs().sum()) == 0


def test_validated_call_cache_skips_prepare(monkeypatch):
    """A repeated no-grad decode call (the KV length growing) skips validation and stays right;
    different options, a list window, grad-requiring input or a short KV take the full path."""
    torch.manual_seed(6)
    q = _randn(2, 1, 8, D)
    cache_k, cache_v = _randn(2, 600, 2, D), _randn(2, 600, 2, D)
    prepared = []
    real = attn._prepare

    def spy(*a):
        prepared.append(1)
        return real(*a)

    monkeypatch.setattr(attn, "_prepare", spy)

    def step(end, **kw):
        k, v = cache_k[:, :end], cache_v[:, :end]
        with qkern.backend("triton"), torch.no_grad():
            out = flash_attention(q, k, v, causal=True, **kw)
        ref = flash_attention_ref(q.double(), k.double(), v.double(), causal=True, **kw)
        assert_close_rule(out, ref, flash_attention_ref(q, k, v, upcast=False, causal=True, **kw),
                          atol=ATOL[DT])  # fmt: skip

    step(300)
    step(301)
    step(400)
    assert len(prepared) == 1  # one bucket (257-512 keys): validated once
    step(513)  # a new key-length bucket: planned through the full path once
    step(600)
    assert len(prepared) == 2
    step(520, softcap=3.0)
    step(520, window=[50, 0])  # unhashable: always the full path
    step(520, window=[50, 0])
    step(200)  # too few keys for decode: the regular forward
    assert len(prepared) == 6
    with pytest.raises(ValueError, match="softcap"):
        with torch.no_grad():
            flash_attention(q, cache_k[:, :520], cache_v[:, :520], softcap=-1.0)


def test_decode_caches_tell_apart_what_they_must():
    """Regression: (1) K/V whose last dimension is strided (copied by validation) never use the
    validated-call cache, whose plan would carry the copy's strides; (2) head-sliced views of one
    cache (same strides, different KV head counts) get different plans; (3) an option value that
    only hashes equal to a validated one (True for 1) is still rejected."""
    torch.manual_seed(8)
    q = _randn(1, 1, 4, D)

    def run(k, v, **kw):
        with qkern.backend("triton"), torch.no_grad():
            out = flash_attention(q, k, v, causal=True, **kw)
        kc, vc = k.contiguous(), v.contiguous()
        ref = flash_attention_ref(q.double(), kc.double(), vc.double(), causal=True, **kw)
        same = flash_attention_ref(q, kc, vc, upcast=False, causal=True, **kw)
        assert_close_rule(out, ref, same, atol=ATOL[DT])

    wide = _randn(1, 300, 1, 2 * D)
    strided = wide[..., ::2]  # last-dim stride 2
    assert strided.stride(-1) == 2
    run(strided, strided)
    run(strided, strided)  # the second call must not reuse a plan built for the copy
    cache = _randn(1, 300, 8, D)
    for hkv in (2, 4, 2):
        run(cache[:, :, :hkv], cache[:, :, :hkv])
    run(cache[:, :, :2], cache[:, :, :2], window=(1, 0))
    with pytest.raises(ValueError, match="window left must be an int"):
        with torch.no_grad():
            flash_attention(q, cache[:, :, :2], cache[:, :, :2], causal=True, window=(True, 0))


def test_many_queries_use_regular_forward():
    """group·Sq > 64 rows, or fewer than 256 keys: the regular forward (consistent packing)."""
    q, k = _randn(1, 17, 4, D), _randn(1, 300, 1, D)
    _, _, _, spec = attn._prepare(q, k, k, True, None, None, None, None, None, None, None)
    assert attn._num_splits(1, 1, 4, spec, q.device) == 0
    assert not attn._decode_eligible(q, k, spec)
    q, k = _randn(1, 1, 4, D), _randn(1, 255, 1, D)
    _, _, _, spec = attn._prepare(q, k, k, True, None, None, None, None, None, None, None)
    assert not attn._decode_eligible(q, k, spec)


def test_float16_decode():
    torch.manual_seed(4)
    q = _randn(2, 1, 8, 64, dtype=torch.float16)
    k, v = (_randn(2, 277, 1, 64, dtype=torch.float16) for _ in range(2))
    _check(q, k, v, causal=True, softcap=20.0)
    lk = [1, 260, 33]
    qp = _randn(3, 8, 64, dtype=torch.float16)
    kp, vp = (_randn(sum(lk), 1, 64, dtype=torch.float16) for _ in range(2))
    _check(qp, kp, vp, causal=True, cu_seqlens=_cu([1, 1, 1]), cu_seqlens_k=_cu(lk))


# ------------------------------------------------------------------------------------------------
# GPU: bf16, realistic sizes, every tuning candidate, the direct-launch cache across lengths
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("group,d", [(1, 128), (4, 128), (8, 128), (4, 64), (4, 256)])
def test_gpu_bf16_decode_every_candidate(group, d):
    torch.manual_seed(10)
    hkv = 8 if d <= 128 else 2
    q = _randn(4, 1, group * hkv, d, dtype=torch.bfloat16)
    k, v = (_randn(4, 4099, hkv, d, dtype=torch.bfloat16) for _ in range(2))
    for cfg in attn._decode_candidates(torch.bfloat16, max(16, attn.next_power_of_2(d))):
        _check(q, k, v, config=cfg, causal=True)
        _check(q, k, v, config=cfg, causal=True, window=(1000, 0), softcap=30.0)


@pytest.mark.gpu
def test_gpu_bf16_varlen_decode_ragged():
    torch.manual_seed(11)
    lk = [8191, 1, 2000, 3001, 0, 513]
    lq = [1, 1, 4, 2, 1, 3]
    q = _randn(sum(lq), 32, 128, dtype=torch.bfloat16)
    k, v = (_randn(sum(lk), 8, 128, dtype=torch.bfloat16) for _ in range(2))
    _check(q, k, v, causal=True, cu_seqlens=_cu(lq), cu_seqlens_k=_cu(lk))
    _check(q, k, v, causal=True, cu_seqlens=_cu(lq), cu_seqlens_k=_cu(lk), window=(511, 0))


@pytest.mark.gpu
def test_gpu_decode_steps_reuse_direct_launch():
    """A KV cache growing one key per step (a view of a preallocated buffer): every step right,
    through the cached plan and compiled kernels, with and without tuning."""
    torch.manual_seed(12)
    cache_k, cache_v = (_randn(2, 2200, 8, 128, dtype=torch.bfloat16) for _ in range(2))
    q = _randn(2, 1, 32, 128, dtype=torch.bfloat16)
    for tune in (False, True):
        attn._TUNE_ALL = tune
        attn._DECODE_PLANS.clear()  # plans remember the config chosen with tuning off
        attn._DECODE_FAST.clear()  # so do the validated-call entries that hold them
        for end in (1023, 1024, 1025, 1500, 2200):
            with torch.no_grad():
                out = flash_attention(q, cache_k[:, :end], cache_v[:, :end], causal=True)
            ref = flash_attention_ref(
                q.double(), cache_k[:, :end].double(), cache_v[:, :end].double(), causal=True
            )
            low = flash_attention_ref(q, cache_k[:, :end], cache_v[:, :end], upcast=False)
            assert_close_rule(out, ref, low, atol=ATOL[torch.bfloat16])
