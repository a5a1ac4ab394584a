"""Fused LoRA MLP / QKV blocks vs the unfused chain of QLoRALinear modules and fp64 reference."""

from __future__ import annotations

import copy

import pytest
import torch

import qkern
from qkern.fused_lora import lora_mlp, lora_mlp_ref, lora_qkv, lora_qkv_ref
from qkern.qlora import QLoRALinear
from qkern.swiglu import swiglu
from tests.helpers import assert_close_rule, kernel_device

DEV = kernel_device()


def _proj(n, k, r, seed, bias=False, bias_grad=False, lora_dtype=torch.float32, device=DEV):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    m = QLoRALinear.from_linear(w.to(device), bias=None if b is None else b.to(device))
    if r:
        m.add_adapter(r, lora_alpha=2.0 * r, generator=g, dtype=lora_dtype)
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    if bias_grad:
        m.bias.requires_grad_(True)
    return m


def _params(mods):
    return [
        p for m in mods for p in (m.lora_A, m.lora_B, m.bias) if p is not None and p.requires_grad
    ]


def _run(fn, x, mods, dys):
    """Outputs and gradients wrt x (if it requires grad) and every trainable tensor."""
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    inputs = ([x] if x.requires_grad else []) + _params(mods)
    grads = torch.autograd.grad(outs, inputs, dys)
    return [o.detach() for o in outs] + list(grads)


def _fp64(mods):
    m64 = [copy.deepcopy(m).to(torch.float64) for m in mods]  # adapters/bias to fp64; W stays 4-bit
    return m64


def _compare(block, mods, x, atol, **kw):
    """Fused (Triton path) vs unfused chain of modules (Triton path, same dtype) vs fp64 ref."""
    if block == "mlp":
        fused = lambda x_: lora_mlp(x_, *mods, **kw)  # noqa: E731
        chain = lambda x_: mods[2](swiglu(mods[0](x_), mods[1](x_)))  # noqa: E731
        ref = lambda x_, ms: lora_mlp_ref(x_, *ms)  # noqa: E731
    else:
        fused = lambda x_: lora_qkv(x_, *mods)  # noqa: E731
        chain = lambda x_: tuple(m(x_) for m in mods)  # noqa: E731
        ref = lambda x_, ms: lora_qkv_ref(x_, *ms)  # noqa: E731
    with torch.no_grad():
        outs = fused(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(99)
    dys = [torch.randn(o.shape, generator=g).to(DEV, x.dtype) for o in outs]
    with qkern.backend("triton"):
        got = _run(fused, x, mods, dys)
        same = _run(chain, x, mods, dys)
    m64 = _fp64(mods)
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    want = _run(lambda x_: ref(x_, m64), x64, m64, [d.double() for d in dys])
    assert len(got) == len(same) == len(want)
    for i, (a, s_, w) in enumerate(zip(got, same, want)):
        assert a.dtype == s_.dtype, i
        assert_close_rule(a, w, s_, atol=atol, rtol=1e-4, name=f"tensor {i}")
    return got


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_mlp_matches_chain_and_fp64(recompute, dtype):
    h, i = 64, 96
    mods = [_proj(i, h, 4, 1), _proj(i, h, 2, 2), _proj(h, i, 4, 3)]
    x = (torch.randn(3, 17, h, generator=torch.Generator().manual_seed(4))).to(DEV, dtype)
    _compare(
        "mlp",
        mods,
        x.requires_grad_(),
        atol=1e-4 if dtype == torch.float32 else 1e-2,
        recompute=recompute,
    )


def test_lora_mlp_partial_adapters_trainable_bias_and_frozen_x():
    h, i = 64, 128
    mods = [
        _proj(i, h, 0, 5, bias=True),
        _proj(i, h, 3, 6, bias=True, bias_grad=True),
        _proj(h, i, 0, 7),
    ]
    x = torch.randn(40, h, generator=torch.Generator().manual_seed(8)).to(DEV)
    _compare("mlp", mods, x, atol=1e-4)  # x without grad: only adapter and bias grads
    mods[2] = _proj(h, i, 2, 9, bias=True, bias_grad=True)
    _compare("mlp", mods, x.requires_grad_(), atol=1e-4, recompute=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_qkv_matches_chain_and_fp64(dtype):
    h = 64
    mods = [
        _proj(64, h, 4, 10, bias=True, bias_grad=True),
        _proj(32, h, 2, 11),
        _proj(32, h, 0, 12, bias=True),
    ]
    x = torch.randn(2, 21, h, generator=torch.Generator().manual_seed(13)).to(DEV, dtype)
    _compare("qkv", mods, x.requires_grad_(), atol=1e-4 if dtype == torch.float32 else 1e-2)


def test_adapters_in_compute_dtype():
    h = 64
    mods = [_proj(n, h, 4, 14 + n, lora_dtype=torch.float16) for n in (64, 32, 48)]
    x = torch.randn(40, h, generator=torch.Generator().manual_seed(17)).to(DEV, torch.float16)
    got = _compare("qkv", mods, x.requires_grad_(), atol=1e-2)
    assert all(g.dtype == torch.float16 for g in got[4:])


def test_small_m_uses_unfused_modules():
    h, i = 64, 96
    mods = [_proj(i, h, 4, 18), _proj(i, h, 4, 19), _proj(h, i, 4, 20)]
    x = torch.randn(5, h, generator=torch.Generator().manual_seed(21)).to(DEV).requires_grad_()
    _compare("mlp", mods, x, atol=1e-4)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while running fn."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_mlp_saves_about_its_input_only():
    h, i, m = 64, 256, 64
    mods = [_proj(i, h, 4, 22), _proj(i, h, 4, 23), _proj(h, i, 4, 24)]
    x = torch.randn(m, h, device=DEV).requires_grad_()
    with qkern.backend("triton"):
        fused = _saved_bytes(lambda: lora_mlp(x, *mods))
        kept = _saved_bytes(lambda: lora_mlp(x, *mods, recompute=False))
        chain = _saved_bytes(lambda: mods[2](swiglu(mods[0](x), mods[1](x))))
    x_bytes, act = m * h * 4, m * i * 4
    small = 3 * m * 4 * 4 + 3 * (i * h * 4)  # r-wide t's, adapters (A, B of each projection)
    assert fused <= x_bytes + small + 4096
    assert kept >= fused + 2 * act
    assert chain >= fused + 3 * act


def test_recompute_false_blocks_second_backward():
    h, i = 64, 96
    mods = [_proj(i, h, 4, 25), _proj(i, h, 4, 26), _proj(h, i, 4, 27)]
    x = torch.randn(40, h, device=DEV).requires_grad_()
    with qkern.backend("triton"):
        y = lora_mlp(x, *mods, recompute=False)
        y.sum().backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_bad_inputs():
    h, i = 64, 96
    g, u, d = _proj(i, h, 4, 28), _proj(i, h, 4, 29), _proj(h, i, 4, 30)
    x = torch.randn(40, h, device=DEV)
    with pytest.raises(ValueError, match="x.shape"):
        lora_mlp(torch.randn(40, h + 1), g, u, d)
    with pytest.raises(ValueError, match="up_proj weight"):
        lora_mlp(x, g, _proj(i + 1, h, 4, 31), d)
    with pytest.raises(ValueError, match="down_proj.in_features"):
        lora_mlp(x, g, u, _proj(h, i + 2, 4, 32))
    with pytest.raises(ValueError, match="k_proj.in_features"):
        lora_qkv(x, _proj(64, h, 4, 33), _proj(32, h + 2, 4, 34), _proj(32, h, 4, 35))
    with pytest.raises(TypeError, match="must be a QLoRALinear"):
        lora_qkv(x, torch.nn.Linear(h, 64), u, d)
    with pytest.raises(TypeError, match="x must have dtype"):
        lora_mlp(x.to(torch.int64), g, u, d)
    drop = _proj(i, h, 4, 36)
    drop.lora_dropout = 0.1
    with pytest.raises(ValueError, match="lora_dropout"):
        lora_mlp(x, drop, u, d)
    drop.eval()  # dropout inactive in eval mode: allowed
    assert lora_mlp(x, drop, u, d).shape == (40, h)


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [True, False])
def test_lora_mlp_bf16_gpu(recompute):
    h, i = 512, 1376
    mods = [_proj(i, h, 16, 40), _proj(i, h, 16, 41), _proj(h, i, 16, 42)]
    x = torch.randn(4, 300, h, generator=torch.Generator().manual_seed(43)).to(DEV, torch.bfloat16)
    _compare("mlp", mods, x.requires_grad_(), atol=2e-2, recompute=recompute)


@pytest.mark.gpu
def test_lora_qkv_bf16_gpu():
    h = 512
    mods = [
        _proj(512, h, 16, 44, bias=True),
        _proj(128, h, 8, 45, bias=True),
        _proj(128, h, 16, 46),
    ]
    x = torch.randn(2, 333, h, generator=torch.Generator().manual_seed(47)).to(DEV, torch.bfloat16)
    _compare("qkv", mods, x.requires_grad_(), atol=2e-2)


@pytest.mark.gpu
def test_lora_mlp_peak_memory_gpu():
    h, i, m = 1024, 3584, 4096
    mods = [_proj(i, h, 16, 50), _proj(i, h, 16, 51), _proj(h, i, 16, 52)]
    x = torch.randn(m, h, device=DEV, dtype=torch.bfloat16, requires_grad=True)

    def activation_bytes(fn):
        fn().sum()  # warm the dequant workspace and autotuner
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        y = fn()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
        del y
        return held

    fused = activation_bytes(lambda: lora_mlp(x, *mods))
    chain = activation_bytes(lambda: mods[2](swiglu(mods[0](x), mods[1](x))))
    act = m * i * 2
    assert fused < act // 4  # only r-wide tensors beyond x
    assert chain >= 3 * act
