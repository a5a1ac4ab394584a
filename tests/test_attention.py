"""Flash attention: kernels vs a float64 plain-softmax reference, forward and dQ/dK/dV.

CPU runs go through the Triton interpreter in float32/float16 at small sizes (the interpreter
blocks are 16-32 wide, so S <= 70 still crosses several blocks and the diagonal). On a GPU the
same tests run in float16 with fewer hypothesis examples (each new head dim/flag combination
compiles kernels); bf16 and realistic sizes are @pytest.mark.gpu.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import qkern
from qkern import attention as attn
from qkern.attention import LOG2E, flash_attention, flash_attention_ref, visible_mask
from tests.helpers import assert_close_rule, kernel_device

# exp2 of a large softcap argument or of a score the mask is about to drop overflows to inf on
# purpose (tanh -> 1, p -> masked to 0), and log2(0) of rows that saw no key is discarded by a
# where(); numpy under the interpreter warns about both
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

DEV = kernel_device()
ON_GPU = DEV == "cuda"
# tests that run on both devices use exact fp32 under the interpreter and fp16 on a GPU, where
# fp32 has no tensor-core path (slow to compile, meant for these CPU tests)
DT = torch.float16 if ON_GPU else torch.float32
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True, scope="module")
def _one_config_per_kernel():
    """On a GPU, compile one autotune config per kernel variant: compiling dominates the tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attn, "_TUNE_ALL", False)
        yield


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Every output and fp32 buffer the kernels allocate starts as NaN, so gaps show."""
    saved = attn._new_output, attn._new_buffer
    attn._new_output = lambda like: torch.full_like(like, float("nan"))
    attn._new_buffer = lambda shape, device: torch.full(
        shape, float("nan"), device=device, dtype=torch.float32
    )
    try:
        yield
    finally:
        attn._new_output, attn._new_buffer = saved


@contextlib.contextmanager
def forced_variant(tma: bool, ws: bool) -> Iterator[None]:
    """The three dense kernels run one candidate of the given variant (TMA descriptors, warp
    specialization), restoring the autotune lists after."""
    kernels = (attn._attn_fwd_kernel, attn._attn_bwd_dkdv_kernel, attn._attn_bwd_dq_kernel)
    saved, saved_ws = [k.configs for k in kernels], attn._WARP_SPECIALIZE
    if ON_GPU:
        sizes = ((128, 64, 8, 3), (32, 128, 8, 3), (128, 64, 8, 3))
    else:  # interpreter: small blocks that cross the diagonal and the tails
        sizes = ((32, 16, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1))
    attn._WARP_SPECIALIZE = ws
    attn._force_configs(*([attn._cfg(*size, tma=tma, ws=ws)] for size in sizes))
    try:
        yield
    finally:
        attn._WARP_SPECIALIZE = saved_ws
        attn._force_configs(*saved)


def _leaf(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to(dtype).requires_grad_()


def check_against_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: bool = True, **kw
) -> torch.Tensor:
    """Run the kernel (forced Triton, poisoned buffers); compare out and dq/dk/dv to float64.

    The budget is 2x the error of the same computation in plain PyTorch in the input dtype.
    """
    dtype = q.dtype
    qt, kt, vt = (_leaf(t, dtype) for t in (q, k, v))
    with qkern.backend("triton"), poisoned_allocations():
        out = flash_attention(qt, kt, vt, **kw)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (qt, kt, vt), do) if grad else ()
    q64, k64, v64 = (_leaf(t, torch.float64) for t in (q, k, v))
    ref = flash_attention_ref(q64, k64, v64, **kw)
    ql, kl, vl = (_leaf(t, dtype) for t in (q, k, v))
    low = flash_attention_ref(ql, kl, vl, upcast=False, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    # slack in units of each result's natural size: out mixes rows of v; dq and dk are sums of
    # scale·k·(dO·v) terms (even where they cancel to 0 exactly, as with a single visible key)
    amax = lambda t: max(1.0, t.detach().abs().max().item()) if t.numel() else 1.0
    assert_close_rule(out, ref, low, atol=ATOL[dtype] * amax(v), name="out")
    if grad:
        sm_scale = kw.get("softmax_scale") or 1 / math.sqrt(q.shape[-1])
        size = sm_scale * max(amax(q), amax(k)) * amax(v) * amax(do)
        refs = torch.autograd.grad(ref, (q64, k64, v64), do.double())
        lows = torch.autograd.grad(low, (ql, kl, vl), do)
        for name, g, r, lo in zip(("dq", "dk", "dv"), grads, refs, lows):
            assert g.dtype == dtype
            assert_close_rule(g, r, lo, atol=ATOL[dtype] * max(size, amax(r)), name=name)
    return out.detach()


def _randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = DT) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


seq_lens = st.one_of(st.sampled_from([1, 16, 17, 32, 33, 65]), st.integers(1, 70))
windows = st.one_of(st.none(), st.tuples(st.integers(-1, 40), st.integers(-1, 40)), st.just((7, 0)))


@st.composite
def head_layouts(draw) -> tuple[int, int]:
    """(Hq, Hkv) with GQA ratios 1, 4, 8 (MQA when Hkv = 1)."""
    ratio = draw(st.sampled_from([1, 4, 8]))
    hkv = 1 if ratio == 8 else draw(st.sampled_from([1, 2]))
    return hkv * ratio, hkv


# shrinking a failure through the interpreter takes minutes; the failing example is printed
# anyway. On a GPU every new (head dim, flags) draw compiles kernels, so fewer examples.
NO_SHRINK = settings(
    phases=(Phase.explicit, Phase.reuse, Phase.generate), **({"max_examples": 3} if ON_GPU else {})
)


@NO_SHRINK
@given(
    sq=seq_lens,
    sk=st.one_of(st.none(), seq_lens),
    heads=head_layouts(),
    d=st.sampled_from([16, 32, 64, 80]),
    batch=st.integers(1, 2),
    causal=st.booleans(),
    window=windows,
    softcap=st.one_of(st.none(), st.floats(0.5, 20.0)),
    scale=st.one_of(st.none(), st.floats(0.05, 1.0)),
    magnitude=st.sampled_from([1.0, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_dense_forward_backward(
    sq, sk, heads, d, batch, causal, window, softcap, scale, magnitude, seed
):
    hq, hkv = heads
    sk = sq if sk is None else sk
    batch = 1 if hq > 2 else batch  # keeps the interpreter's work per example bounded
    torch.manual_seed(seed)
    q = _randn(batch, sq, hq, d, scale=magnitude)
    k = _randn(batch, sk, hkv, d, scale=magnitude)
    v = _randn(batch, sk, hkv, d)
    check_against_reference(
        q, k, v, causal=causal, window=window, softcap=softcap, softmax_scale=scale
    )


@st.composite
def documents(draw) -> tuple[list[int], list[int] | None]:
    """Query lengths per document (some of length 1, empty allowed) and optional key lengths."""
    lq = draw(st.lists(st.one_of(st.just(1), st.integers(0, 40)), min_size=1, max_size=4))
    if sum(lq) == 0:
        lq[0] = 1
    if not draw(st.booleans()):
        return lq, None
    # KV-cache style: each document has at least as many keys as queries
    return lq, [n + draw(st.integers(0, 24)) for n in lq]


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEV
    )


@NO_SHRINK
@given(
    docs=documents(),
    heads=head_layouts(),
    d=st.sampled_from([16, 32, 64]),
    causal=st.booleans(),
    window=windows,
    softcap=st.one_of(st.none(), st.just(5.0)),
    seed=st.integers(0, 2**16),
)
def test_varlen_forward_backward(docs, heads, d, causal, window, softcap, seed):
    lq, lk = docs
    hq, hkv = heads
    torch.manual_seed(seed)
    kw = dict(causal=causal, window=window, softcap=softcap, cu_seqlens=_cu(lq))
    tk = sum(lq)
    if lk is not None:
        kw["cu_seqlens_k"] = _cu(lk)
        tk = sum(lk)
    q = _randn(sum(lq), hq, d)
    k = _randn(tk, hkv, d)
    v = _randn(tk, hkv, d)
    check_against_reference(q, k, v, **kw)


def test_packed_equals_each_document_alone():
    torch.manual_seed(1)
    lq, lk = [5, 1, 40, 23], [9, 1, 40, 50]
    hq, hkv, d = 4, 2, 32
    q, k, v = _randn(sum(lq), hq, d), _randn(sum(lk), hkv, d), _randn(sum(lk), hkv, d)
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    kw = dict(causal=True, window=(20, 0))
    with qkern.backend("triton"):
        packed = flash_attention(q, k, v, cu_seqlens=_cu(lq), cu_seqlens_k=_cu(lk), **kw)
        for i in range(len(lq)):
            alone = flash_attention(
                q[None, cq[i] : cq[i + 1]],
                k[None, ck[i] : ck[i + 1]],
                v[None, ck[i] : ck[i + 1]],
                **kw,
            )[0]
            torch.testing.assert_close(packed[cq[i] : cq[i + 1]], alone, rtol=0, atol=0)


@pytest.mark.parametrize(
    "sq,sk,heads,kw",
    [
        (1, 67, (8, 2), dict(causal=True)),
        (3, 70, (4, 1), dict(causal=True, window=(20, 0), softcap=10.0)),
        (2, 45, (2, 2), dict(causal=False)),
    ],
)
@pytest.mark.parametrize("splits", [1, 3])
def test_split_kv_decode(sq, sk, heads, kw, splits):
    """The split-KV path gives the regular path's output and base-2 LSE."""
    torch.manual_seed(2)
    hq, hkv = heads
    q, k, v = _randn(2, sq, hq, 32), _randn(2, sk, hkv, 32), _randn(2, sk, hkv, 32)
    q, k, v, spec = attn._prepare(
        q, k, v, kw["causal"], None, kw.get("window"), kw.get("softcap"), None, None, None, None
    )
    with poisoned_allocations():
        out, lse = attn._attention_forward(q, k, v, spec, num_splits=splits)
    ref = flash_attention_ref(q.double(), k.double(), v.double(), **kw)
    low = flash_attention_ref(q, k, v, upcast=False, **kw)
    assert_close_rule(out, ref, low, atol=ATOL[DT] * v.abs().max().item())
    # LSE oracle: log2 sum_j exp(s_j) over the visible keys of every (b, h, i)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double().repeat_interleave(hq // hkv, 2))
    s = s / math.sqrt(32)
    if kw.get("softcap"):
        s = kw["softcap"] * torch.tanh(s / kw["softcap"])
    s = s.masked_fill(~visible_mask(sq, sk, kw["causal"], kw.get("window")), float("-inf"))
    assert_close_rule(lse, torch.logsumexp(s, -1) * LOG2E, None, atol=4 * ATOL[DT], name="lse")


def test_split_kv_varlen_decode_with_empty_cache():
    """Packed decode: one query per document against caches of various lengths, one empty."""
    torch.manual_seed(3)
    lq, lk = [1, 1, 1, 1], [50, 0, 1, 33]
    q, k, v = _randn(4, 4, 16), _randn(sum(lk), 2, 16), _randn(sum(lk), 2, 16)
    kw = dict(causal=True, cu_seqlens=_cu(lq), cu_seqlens_k=_cu(lk))
    q, k, v, spec = attn._prepare(
        q, k, v, True, None, None, None, kw["cu_seqlens"], None, kw["cu_seqlens_k"], None
    )
    with poisoned_allocations():
        out, lse = attn._attention_forward(q, k, v, spec, num_splits=2)
    ref = flash_attention_ref(q.double(), k.double(), v.double(), **kw)
    low = flash_attention_ref(q, k, v, upcast=False, **kw)
    assert_close_rule(out, ref, low, atol=ATOL[DT] * v.abs().max().item())
    assert torch.all(out[1] == 0) and torch.all(lse[:, 1] == float("inf"))


def test_decode_picks_split_path_and_matches():
    torch.manual_seed(4)
    q, k, v = _randn(1, 1, 4, 16), _randn(1, 300, 1, 16), _randn(1, 300, 1, 16)
    _, _, _, spec = attn._prepare(q, k, v, True, None, None, None, None, None, None, None)
    assert attn._num_splits(1, 1, 4, spec, q.device) > 1
    check_against_reference(q, k, v, grad=True, causal=True)


@pytest.mark.parametrize("varlen", [False, True])
def test_float16(varlen):
    torch.manual_seed(5)
    if varlen:
        lq = [7, 1, 30]
        q, k, v = (_randn(sum(lq), h, 32, dtype=torch.float16) for h in (4, 1, 1))
        check_against_reference(q, k, v, causal=True, cu_seqlens=_cu(lq), softcap=8.0)
    else:
        q, k, v = (_randn(2, 37, h, 64, dtype=torch.float16) for h in (4, 2, 2))
        check_against_reference(q, k, v, causal=False, window=(9, 9))


@pytest.mark.parametrize("ws", [False, True])
def test_tma_descriptor_variant(ws):
    """Q/K/V (forward, dQ) and Q/dO (dK/dV) through per-document tensor descriptors, whose
    out-of-range rows read as zeros: odd lengths, more keys than queries, GQA, packed documents
    with a window and softcap. ``ws`` adds the warp-specialized loop (a no-op when interpreted)."""
    torch.manual_seed(15)
    with forced_variant(tma=True, ws=ws):
        q, k, v = _randn(1, 37, 4, 32), _randn(1, 45, 1, 32), _randn(1, 45, 1, 32)
        check_against_reference(q, k, v, causal=True)
        assert attn._attn_fwd_kernel.best_config.kwargs["TMA"]
        assert attn._attn_bwd_dkdv_kernel.best_config.kwargs["TMA"]
        assert attn._attn_bwd_dq_kernel.best_config.kwargs["TMA"]
        lq = [1, 30, 0, 19]
        q, k, v = (_randn(sum(lq), h, 16) for h in (2, 2, 2))
        check_against_reference(
            q, k, v, causal=True, cu_seqlens=_cu(lq), window=(9, 0), softcap=6.0
        )


def test_tma_eligibility_and_pruning(monkeypatch):
    """Descriptors need D a power of two and 16-byte aligned rows; the pruner keeps TMA
    candidates only for such launches and WS candidates only when enabled."""
    x = _randn(2, 9, 4, 64)
    assert attn._tma_ok(64, x, x)
    assert not attn._tma_ok(80, _randn(2, 9, 4, 80))
    odd_rows = _randn(2, 9, 4 * 64 + 1)[..., :256].view(2, 9, 4, 64)  # row stride 257
    assert not attn._tma_ok(64, x, odd_rows)
    monkeypatch.setattr(attn, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(attn, "_TUNE_ALL", True)
    configs = [attn._cfg(128, 64, 8, 3), attn._cfg(128, 64, 8, 3, tma=True),
               attn._cfg(128, 64, 8, 2, tma=True, ws=True)]  # fmt: skip
    prune = attn._pruner([], [])
    flags = lambda kept: [(c.kwargs["TMA"], c.kwargs["WS"]) for c in kept]
    for ws in (False, True):
        monkeypatch.setattr(attn, "_WARP_SPECIALIZE", ws)
        kept = prune(configs, {}, PREC="tf32", D_PAD=128, TMA_OK=True)
        assert flags(kept) == [(False, False), (True, False)] + ([(True, True)] if ws else [])
        kept = prune(configs, {}, PREC="tf32", D_PAD=128, TMA_OK=False)
        assert flags(kept) == [(False, False)]
        # warp specialization only at the head dim it was checked at on the GPU
        kept = prune(configs, {}, PREC="tf32", D_PAD=64, TMA_OK=True)
        assert flags(kept) == [(False, False), (True, False)]
    # a zero stride (an expanded tensor) is no TMA row stride
    assert not attn._tma_ok(64, x[:, :1].expand(2, 9, 4, 64))


def _candidate_lists(monkeypatch) -> dict:
    """The Hopper candidate lists as a GPU run builds them (the interpreter gets one tiny one)."""
    monkeypatch.setattr(attn, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(attn, "pick_configs", list)
    return {"fwd": attn._fwd_configs(), "dkdv": attn._dkdv_configs(), "dq": attn._dq_configs()}


def test_candidate_lists_are_small_with_a_pointer_default(monkeypatch):
    """At most six candidates per kernel, no duplicates, warp specialization only with TMA, and
    the first entry (the only one compiled when tuning is off, or when descriptors and warp
    specialization are unavailable) a plain pointer-load config."""
    for name, configs in _candidate_lists(monkeypatch).items():
        assert 1 <= len(configs) <= 6, name
        keys = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in configs]
        assert len(set(keys)) == len(keys), name
        assert not configs[0].kwargs["TMA"] and not configs[0].kwargs["WS"], name
        assert all(c.kwargs["TMA"] or not c.kwargs["WS"] for c in configs), name
        for c in configs:  # D = 128 tiles the kernels index with BLOCK_M and BLOCK_N
            assert c.kwargs["BLOCK_M"] in (16, 32, 64, 128) and c.kwargs["BLOCK_N"] in (32, 64, 128)
            assert c.num_warps in (4, 8) and 1 <= c.num_stages <= 5
        monkeypatch.setattr(attn, "_TUNE_ALL", True)
        monkeypatch.setattr(attn, "_WARP_SPECIALIZE", False)
        kept = attn._pruner([], [])(configs, {}, PREC="tf32", D_PAD=128, TMA_OK=False)
        assert kept and all(not c.kwargs["TMA"] for c in kept), name


def test_rows_without_keys_are_zero_with_zero_gradient():
    """Causal with more queries than keys: the first Sq - Sk queries see nothing."""
    torch.manual_seed(6)
    q, k, v = _randn(1, 40, 2, 16), _randn(1, 10, 2, 16), _randn(1, 10, 2, 16)
    out = check_against_reference(q, k, v, causal=True)
    assert torch.all(out[:, :30] == 0)


def test_non_contiguous_inputs():
    """q/k/v as slices of a fused qkv projection, and a transposed last dim (copied)."""
    torch.manual_seed(7)
    qkv = _randn(2, 33, 3, 4, 32)
    q, k, v = qkv.unbind(2)
    check_against_reference(q, k, v, causal=True)
    qt = _randn(2, 33, 4, 32).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    check_against_reference(qt, k, v, causal=True, grad=False)


def test_auto_backend_on_cpu_is_the_reference():
    torch.manual_seed(8)
    q, k, v = _randn(1, 9, 4, 16), _randn(1, 9, 2, 16), _randn(1, 9, 2, 16)
    if q.is_cuda:
        pytest.skip("auto dispatch picks the kernels on CUDA")
    torch.testing.assert_close(qkern.flash_attention(q, k, v), flash_attention_ref(q, k, v))


def test_reference_matches_sdpa():
    """The oracle itself against PyTorch's math attention (causal, GQA via enable_gqa)."""
    torch.manual_seed(9)
    q, k, v = _randn(2, 11, 4, 16), _randn(2, 11, 2, 16), _randn(2, 11, 2, 16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = sdpa(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(flash_attention_ref(q, k, v), want.transpose(1, 2))


def test_reference_gradcheck():
    torch.manual_seed(10)
    q = torch.randn(1, 4, 2, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 1, 16, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: flash_attention_ref(q, k, v, causal=True, softcap=2.0, window=(1, 0))
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_visible_mask_definition():
    m = visible_mask(2, 5, causal=True, window=(2, 0))
    # query 0 sits at position 3, query 1 at 4; each sees itself and 2 keys back
    assert m.tolist() == [[False, True, True, True, False], [False, False, True, True, True]]


def _qkv(sq=8, sk=8, hq=4, hkv=2, d=16, dtype=DT):
    return _randn(1, sq, hq, d, dtype=dtype), _randn(1, sk, hkv, d), _randn(1, sk, hkv, d)


@pytest.mark.parametrize(
    "make,kw,err,match",
    [
        (lambda: _qkv(hq=6, hkv=4), {}, ValueError, r"q heads \(6\) must be a multiple"),
        (lambda: _qkv(d=12), {}, ValueError, "head_dim must be a multiple of 8"),
        (lambda: _qkv(d=264), {}, ValueError, "head_dim must be a multiple of 8"),
        (lambda: _qkv(dtype=torch.bfloat16), {}, TypeError, "must share one dtype"),
        (
            lambda: tuple(t.to(torch.float64) for t in _qkv()),
            {},
            TypeError,
            "q must have dtype in",
        ),
        (
            lambda: (_randn(1, 8, 4, 16), _randn(2, 8, 2, 16), _randn(2, 8, 2, 16)),
            {},
            ValueError,
            "same batch size",
        ),  # fmt: skip
        (
            lambda: (_randn(1, 8, 4, 16), _randn(1, 8, 2, 16), _randn(1, 7, 2, 16)),
            {},
            ValueError,
            "k and v must have the same shape",
        ),  # fmt: skip
        (
            lambda: (_randn(1, 8, 4, 16), _randn(1, 8, 2, 32), _randn(1, 8, 2, 32)),
            {},
            ValueError,
            "same head_dim",
        ),  # fmt: skip
        (
            lambda: (_randn(8, 4, 16), _randn(8, 2, 16), _randn(8, 2, 16)),
            {},
            ValueError,
            "pass cu_seqlens",
        ),  # fmt: skip
        (lambda: _qkv(), {"window": (3,)}, ValueError, "window must be None or a"),
        (lambda: _qkv(), {"window": (-2, 0)}, ValueError, "window left must be"),
        (lambda: _qkv(), {"softcap": 0.0}, ValueError, "softcap must be"),
        (lambda: _qkv(), {"softmax_scale": float("nan")}, ValueError, "softmax_scale must be"),
        (lambda: _qkv(), {"max_seqlen": 8}, ValueError, "only for packed input"),
    ],
)
def test_bad_dense_inputs(make, kw, err, match):
    q, k, v = make()
    with pytest.raises(err, match=match):
        flash_attention(q, k, v, **kw)


def _packed(tq=10, tk=10):
    return _randn(tq, 4, 16), _randn(tk, 2, 16), _randn(tk, 2, 16)


@pytest.mark.parametrize(
    "cu,extra,err,match",
    [
        ([0, 4, 10], {"cu_dtype": torch.int64}, TypeError, "cu_seqlens must be int32"),
        ([0, 6, 4, 10], {}, ValueError, "cu_seqlens must be non-decreasing"),
        ([1, 4, 10], {}, ValueError, "cu_seqlens must start at 0"),
        ([0, 4, 9], {}, ValueError, r"must end at the token count of q \(10\)"),
        ([0], {}, ValueError, "1-D with documents"),
        ([0, 4, 10], {"max_seqlen": 5}, ValueError, r"max_seqlen=5 is smaller"),
        ([0, 4, 10], {"cu_k": [0, 4, 10]}, ValueError, r"token count of k \(12\)"),
        ([0, 4, 10], {"cu_k": [0, 12]}, ValueError, "as many entries as cu_seqlens"),
        ([0, 4, 10], {"tk": 12}, ValueError, "pass cu_seqlens_k"),
        ([0, 4, 10], {"no_cu_q": True}, ValueError, "cu_seqlens_k needs cu_seqlens"),
    ],
)
def test_bad_packed_inputs(cu, extra, err, match):
    tk = 12 if "cu_k" in extra or "tk" in extra else 10
    q, k, v = _packed(10, tk)
    cu_t = torch.tensor(cu, dtype=extra.get("cu_dtype", torch.int32), device=DEV)
    kw = {"max_seqlen": extra.get("max_seqlen")}
    if "cu_k" in extra:
        kw["cu_seqlens_k"] = torch.tensor(extra["cu_k"], dtype=torch.int32, device=DEV)
    if extra.get("no_cu_q"):
        cu_t, kw = None, {"cu_seqlens_k": cu_t}
    with pytest.raises(err, match=match):
        flash_attention(q, k, v, cu_seqlens=cu_t, **kw)


# ------------------------------------------------------------------------------------------
# GPU: bf16/fp16 at moderate sizes (skipped without CUDA)
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,d,causal",
    [(torch.bfloat16, 128, True), (torch.float16, 128, False), (torch.bfloat16, 64, True)],
)
def test_gpu_dense(dtype, d, causal):
    torch.manual_seed(11)
    q, k, v = (_randn(2, 1024, h, d, dtype=dtype) for h in (8, 2, 2))
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_tma_variant(d):
    torch.manual_seed(16)
    with forced_variant(tma=True, ws=False):
        q, k, v = (_randn(2, 1000, h, d, dtype=torch.bfloat16) for h in (8, 2, 2))
        check_against_reference(q, k, v, causal=True)
        lq = [1, 300, 1024, 17]
        q, k, v = (_randn(sum(lq), h, d, dtype=torch.bfloat16) for h in (8, 2, 2))
        check_against_reference(q, k, v, causal=True, cu_seqlens=_cu(lq), softcap=30.0)


@pytest.mark.gpu
def test_gpu_warp_specialized_variant():
    """Warp-specialized TMA kernels (forward, dK/dV, dQ) against the float32 reference, in a
    child process: a failed lowering could abort or hang the test process itself."""
    assert attn.probe_warp_specialization()


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(6))
def test_gpu_every_candidate(index, monkeypatch):
    """Each autotune candidate alone (the index-th entry of each kernel's list, wrapping around)
    against the float64 reference, dense GQA and packed with softcap. Warp-specialized entries
    run only where the child-process probe passed (a failed lowering could abort this process)."""
    lists = _candidate_lists(monkeypatch)
    monkeypatch.undo()
    kernels = (attn._attn_fwd_kernel, attn._attn_bwd_dkdv_kernel, attn._attn_bwd_dq_kernel)
    chosen = [configs[index % len(configs)] for configs in lists.values()]
    ws = any(c.kwargs["WS"] for c in chosen)
    if ws and not _warp_specialization_works():
        pytest.skip("warp specialization does not run correctly on this GPU / Triton")
    saved, saved_ws = [k.configs for k in kernels], attn._WARP_SPECIALIZE
    attn._WARP_SPECIALIZE = ws
    attn._force_configs(*([c] for c in chosen))
    try:
        torch.manual_seed(17 + index)
        q, k, v = (_randn(2, 777, h, 128, dtype=torch.bfloat16) for h in (8, 2, 2))
        check_against_reference(q, k, v, causal=True)
        for kernel, c in zip(kernels, chosen):
            assert kernel.best_config.kwargs == c.kwargs
        lq = [1, 300, 530, 17]
        q, k, v = (_randn(sum(lq), h, 128, dtype=torch.bfloat16) for h in (8, 2, 2))
        check_against_reference(q, k, v, causal=True, cu_seqlens=_cu(lq), softcap=30.0)
    finally:
        attn._WARP_SPECIALIZE = saved_ws
        attn._force_configs(*saved)


@functools.cache
def _warp_specialization_works() -> bool:
    return attn.probe_warp_specialization()


@pytest.mark.gpu
@pytest.mark.parametrize("d", [80, 256])
def test_gpu_padded_and_large_head_dims(d):
    torch.manual_seed(12)
    q, k, v = (_randn(1, 777, h, d, dtype=torch.bfloat16) for h in (4, 1, 1))
    check_against_reference(q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gpu_varlen_window_softcap(dtype):
    torch.manual_seed(13)
    lq = [1, 300, 1024, 17, 700]
    q, k, v = (_randn(sum(lq), h, 128, dtype=dtype) for h in (8, 2, 2))
    check_against_reference(q, k, v, causal=True, cu_seqlens=_cu(lq), window=(255, 0), softcap=30.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gpu_decode_split_kv(dtype):
    torch.manual_seed(14)
    q = _randn(4, 1, 32, 128, dtype=dtype)
    k, v = (_randn(4, 4096, 8, 128, dtype=dtype) for _ in range(2))
    _, _, _, spec = attn._prepare(q, k, v, True, None, None, None, None, None, None, None)
    assert attn._num_splits(4, 8, 4, spec, q.device) > 1
    check_against_reference(q, k, v, grad=False, causal=True)
    lk = [4096, 1, 2000, 3000]
    kp, vp = (_randn(sum(lk), 8, 128, dtype=dtype) for _ in range(2))
    check_against_reference(
        q[:, 0], kp, vp, grad=False, causal=True, cu_seqlens=_cu([1] * 4), cu_seqlens_k=_cu(lk)
    )


def test_enable_warp_specialization_follows_the_probe(monkeypatch):
    # the flag is exactly the probe's answer; without a GPU the child process fails, so the
    # warp-specialized candidates stay out
    monkeypatch.setattr(attn, "_WARP_SPECIALIZE", False)
    monkeypatch.setattr(attn, "probe_warp_specialization", lambda timeout_s: True)
    assert attn.enable_warp_specialization() is True and attn._WARP_SPECIALIZE is True
    monkeypatch.undo()
    monkeypatch.setattr(attn, "_WARP_SPECIALIZE", False)
    if not torch.cuda.is_available():
        assert attn.enable_warp_specialization(timeout_s=120) is False
        assert attn._WARP_SPECIALIZE is False
