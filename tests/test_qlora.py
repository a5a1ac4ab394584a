"""QLoRA linear, the fused small-M NF4 matmul and the QLoRALinear module.

The oracle is the same math in float64: W dequantized (fp32, exact in fp64), y = x·Wᵀ +
s·(d(x)·Aᵀ)·Bᵀ + bias, gradients from float64 autograd. Kernel paths run with the Triton backend
forced (the interpreter on CPU), in fp32 and fp16; bf16 and real shapes are GPU tests.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import qkern
from qkern import qlora
from qkern.nf4 import dequantize_4bit, quantize_4bit
from qkern.qlora import (
    QLoRALinear,
    lora_dropout_mask,
    nf4_matmul,
    nf4_matmul_supported,
    qlora_linear,
    qlora_linear_ref,
)
from tests.helpers import assert_close_rule, kernel_device, poisoned, rel_err

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(autouse=True, scope="module")
def _no_nf4_matmul_timing():
    # the GPU tests check correctness: each shape takes the first candidate instead of timing
    # them all (the variants are each forced in test_nf4_matmul_every_config; the tuner has
    # its own test below)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qlora, "_NF4_TUNE", False)
        yield


def _weight(n, k, blocksize=64, dq=True, seed=0, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * scale
    with qkern.backend("reference"):
        packed, state = quantize_4bit(w, blocksize=blocksize, compress_statistics=dq)
        w64 = dequantize_4bit(packed, state, dtype=torch.float32).double()
    if device != "cpu":
        packed, state = packed.to(device), state.to(device)
    return packed, state, w64


def _oracle(x, w64, a, b, s, bias=None, keep=None, p=0.0):
    """float64 forward and its autograd leaves (x, A, B, bias), on x's device."""
    dev = x.device

    def leaf(t):
        return None if t is None else t.detach().double().to(dev).requires_grad_()

    x64, a64, b64, bias64 = leaf(x), leaf(a), leaf(b), leaf(bias)
    y = x64 @ w64.to(dev).t()
    if a is not None:
        xd = x64
        if keep is not None:
            xd = torch.where(keep.to(dev).view(x.shape), x64 / (1 - p) if p < 1 else 0 * x64, 0.0)
        y = y + s * ((xd @ a64.t()) @ b64.t())
    if bias is not None:
        y = y + bias64
    return y, (x64, a64, b64, bias64)


def _grads(y, leaves, gy):
    y.backward(gy.detach().to(y.dtype).to(y.device))
    return [None if t is None else t.grad for t in leaves]


def _atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # a few ulps of the largest magnitude: where |ref| is tiny through cancellation the
    # same-dtype torch error can be accidentally ~0, and this floor keeps the rule meaningful
    return 4 * EPS[dtype] * float(ref.detach().abs().max()) + 1e-6


def _inputs(lead, n, k, r, dtype, device, seed=1, bias=True, a_dtype=None):
    g = torch.Generator().manual_seed(seed)
    a_dtype = a_dtype or dtype
    x = torch.randn(*lead, k, generator=g).to(dtype).to(device)
    a = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(a_dtype).to(device)
    b = (torch.randn(n, r, generator=g) * 0.5).to(a_dtype).to(device)
    bb = (torch.randn(n, generator=g) * 0.1).to(dtype).to(device) if bias else None
    return x, a, b, bb


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


@given(
    n=st.integers(1, 70),
    k=st.integers(1, 130),
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    r=st.sampled_from([1, 3, 8]),
    has_bias=st.booleans(),
)
def test_reference_matches_fp64_math(n, k, lead, r, has_bias):
    packed, state, w64 = _weight(n, k, seed=n * 131 + k)
    x, a, b, bias = _inputs(lead, n, k, r, torch.float32, "cpu", bias=has_bias)
    for t in (x, a, b, bias):
        if t is not None:
            t.requires_grad_()
    s = 0.75
    with qkern.backend("reference"):
        y = qlora_linear_ref(x, packed, state, a, b, s, bias)
    y64, leaves = _oracle(x, w64, a, b, s, bias)
    gy = torch.randn_like(y64)
    assert_close_rule(y, y64, atol=_atol(y64, torch.float32) * 4, name="y")
    got = _grads(y, (x, a, b, bias), gy)
    want = _grads(y64, leaves, gy)
    for name, g1, g2 in zip(("dX", "dA", "dB", "dbias"), got, want):
        if g2 is not None:
            assert_close_rule(g1, g2, atol=_atol(g2, torch.float32) * 4 * max(1, k), name=name)


def test_reference_gradcheck_float64():
    packed, state, _ = _weight(5, 12, blocksize=32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 12, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 12, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    keep = torch.rand(2, 3, 12, generator=g) >= 0.4

    def f(x, a, b, bias):
        return qlora_linear_ref(x, packed, state, a, b, 1.5, bias, 0.4, dropout_mask=keep)

    assert torch.autograd.gradcheck(f, (x, a, b, bias))


# --------------------------------------------------------------------------------------------
# Kernel path (Triton forced: interpreter on CPU)
# --------------------------------------------------------------------------------------------


def _check_kernel_vs_oracle(lead, n, k, r, dtype, has_bias, seed, a_dtype=None, bs=64, dq=True):
    dev = kernel_device()
    packed, state, w64 = _weight(n, k, blocksize=bs, dq=dq, seed=seed, device=dev)
    x, a, b, bias = _inputs(lead, n, k, r, dtype, dev, seed=seed, bias=has_bias, a_dtype=a_dtype)
    s = 2.0
    if bias is not None:
        bias.requires_grad_()
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, a, b)]
    leaves.append(bias.detach().clone().requires_grad_() if bias is not None else None)
    with qkern.backend("triton"):
        y = qlora_linear(
            x.requires_grad_(), packed, state, a.requires_grad_(), b.requires_grad_(), s, bias
        )
    with qkern.backend("reference"):
        y_t = qlora_linear_ref(leaves[0], packed, state, leaves[1], leaves[2], s, leaves[3])
    y64, leaves64 = _oracle(x, w64, a, b, s, bias)
    gy = torch.randn(
        y64.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64
    )
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert_close_rule(y, y64, y_t, atol=_atol(y64, dtype), name="y")
    got = _grads(y, (x, a, b, bias), gy)
    same = _grads(y_t, leaves, gy)
    want = _grads(y64, leaves64, gy)
    for name, g1, gt, g2, t in zip(("dX", "dA", "dB", "dbias"), got, same, want, (x, a, b, bias)):
        if g2 is None:
            continue
        assert g1.dtype == t.dtype, name
        assert_close_rule(g1, g2, gt, atol=_atol(g2, dtype), name=name)


@given(
    n=st.integers(1, 70),
    k=st.sampled_from([32, 64, 96, 160, 40, 72, 33]),
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    r=st.sampled_from([1, 3, 8]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    has_bias=st.booleans(),
)
def test_kernel_path_matches_fp64(n, k, lead, r, dtype, has_bias):
    # rows = prod(lead) in 1..125 covers both the fused small-M forward (<= NF4_MATMUL_MAX_M)
    # and dequant-workspace + matmul; K in {40, 72, 33} falls back from the fused kernel
    _check_kernel_vs_oracle(lead, n, k, r, dtype, has_bias, seed=n + k + r)


@pytest.mark.parametrize("lead", [(3,), (2, 40)])
def test_kernel_path_fp32_adapter_weights(lead):
    # A, B kept in fp32 (optimizer master weights) with fp16 compute: grads come back in fp32
    _check_kernel_vs_oracle(lead, 24, 64, 4, torch.float16, True, seed=5, a_dtype=torch.float32)


@pytest.mark.parametrize("dq,bs", [(False, 32), (True, 128)])
def test_kernel_path_blocksizes(dq, bs):
    _check_kernel_vs_oracle((2, 20), 19, 128, 3, torch.float32, False, seed=9, bs=bs, dq=dq)


def test_kernel_path_no_adapter_and_partial_grads():
    dev = kernel_device()
    packed, state, w64 = _weight(21, 64, device=dev)
    x, _, _, bias = _inputs((45,), 21, 64, 1, torch.float32, dev)
    bias.requires_grad_()
    with qkern.backend("triton"):
        y = qlora_linear(x.requires_grad_(), packed, state, bias=bias)
    y64, leaves = _oracle(x, w64, None, None, 0.0, bias)
    gy = torch.randn_like(y64)
    assert_close_rule(y, y64, atol=1e-4)
    dx, _, _, db = _grads(y, (x, None, None, bias), gy)
    ex, _, _, eb = _grads(y64, leaves, gy)
    assert_close_rule(dx, ex, atol=1e-4)
    assert_close_rule(db, eb, atol=1e-4)
    # a frozen bias gets no gradient; x without grad skips dX; only the adapter trains
    x2, a, b, fb = _inputs((45,), 21, 64, 2, torch.float32, dev)
    with qkern.backend("triton"):
        y = qlora_linear(x2, packed, state, a.requires_grad_(), b.requires_grad_(), 1.0, fb)
    y.sum().backward()
    assert x2.grad is None and fb.grad is None
    assert a.grad is not None and b.grad is not None


def test_kernel_path_noncontiguous_input():
    dev = kernel_device()
    packed, state, w64 = _weight(10, 64, device=dev)
    base = torch.randn(64, 6, device=dev)
    x = base.t()  # (6, 64), stride (1, 6)
    _, a, b, _ = _inputs((6,), 10, 64, 2, torch.float32, dev, bias=False)
    with qkern.backend("triton"):
        y = qlora_linear(x, packed, state, a, b, 0.5)
    y64, _ = _oracle(x, w64, a, b, 0.5)
    assert_close_rule(y, y64, atol=1e-4)


def test_workspace_is_reused_across_layers():
    dev = kernel_device()
    layers = [_weight(n, k, seed=n, device=dev) for n, k in ((40, 64), (24, 96), (40, 64))]
    ptrs = []
    for packed, state, w64 in layers:
        x = torch.randn(50, state.shape[1], device=dev)
        with qkern.backend("triton"):
            y = qlora_linear(x, packed, state)
            ptrs.append(qlora.dequant_workspace(packed, state, torch.float32).data_ptr())
        assert_close_rule(y, x.double().cpu() @ w64.t(), atol=1e-4)
    assert len(set(ptrs)) == 1  # one buffer, sized for the largest weight


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [7, 70])  # fused small-M forward / dequant + matmul
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_mask_replayed_in_backward(rows, dtype):
    dev = kernel_device()
    n, k, r, p, s, seed = 30, 96, 3, 0.3, 1.25, 1234
    packed, state, w64 = _weight(n, k, device=dev)
    x, a, b, bias = _inputs((rows,), n, k, r, dtype, dev)
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    with qkern.backend("triton"):
        y = qlora_linear(x, packed, state, a, b, s, bias, dropout=p, dropout_seed=seed)
        keep = lora_dropout_mask(seed, (rows, k), p, dev)
    assert keep.dtype == torch.bool and keep.shape == (rows, k)
    y64, leaves = _oracle(x, w64, a, b, s, bias, keep=keep, p=p)
    leaves_t = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    with qkern.backend("reference"):
        y_t = qlora_linear_ref(
            *leaves_t[:1], packed, state, *leaves_t[1:], s, bias, p, dropout_mask=keep
        )
    gy = torch.randn_like(y64)
    assert_close_rule(y, y64, y_t, atol=_atol(y64, dtype), name="y")
    got = _grads(y, (x, a, b), gy)
    same = _grads(y_t, leaves_t, gy)
    want = _grads(y64, leaves[:3], gy)
    for name, g1, gt, g2 in zip(("dX", "dA", "dB"), got, same, want):
        assert_close_rule(g1, g2, gt, atol=_atol(g2, dtype), name=name)
    # the mask is actually used: without it the adapter term differs
    y_nodrop, _ = _oracle(x, w64, a, b, s, bias)
    assert (y_nodrop - y64).abs().max() > 1e-3


def test_dropout_mask_statistics_and_seeds():
    dev = kernel_device()
    with qkern.backend("triton"):
        m1 = lora_dropout_mask(7, (64, 160), 0.25, dev)
        m2 = lora_dropout_mask(7, (64, 160), 0.25, dev)
        m3 = lora_dropout_mask(8, (64, 160), 0.25, dev)
        m0 = lora_dropout_mask(7, (64, 160), 0.0, dev)
        mall = lora_dropout_mask(7, (64, 160), 1.0, dev)
    kept = m1.float().mean().item()
    sigma = math.sqrt(0.25 * 0.75 / m1.numel())
    assert abs(kept - 0.75) < 5 * sigma
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert bool(m0.all()) and not bool(mall.any())


def test_dropout_edge_cases():
    dev = kernel_device()
    n, k = 12, 64
    packed, state, w64 = _weight(n, k, device=dev)
    x, a, b, _ = _inputs((40,), n, k, 2, torch.float32, dev, bias=False)
    a.requires_grad_()
    b.requires_grad_()
    with qkern.backend("triton"):
        # p = 1: the adapter sees zeros; dA = dB = 0
        y = qlora_linear(x, packed, state, a, b, 1.0, dropout=1.0, dropout_seed=3)
        y.sum().backward()
        assert_close_rule(y, x.double().cpu() @ w64.t(), atol=1e-4)
        assert not a.grad.any() and not b.grad.any()
        # eval mode and p = 0 are dropout-free and deterministic
        y_eval = qlora_linear(x, packed, state, a, b, 1.0, dropout=0.5, training=False)
        y_p0 = qlora_linear(x, packed, state, a, b, 1.0, dropout=0.0)
        assert torch.equal(y_eval, y_p0)
        # same seed, same result; another seed, another mask
        ya = qlora_linear(x, packed, state, a, b.detach() + 1, 1.0, dropout=0.5, dropout_seed=11)
        yb = qlora_linear(x, packed, state, a, b.detach() + 1, 1.0, dropout=0.5, dropout_seed=11)
        yc = qlora_linear(x, packed, state, a, b.detach() + 1, 1.0, dropout=0.5, dropout_seed=12)
    assert torch.equal(ya, yb) and not torch.equal(ya, yc)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout"):
            qlora_linear(x, packed, state, a, b, 1.0, dropout=bad)


def _philox4x32_10(ctr: np.ndarray, seed: int) -> list[np.ndarray]:
    """Philox4x32-10 of counters (ctr, 0, 0, 0) (ctr < 2^32) and key (seed, 0), in numpy."""
    mask = np.uint64(0xFFFFFFFF)
    c0, c1 = ctr.astype(np.uint64), np.zeros_like(ctr, dtype=np.uint64)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pa, pb = a * c0, b * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (
            (pb >> np.uint64(32)) ^ c1 ^ k0,
            pb & mask,
            (pa >> np.uint64(32)) ^ c3 ^ k1,
            pa & mask,
        )
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask
    return [c0, c1, c2, c3]


def test_dropout_mask_follows_documented_philox_mapping():
    # element (m, k = 128g + 32j + i) is kept when Philox output j of counter m*KC + 32g + i,
    # shifted right once, is >= ceil(p * 2^31); KC = 32 * ceil(K / 128)
    dev = kernel_device()
    m, k, p, seed = 5, 200, 0.3, 12345
    with qkern.backend("triton"):
        keep = lora_dropout_mask(seed, (m, k), p, dev).cpu().numpy()
    kc = 32 * math.ceil(k / 128)
    rows, cols = np.meshgrid(np.arange(m), np.arange(k), indexing="ij")
    g, j, i = cols // 128, (cols % 128) // 32, cols % 32
    outs = _philox4x32_10((rows * kc + 32 * g + i).ravel(), seed)
    r = np.choose(j.ravel(), outs).reshape(m, k)
    want = (r >> np.uint64(1)) >= np.uint64(math.ceil(p * 2**31))
    assert np.array_equal(keep, want)


def test_dropout_forward_bits_match_mask():
    # the forward stores the mask as bits (word m*KW + k // 32, bit k % 32) for the backward
    dev = kernel_device()
    m, k, r, p, seed = 37, 200, 3, 0.4, 99
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dev)
    a = torch.randn(r, k, generator=g).to(dev)
    with qkern.backend("triton"):
        t, bits = qlora._lora_down_dropout(x, a, p, seed)
        keep = lora_dropout_mask(seed, (m, k), p, dev)
    assert bits.shape == (m, 4 * math.ceil(k / 128)) and bits.dtype == torch.int32
    col = torch.arange(k)
    unpacked = (bits.cpu()[:, col // 32] >> (col % 32)) & 1
    assert torch.equal(unpacked.bool(), keep.cpu())
    xd = torch.where(keep, x / (1 - p), 0.0)
    assert_close_rule(t, xd.double().cpu() @ a.double().cpu().t(), atol=1e-4)


def test_dropout_seed_follows_torch_seed():
    dev = kernel_device()
    packed, state, _ = _weight(12, 64, device=dev)
    x, a, b, _ = _inputs((20,), 12, 64, 2, torch.float32, dev, bias=False)
    b = b + 1
    outs = []
    with qkern.backend("triton"):
        for _ in range(2):
            torch.manual_seed(99)
            outs.append(qlora_linear(x, packed, state, a, b, 1.0, dropout=0.5))
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------
# nf4_matmul (fused small-M kernel)
# --------------------------------------------------------------------------------------------


_NF4_SHAPES = [(33, 64, 64, True), (47, 160, 64, False), (20, 96, 32, True), (9, 256, 128, True)]


@pytest.mark.parametrize("m", [1, 2, 5, 8, 16, 70])
@pytest.mark.parametrize("shape", range(len(_NF4_SHAPES)))
def test_nf4_matmul_vs_dequant_matmul(m, shape):
    # K=160, 96 with blocksize 64/32: quant blocks cross row boundaries; the dtype alternates
    # over the grid so that both meet every M and every shape
    n, k, bs, dq = _NF4_SHAPES[shape]
    dtype = (torch.float32, torch.float16)[(m + shape) % 2]
    dev = kernel_device()
    packed, state, w64 = _weight(n, k, blocksize=bs, dq=dq, seed=m + n, device=dev)
    assert nf4_matmul_supported(k, state)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype).to(dev)
    bias = torch.randn(n, generator=g).to(dtype).to(dev)
    out = poisoned((m, n), dtype, dev)
    with qkern.backend("triton"):
        y = nf4_matmul(x, packed, state, bias, out=out)
        y2 = nf4_matmul(x, packed, state, bias)
    assert y.data_ptr() == out.data_ptr()
    ref64 = x.double().cpu() @ w64.t() + bias.double().cpu()
    same = (x.cpu().float() @ w64.float().t().to(dtype).float()).to(dtype) + bias.cpu()
    assert_close_rule(y, ref64, same, atol=_atol(ref64, dtype))
    assert torch.equal(y, y2)  # split-K reduction in a fixed order: deterministic


def _one_hot_weights(packed, state, dtype, byte_pairs):
    """W as a one-hot row of x reads it from nf4_matmul: dequantize_4bit's bits, or for the
    byte-pair variants dtype(fp32(dtype(code)) · absmax), the block scale applied after the
    products (see qlora._nf4_sub_dot_t)."""
    n, k = state.shape
    if not byte_pairs:
        with qkern.backend("reference"):
            return dequantize_4bit(packed.cpu(), state.to("cpu"), dtype=dtype)
    from qkern.nf4 import unpack_4bit_ref

    st = state.to("cpu")
    q = unpack_4bit_ref(packed.cpu().reshape(-1), n * k).long()
    scale = st.dequantized_absmax().float()[torch.arange(n * k) // st.blocksize]
    return (st.code.to(dtype).float()[q] * scale).to(dtype).view(n, k)


def _applies(config, m, dtype):
    """Whether ``config`` is a candidate for M rows of ``dtype`` on some machine (native ones
    included: forced where the native kernel cannot run, they run their Triton stand-in)."""
    return config in qlora._nf4_candidates(m, dtype, native=True)


def _expected_config(config, m, state, dtype, device):
    """The configuration a forced ``config`` runs with: itself, or the native stand-in."""
    k = state.shape[1]
    if config["DOT"] == 4 and not qlora._native_supported(m, k, state, dtype, device):
        return qlora._NATIVE_STANDIN
    return config


def _check_one_hot(monkeypatch, packed, state, dtype, cols, m_values):
    """Every applicable candidate, forced, on one-hot rows of x picking ``cols``."""
    n, k = state.shape
    dev = packed.device
    checked = 0
    for config in qlora._NF4_MM_CONFIGS:
        w = _one_hot_weights(packed, state, dtype, config["DOT"] >= 3)
        for m in m_values:
            if not _applies(config, m, dtype):
                continue
            monkeypatch.setattr(qlora, "NF4_MATMUL_CONFIG", config)
            monkeypatch.setattr(qlora, "_MM_CACHE", {})  # a new entry with this configuration
            c = cols[:m]
            x = torch.zeros(m, k, dtype=dtype, device=dev)
            x[torch.arange(m), c.to(dev)] = 1
            with qkern.backend("triton"):
                y = nf4_matmul(x, packed, state)
                entry = qlora._mm_lookup(x, packed, state, None)
            assert entry.config == _expected_config(config, m, state, dtype, dev)
            assert torch.equal(y.cpu(), w[:, c].t()), config
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dq", [True, False])
def test_nf4_matmul_dequantizes_exactly(monkeypatch, dtype, dq):
    # one-hot rows pick single columns of W: the in-kernel dequant (absmax through the double
    # quant formula included) must equal dequantize_4bit bit for bit, with every candidate but
    # the byte-pair ones, which must equal their own documented rounding
    dev = kernel_device()
    n, k = 40, 192
    packed, state, _ = _weight(n, k, dq=dq, seed=4, device=dev, scale=3.0)
    cols = torch.tensor([0, 1, 63, 64, 100, 191, 127, 128, 5, 6, 7, 8, 9, 10, 11, 12])
    _check_one_hot(monkeypatch, packed, state, dtype, cols, (1, 8, 16))


def test_code_tables_derived_once_with_the_documented_layout():
    # the byte-pair table: word b holds the codes of b's high nibble (low half: element 2j)
    # and low nibble (high half), in the compute dtype, at a 1024-byte aligned address; made
    # once per code table and dtype; a second lookup of the same table (another x shape) gets
    # the same tensor (a WeakKeyDictionary cache used to fail there: it compares tensors)
    _, state, _ = _weight(8, 64, seed=2)
    code = state.code
    for dtype in (torch.bfloat16, torch.float16):
        t = qlora._pair_table(code, dtype)
        assert t.dtype == torch.int32 and t.numel() == 256 and t.data_ptr() % 1024 == 0
        assert qlora._pair_table(code, dtype) is t
        lo = (t & 0xFFFF).to(torch.int16).view(dtype)
        hi = (t >> 16).to(torch.int16).view(dtype)
        b = torch.arange(256)
        assert torch.equal(lo, code.to(dtype)[b >> 4])
        assert torch.equal(hi, code.to(dtype)[b & 15])
    with pytest.raises(TypeError, match="16-bit"):
        qlora._pair_table(code, torch.float32)
    sliced = torch.cat([torch.zeros(1), code])[1:]
    assert sliced.data_ptr() % 64 != 0
    a = qlora._aligned_code(sliced)
    assert a.data_ptr() % 64 == 0 and torch.equal(a, code)
    assert qlora._aligned_code(sliced) is a
    key = (id(sliced), "aligned")
    del sliced  # the cache entry goes with its code table
    assert key not in qlora._CODE_DERIVED


def test_nf4_matmul_byte_pair_config_forced_on_fp32_runs_w_first(monkeypatch):
    # the byte-pair table is for 16-bit x: a forced byte-pair configuration on fp32 x runs the
    # W-first variant of the same shape instead of failing
    dev = kernel_device()
    packed, state, w64 = _weight(24, 128, seed=5, device=dev)
    config = next(c for c in qlora._NF4_MM_CONFIGS if c["DOT"] == 3)
    monkeypatch.setattr(qlora, "NF4_MATMUL_CONFIG", config)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5)).to(dev)
    with qkern.backend("triton"):
        y = nf4_matmul(x, packed, state)
        entry = qlora._mm_lookup(x, packed, state, None)
    assert entry.config == {**config, "DOT": 2}
    ref64 = x.double().cpu() @ w64.t()
    assert_close_rule(y, ref64, (x.cpu() @ w64.float().t()), atol=1e-4)


def test_nf4_matmul_strided_and_misaligned_inputs():
    # x is read as two-element words: a row stride != K or an odd element offset goes through a
    # contiguous copy; the code table must sit at a 64-byte aligned address (else it is copied);
    # the results are the same as for aligned, contiguous inputs
    dev = kernel_device()
    n, k = 24, 128
    packed, state, _ = _weight(n, k, seed=3, device=dev)
    base = torch.randn(6, k + 1, device=dev, dtype=torch.float16)
    x = base[:, 1:]  # stride (k + 1, 1), storage offset 1
    with qkern.backend("triton"):
        y = nf4_matmul(x, packed, state)
        y_ref = nf4_matmul(x.contiguous(), packed, state)
        y1 = nf4_matmul(x[2], packed, state)  # 1-D input, odd offset
    assert torch.equal(y, y_ref)
    # a code table at an address that is not 64-byte aligned (sliced out of a bigger buffer)
    code = torch.cat([torch.zeros(1, device=dev), state.code])[1:]
    assert code.data_ptr() % 64 != 0
    with qkern.backend("triton"):
        y_code = nf4_matmul(x, packed, dataclasses.replace(state, code=code))
    assert torch.equal(y_code, y_ref)
    assert y1.shape == (n,)
    # another M may split K differently (another fp32 summation order): close, not bit-equal
    torch.testing.assert_close(y1, y_ref[2], rtol=2e-3, atol=2e-2)


def test_nf4_matmul_unsupported_k_falls_back():
    dev = kernel_device()
    packed, state, w64 = _weight(11, 33, device=dev)  # odd K: blocks and bytes straddle rows
    assert not nf4_matmul_supported(33, state)
    x = torch.randn(2, 3, 33, device=dev)
    with qkern.backend("triton"):
        y = nf4_matmul(x, packed, state)
    assert y.shape == (2, 3, 11)
    assert_close_rule(y, x.double().cpu() @ w64.t(), atol=1e-4)


def test_nf4_matmul_bad_inputs():
    packed, state, _ = _weight(8, 64)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="in_features=64"):
        nf4_matmul(torch.randn(3, 65), packed, state)
    with pytest.raises(ValueError, match="out must be"):
        nf4_matmul(x, packed, state, out=torch.empty(3, 9))
    with pytest.raises(TypeError, match="x must have dtype"):
        nf4_matmul(x.long(), packed, state)
    with pytest.raises(ValueError, match="bias must be"):
        nf4_matmul(x, packed, state, bias=torch.randn(7))


@pytest.mark.parametrize("cfg", range(len(qlora._NF4_MM_CONFIGS)))
@pytest.mark.parametrize(
    "case",
    [
        (1, 37, 192, 64, True, torch.float16),
        (3, 70, 160, 64, True, torch.float32),
        (2, 29, 256, 128, False, torch.float16),
        (1, 40, 96, 32, True, torch.float16),
    ],
)
def test_nf4_matmul_every_config(monkeypatch, cfg, case):
    # each candidate the GPU tuner may pick, forced: odd N (a partial row tile), K = 3 or 5
    # sub-chunks (a partial unrolled iteration), blocksize 64 with K % 64 != 0 (32-element
    # sub-chunks whose quant blocks cross rows), blocksizes 128 (no double quant) and 32; the
    # interpreter's 4 "SMs" give split-K grids
    m, n, k, bs, dq, dtype = case
    config = qlora._NF4_MM_CONFIGS[cfg]
    if config["DOT"]:
        m = m + 13  # the tensor-core variants: 14 to 16 rows here
    if not _applies(config, m, dtype):
        pytest.skip("not a candidate for this dtype")  # the byte-pair variants: 16-bit x only
    monkeypatch.setattr(qlora, "NF4_MATMUL_CONFIG", config)
    dev = kernel_device()
    packed, state, w64 = _weight(n, k, blocksize=bs, dq=dq, seed=cfg, device=dev)
    g = torch.Generator().manual_seed(cfg)
    x = torch.randn(m, k, generator=g).to(dtype).to(dev)
    bias = torch.randn(n, generator=g).to(dtype).to(dev)
    with qkern.backend("triton"):
        y = nf4_matmul(x, packed, state, bias, out=poisoned((m, n), dtype, dev))
        entry = qlora._mm_lookup(x, packed, state, bias)
        y1 = nf4_matmul(x[:1], packed, state)
    assert entry.config == _expected_config(config, m, state, dtype, dev)
    ref64 = x.double().cpu() @ w64.t() + bias.double().cpu()
    same = (x.cpu().float() @ w64.float().t().to(dtype).float()).to(dtype) + bias.cpu()
    assert_close_rule(y, ref64, same, atol=_atol(ref64, dtype))
    assert_close_rule(y1, ref64[:1] - bias.double().cpu(), atol=_atol(ref64, dtype) + 1e-3)


def test_nf4_matmul_tuner_runs_every_candidate(monkeypatch):
    # the one-time tuning of a shape (GPU only in real use: the interpreter has one candidate)
    # builds a trial launch per candidate and keeps the fastest; a fake timer runs each trial
    # once, checks its output, and reports the candidates in reverse order of speed
    import triton.testing

    dev = kernel_device()
    m, n, k = 3, 40, 128
    packed, state, w64 = _weight(n, k, blocksize=64, seed=7, device=dev)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)).to(dev)
    ref64 = x.double().cpu() @ w64.t()
    cands = qlora._nf4_candidates(m, x.dtype)
    assert len(cands) >= 2
    seen = []

    def fake_bench(fn, **kw):
        seen.append(len(seen))
        fn()
        return float(len(cands) - len(seen))  # the last candidate timed is the "fastest"

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(qlora, "_NF4_TUNE", True)
    monkeypatch.setattr(qlora, "pick_configs", lambda c: c)
    monkeypatch.setattr(qlora, "_NF4_TUNED", {})
    with qkern.backend("triton"):
        y = nf4_matmul(x, packed, state)
        entry = qlora._mm_lookup(x, packed, state, None)
    assert len(seen) == len(cands)
    assert entry.config is cands[-1]
    assert_close_rule(y, ref64, (x @ w64.float().t().to(dev)).cpu(), atol=1e-4)


@given(
    m=st.integers(1, 16),
    n=st.integers(1, 80),
    k32=st.integers(1, 9),
    bs=st.sampled_from([32, 64, 128]),
    half=st.booleans(),
)
def test_nf4_matmul_small_m_shapes(m, n, k32, bs, half):
    # M = 1..16 rows (FMA variants up to _FMA_MAX_M, tensor cores above), any N, K a multiple
    # of 32 (32- or 64-element sub-chunks, blocks of 32..128 that may straddle rows)
    k = 32 * k32
    dtype = torch.float16 if half else torch.float32
    dev = kernel_device()
    packed, state, w64 = _weight(n, k, blocksize=bs, seed=n + k, device=dev)
    assert nf4_matmul_supported(k, state)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(dev)
    with qkern.backend("triton"):
        y = nf4_matmul(x, packed, state, out=poisoned((m, n), dtype, dev))
    ref64 = x.double().cpu() @ w64.t()
    same = (x.cpu().float() @ w64.float().t().to(dtype).float()).to(dtype)
    assert_close_rule(y, ref64, same, atol=_atol(ref64, dtype))


def test_nf4_matmul_candidates_cover_small_m():
    # every M up to NF4_MATMUL_MAX_M has candidates; FMA ones stop at _FMA_MAX_M, x·Wᵀ
    # tensor-core ones start at 2 rows, W·xᵀ ones at 1; the forced configuration is the only
    # one a new entry uses
    for m in range(1, qlora.NF4_MATMUL_MAX_M + 1):
        cands = qlora._nf4_candidates(m)
        assert cands
        assert all(c["DOT"] or m <= qlora._FMA_MAX_M for c in cands)
        assert any(c["DOT"] == 1 for c in cands) == (m >= 2)
        assert any(c["DOT"] == 2 for c in cands)
        assert any(c["DOT"] == 3 for c in cands)
        assert not any(c["DOT"] == 3 for c in qlora._nf4_candidates(m, torch.float32))
        assert not any(c["DOT"] == 4 for c in cands)  # native ones only where they run
        native = qlora._nf4_candidates(m, torch.bfloat16, native=True)
        assert any(c["DOT"] == 4 for c in native)
        assert not any(c["DOT"] == 4 for c in qlora._nf4_candidates(m, torch.float32, True))
    assert not any(c["DOT"] == 4 for c in qlora._nf4_candidates(17, torch.float16, True))


def test_native_kernel_needs_cuda_and_a_supported_shape():
    # the native small-M kernel (csrc/nf4_small_m.cu) is only offered where it runs: a CUDA
    # device with the NVRTC library, 16-bit x, M <= 16, K % 64 == 0 and a power-of-two
    # blocksize >= 64; a forced native configuration elsewhere runs its Triton stand-in, which
    # rounds the same way (checked by the one-hot tests above)
    _, state, _ = _weight(8, 128, blocksize=64)
    assert not qlora._native_supported(1, 128, state, torch.float16, torch.device("cpu"))
    from qkern import _native

    if not _native.available("cuda"):
        return
    _, st32, _ = _weight(8, 128, blocksize=32)
    ok = qlora._native_supported
    assert ok(1, 128, state, torch.bfloat16, "cuda") and ok(16, 128, state, torch.float16, "cuda")
    assert not ok(17, 128, state, torch.bfloat16, "cuda")
    assert not ok(1, 128, state, torch.float32, "cuda")
    assert not ok(1, 96, state, torch.bfloat16, "cuda")
    assert not ok(1, 128, st32, torch.bfloat16, "cuda")


def _record_host_path(monkeypatch):
    """Stub the kernel launch of nf4_matmul and record it, plus every aten op run meanwhile."""
    from torch.utils._python_dispatch import TorchDispatchMode

    launches, ops = [], []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(qlora, "_launch", lambda *a, **k: launches.append(a[1]))
    return launches, ops, Ops


def test_nf4_matmul_host_path_is_one_launch_and_one_allocation(monkeypatch):
    # after the first call of a shape, a call runs no torch op except the output allocation
    # (none with out=) and exactly one kernel launch; qlora_linear's no-grad shortcut likewise
    dev = kernel_device()
    packed, state, _ = _weight(40, 128, device=dev)
    x = torch.randn(2, 3, 128, device=dev)
    out = torch.empty(2, 3, 40, device=dev)
    launches, ops, Ops = _record_host_path(monkeypatch)
    with qkern.backend("triton"):
        nf4_matmul(x, packed, state)  # first call: validation and entry
        qlora_linear(x, packed, state)
        launches.clear()
        with Ops():
            y = nf4_matmul(x, packed, state)
            nf4_matmul(x, packed, state, out=out)
            qlora_linear(x, packed, state)
    assert y.shape == (2, 3, 40)
    assert len(launches) == 3
    assert ops == ["new_empty", "new_empty"], ops


def test_nf4_matmul_cache_across_shapes_out_and_alignment():
    # entries are per (x shape, x dtype, bias dtype): interleaved shapes, out=, a bias and a
    # misaligned x of an already-seen shape all give what a fresh state (fresh caches) gives
    dev = kernel_device()
    packed, state, w64 = _weight(24, 128, seed=5, device=dev)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(*lead, 128, generator=g).to(dev) for lead in [(1,), (3,), (2, 2), (), (3,)]]
    bias = torch.randn(24, generator=g).to(dev)
    with qkern.backend("triton"):
        first = [nf4_matmul(x, packed, state) for x in xs]
        again = [nf4_matmul(x, packed, state) for x in reversed(xs)][::-1]
        with_bias = nf4_matmul(xs[2], packed, state, bias)
        out = poisoned((2, 2, 24), torch.float32, dev)
        y_out = nf4_matmul(xs[2], packed, state, bias, out=out)
        base = torch.randn(3 * 128 + 1, generator=g).to(dev)
        x_odd = base[1:].view(3, 128)  # an odd element offset: not word aligned
        y_odd = nf4_matmul(x_odd, packed, state)
        fresh = dataclasses.replace(state)
        y_odd_fresh = nf4_matmul(x_odd.clone(), packed, fresh)
    assert y_out.data_ptr() == out.data_ptr()
    assert torch.equal(y_out, with_bias)
    assert torch.equal(y_odd, y_odd_fresh)
    for x, y1, y2 in zip(xs, first, again):
        assert y1.shape == (*x.shape[:-1], 24)
        assert torch.equal(y1, y2)
        assert_close_rule(y1, x.double().cpu() @ w64.t(), atol=1e-4)
    assert_close_rule(with_bias, xs[2].double().cpu() @ w64.t() + bias.double().cpu(), atol=1e-4)


def test_nf4_matmul_cache_follows_state_changes():
    dev = kernel_device()
    packed, state, w64 = _weight(16, 64, seed=1, device=dev, dq=False)
    packed2, state2, w64_2 = _weight(16, 64, seed=2, device=dev, dq=False)
    x = torch.randn(2, 64, device=dev)
    with qkern.backend("triton"):
        y1 = nf4_matmul(x, packed, state)
        # reassigning a field of the state rebuilds its entries: the new absmax is used
        state.absmax = state2.absmax
        y_mixed = nf4_matmul(x, packed, state)
        state.absmax = torch.full_like(state2.absmax, float("nan"))
        y_nan = nf4_matmul(x, packed, state)
        y2 = nf4_matmul(x, packed2, state2)
        qlora.clear_workspaces()  # drops every entry and the split-K scratch
        y2_again = nf4_matmul(x, packed2, state2)
    assert_close_rule(y1, x.double().cpu() @ w64.t(), atol=1e-4)
    scale = (state2.absmax / _weight(16, 64, seed=1, dq=False)[1].absmax).double().cpu()
    w_mixed = (w64.view(-1, 64) * scale[:, None]).view(16, 64)
    assert_close_rule(y_mixed, x.double().cpu() @ w_mixed.t(), atol=1e-4)
    assert torch.isnan(y_nan).all()
    assert torch.equal(y2, y2_again)
    # entries die with their state
    n_before = len(qlora._MM_CACHE)
    tmp = dataclasses.replace(state2)
    with qkern.backend("triton"):
        nf4_matmul(x, packed2, tmp)
    assert len(qlora._MM_CACHE) == n_before + 1
    del tmp
    assert len(qlora._MM_CACHE) == n_before


def test_nf4_matmul_bad_inputs_after_cached_call():
    # a cached entry must not let a bad call through: every check of the first call still holds
    dev = kernel_device()
    packed, state, _ = _weight(8, 64, device=dev)
    x = torch.randn(3, 64, device=dev)
    bias = torch.randn(8, device=dev)
    with qkern.backend("triton"):
        nf4_matmul(x, packed, state, bias, out=torch.empty(3, 8, device=dev))
        nf4_matmul(x, packed, state)
        with pytest.raises(ValueError, match="bias must be"):
            nf4_matmul(x, packed, state, bias=torch.randn(7, device=dev))
        with pytest.raises(ValueError, match="out must be"):
            nf4_matmul(x, packed, state, bias, out=torch.empty(3, 9, device=dev))
        with pytest.raises(ValueError, match="out must be"):
            nf4_matmul(x, packed, state, out=torch.empty(3, 8, device=dev).half())
        with pytest.raises(ValueError, match="out must be"):
            nf4_matmul(x, packed, state, out=torch.empty(8, 3, device=dev).t())
        with pytest.raises(ValueError, match="one device"):
            nf4_matmul(x.to("meta"), packed, state)
        with pytest.raises(ValueError, match="packed has"):
            nf4_matmul(x, packed[:-1], state)
        with pytest.raises(TypeError, match="packed must be"):
            nf4_matmul(x, packed.float(), state)
        with pytest.raises(TypeError, match="state must be"):
            nf4_matmul(x, packed, "state")
        with pytest.raises(TypeError, match="x must be"):
            nf4_matmul(x.tolist(), packed, state)
        with pytest.raises(TypeError, match="bias must be"):
            nf4_matmul(x, packed, state, bias=[0.0] * 8)
        with pytest.raises(ValueError, match="dropout"):
            qlora_linear(x, packed, state, dropout=float("nan"))
        with pytest.raises(ValueError, match="x.shape"):
            qlora_linear(torch.randn(3, 65, device=dev), packed, state)
        assert nf4_matmul(x, packed, state).shape == (3, 8)


def test_qlora_linear_no_grad_small_m_matches_autograd_path():
    # without anything to differentiate, small M skips the autograd Function (no graph) and
    # computes the same y with the same kernels
    dev = kernel_device()
    packed, state, _ = _weight(24, 64, device=dev)
    x, a, b, bias = _inputs((2, 3), 24, 64, 4, torch.float32, dev)
    with qkern.backend("triton"):
        y_grad = qlora_linear(x, packed, state, a.requires_grad_(), b.requires_grad_(), 2.0, bias)
        with torch.no_grad():
            y_nograd = qlora_linear(x, packed, state, a, b, 2.0, bias)
            y_frozen = qlora_linear(x, packed, state, bias=bias)
        y_frozen_grad = qlora_linear(x.requires_grad_(), packed, state, bias=bias)
    assert y_grad.grad_fn is not None and y_frozen_grad.grad_fn is not None
    assert y_nograd.grad_fn is None and y_frozen.grad_fn is None
    assert torch.equal(y_nograd, y_grad.detach())
    assert torch.equal(y_frozen, y_frozen_grad.detach())


# --------------------------------------------------------------------------------------------
# Bad input of qlora_linear
# --------------------------------------------------------------------------------------------


def test_qlora_linear_bad_inputs():
    packed, state, _ = _weight(8, 64)
    x = torch.randn(3, 64)
    a, b = torch.randn(4, 64), torch.randn(8, 4)
    cases = [
        ((torch.randn(3, 60), packed, state, a, b), ValueError, "x.shape"),
        ((x, packed[:-1], state, a, b), ValueError, "packed has"),
        ((x, packed.float(), state, a, b), TypeError, "packed must be"),
        ((x, packed, "state", a, b), TypeError, "state must be"),
        ((x, packed, state, torch.randn(4, 63), b), ValueError, "lora_a must be"),
        ((x, packed, state, a, torch.randn(9, 4)), ValueError, "lora_b must be"),
        ((x, packed, state, a, torch.randn(8, 5)), ValueError, "rank mismatch"),
        ((x, packed, state, a[:0], b[:, :0]), ValueError, "r=0"),
        ((x, packed, state, a, None), ValueError, "together"),
        ((x.half(), packed, state, a.bfloat16(), b.bfloat16()), TypeError, "lora_a must have"),
        ((x, packed, state, a, b.half()), TypeError, "lora_b must have"),
        ((x.int(), packed, state, a, b), TypeError, "x must have"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            qlora_linear(*args)
    with pytest.raises(ValueError, match="bias must be"):
        qlora_linear(x, packed, state, a, b, 1.0, torch.randn(9))
    with pytest.raises(ValueError, match="scaling"):
        qlora_linear(x, packed, state, a, b, float("nan"))


# --------------------------------------------------------------------------------------------
# QLoRALinear
# --------------------------------------------------------------------------------------------


def test_module_from_linear_round_trip():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True)
    m = QLoRALinear.from_linear(lin)
    assert (m.in_features, m.out_features, m.r) == (96, 40, 0)
    assert m.packed.dtype == torch.uint8 and "packed" in dict(m.named_buffers())
    assert not m.bias.requires_grad and torch.equal(m.bias, lin.bias.detach())
    packed, state = quantize_4bit(lin.weight.detach())
    assert torch.equal(m.packed, packed)
    w = m.base_weight(torch.float32)
    assert torch.equal(w, dequantize_4bit(packed, state, dtype=torch.float32))
    assert rel_err(w, lin.weight) < 0.15  # NF4 round trip of a uniform-init weight
    out = torch.empty(40, 96, dtype=torch.float16)
    assert m.base_weight(torch.float16, out=out) is out
    # a bare tensor with an explicit bias, no double quant, blocksize 128
    m2 = QLoRALinear.from_linear(
        lin.weight, bias=torch.zeros(40), blocksize=128, compress_statistics=False
    )
    assert m2.quant_state.blocksize == 128 and not m2.quant_state.double_quant
    assert not [p for p in m2.parameters() if p.requires_grad]


def test_module_forward_adapter_and_merge():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 24, bias=True)
    m = QLoRALinear.from_linear(lin)
    x = torch.randn(2, 5, 64)
    w = m.base_weight(torch.float32)
    torch.testing.assert_close(m(x), x @ w.t() + lin.bias.detach(), rtol=1e-5, atol=1e-5)
    m.add_adapter(4, 8, generator=torch.Generator().manual_seed(0))
    assert m.r == 4 and m.scaling == 2.0
    assert not m.lora_B.any()  # B = 0: the adapter starts as the identity change
    assert float(m.lora_A.detach().abs().max()) <= 1 / math.sqrt(64)  # kaiming_uniform(a=√5) bound
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    with torch.no_grad():
        m.lora_B.normal_()
    merged = m.merged_weight()
    expect = w.double() + 2.0 * m.lora_B.double() @ m.lora_A.double()
    torch.testing.assert_close(merged.double(), expect, rtol=1e-6, atol=1e-6)
    y = m(x)
    torch.testing.assert_close(y, x @ merged.t() + lin.bias.detach(), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None
    assert m.bias.grad is None
    rep = repr(m)
    for field in ("in_features=64", "out_features=24", "quant_type=nf4", "r=4", "scaling=2"):
        assert field in rep


def test_module_adapter_options():
    m = QLoRALinear.from_linear(torch.randn(16, 64))
    m.add_adapter(
        16,
        32,
        use_rslora=True,
        init="gaussian",
        generator=torch.Generator().manual_seed(0),
        dropout=0.1,
    )
    assert m.scaling == 32 / 4 and m.lora_dropout == 0.1
    assert abs(m.lora_A.std().item() - 1 / 16) < 0.01
    a1 = m.lora_A.detach().clone()
    m.add_adapter(
        16,
        32,
        use_rslora=True,
        init="gaussian",
        generator=torch.Generator().manual_seed(0),
        dropout=0.1,
    )
    assert torch.equal(a1, m.lora_A)  # the generator makes init reproducible
    m.add_adapter(2, 4, dtype=torch.bfloat16)
    assert m.lora_A.dtype == torch.bfloat16 and m.lora_A.shape == (2, 64)
    with pytest.raises(ValueError, match="r must be"):
        m.add_adapter(0, 4)
    with pytest.raises(ValueError, match="init"):
        m.add_adapter(2, 4, init="zeros")
    # eval mode turns dropout off: two calls agree
    m.add_adapter(4, 4, dropout=0.5)
    with torch.no_grad():
        m.lora_B.normal_()
    m.eval()
    x = torch.randn(3, 64)
    assert torch.equal(m(x), m(x))


def test_module_to_moves_quant_state():
    m = QLoRALinear.from_linear(torch.nn.Linear(64, 8))
    m.add_adapter(2, 2)
    absmax_dtype = m.quant_state.absmax.dtype
    m.to(torch.float16)
    assert m.packed.dtype == torch.uint8 and m.quant_state.absmax.dtype == absmax_dtype
    assert m.quant_state.nested_absmax.dtype == torch.float32
    assert m.lora_A.dtype == torch.float16
    m.to("meta")
    st_ = m.quant_state
    for t in (m.packed, st_.absmax, st_.code, st_.nested_absmax, st_.nested_code):
        assert t.device.type == "meta"


def test_module_bad_inputs():
    packed, state, _ = _weight(8, 64)
    with pytest.raises(TypeError, match="quant_state must be"):
        QLoRALinear(packed, "nope")
    with pytest.raises(TypeError, match="packed must be"):
        QLoRALinear(packed.float(), state)
    with pytest.raises(ValueError, match="packed has"):
        QLoRALinear(packed[:5], state)
    with pytest.raises(ValueError, match="bias must be"):
        QLoRALinear(packed, state, bias=torch.zeros(3))
    with pytest.raises(TypeError, match="nn.Linear or a weight"):
        QLoRALinear.from_linear([1, 2])
    m = QLoRALinear(packed, state)
    with pytest.raises(ValueError, match="x.shape"):
        m(torch.randn(2, 63))
    m.lora_A = torch.nn.Parameter(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="r=0"):
        m(torch.randn(2, 64))


# --------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at real shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1024, 4096, 4096), (512, 1024, 4096), (8, 4096, 4096)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_qlora_linear(dtype, rows, n, k, p):
    packed, state, w64 = _weight(n, k, seed=rows, device="cuda", scale=0.02)
    x, a, b, bias = _inputs((rows,), n, k, 16, dtype, "cuda")
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    s, seed = 2.0, 77
    y = qlora_linear(x, packed, state, a, b, s, bias, dropout=p, dropout_seed=seed)
    keep = lora_dropout_mask(seed, (rows, k), p, "cuda") if p > 0 else None
    leaves_t = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    with qkern.backend("reference"):
        y_t = qlora_linear_ref(
            leaves_t[0], packed, state, leaves_t[1], leaves_t[2], s, bias, p, dropout_mask=keep
        )
    y64, leaves = _oracle(x, w64, a, b, s, bias, keep=keep, p=p)
    gy = torch.randn_like(y64)
    assert_close_rule(y, y64, y_t, atol=_atol(y64, dtype), name="y")
    got = _grads(y, (x, a, b), gy)
    same = _grads(y_t, leaves_t, gy)
    want = _grads(y64, leaves[:3], gy)
    for name, g1, gt, g2 in zip(("dX", "dA", "dB"), got, same, want):
        assert_close_rule(g1, g2, gt, atol=_atol(g2, dtype), name=name)


@pytest.mark.gpu
def test_gpu_dropout_dx_right_on_a_new_autotuning_key(monkeypatch):
    """The dX kernel with dropout adds into dx in place and is autotuned on the first call of
    each K: every timing run must start from the same dx, so that call's dX equals the composed
    path's (without restore_value it came out 26-49x too large at M=8192 on an H200)."""
    assert qlora.FUSED_DROPOUT_ON_CUDA
    knobs = getattr(getattr(triton, "knobs", None), "autotuning", None)
    if knobs is not None and hasattr(knobs, "cache"):
        monkeypatch.setattr(knobs, "cache", False)  # no tuning results from the disk cache
    qlora._lora_grad_x_dropout_kernel.cache.clear()  # a fresh key: the next call autotunes
    packed, state, _ = _weight(512, 2048, seed=9, device="cuda", scale=0.02)
    x, a, b, _ = _inputs((1024,), 512, 2048, 16, torch.bfloat16, "cuda", bias=False)
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    fused = qlora._QLoRALinearFunction.apply(
        leaves[0], packed, state, leaves[1], leaves[2], 2.0, None, 0.1, 5, False
    )
    twins = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    composed = qlora._qlora_linear_masked(twins[0], packed, state, twins[1], twins[2], 2.0,
                                          None, 0.1, 5)  # fmt: skip
    gy = torch.randn_like(fused)
    for name, g1, g2 in zip(
        ("dX", "dA", "dB"),
        torch.autograd.grad(fused, leaves, gy),
        torch.autograd.grad(composed, twins, gy),
    ):
        assert rel_err(g1, g2) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 8, 16, 64, 200])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (1000, 96)])
def test_gpu_nf4_matmul(dtype, m, n, k):
    packed, state, w64 = _weight(n, k, seed=m, device="cuda", scale=0.02)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = poisoned((m, n), dtype, "cuda")
    y = nf4_matmul(x, packed, state, out=out)
    ref64 = x.double() @ w64.cuda().t()
    same = x @ dequantize_4bit(packed, state, dtype=dtype).t()
    assert_close_rule(y, ref64, same, atol=_atol(ref64, dtype))
    assert torch.equal(y, nf4_matmul(x, packed, state))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", range(len(qlora._NF4_MM_CONFIGS)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_nf4_matmul_every_config(monkeypatch, cfg, dtype):
    # each candidate the tuner may pick, forced, in the 16-bit dtypes the CPU tests cannot run
    # (bf16), at a real shape and at K = 96 (32-element sub-chunks), M = 1 and 8 where it applies
    config = qlora._NF4_MM_CONFIGS[cfg]
    monkeypatch.setattr(qlora, "NF4_MATMUL_CONFIG", config)
    for n, k in ((4096, 4096), (1000, 96)):
        packed, state, w64 = _weight(n, k, seed=cfg, device="cuda", scale=0.02)
        for m in (1, 8):
            if not _applies(config, m, dtype):
                continue
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            y = nf4_matmul(x, packed, state, out=poisoned((m, n), dtype, "cuda"))
            entry = qlora._mm_lookup(x, packed, state, None)
            assert entry.config == _expected_config(config, m, state, dtype, "cuda")
            ref64 = x.double() @ w64.cuda().t()
            same = x @ dequantize_4bit(packed, state, dtype=dtype).t()
            assert_close_rule(y, ref64, same, atol=_atol(ref64, dtype))


@pytest.mark.gpu
@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 16),
    n=st.sampled_from([1, 15, 16, 37, 1000, 4096]),
    k=st.sampled_from([64, 192, 320, 1024, 4096]),
    bs=st.sampled_from([64, 128, 256]),
    dq=st.booleans(),
    half=st.booleans(),
    with_bias=st.booleans(),
    cfg=st.sampled_from([c for c in qlora._NF4_MM_CONFIGS if c["DOT"] == 4]),
    sms=st.sampled_from([0, 1, 3]),
)
def test_gpu_native_small_m_kernel(m, n, k, bs, dq, half, with_bias, cfg, sms):
    # the native kernel over its whole domain: M = 1..16 (one or two MMA column tiles), N not a
    # multiple of the 16-row tile, K of 1 to 64 chunks (partial groups of 4, empty warps),
    # blocksizes 64..256 with and without double quant, a bias, split-K (few row tiles), blocks
    # walking many row tiles (the grid sized for a pretend GPU of 1 or 3 SMs), both 16-bit
    # dtypes; poisoned outputs; a second call (counters left at zero) gives the same bits
    from qkern import _native

    if not _native.available("cuda"):
        pytest.skip("native kernels unavailable")
    dtype = torch.float16 if half else torch.bfloat16
    packed, state, w64 = _weight(n, k, blocksize=bs, dq=dq, seed=m + n + k, device="cuda",
                                 scale=0.02)  # fmt: skip
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    old = qlora.NF4_MATMUL_CONFIG, qlora.num_sms
    qlora.NF4_MATMUL_CONFIG = cfg
    if sms:
        qlora.num_sms = lambda device=None: sms
    try:
        y = nf4_matmul(x, packed, state, bias, out=poisoned((m, n), dtype, "cuda"))
        entry = qlora._mm_lookup(x, packed, state, bias)
        y2 = nf4_matmul(x, packed, state, bias)
    finally:
        qlora.NF4_MATMUL_CONFIG, qlora.num_sms = old
    assert entry.config is cfg and entry.compiled is None  # the native launch
    ref64 = x.double() @ w64.cuda().t()
    same = x @ dequantize_4bit(packed, state, dtype=dtype).t()
    if bias is not None:
        ref64 = ref64 + bias.double()
        same = same + bias
    assert_close_rule(y, ref64, same, atol=_atol(ref64, dtype))
    assert torch.equal(y, y2)


def test_native_kernel_failure_falls_back_with_a_warning(monkeypatch):
    # a native kernel that fails to compile or load (here: a stub that raises) makes the entry
    # run the Triton stand-in, warns once, and marks the device so it is not offered again
    from qkern import _native

    dev = kernel_device()
    packed, state, w64 = _weight(24, 128, seed=6, device=dev)
    monkeypatch.setattr(_native, "available", lambda device=None: True)
    monkeypatch.setattr(qlora, "_NATIVE_BROKEN", set())

    def broken(*args, **kwargs):
        raise RuntimeError("NVRTC failed to compile (stub)")

    monkeypatch.setattr(_native, "kernel", broken)
    cfg = next(c for c in qlora._NF4_MM_CONFIGS if c["DOT"] == 4)
    monkeypatch.setattr(qlora, "NF4_MATMUL_CONFIG", cfg)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6)).to(torch.float16).to(dev)
    assert qlora._native_supported(3, 128, state, torch.float16, torch.device(dev))
    with qkern.backend("triton"), pytest.warns(RuntimeWarning, match="native small-M kernel"):
        y = nf4_matmul(x, packed, state)
        entry = qlora._mm_lookup(x, packed, state, None)
    assert entry.config == qlora._NATIVE_STANDIN and entry.compiled is not None
    assert not qlora._native_supported(3, 128, state, torch.float16, torch.device(dev))
    same = (x.cpu().float() @ w64.float().t().to(torch.float16).float()).to(torch.float16)
    assert_close_rule(y, x.double().cpu() @ w64.t(), same, atol=1e-2)


@pytest.mark.gpu
def test_gpu_native_first_use_inside_graph_capture_takes_the_stand_in(monkeypatch):
    # a native variant not loaded yet (M = 9: two MMA column tiles) met for the first time
    # inside a CUDA-graph capture: loading a module there would break the capture, so the
    # entry runs the Triton stand-in (compiled beforehand here, as a warm-up would); the
    # captured graph replays correctly
    from qkern import _native

    if not _native.available("cuda"):
        pytest.skip("native kernels unavailable")
    packed, state, w64 = _weight(1000, 1024, seed=8, device="cuda", scale=0.02)
    x = torch.randn(9, 1024, device="cuda", dtype=torch.float16)
    monkeypatch.setattr(qlora, "NF4_MATMUL_CONFIG", qlora._NATIVE_STANDIN)
    nf4_matmul(x, packed, state)  # compiles the stand-in and builds the pair table
    monkeypatch.setattr(qlora, "_MM_CACHE", {})
    monkeypatch.setattr(_native, "_KERNELS", {})  # no native variant loaded
    cfg = next(c for c in qlora._NF4_MM_CONFIGS if c["DOT"] == 4)
    monkeypatch.setattr(qlora, "NF4_MATMUL_CONFIG", cfg)
    out = torch.empty(9, 1000, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nf4_matmul(x, packed, state, out=out)
    assert qlora._mm_lookup(x, packed, state, None).config == qlora._NATIVE_STANDIN
    x.copy_(torch.randn(9, 1024, device="cuda", dtype=torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    same = x @ dequantize_4bit(packed, state, dtype=torch.float16).t()
    assert_close_rule(out, x.double() @ w64.cuda().t(), same, atol=1e-2)


@pytest.mark.gpu
def test_gpu_native_small_m_kernel_misaligned_x_and_graph_capture(monkeypatch):
    # x at an odd element offset (the launcher copies it to an aligned buffer) and a CUDA-graph
    # capture of the native launch (it runs on the current stream) replayed with new x
    from qkern import _native

    if not _native.available("cuda"):
        pytest.skip("native kernels unavailable")
    cfg = next(c for c in qlora._NF4_MM_CONFIGS if c["DOT"] == 4 and c["PER_SM"])
    monkeypatch.setattr(qlora, "NF4_MATMUL_CONFIG", cfg)
    packed, state, w64 = _weight(4096, 4096, seed=3, device="cuda", scale=0.02)
    base = torch.randn(4 * 4096 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(4, 4096)
    assert x.data_ptr() % 16
    y = nf4_matmul(x, packed, state)
    assert qlora._mm_lookup(x, packed, state, None).compiled is None
    same = x @ dequantize_4bit(packed, state, dtype=torch.bfloat16).t()
    assert_close_rule(y, x.double() @ w64.cuda().t(), same, atol=1e-2)
    xs = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(4, 4096, device="cuda", dtype=torch.bfloat16)
    nf4_matmul(xs, packed, state, out=out)  # the entry exists before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nf4_matmul(xs, packed, state, out=out)
    xs.copy_(torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, nf4_matmul(xs, packed, state))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_nf4_matmul_dequantizes_exactly(monkeypatch, dtype):
    n, k = 4096, 4096
    packed, state, _ = _weight(n, k, seed=1, device="cuda", scale=0.02)
    cols = torch.tensor([0, 1, 63, 64, 1000, 2047, 4032, 4095])
    _check_one_hot(monkeypatch, packed, state, dtype, cols, (1, 8))


@pytest.mark.gpu
def test_gpu_module_cuda_moves_state():
    m = QLoRALinear.from_linear(torch.nn.Linear(256, 128))
    m.add_adapter(8, 16)
    m.cuda()
    st_ = m.quant_state
    for t in (m.packed, st_.absmax, st_.code, st_.nested_absmax, st_.nested_code, m.lora_A):
        assert t.is_cuda
    x = torch.randn(4, 7, 256, device="cuda", dtype=torch.bfloat16)
    y = m(x)
    ref = x.float() @ m.merged_weight().t() + m.bias.float()
    assert rel_err(y, ref) < 1e-2
    m.cpu()
    assert m.quant_state.absmax.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64])
def test_gpu_nf4_matmul_matches_bitsandbytes(m):
    # the same packed bytes through bitsandbytes' matmul_4bit and ours
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from qkern.nf4 import QuantState

    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, bnb_state = bnbf.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=True
    )
    tensors = {f"w.{k}": v for k, v in bnb_state.as_dict(packed=True).items()}
    state = QuantState.from_bnb_dict(tensors, "w")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    y = nf4_matmul(x, packed, state)
    with torch.no_grad():
        y_bnb = bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state)
    w_deq = bnbf.dequantize_4bit(packed, bnb_state).double()
    ref64 = x.double() @ w_deq.t()
    assert_close_rule(y, ref64, y_bnb, atol=_atol(ref64, torch.bfloat16))


def test_composed_dropout_path_matches_fused_kernels():
    """The path CUDA tensors take with dropout (seeded mask applied in PyTorch around the frozen
    NF4 linear) computes what the fused dropout kernels compute, values and all gradients."""
    dev = kernel_device()
    torch.manual_seed(3)
    packed, state = quantize_4bit((torch.randn(48, 96) * 0.02).to(dev))
    x = torch.randn(37, 96, device=dev, requires_grad=True)
    a = torch.randn(4, 96, device=dev, requires_grad=True)
    b = torch.randn(48, 4, device=dev, requires_grad=True)
    with qkern.backend("triton"):
        fused = qlora._QLoRALinearFunction.apply(x, packed, state, a, b, 2.0, None, 0.3, 11, False)
        composed = qlora._qlora_linear_masked(x, packed, state, a, b, 2.0, None, 0.3, 11)
    gy = torch.randn_like(fused)
    for name, g1, g2 in zip(
        ("dX", "dA", "dB"),
        torch.autograd.grad(fused, (x, a, b), gy),
        torch.autograd.grad(composed, (x, a, b), gy),
    ):
        assert rel_err(g1, g2) < 1e-5, name
    assert rel_err(fused, composed) < 1e-5
