"""SwiGLU: Triton kernels (interpreter on CPU) vs the float64 reference, gradients, in-place."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkern
from qkern._backend import interpreter_enabled
from qkern.swiglu import swiglu, swiglu_backward_2d, swiglu_forward_2d, swiglu_ref
from tests.helpers import assert_close_rule, kernel_device, poisoned
from tests.test_rms_norm import count_jit_runs, direct_launch_counts

sw_mod = importlib.import_module("qkern.swiglu")  # the package exports a function of that name
_JITS = [sw_mod._FWD_JIT, sw_mod._BWD_JIT]
_TUNERS = [sw_mod._swiglu_fwd_kernel, sw_mod._swiglu_bwd_kernel]

DEV = kernel_device()
# the interpreter evaluates exp(-g) with numpy, which warns when it saturates to inf (sigmoid -> 0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _case(shape, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    dh = torch.randn(shape, generator=g, dtype=torch.float64)
    return gate.to(DEV, dtype), up.to(DEV, dtype), dh.to(DEV, dtype)


def _fwd_bwd(gate, up, dh, fn):
    g0 = gate.detach().clone().requires_grad_()
    u0 = up.detach().clone().requires_grad_()
    h = fn(g0 * 1, u0 * 1)  # non-leaf inputs, as in a model (allows the in-place backward)
    dg, du = torch.autograd.grad(h, (g0, u0), dh)
    return h, dg, du


def _check(gate, up, dh, inplace_backward=False):
    dtype = gate.dtype
    with qkern.backend("triton"):
        got = _fwd_bwd(gate, up, dh, lambda a, b: swiglu(a, b, inplace_backward=inplace_backward))
    same = _fwd_bwd(gate, up, dh, swiglu_ref)
    want = _fwd_bwd(gate.double(), up.double(), dh.double(), swiglu_ref)
    for name, a, s_, w in zip(("h", "dgate", "dup"), got, same, want):
        assert a.dtype == dtype and a.shape == gate.shape
        assert_close_rule(a, w, s_, atol=ATOL[dtype], name=name)


@given(
    shape=st.lists(st.integers(1, 7), min_size=0, max_size=2).flatmap(
        lambda lead: st.sampled_from([1, 3, 100, 1025, 2500]).map(lambda n: (*lead, n))
    ),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    scale=st.sampled_from([0.1, 1.0, 8.0, 30.0]),
    inplace=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_swiglu_matches_fp64_reference(shape, dtype, scale, inplace, seed):
    gate, up, dh = _case(shape, dtype, scale, seed)
    _check(gate, up, dh, inplace_backward=inplace)


def test_views_of_fused_gate_up():
    gu, _, dh = _case((5, 2 * 300), torch.float32, 2.0, 1)
    gate, up = gu.chunk(2, dim=-1)  # row stride 600, unit column stride
    assert not gate.is_contiguous()
    _check(gate, up, dh[:, :300].contiguous())
    _check(gate, up, dh[:, :300].contiguous(), inplace_backward=True)


def test_strided_rows_of_3d_views():
    # gate and up as halves of a (2, 3, 2n) projection: rows collapse with stride 2n, so the
    # kernels read (and, in place, write) them without a copy
    gu, _, dh = _case((2, 3, 2 * 130), torch.float32, 2.0, 8)
    gate, up = gu.chunk(2, dim=-1)
    dh = dh[..., :130].contiguous()
    _check(gate, up, dh)
    _check(gate, up, dh, inplace_backward=True)
    _check(gate.transpose(0, 1), up.transpose(0, 1), dh.transpose(0, 1).contiguous())  # copies


def test_inference_call_builds_no_graph():
    gate, up, _ = _case((2, 3, 70), torch.float32, 2.0, 12)
    with qkern.backend("triton"):
        h = swiglu(gate, up)  # no input needs a gradient: no autograd node
        g1 = gate.clone().requires_grad_()
        with torch.no_grad():
            h_ng = swiglu(g1, up)
        h_grad = swiglu(g1, up)
    assert h.grad_fn is None and h_ng.grad_fn is None and h_grad.grad_fn is not None
    assert torch.equal(h, h_grad.detach()) and torch.equal(h_ng, h)
    assert_close_rule(h, swiglu_ref(gate.double(), up.double()), swiglu_ref(gate, up), atol=1e-5)


def test_inplace_backward_reuses_buffers_and_blocks_second_backward():
    gate, up, dh = _case((6, 130), torch.float32, 1.0, 2)
    g0 = gate.clone().requires_grad_()
    u0 = up.clone().requires_grad_()
    g1, u1 = g0 * 1, u0 * 1
    with qkern.backend("triton"):
        h = swiglu(g1, u1, inplace_backward=True)
    h.backward(dh, retain_graph=True)
    want = _fwd_bwd(gate.double(), up.double(), dh.double(), swiglu_ref)
    assert_close_rule(g0.grad, want[1], atol=1e-5)
    assert_close_rule(u0.grad, want[2], atol=1e-5)
    assert torch.equal(g1.detach(), g0.grad) and torch.equal(u1.detach(), u0.grad)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.backward(dh)


def test_gradcheck_triton_fp64():
    gate, up, _ = _case((3, 5), torch.float64, 2.0, 3)
    gate.requires_grad_()
    up.requires_grad_()
    with qkern.backend("triton"):
        assert torch.autograd.gradcheck(swiglu, (gate, up), fast_mode=True)


def test_kernels_write_every_element():
    gate, up, dh = _case((9, 1500), torch.float32, 1.0, 4)
    h = poisoned(gate.shape, gate.dtype, DEV)
    swiglu_forward_2d(gate, up, out=h)
    assert_close_rule(h, swiglu_ref(gate.double(), up.double()), atol=1e-5)
    dg, du, h2 = (poisoned(gate.shape, gate.dtype, DEV) for _ in range(3))
    swiglu_backward_2d(dh, gate, up, dg, du, h_out=h2)
    assert not dg.isnan().any() and not du.isnan().any()
    assert torch.equal(h2, h)


def test_backward_with_h_in_place_of_dh():
    gate, up, dh = _case((4, 700), torch.float32, 3.0, 5)
    want = _fwd_bwd(gate.double(), up.double(), dh.double(), swiglu_ref)
    g, u, d = gate.clone(), up.clone(), dh.clone()
    swiglu_backward_2d(d, g, u, g, u, h_out=d)  # every output over an input
    assert_close_rule(g, want[1], atol=1e-5)
    assert_close_rule(u, want[2], atol=1e-5)
    assert_close_rule(d, want[0], atol=1e-5)


def test_saturated_inputs_are_finite():
    gate = torch.tensor([[-200.0, -80.0, 0.0, 80.0, 200.0]], device=DEV)
    up = torch.ones_like(gate)
    with qkern.backend("triton"):
        h, dg, du = _fwd_bwd(gate, up, torch.ones_like(gate), swiglu)
    for t in (h, dg, du):
        assert torch.isfinite(t).all()
    want = _fwd_bwd(gate.double(), up.double(), torch.ones_like(gate).double(), swiglu_ref)
    for a, w in zip((h, dg, du), want):
        assert_close_rule(a, w, atol=1e-5)


def test_bad_inputs():
    a = torch.randn(3, 8)
    with pytest.raises(ValueError, match="one shape"):
        swiglu(a, torch.randn(3, 9))
    with pytest.raises(TypeError, match="one dtype"):
        swiglu(a, a.half())
    with pytest.raises(TypeError, match="gate must have dtype"):
        swiglu(a.to(torch.int32), a)
    with pytest.raises(ValueError, match="at least one dimension"):
        swiglu(torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.skipif(not interpreter_enabled(), reason="simulates the GPU launch path on CPU")
@pytest.mark.parametrize("inplace", [False, True])
def test_repeated_call_launches_directly(monkeypatch, inplace):
    gate, up, dh = _case((2, 3, 100), torch.float32, 1.0, 9)

    def step():
        with qkern.backend("triton"):
            _fwd_bwd(gate, up, dh, lambda a, b: swiglu(a, b, inplace_backward=inplace))

    counts, log = direct_launch_counts(monkeypatch, sw_mod, _JITS, _TUNERS, step)
    assert counts == {"jit": 0, "tuner": 0}
    assert [jit for jit, _, _ in log] == _JITS


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [False, True])
def test_repeated_call_launches_directly_gpu(monkeypatch, inplace):
    gate, up, dh = _case((4, 1000, 1024), torch.bfloat16, 2.0, 10)
    for _ in range(3):  # tune, JIT run (caches the compiled kernel), direct launch
        _check(gate, up, dh, inplace_backward=inplace)
    step = lambda: _check(gate, up, dh, inplace_backward=inplace)  # noqa: E731
    assert count_jit_runs(monkeypatch, _JITS, _TUNERS, step) == {"jit": 0, "tuner": 0}


@pytest.mark.gpu
def test_fused_mlp_aliasing_first_call_gpu():
    # the first call of a shape runs the autotuner with h written over g (as the fused MLP
    # does): restore_value must give every timed candidate the original g
    gate, up, _ = _case((64, 4096 + 8), torch.bfloat16, 2.0, 11)
    want = swiglu_ref(gate.double(), up.double())
    for _ in range(3):  # tuned, JIT, direct
        g = gate.clone()
        h = swiglu_forward_2d(g, up, out=g)
        assert h is g
        assert_close_rule(h, want, swiglu_ref(gate, up), atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(512, 14336), (3, 1000, 11008), (7, 2049)])
def test_swiglu_bf16_gpu(shape):
    gate, up, dh = _case(shape, torch.bfloat16, 2.0, 6)
    _check(gate, up, dh)
    _check(gate, up, dh, inplace_backward=True)


@pytest.mark.gpu
def test_swiglu_matches_liger_gpu():
    liger = pytest.importorskip("liger_kernel.ops.swiglu")
    gate, up, dh = _case((1024, 4096), torch.bfloat16, 2.0, 7)
    lg = liger.LigerSiLUMulFunction.apply(gate, up)
    assert_close_rule(swiglu(gate, up), swiglu_ref(gate.double(), up.double()), lg, atol=1e-2)
