"""RMSNorm: Triton kernels (interpreter on CPU) vs the float64 reference, gradients, HF parity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkern
from qkern.rms_norm import RMSNorm, _rms_norm_bwd, _rms_norm_fwd, rms_norm, rms_norm_ref
from tests.helpers import assert_close_rule, kernel_device, poisoned

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
