"""Cross-entropy and fused linear cross-entropy: kernels vs float64 oracles built on torch."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import qkern
from qkern.cross_entropy import (
    cross_entropy,
    cross_entropy_ref,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from tests.helpers import assert_close_rule, kernel_device

# the module itself: once qkern's lazy export has run, the attribute qkern.cross_entropy is the
# function of the same name, so `import qkern.cross_entropy as ce` could bind the function
ce = importlib.import_module("qkern.cross_entropy")

DEV = kernel_device()
IGNORE = -100


# ------------------------------------------------------------------------------------------------
# oracle: torch's cross_entropy on transformed logits, in whatever dtype it is given
# ------------------------------------------------------------------------------------------------


def oracle(
    x: torch.Tensor,
    y: torch.Tensor,
    ignore_index: int = IGNORE,
    reduction: str = "mean",
    num_items: float | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """The loss written directly from the definitions with torch's F.cross_entropy."""
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(
        z, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    valid = y != ignore_index
    if z_loss:
        lse = torch.logsumexp(z, dim=-1)
        rows = rows + torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    if num_items is not None:
        denom = max(float(num_items), 1.0)
        return rows / denom if reduction == "none" else rows.sum() / denom
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(int(valid.sum()), 1)


def loss_and_grad(fn, x: torch.Tensor, go: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, **kw)
    loss.backward(go.to(loss.dtype).expand_as(loss))
    return loss.detach(), x.grad.detach()


def make_case(rows: int, vocab: int, mag: float, dtype: torch.dtype, seed: int, ignore_frac: float):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * mag).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=g)
    ignored = torch.rand(rows, generator=g) < ignore_frac
    y[ignored] = IGNORE
    return x.to(DEV), y.to(DEV)


options = st.fixed_dictionaries(
    {
        "reduction": st.sampled_from(["mean", "sum", "none"]),
        "num_items": st.sampled_from([None, None, 1, 7]),
        "label_smoothing": st.sampled_from([0.0, 0.0, 0.1]),
        "softcap": st.sampled_from([None, None, 3.0]),
        "z_loss": st.sampled_from([0.0, 0.0, 1e-3]),
        "logit_scale": st.sampled_from([1.0, 1.0, 0.5]),
    }
)


def tolerances(dtype: torch.dtype) -> dict:
    # half-precision gradients are rounded once (one ulp = 2^-11 fp16, 2^-8 bf16): allow about one
    # ulp beyond the rule
    if dtype == torch.float16:
        return {"atol": 1e-6, "rtol": 2.0**-10}
    if dtype == torch.bfloat16:
        return {"atol": 1e-6, "rtol": 2.0**-7}
    return {"atol": 1e-6, "rtol": 1e-5}


def check_against_oracle(x, y, go, dtype, **opts) -> None:
    x64 = x.double()
    ref_loss, ref_grad = loss_and_grad(lambda t, **k: oracle(t, y, **k), x64, go, **opts)
    # torch in the kernel's dtype sets the error budget (on the CPU in fp32 for fp16 inputs,
    # where half-precision softmax kernels are not available everywhere)
    same = x.cpu().float() if dtype == torch.float16 else x.cpu()
    t_loss, t_grad = loss_and_grad(lambda t, **k: oracle(t, y.cpu(), **k), same, go.cpu(), **opts)
    with qkern.backend("triton"):
        out_loss, out_grad = loss_and_grad(lambda t, **k: cross_entropy(t, y, **k), x, go, **opts)
    assert out_grad.dtype == dtype
    tol = tolerances(dtype)
    assert_close_rule(out_loss, ref_loss, t_loss, atol=1e-5, rtol=1e-5, name="loss")
    assert_close_rule(out_grad, ref_grad, t_grad.to(dtype), name="grad", **tol)


# ------------------------------------------------------------------------------------------------
# reference vs torch (fast, no kernel)
# ------------------------------------------------------------------------------------------------


@given(
    rows=st.integers(1, 9),
    vocab=st.integers(1, 70),
    opts=options,
    seed=st.integers(0, 2**16),
)
def test_reference_matches_torch(rows, vocab, opts, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[torch.rand(rows, generator=g) < 0.3] = IGNORE
    go = torch.rand(rows if opts["reduction"] == "none" else (), generator=g, dtype=torch.float64)
    want_loss, want_grad = loss_and_grad(lambda t, **k: oracle(t, y, **k), x, go, **opts)
    got_loss, got_grad = loss_and_grad(lambda t, **k: cross_entropy_ref(t, y, **k), x, go, **opts)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, IGNORE, 5, 0])
    fn = lambda t: cross_entropy_ref(  # noqa: E731
        t, y, label_smoothing=0.2, softcap=2.0, z_loss=0.01, logit_scale=0.7, num_items=3
    )
    assert torch.autograd.gradcheck(fn, (x,))


def test_reference_z_loss_formula():
    x = torch.randn(5, 11, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, IGNORE, 10, 7])
    got = cross_entropy_ref(x, y, z_loss=0.1, reduction="none")
    lse = torch.log(torch.exp(x).sum(-1))
    want = lse - x[torch.arange(5), y.clamp_min(0)] + 0.1 * lse**2
    want[2] = 0.0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# the Triton kernel (interpreter on CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@given(
    rows=st.integers(1, 4),
    vocab=st.sampled_from([1, 7, 129, 1000, 3001]),
    mag=st.sampled_from([1.0, 8.0]),
    opts=options,
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_torch(dtype, rows, vocab, mag, opts, seed):
    x, y = make_case(rows, vocab, mag, dtype, seed, ignore_frac=0.25)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (rows,) if opts["reduction"] == "none" else ()
    go = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(DEV)
    check_against_oracle(x, y, go, dtype, **opts)


@pytest.mark.parametrize(("vocab", "pf"), [(1, 2), (100, 1), (128, 2), (129, 3), (1000, 3)])
def test_kernel_small_chunks_run_the_prefetch_queue(monkeypatch, vocab, pf):
    # fp32, 1 warp, 1 vector of 4 per thread: 128-logit chunks. 1000 -> 7 full chunks and a
    # ragged one, 129 -> one full and a 1-logit ragged one, 128 -> exactly one, 1 -> only ragged;
    # 2 programs for 5 rows: the queue crosses from pass 1 to pass 2 and into the next row
    monkeypatch.setattr(ce, "_INTERPRET_CONFIG", {"NW": 1, "K": 1, "PF": pf, "programs": 2})
    x, y = make_case(5, vocab, 5.0, torch.float32, vocab, ignore_frac=0.0)
    y[-1] = vocab - 1  # the label in the ragged last chunk
    go = torch.tensor(1.0, dtype=torch.float64, device=DEV)
    check_against_oracle(x, y, go, torch.float32, label_smoothing=0.1, softcap=4.0, z_loss=1e-2)
    check_against_oracle(x, y, go.expand(5) * 2, torch.float32, reduction="none")


@pytest.mark.parametrize("vocab", [2, 130, 1000])
def test_kernel_bf16_word_pairs(vocab):
    """bf16 rows of even length are read as int32 words of two logits (and the gradient packed
    back); the integer path runs under the interpreter too."""
    x, y = make_case(5, vocab, 4.0, torch.bfloat16, 20 + vocab, ignore_frac=0.2)
    assert ce._units(x, x) == (True, 4)
    x64 = x.double()
    go = torch.tensor(1.0, dtype=torch.float64, device=DEV)
    ref_loss, ref_grad = loss_and_grad(lambda t: oracle(t, y, label_smoothing=0.1), x64, go)
    with qkern.backend("triton"):
        out_loss, out_grad = loss_and_grad(
            lambda t: cross_entropy(t, y, label_smoothing=0.1), x, go
        )
    assert out_grad.dtype == torch.bfloat16
    assert_close_rule(out_loss, ref_loss, atol=1e-5, rtol=1e-5, name="loss")
    # one rounding of each gradient element to bf16: the packed words round to nearest (half an
    # ulp); the label's element goes through a scalar bf16 cast, which the interpreter truncates
    # (up to one ulp = 2^-7 relative)
    assert_close_rule(out_grad, ref_grad, atol=1e-7, rtol=2.0**-7, name="grad")
    not_label = torch.ones_like(out_grad, dtype=torch.bool)
    counted = (y != IGNORE).nonzero()[:, 0]
    not_label[counted, y[counted]] = False
    assert_close_rule(
        out_grad[not_label], ref_grad[not_label], atol=1e-7, rtol=2.0**-8, name="grad, packed"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_extreme_logits(dtype):
    x, y = make_case(4, 300, 1.0, dtype, 0, ignore_frac=0.0)
    x[0, :] = 1e4
    x[1, ::2] = -1e4
    x[2, y[2]] = 1e4  # target far above the rest: loss 0
    x[3, y[3]] = -1e4  # target far below: loss ~ 1e4
    go = torch.tensor(1.0, dtype=torch.float64, device=DEV)
    with qkern.backend("triton"):
        rows = cross_entropy(x, y, reduction="none")
    assert torch.isfinite(rows).all()
    check_against_oracle(x, y, go, dtype, reduction="sum")
    check_against_oracle(x, y, go, dtype, label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_grad(reduction):
    x, _ = make_case(3, 50, 2.0, torch.float32, 1, ignore_frac=0.0)
    y = torch.full((3,), IGNORE, device=DEV)
    for mode in ("triton", "reference"):
        xr = x.clone().requires_grad_(True)
        with qkern.backend(mode):
            loss = cross_entropy(xr, y, reduction=reduction, label_smoothing=0.1, z_loss=0.1)
        loss.sum().backward()
        assert torch.equal(loss, torch.zeros_like(loss)), mode
        assert torch.equal(xr.grad, torch.zeros_like(x)), mode


def test_custom_ignore_index_and_leading_dims():
    x, y = make_case(6, 40, 3.0, torch.float32, 2, ignore_frac=0.0)
    y[1] = 7  # 7 is the ignore index here
    go = torch.tensor(1.0, dtype=torch.float64, device=DEV)
    check_against_oracle(x, y, go, torch.float32, ignore_index=7)
    with qkern.backend("triton"):
        got = cross_entropy(x.view(2, 3, 40), y.view(2, 3), ignore_index=7)
    assert_close_rule(got, oracle(x.double(), y, ignore_index=7), atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_matches_and_overwrites_logits(reduction):
    x, y = make_case(5, 260, 3.0, torch.float32, 3, ignore_frac=0.2)
    go = torch.rand(5 if reduction == "none" else (), dtype=torch.float64, device=DEV) + 0.5
    with qkern.backend("triton"):
        want_loss, want_grad = loss_and_grad(
            lambda t: cross_entropy(t, y, reduction=reduction, softcap=5.0), x, go
        )
        a = torch.zeros(5, 260, device=DEV, requires_grad=True)
        logits = a + x  # a non-leaf whose producer does not need it for backward
        loss = cross_entropy(logits, y, reduction=reduction, softcap=5.0, inplace_backward=True)
        loss.backward(go.float().expand_as(loss))
    torch.testing.assert_close(loss.detach(), want_loss, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, want_grad, rtol=0, atol=0)
    torch.testing.assert_close(logits.detach(), want_grad, rtol=0, atol=0)  # buffer = gradient


def test_inplace_backward_refuses_logits_saved_by_another_op():
    x, y = make_case(3, 20, 1.0, torch.float32, 4, ignore_frac=0.0)
    a = x.clone().requires_grad_(True)
    logits = torch.exp(a)  # exp saves its output for backward
    with qkern.backend("triton"):
        loss = cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_backward_twice_is_refused():
    x, y = make_case(2, 10, 1.0, torch.float32, 5, ignore_frac=0.0)
    x.requires_grad_(True)
    with qkern.backend("triton"):
        loss = cross_entropy(x, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_no_grad_forward_matches():
    x, y = make_case(4, 90, 2.0, torch.float32, 6, ignore_frac=0.25)
    with qkern.backend("triton"), torch.no_grad():
        got = cross_entropy(x, y, label_smoothing=0.05)
    assert_close_rule(got, oracle(x.double(), y, label_smoothing=0.05), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("tensor_items", [False, True])
def test_gradient_accumulation_identity(mode, tensor_items):
    """Two micro-batches normalized by the total valid tokens sum to the big batch's mean."""
    x, y = make_case(8, 77, 2.0, torch.float32, 7, ignore_frac=0.3)
    y[0] = 3  # at least one valid row
    n_valid = int((y != IGNORE).sum())
    items = torch.tensor(n_valid, device=DEV) if tensor_items else n_valid
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    with qkern.backend(mode):
        big = cross_entropy(xa, y, label_smoothing=0.1)
        big.backward()
        parts = [cross_entropy(xb[s], y[s], num_items=items, label_smoothing=0.1) for s in
                 (slice(0, 3), slice(3, 8))]  # fmt: skip
        total = parts[0] + parts[1]
        total.backward()
    torch.testing.assert_close(total, big, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-9)


def test_dispatch_uses_reference_on_cpu_in_auto_mode():
    x = torch.randn(3, 9, dtype=torch.float64)
    y = torch.tensor([0, 8, IGNORE])
    with qkern.backend("auto"):
        got = cross_entropy(x, y, z_loss=0.5)
    torch.testing.assert_close(got, cross_entropy_ref(x, y, z_loss=0.5), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# fused linear cross-entropy
# ------------------------------------------------------------------------------------------------


def qkern_flce(h, w, b, y, **opts):
    return fused_linear_cross_entropy(h, w, y, b, **opts)


def linear_oracle(h, w, b, y, **opts):
    logits = h @ w.t()
    if b is not None:
        logits = logits + b
    return oracle(logits, y, **opts)


def flce_grads(fn, h, w, b, y, go, train_w, **opts):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(train_w)
    b = b.detach().clone().requires_grad_(train_w) if b is not None else None
    loss = fn(h, w, b, y, **opts)
    loss.backward(go.to(loss.dtype).expand_as(loss))
    grads = [h.grad, w.grad, b.grad if b is not None else None]
    return loss.detach(), grads


def make_linear_case(rows, hid, vocab, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hid, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hid, generator=g, dtype=torch.float64) / math.sqrt(hid) * 3
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[torch.rand(rows, generator=g) < 0.2] = IGNORE

    def cast(t):
        return t.to(dtype).to(DEV) if t is not None else None

    return cast(h), cast(w), cast(b), y.to(DEV)


@pytest.mark.parametrize("train_w", [True, False])
@given(
    rows=st.integers(1, 7),
    hid=st.sampled_from([1, 8, 19]),
    vocab=st.sampled_from([3, 130, 517]),
    bias=st.booleans(),
    opts=options,
    seed=st.integers(0, 2**16),
)
def test_flce_matches_matmul_plus_ce(train_w, rows, hid, vocab, bias, opts, seed):
    h, w, b, y = make_linear_case(rows, hid, vocab, torch.float32, seed, bias)
    g = torch.Generator().manual_seed(seed)
    shape = (rows,) if opts["reduction"] == "none" else ()
    go = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(DEV)
    f64 = [t.double() if t is not None else None for t in (h, w, b)]
    ref_loss, ref_g = flce_grads(linear_oracle, *f64, y, go, train_w, **opts)
    t_loss, t_g = flce_grads(linear_oracle, h, w, b, y, go, train_w, **opts)
    # a 3-row budget at fp32 makes several chunks (and a ragged last one) out of 7 rows
    with pytest.MonkeyPatch.context() as mp, qkern.backend("triton"):
        mp.setattr(ce, "_FLCE_CHUNK_BYTES", 3 * vocab * 4)
        out_loss, out_g = flce_grads(qkern_flce, h, w, b, y, go, train_w, **opts)
    assert_close_rule(out_loss, ref_loss, t_loss, atol=1e-5, rtol=1e-5, name="loss")
    for name, o, r, t in zip(("dh", "dw", "db"), out_g, ref_g, t_g, strict=True):
        if r is None:
            assert o is None, f"{name} computed although not required"
            continue
        assert o.dtype == torch.float32
        assert_close_rule(o, r, t, atol=1e-5, rtol=1e-5, name=name)


def count_matmuls(fn) -> tuple[int, object]:
    """Number of matrix products (mm / addmm / addmm_) torch runs inside ``fn``, and its result."""
    from torch.overrides import TorchFunctionMode

    names = {"mm", "addmm", "addmm_"}
    calls = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in names:
                calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return len(calls), out


def test_flce_frozen_head_never_computes_dw(monkeypatch):
    monkeypatch.setattr(ce, "_FLCE_CHUNK_BYTES", 4 * 64 * 4)  # 4-row chunks: 3 chunks for 10 rows
    h, w, _, y = make_linear_case(10, 12, 64, torch.float32, 8, bias=False)

    def run(train_w):
        hh = h.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(train_w)
        with qkern.backend("triton"):
            loss = fused_linear_cross_entropy(hh, ww, y)
            loss.backward()
        return hh.grad, ww.grad

    frozen_mm, (dh_frozen, dw_frozen) = count_matmuls(lambda: run(False))
    train_mm, (dh_train, dw_train) = count_matmuls(lambda: run(True))
    assert frozen_mm == 3 * 2  # logits and dh per chunk
    assert train_mm == 3 * 3  # plus dW
    assert dw_frozen is None and dw_train is not None
    torch.testing.assert_close(dh_frozen, dh_train, rtol=0, atol=0)


def test_flce_chunk_bytes_argument_sets_the_chunk():
    # chunk_bytes bounds the logits buffer: 2 rows of 64 fp32 logits -> 5 chunks for 10 rows
    # (2 matmuls each on a frozen head), the default budget -> one chunk; same results
    h, w, _, y = make_linear_case(10, 12, 64, torch.float32, 5, bias=False)

    def run(chunk_bytes):
        hh = h.clone().requires_grad_(True)
        with qkern.backend("triton"):
            loss = fused_linear_cross_entropy(hh, w, y, chunk_bytes=chunk_bytes)
            loss.backward()
        return loss, hh.grad

    small_mm, (loss_small, dh_small) = count_matmuls(lambda: run(2 * 64 * 4))
    default_mm, (loss_default, dh_default) = count_matmuls(lambda: run(None))
    assert small_mm == 5 * 2 and default_mm == 2
    torch.testing.assert_close(loss_small, loss_default, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh_small, dh_default, rtol=1e-6, atol=1e-6)
    for bad in (0, -5, 1.5, True, "1"):
        with pytest.raises(ValueError, match="chunk_bytes"):
            fused_linear_cross_entropy(h, w, y, chunk_bytes=bad)


def test_flce_gradient_accumulation_identity(monkeypatch):
    monkeypatch.setattr(ce, "_FLCE_CHUNK_BYTES", 2 * 40 * 4)
    h, w, b, y = make_linear_case(9, 6, 40, torch.float32, 9, bias=True)
    y[0] = 1
    n_valid = int((y != IGNORE).sum())
    with qkern.backend("triton"):
        _, big = flce_grads(qkern_flce, h, w, b, y, torch.tensor(1.0), True)
        hh = h.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        bb = b.clone().requires_grad_(True)
        for s in (slice(0, 4), slice(4, 9)):
            fused_linear_cross_entropy(hh[s], ww, y[s], bb, num_items=n_valid).backward()
    for got, want in zip((hh.grad, ww.grad, bb.grad), big, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_flce_reference_equals_cross_entropy_on_logits():
    h, w, b, y = make_linear_case(5, 7, 23, torch.float64, 10, bias=True)
    got = fused_linear_cross_entropy_ref(h, w, y, b, label_smoothing=0.1, softcap=3.0)
    want = oracle(h @ w.t() + b, y, label_smoothing=0.1, softcap=3.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_flce_chunk_rows_rule():
    bench = dict(rows=8192, vocab=128256, hidden=4096, elt=2, sms=132)
    for dw in (False, True):
        # d hidden fills 1.94 waves of 128 x 256 tiles at 2048 rows (501 MiB of bf16 logits)
        assert ce._flce_best_chunk(**bench, dw=dw, budget=504 * 2**20) == 2048
        # and 0.97 waves at 1024 rows, preferred to 1280 or 1536 (2 waves, 39% / 27% idle)
        assert ce._flce_best_chunk(**bench, dw=dw, budget=384 * 2**20) == 1024
    cost = {c: ce._flce_cost(8192, c, 128256, 4096, 2, False, 132) for c in (1024, 1536, 2048)}
    assert cost[2048] < cost[1024] < cost[1536]
    # every choice is a multiple of 256 rows within the budget, or all rows when they fit
    for rows, vocab, hidden in [(8192, 152064, 5120), (8192, 256000, 4096), (5000, 32000, 2048),
                                (300, 128256, 4096), (8192, 10**6, 4096)]:  # fmt: skip
        for budget in (384 * 2**20, 504 * 2**20):
            c = ce._flce_best_chunk(rows, vocab, hidden, 2, False, 132, budget)
            assert c * vocab * 2 <= budget or c == 1
            assert c % 256 == 0 or c == rows or c < 256
    assert ce._flce_best_chunk(300, 128256, 4096, 2, False, 132, 504 * 2**20) == 300
    assert ce._flce_best_chunk(8192, 10**9, 4096, 4, False, 132, 504 * 2**20) == 1
    # the private override wins over the rule (the benchmark sweeps it)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ce, "_FLCE_CHUNK_ROWS", 1280)
        assert ce._flce_chunk_rows(8192, 128256, 4096, 2, False, torch.device("cpu")) == 1280
        assert ce._flce_chunk_rows(1000, 128256, 4096, 2, False, torch.device("cpu")) == 1000
    # the default budget (256 MiB) holds 1024 rows of a 128256-wide bf16 vocabulary
    assert ce._flce_chunk_rows(8192, 128256, 4096, 2, False, torch.device("cpu")) == 1024
    assert 1024 * 128256 * 2 <= ce._FLCE_CHUNK_BYTES < 1280 * 128256 * 2


# (train_w, bias, reduction, num_items): the frozen head, a trained head and bias normalized by
# num_items, and reduction "none" (forward loss only, backward recomputes the chunks)
CHUNK_CASES = [(False, False, "mean", None), (True, True, "sum", 7), (True, False, "none", None)]


@pytest.mark.parametrize("case", CHUNK_CASES)
def test_flce_results_do_not_depend_on_the_chunk_size(monkeypatch, case):
    train_w, bias, reduction, num_items = case
    h, w, b, y = make_linear_case(12, 8, 130, torch.float32, 21, bias=bias)
    y[:] = torch.tensor([5, IGNORE, 129, 0, IGNORE, IGNORE, IGNORE, IGNORE, 64, 7, IGNORE, 100])
    opts = dict(reduction=reduction, num_items=num_items)
    g = torch.Generator().manual_seed(3)
    shape = (12,) if reduction == "none" else ()
    go = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(DEV)
    f64 = [t.double() if t is not None else None for t in (h, w, b)]
    ref_loss, ref_g = flce_grads(linear_oracle, *f64, y, go, train_w, **opts)
    t_loss, t_g = flce_grads(linear_oracle, h, w, b, y, go, train_w, **opts)
    results = {}
    # 1 and 4 divide the 12 rows (4: the second chunk is all ignore_index), 5 leaves a 2-row
    # chunk, 64 is one chunk larger than the rows
    for chunk in (1, 4, 5, 64):
        monkeypatch.setattr(ce, "_FLCE_CHUNK_ROWS", chunk)
        with qkern.backend("triton"):
            loss, grads = flce_grads(qkern_flce, h, w, b, y, go, train_w, **opts)
        assert_close_rule(loss, ref_loss, t_loss, atol=1e-5, rtol=1e-5, name=f"loss {chunk}")
        for name, o, r, t in zip(("dh", "dw", "db"), grads, ref_g, t_g, strict=True):
            assert (o is None) == (r is None), name
            if r is not None:
                assert_close_rule(o, r, t, atol=1e-5, rtol=1e-5, name=f"{name} {chunk}")
        results[chunk] = (loss, grads)
    # beyond the oracle: chunkings agree with each other up to the order of the dW/db sums
    base_loss, base_g = results[64]
    for loss, grads in results.values():
        torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-7)
        for o, r in zip(grads, base_g, strict=True):
            if r is not None:
                torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


def test_flce_chunk_loop_allocates_and_copies_nothing_per_chunk(monkeypatch):
    """Torch-level calls that allocate, copy or cast do not grow with the number of chunks; each
    chunk adds exactly its two products (logits, d hidden) on a frozen head."""
    from torch.overrides import TorchFunctionMode

    watched = {"empty", "empty_like", "zeros", "zeros_like", "full", "contiguous", "clone",
               "copy_", "to", "float", "fill_", "zero_", "cat", "stack", "mm", "addmm"}  # fmt: skip
    h, w, _, y = make_linear_case(12, 8, 64, torch.float32, 22, bias=False)

    def calls(chunk):
        monkeypatch.setattr(ce, "_FLCE_CHUNK_ROWS", chunk)
        seen = {}

        class Record(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in watched:
                    seen[name] = seen.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        hh = h.clone().requires_grad_(True)
        with qkern.backend("triton"), Record():
            fused_linear_cross_entropy(hh, w, y).backward()
        return seen

    few, many = calls(6), calls(2)  # 2 and 6 chunks
    assert few.pop("mm") == 2 * 2 and many.pop("mm") == 6 * 2
    assert few == many


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_bad_inputs_raise(mode):
    x = torch.randn(4, 10, device=DEV)
    y = torch.tensor([1, 2, IGNORE, 3], device=DEV)
    h = torch.randn(4, 6, device=DEV)
    w = torch.randn(10, 6, device=DEV)
    with qkern.backend(mode):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*found 10"):
            cross_entropy(x, torch.tensor([1, 10, 2, 3], device=DEV))
        with pytest.raises(ValueError, match="labels must be in"):
            cross_entropy(x, torch.tensor([1, -1, 2, 3], device=DEV))
        with pytest.raises(ValueError, match="labels must be in"):
            fused_linear_cross_entropy(h, w, torch.tensor([0, 0, 0, 11], device=DEV))
        with pytest.raises(ValueError, match="one label per row"):
            cross_entropy(x, y[:3])
        with pytest.raises(TypeError, match="logits must have dtype"):
            cross_entropy(x.long(), y)
        with pytest.raises(TypeError, match="labels must have an integer dtype"):
            cross_entropy(x, y.float())
        with pytest.raises(ValueError, match="reduction must be one of"):
            cross_entropy(x, y, reduction="avg")
        with pytest.raises(ValueError, match="label_smoothing"):
            cross_entropy(x, y, label_smoothing=1.5)
        with pytest.raises(ValueError, match="softcap"):
            cross_entropy(x, y, softcap=0.0)
        with pytest.raises(ValueError, match="num_items must be >= 0"):
            cross_entropy(x, y, num_items=-1)
        with pytest.raises(ValueError, match="one label per row"):
            fused_linear_cross_entropy(h, w, y[:2])
        with pytest.raises(ValueError, match="hidden's last dim must equal weight's H"):
            fused_linear_cross_entropy(h[:, :5], w, y)
        with pytest.raises(ValueError, match=r"bias must have shape \(V,\)"):
            fused_linear_cross_entropy(h, w, y, bias=torch.zeros(9, device=DEV))
        with pytest.raises(TypeError, match="weight must have dtype"):
            fused_linear_cross_entropy(h, w.int(), y)


def test_mixed_dtypes_refused_on_triton_path():
    h = torch.randn(4, 6, device=DEV)
    w = torch.randn(10, 6, device=DEV, dtype=torch.float16)
    with qkern.backend("triton"), pytest.raises(TypeError, match="share one dtype"):
        fused_linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4], device=DEV))


def test_unvalidated_bad_label_gives_nan_not_garbage():
    x = torch.randn(3, 10, device=DEV)
    y = torch.tensor([1, 10, 2], device=DEV)
    with qkern.backend("triton"):
        rows = cross_entropy(x, y, reduction="none", validate=False)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


# ------------------------------------------------------------------------------------------------
# GPU: bf16, large vocabularies, every autotune config
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32003, 256000])
def test_gpu_bf16_cross_entropy_large_vocab(vocab):
    x, y = make_case(64, vocab, 4.0, torch.bfloat16, 11, ignore_frac=0.2)
    go = torch.tensor(1.0, dtype=torch.float64, device=DEV)
    check_against_oracle(x, y, go, torch.bfloat16, label_smoothing=0.1, softcap=30.0)
    check_against_oracle(x, y, go * 3, torch.bfloat16, z_loss=1e-4)
    check_against_oracle(x, y, go.expand(64), torch.bfloat16, reduction="none")


@pytest.mark.gpu
def test_gpu_bf16_cross_entropy_big_t_by_v_inplace():
    rows, vocab = 4096, 128256  # 1 GiB of bf16 logits
    g = torch.Generator(device=DEV).manual_seed(12)
    x = torch.randn(rows, vocab, device=DEV, dtype=torch.bfloat16, generator=g) * 3
    y = torch.randint(0, vocab, (rows,), device=DEV, generator=g)
    y[::7] = IGNORE
    xf = x.float().requires_grad_(True)
    want = F.cross_entropy(xf, y)
    want.backward()
    buf = x.clone().requires_grad_(True)
    logits = buf * 1.0
    got = cross_entropy(logits, y, inplace_backward=True)
    got.backward()
    assert abs(got.item() - want.item()) < 1e-4 * max(1.0, want.item())
    err = (buf.grad.float() - xf.grad).abs().max().item()
    assert err < 2 * xf.grad.abs().max().item() * 2**-8 + 1e-7


@pytest.mark.gpu
@pytest.mark.parametrize("train_w", [True, False])
@pytest.mark.parametrize("chunk", [512, 768, None])
def test_gpu_bf16_flce_matches_matmul_plus_ce(monkeypatch, train_w, chunk):
    # 4 chunks of 512 rows; 768, 768 and a 512-row tail; the rule's own choice
    monkeypatch.setattr(ce, "_FLCE_CHUNK_ROWS", chunk)
    h, w, b, y = make_linear_case(2048, 512, 32003, torch.bfloat16, 13, bias=False)
    go = torch.tensor(1.0, dtype=torch.float64, device=DEV)
    f32 = [h.float(), w.float(), None]
    ref_loss, ref_g = flce_grads(linear_oracle, *f32, y, go, train_w, softcap=30.0)
    # torch's own bf16 pipeline (bf16 matmul, CE in fp32 upcast) sets the budget
    naive = lambda h_, w_, b_, y_, **k: oracle((h_ @ w_.t()).float(), y_, **k)  # noqa: E731
    t_loss, t_g = flce_grads(naive, h, w, None, y, go, train_w, softcap=30.0)
    out_loss, out_g = flce_grads(qkern_flce, h, w, None, y, go, train_w,
                                 softcap=30.0)  # fmt: skip
    assert_close_rule(out_loss, ref_loss, t_loss, atol=1e-3, name="loss")
    for name, o, r, t in zip(("dh", "dw"), out_g, ref_g, t_g, strict=False):
        if r is None:
            assert o is None
            continue
        scale = r.abs().max().item()
        assert_close_rule(o, r, t, atol=scale * 2**-7, name=name)


FEATURES = dict(label_smoothing=0.1, softcap=20.0, z_loss=1e-4, logit_scale=0.9)
NO_FEATURES = dict(label_smoothing=0.0, softcap=None, z_loss=0.0, logit_scale=1.0)


def raw_launch(x, y, config, features=True, mode="both", go=None, stats=None):
    """_launch_ce on forced ``config`` (NW, K, PF, programs) with row weight 0.5 into NaN-poisoned
    buffers. mode "both": loss + gradient; "loss": pass 1 only; "grad": pass 2 only from
    ``stats`` with per-row ``go``. Returns (loss, grad, stats)."""
    rows, vocab = x.shape
    f = FEATURES if features else NO_FEATURES
    opts = ce._Opts(IGNORE, f["label_smoothing"], f["softcap"], f["z_loss"], f["logit_scale"])
    loss = torch.full((rows,), float("nan"), device=x.device)
    grad = torch.full_like(x, float("nan")) if mode != "loss" else None
    given = stats is not None
    stats = stats if given else torch.full((rows, 2), float("nan"), device=x.device)
    ce._launch_ce(
        x, y, ce._scan_labels(y, vocab, IGNORE), opts, loss, stats, (0.5, None), grad=grad,
        go=go, stats_given=given, config=config,
    )  # fmt: skip
    return loss, grad, stats


def reference_rows(x, y, features=True, go=None):
    """Row losses and 0.5 * d(sum_r go_r row_r)/dx in float64 (what raw_launch computes)."""
    xr = x.double().requires_grad_(True)
    ref = cross_entropy_ref(xr, y, reduction="none", **(FEATURES if features else {}))
    w = go.double() if go is not None else torch.ones_like(ref)
    (ref * w).sum().mul(0.5).backward()
    return ref.detach(), xr.grad


@pytest.mark.parametrize("programs", [1, 2, 3])
def test_kernel_persistent_row_loop_matches_reference(programs):
    """Few programs walk 7 rows (a third ignored): the counted rows are dealt round-robin, the
    queue runs across rows; every mode of the kernel writes every element (NaN-poisoned)."""
    x, y = make_case(7, 300, 3.0, torch.float32, 15, ignore_frac=0.3)
    y[0] = 299  # the label in the ragged last chunk
    y[1] = IGNORE
    cfg = {"NW": 1, "K": 1, "PF": 2, "programs": programs}
    go = torch.rand(7, device=DEV) + 0.5
    for features in (True, False):
        ref_loss, ref_grad = reference_rows(x, y, features)
        loss, grad, stats = raw_launch(x, y, cfg, features)
        assert_close_rule(loss, 0.5 * ref_loss, atol=1e-5, rtol=1e-5, name="loss")
        assert_close_rule(grad, ref_grad, atol=1e-7, rtol=1e-5, name="grad")
        loss1, none, stats1 = raw_launch(x, y, cfg, features, mode="loss")
        assert none is None
        torch.testing.assert_close(loss1, loss, rtol=0, atol=0)
        torch.testing.assert_close(stats1, stats, rtol=0, atol=0)
        _, grad2, _ = raw_launch(x, y, cfg, features, mode="grad", go=go, stats=stats1)
        _, ref_grad2 = reference_rows(x, y, features, go=go)
        assert_close_rule(grad2, ref_grad2, atol=1e-7, rtol=1e-5, name="grad from stats")


def test_label_scan_lists_counted_rows_first():
    """order = counted rows ascending, then the ignored ones; info = (counted, bad, first bad)."""
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 50, (37,), generator=g)  # 37 labels: 5 scan blocks of 8 on the CPU
    y[torch.rand(37, generator=g) < 0.4] = IGNORE
    y[[5, 30]] = torch.tensor([50, -7])  # out of range, counted, flagged
    rows = ce._scan_labels(y.to(DEV), 50, IGNORE)
    counted = (y != IGNORE).nonzero()[:, 0]
    nv = counted.numel()
    order = rows.order.cpu()
    assert rows.info[:3].tolist() == [nv, 2, 5]
    assert order[:nv].tolist() == counted.tolist()
    assert sorted(order[nv:].tolist()) == (y == IGNORE).nonzero()[:, 0].tolist()


@pytest.mark.parametrize("inplace", [False, True])
def test_validation_in_kernel_raises_then_recovers(inplace):
    """A bad label raises a ValueError naming the label and its row; ignored rows are fine; the
    next good call on the same tensors works (nothing is left behind by the failed call)."""
    x, y = make_case(6, 40, 2.0, torch.float32, 16, ignore_frac=0.0)
    y[2] = IGNORE
    bad = y.clone()
    bad[4] = 40
    with qkern.backend("triton"):
        xr = x.clone().requires_grad_(True)
        with pytest.raises(ValueError, match=r"labels must be in \[0, 40\).*found 40 at row 4"):
            cross_entropy(xr * 1.0, bad, inplace_backward=inplace)
        with pytest.raises(ValueError, match="found -3 at row 0"):
            cross_entropy(x, torch.tensor([-3, 1, 2, 3, 4, 5], device=DEV), reduction="none")
        h, w = torch.randn(6, 5, device=DEV), torch.randn(40, 5, device=DEV)
        with pytest.raises(ValueError, match="found 40 at row 4"):
            fused_linear_cross_entropy(h, w, bad)
        loss = cross_entropy(xr * 1.0, y, inplace_backward=inplace)
        loss.backward()
        flce = fused_linear_cross_entropy(h, w, y)
    one = torch.tensor(1.0, dtype=torch.float64, device=DEV)
    want_loss, want_grad = loss_and_grad(lambda t: oracle(t, y), x.double(), one)
    assert_close_rule(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert_close_rule(xr.grad, want_grad, atol=1e-7, rtol=1e-5)
    assert_close_rule(flce, oracle(h.double() @ w.double().t(), y), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("features", [True, False])
def test_gpu_every_config_is_correct(features):
    x, y = make_case(300, 40000, 3.0, torch.bfloat16, 14, ignore_frac=0.2)
    y[1] = 39999  # in the ragged last chunk of every chunk size
    ref_loss, ref_grad = reference_rows(x, y, features)
    # bf16 budget: torch's own bf16 rounding of the gradient, plus a little
    t_grad = ref_grad.to(torch.bfloat16)
    sms = qkern._backend.num_sms()
    configs = [dict(c, programs=sms) for c in ce._LONG_CONFIGS]
    short = ce._short_config(20000, 4)
    configs.append(dict(NW=short["NW"], K=1, PF=2, programs=sms * short["ctas_per_sm"]))
    for cfg in configs:
        loss, grad, _ = raw_launch(x, y, cfg, features)
        assert_close_rule(loss, 0.5 * ref_loss, atol=1e-4, rtol=1e-5, name=f"loss {cfg}")
        assert_close_rule(grad, ref_grad, t_grad, atol=1e-7, rtol=2.0**-8, name=f"grad {cfg}")
        # odd length: no word pairs, one bf16 per unit
        lo, go_, _ = raw_launch(x[:, :39999], y.clamp_max(39998), cfg, features)
        assert not torch.isnan(lo).any() and not torch.isnan(go_).any()
