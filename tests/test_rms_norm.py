"""RMSNorm: Triton kernels (interpreter on CPU) vs the float64 reference, gradients, HF parity."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkern
from qkern._backend import interpreter_enabled
from qkern.rms_norm import (
    RMSNorm,
    _rms_norm_bwd,
    _rms_norm_fwd,
    _row_stride,
    rms_norm,
    rms_norm_ref,
)
from tests.helpers import assert_close_rule, kernel_device, poisoned

rms_mod = importlib.import_module("qkern.rms_norm")  # the package exports a function of that name

DEV = kernel_device()
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _case(lead, n, dtype, scale, seed, w_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, n, generator=g, dtype=torch.float64) * scale).to(DEV)
    w = (1 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)).to(DEV)
    dy = torch.randn(*lead, n, generator=g, dtype=torch.float64).to(DEV)
    return x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(w_grad), dy.to(dtype)


def _grads(fn, x, w, dy):
    y = fn(x, w)
    inputs = (x, w) if w.requires_grad else (x,)
    return (y, *torch.autograd.grad(y, inputs, dy))


def _check_against_fp64(x, w, dy, eps=1e-6):
    """Kernel vs fp64 reference with torch-in-the-same-dtype setting the error budget."""
    dtype = x.dtype
    with qkern.backend("triton"):
        got = _grads(lambda a, b: rms_norm(a, b, eps), x, w, dy)
    same = _grads(lambda a, b: rms_norm_ref(a, b, eps), x, w, dy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_(w.requires_grad)
    want = _grads(lambda a, b: rms_norm_ref(a, b, eps), x64, w64, dy.double())
    atol = ATOL[dtype]
    for name, g_, s_, r_ in zip(("y", "dx", "dw"), got, same, want):
        # dw sums over rows: its rounding errors grow like sqrt(rows)
        a = atol * (x.numel() // x.shape[-1]) ** 0.5 if name == "dw" else atol
        assert_close_rule(
            g_, r_, s_, atol=a, rtol=2e-3 if dtype != torch.float32 else 1e-5, name=name
        )


@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    n=st.sampled_from([1, 2, 7, 33, 64, 100, 255, 520]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    scale=st.sampled_from([1e-2, 1.0, 30.0]),
    w_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_matches_fp64_reference(lead, n, dtype, scale, w_grad, seed):
    x, w, dy = _case(lead, n, dtype, scale, seed, w_grad)
    _check_against_fp64(x, w, dy)


@pytest.mark.parametrize(
    "lead, n",
    [
        ([3, 41], 96),  # 16 rows per step: every program one step
        ([3, 41], 520),  # 2 rows per step, 4 steps per program, the last step half empty
        ([17], 2048),  # one row per step; programs 9..15 get no rows and store a zero partial
    ],
)
def test_many_rows_per_backward_program(lead, n):
    # 4 "SMs" on the interpreter -> at most 16 dW partials, so backward programs loop over rows
    # (with the next step's loads issued before the current step is stored)
    x, w, dy = _case(lead, n, torch.float32, 1.0, 1)
    _check_against_fp64(x, w, dy, eps=1e-5)


def test_single_row_and_large_eps():
    x, w, dy = _case([1], 300, torch.float32, 1e-3, 2)
    _check_against_fp64(x, w, dy, eps=0.1)


def test_weight_without_grad_gives_no_dw_and_correct_dx():
    x, w, dy = _case([9], 40, torch.float32, 1.0, 3, w_grad=False)
    with qkern.backend("triton"):
        y = rms_norm(x, w)
    y.backward(dy)
    assert w.grad is None
    x64 = x.detach().double().requires_grad_()
    rms_norm_ref(x64, w.double()).backward(dy.double())
    assert_close_rule(x.grad, x64.grad, atol=1e-5)


def test_gradcheck_triton_fp64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g).to(DEV).requires_grad_()
    w = torch.randn(5, dtype=torch.float64, generator=g).to(DEV).requires_grad_()
    with qkern.backend("triton"):
        assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w), fast_mode=True)


def test_gradcheck_reference_fp64():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_ref(a, b), (x, w))


def test_kernels_write_every_element():
    x, w, dy = _case([13], 70, torch.float32, 1.0, 4)
    x2, dy2 = x.detach(), dy
    y = poisoned((13, 70), torch.float32, DEV)
    rstd = poisoned((13,), torch.float32, DEV)
    _rms_norm_fwd(x2, w.detach(), 1e-6, y=y, rstd=rstd)
    assert not y.isnan().any() and not rstd.isnan().any()
    dx = poisoned((13, 70), torch.float32, DEV)
    _, dw = _rms_norm_bwd(dy2, x2, w.detach(), rstd, compute_dw=True, dx=dx)
    assert not dx.isnan().any() and not dw.isnan().any()


def test_non_contiguous_input():
    x, w, dy = _case([6], 64, torch.float32, 1.0, 5)
    xt = x.detach().view(3, 2, 64).transpose(0, 1)  # rows are strided, last dim contiguous
    with qkern.backend("triton"):
        y = rms_norm(xt, w.detach())
    assert_close_rule(y, rms_norm_ref(xt.double(), w.detach().double()), atol=1e-5)


def test_strided_rows_of_3d_input_without_copy():
    # rows of a (2, 3, 2n) buffer's first half: the leading dims collapse with row stride 2n,
    # so the kernels read x in place (no copy), including the dW backward
    x, w, dy = _case([2, 3], 2 * 40, torch.float32, 1.0, 8)
    xs = x.detach()[..., :40].requires_grad_()
    assert _row_stride(xs) == 80 and not xs.is_contiguous()
    _check_against_fp64(xs, w.detach()[:40].clone().requires_grad_(), dy[..., :40])


@pytest.mark.parametrize(
    "shape, make",
    [
        ((6, 8), lambda t: t),
        ((6, 8), lambda t: t[:, :5]),  # strided rows
        ((4, 3, 8), lambda t: t[:, :, :5]),  # strided rows, but the leading dims do not collapse
        ((4, 3, 8), lambda t: t[:, 1:2, :]),  # a size-1 dim in between
        ((4, 3, 8), lambda t: t.transpose(0, 1)),  # leading dims permuted
        ((4, 8), lambda t: t.t()),  # last dim not unit stride
        ((1, 8), lambda t: t.expand(5, 8)),  # broadcast rows (stride 0)
        ((8,), lambda t: t),  # one row
        ((4, 1, 3, 8), lambda t: t[::2]),  # stepped leading dim
    ],
)
def test_row_stride_agrees_with_torch_view(shape, make):
    t = make(torch.zeros(shape))
    n = t.shape[-1]
    rs = _row_stride(t)
    try:
        v = t.view(-1, n)
    except RuntimeError:  # not viewable as rows: the launchers must copy
        assert rs == -1
        return
    if v.stride(1) != 1 and n > 1:
        assert rs == -1
    else:
        assert rs == (v.stride(0) if v.shape[0] > 1 else rs)


def test_inference_call_builds_no_graph():
    x, w, _ = _case([2, 3], 50, torch.float32, 1.0, 11)
    with qkern.backend("triton"):
        y_grad = rms_norm(x, w)
        with torch.no_grad():
            y_ng = rms_norm(x, w)
        y = rms_norm(x.detach(), w.detach())
    assert y.grad_fn is None and y_ng.grad_fn is None and y_grad.grad_fn is not None
    assert torch.equal(y, y_grad.detach()) and torch.equal(y_ng, y)


def test_output_dtype_is_input_dtype_with_fp32_weight():
    x = torch.randn(4, 16, dtype=torch.float16, device=DEV)
    w = torch.rand(16, dtype=torch.float32, device=DEV) + 0.5
    with qkern.backend("triton"):
        y = rms_norm(x, w)
    assert y.dtype == torch.float16
    assert_close_rule(y, rms_norm_ref(x.double(), w.double()), rms_norm_ref(x, w), atol=1e-3)


def test_module():
    m = RMSNorm(24, eps=1e-5).to(DEV)
    assert torch.equal(m.weight.detach(), torch.ones(24, device=DEV))
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    x = torch.randn(2, 3, 24, device=DEV)
    with qkern.backend("triton"):
        y = m(x)
    y.sum().backward()
    assert m.weight.grad is not None and m.weight.grad.shape == (24,)
    assert_close_rule(y, rms_norm_ref(x.double(), m.weight.detach().double(), 1e-5), atol=1e-5)
    assert "eps=1e-05" in repr(m)


def test_reference_is_hf_llama_rmsnorm_bitwise():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    hf = llama.LlamaRMSNorm(48, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(48) + 0.5)
    x = torch.randn(5, 7, 48).to(torch.bfloat16) * 3
    ours = RMSNorm(48, eps=1e-5).to(torch.bfloat16)
    ours.load_state_dict(hf.state_dict())
    with qkern.backend("reference"):
        assert torch.equal(ours(x), hf(x))


def test_bad_inputs():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(1, 8))
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(x.to(torch.int32), torch.ones(8))
    with pytest.raises(TypeError, match="weight must have dtype"):
        rms_norm(x, torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(8), eps=-1.0)
    with pytest.raises(ValueError, match="at least one dimension"):
        rms_norm(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ValueError, match="hidden_size"):
        RMSNorm(0)


# ----------------------------------------------------------------------------------------------
# host path: repeated calls launch the cached compiled kernels directly
# ----------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a compiled kernel (qkern.nf4._launch caches what a JIT run returns) and
    records the direct launches it receives."""

    packed_metadata = None

    def __init__(self, jit, log: list) -> None:
        self.jit, self.log = jit, log

    def __getitem__(self, grid):
        return lambda *args, stream=None: self.log.append((self.jit, grid, args))


def direct_launch_counts(monkeypatch, module, jits, tuners, step):
    """Run ``step`` three times with qkern.nf4's direct launches switched on, as on a GPU, but
    with every JIT kernel of ``module`` replaced by a recorder (no kernel runs: only the
    dispatch is looked at). Returns the JIT and autotuner runs of the third call and its direct
    launches as (jit, grid, args)."""
    from types import SimpleNamespace

    from qkern import nf4

    driver = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda dev: 0)
    monkeypatch.setattr(nf4, "_DIRECT", {"on": True})
    monkeypatch.setattr(nf4, "_driver", SimpleNamespace(active=driver))
    monkeypatch.setattr(module, "_COMPILED", {})
    monkeypatch.setattr(module, "_PLANS", {})
    counts = {"jit": 0, "tuner": 0}
    log: list = []
    for jit in jits:

        def run(*args, grid, warmup, _jit=jit, **kwargs):
            counts["jit"] += 1
            return _Recorder(_jit, log)

        monkeypatch.setattr(jit, "run", run)
    for tuner in tuners:

        def tuned(*args, _run=tuner.run, **kwargs):
            counts["tuner"] += 1
            return _run(*args, **kwargs)

        monkeypatch.setattr(tuner, "run", tuned)
    # first call: the autotuners pick their configs; second: the JIT returns the compiled
    # kernels that nf4._launch caches (kernels without a tuner are cached on the first call)
    step()
    step()
    first = dict(counts)
    counts.update(jit=0, tuner=0)
    log.clear()
    step()
    assert first["jit"] > 0
    for jit, grid, args in log:  # every parameter in signature order, a 3-D grid
        assert len(grid) == 3 and len(args) == len(jit.arg_names)
    return counts, log


def count_jit_runs(monkeypatch, jits, tuners, step) -> dict:
    """Run ``step`` once more with pass-through counters on the JIT and autotuner entries."""
    counts = {"jit": 0, "tuner": 0}
    for name, objs in (("jit", jits), ("tuner", tuners)):
        for obj in objs:

            def counted(*args, _run=obj.run, _name=name, **kwargs):
                counts[_name] += 1
                return _run(*args, **kwargs)

            monkeypatch.setattr(obj, "run", counted)
    step()
    return counts


_JITS = [
    rms_mod._rms_norm_fwd_kernel,
    rms_mod._rms_norm_bwd_dx_kernel,
    rms_mod._rms_norm_bwd_dw_kernel.fn,
    rms_mod._rms_norm_dw_sum_kernel,
]
_TUNERS = [rms_mod._rms_norm_bwd_dw_kernel]


@pytest.mark.skipif(not interpreter_enabled(), reason="simulates the GPU launch path on CPU")
@pytest.mark.parametrize("w_grad", [True, False])
def test_repeated_call_launches_directly(monkeypatch, w_grad):
    x, w, dy = _case([2, 3], 40, torch.float32, 1.0, 9, w_grad)

    def step():
        with qkern.backend("triton"):
            _grads(rms_norm, x, w, dy)

    counts, log = direct_launch_counts(monkeypatch, rms_mod, _JITS, _TUNERS, step)
    assert counts == {"jit": 0, "tuner": 0}
    kernels = [jit for jit, _, _ in log]
    if w_grad:  # forward, dx+dW partials, partial sum
        assert kernels == [_JITS[0], _JITS[2], _JITS[3]]
    else:
        assert kernels == [_JITS[0], _JITS[1]]


@pytest.mark.gpu
@pytest.mark.parametrize("w_grad", [True, False])
def test_repeated_call_launches_directly_gpu(monkeypatch, w_grad):
    x, w, dy = _case([3, 500], 4096, torch.bfloat16, 1.0, 10, w_grad)
    for _ in range(3):  # tune, JIT run (caches the compiled kernel), direct launch
        _check_against_fp64(x, w, dy)
    counts = count_jit_runs(monkeypatch, _JITS, _TUNERS, lambda: _check_against_fp64(x, w, dy))
    assert counts == {"jit": 0, "tuner": 0}


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 5120, 3584, 2048, 1000])
@pytest.mark.parametrize("w_grad", [True, False])
def test_rms_norm_bf16_gpu(n, w_grad):
    x, w, dy = _case([2, 700], n, torch.bfloat16, 2.0, n, w_grad)
    _check_against_fp64(x, w, dy, eps=1e-5)


@pytest.mark.gpu
def test_rms_norm_matches_liger_gpu():
    liger = pytest.importorskip("liger_kernel.transformers.rms_norm")
    x, w, dy = _case([1024], 4096, torch.bfloat16, 1.0, 7)
    ref = liger.LigerRMSNorm(4096, eps=1e-6).to("cuda", torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(w.detach())
    x_l = x.detach().clone().requires_grad_()
    y_l = ref(x_l)
    y_l.backward(dy)
    y = rms_norm(x, w)
    y.backward(dy)
    want = rms_norm_ref(x.detach().double(), w.detach().double())
    assert_close_rule(y, want, y_l, atol=1e-2)
