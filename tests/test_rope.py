"""RoPE: frequencies vs the formulas (and HF), kernel vs float64 reference, gradients, layout."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkern
from qkern._backend import interpreter_enabled
from qkern.rope import _rope_launch, apply_rope, apply_rope_ref, rope_cos_sin, rope_inv_freq
from tests.helpers import assert_close_rule, kernel_device, poisoned
from tests.test_rms_norm import count_jit_runs, direct_launch_counts

rope_mod = importlib.import_module("qkern.rope")  # the package exports a function of that name

DEV = kernel_device()
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# ----------------------------------------------------------------------------------------------
# frequencies
# ----------------------------------------------------------------------------------------------


def _llama3_formula(head_dim, base, factor, low, high, old_len):
    """Element by element, in float64, straight from the Llama 3.1 frequency-scaling recipe."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / base ** (i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim,base", [(128, 500000.0), (64, 10000.0), (96, 1e6)])
def test_inv_freq_formulas(head_dim, base):
    plain = torch.tensor(
        [1.0 / base ** (i / head_dim) for i in range(0, head_dim, 2)], dtype=torch.float64
    )
    got = rope_inv_freq(head_dim, base)
    assert got.dtype == torch.float32 and got.shape == (head_dim // 2,)
    torch.testing.assert_close(got.double(), plain, rtol=1e-6, atol=0)
    for spec in ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}):
        torch.testing.assert_close(
            rope_inv_freq(head_dim, base, spec).double(), plain / 4, rtol=1e-6, atol=0
        )
    want = _llama3_formula(head_dim, base, 8.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(
        rope_inv_freq(head_dim, base, LLAMA3).double(), want, rtol=1e-5, atol=0
    )
    assert torch.equal(rope_inv_freq(head_dim, base, {"rope_type": "default"}), got)


def test_llama3_touches_all_three_bands():
    f = rope_inv_freq(128, 500000.0, LLAMA3)
    plain = rope_inv_freq(128, 500000.0)
    ratio = (plain / f).tolist()
    assert ratio[0] == 1.0 and abs(ratio[-1] - 8.0) < 1e-5
    assert any(1.0 < r < 8.0 - 1e-3 for r in ratio)  # the blended middle band


def test_inv_freq_equals_transformers():
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    cases = [
        (
            500000.0,
            {"rope_type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}},
        ),
        (10000.0, {"rope_type": "linear", "factor": 2.0}),
        (10000.0, {"rope_type": "default"}),
    ]
    for base, params in cases:
        cfg = LlamaConfig(
            hidden_size=4096,
            num_attention_heads=32,
            max_position_embeddings=131072,
            rope_parameters={"rope_theta": base, **params},
        )
        init = rope_utils.ROPE_INIT_FUNCTIONS.get(params["rope_type"])
        if init is None:  # "default" lives in the model's rotary module
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

            want = LlamaRotaryEmbedding(cfg).inv_freq
        else:
            want, _ = init(cfg, "cpu")
        assert torch.equal(rope_inv_freq(128, base, params), want), params


def test_inv_freq_bad_inputs():
    with pytest.raises(ValueError, match="supported: default, linear, llama3"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="needs the key 'low_freq_factor'"):
        rope_inv_freq(64, 10000.0, {"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="head_dim"):
        rope_inv_freq(7)
    with pytest.raises(TypeError, match="scaling"):
        rope_inv_freq(64, 10000.0, "llama3")


def test_cos_sin_positions_restart_for_packed_sequences():
    inv = rope_inv_freq(32)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11]])
    cos, sin = rope_cos_sin(pos, inv)
    assert cos.shape == (2, 7, 16) and cos.dtype == torch.float32
    assert torch.equal(cos[0, 4:7], cos[0, 0:3]) and torch.equal(sin[0, 4:7], sin[0, 0:3])
    ang = pos.double()[..., None] * inv.double()
    torch.testing.assert_close(cos.double(), ang.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.double(), ang.sin(), atol=1e-5, rtol=0)
    # same angles as HF's fp32 outer product
    freqs = inv[None, :, None] @ pos[:, None, :].float()
    assert torch.equal(cos, freqs.transpose(1, 2).cos())


# ----------------------------------------------------------------------------------------------
# apply_rope
# ----------------------------------------------------------------------------------------------


def _qk(b, s, hq, hk, d, dtype, seed, cos_2d=False, packed=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64).to(DEV, dtype)
    k = torch.randn(b, s, hk, d, generator=g, dtype=torch.float64).to(DEV, dtype)
    if cos_2d:
        pos = torch.arange(s)
    elif packed:
        pos = torch.cat([torch.arange(s // 2), torch.arange(s - s // 2)]).expand(b, s)
    else:
        pos = torch.randint(0, 4096, (b, s), generator=g)
    cos, sin = rope_cos_sin(pos.to(DEV), rope_inv_freq(d, 10000.0).to(DEV))
    return q, k, cos, sin


def _fwd_bwd(q, k, cos, sin, dq, dk, fn):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    qo, ko = fn(q * 1, k * 1, cos, sin)  # non-leaf inputs so in-place variants are allowed
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    return qo, ko, gq, gk


def _check(q, k, cos, sin, inplace=False, seed=0):
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed + 1)
    dq = torch.randn(q.shape, generator=g).to(DEV, dtype)
    dk = torch.randn(k.shape, generator=g).to(DEV, dtype)
    with qkern.backend("triton"):
        got = _fwd_bwd(q, k, cos, sin, dq, dk, lambda *a: apply_rope(*a, inplace=inplace))
    same = _fwd_bwd(q, k, cos, sin, dq, dk, apply_rope_ref)
    want = _fwd_bwd(
        q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double(), apply_rope_ref
    )
    for name, a, s_, w in zip(("q", "k", "dq", "dk"), got, same, want):
        assert a.dtype == dtype
        assert_close_rule(a, w, s_, atol=ATOL[dtype], name=name)


@given(
    b=st.integers(1, 2),
    s=st.integers(1, 6),
    hq=st.sampled_from([1, 3, 4, 6]),
    hk=st.sampled_from([1, 2, 3]),
    d=st.sampled_from([2, 6, 16, 24, 64]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    cos_2d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_apply_rope_matches_fp64_reference(b, s, hq, hk, d, dtype, cos_2d, seed):
    q, k, cos, sin = _qk(b, s, hq, hk, d, dtype, seed, cos_2d=cos_2d)
    _check(q, k, cos, sin, seed=seed)


def test_packed_positions_and_batch_one_cos():
    q, k, cos, sin = _qk(2, 8, 4, 2, 32, torch.float32, 3, packed=True)
    _check(q, k, cos, sin)
    _check(q, k, cos[:1], sin[:1])  # (1, S, D/2) broadcasts over the batch


def test_inplace_writes_into_q_and_k():
    q, k, cos, sin = _qk(2, 5, 4, 2, 16, torch.float32, 4)
    _check(q, k, cos, sin, inplace=True)
    q2, k2 = q.clone(), k.clone()
    with qkern.backend("triton"):
        qo, ko = apply_rope(q2, k2, cos, sin, inplace=True)
    assert qo is q2 and ko is k2
    qr, kr = apply_rope_ref(q.double(), k.double(), cos.double(), sin.double())
    assert_close_rule(qo, qr, atol=1e-5)
    assert_close_rule(ko, kr, atol=1e-5)


def test_inference_call_builds_no_graph():
    q, k, cos, sin = _qk(2, 5, 4, 2, 16, torch.float32, 15)
    with qkern.backend("triton"):
        qg, kg = apply_rope(q.clone().requires_grad_(), k, cos, sin)
        qo, ko = apply_rope(q, k, cos, sin)
        with torch.no_grad():
            qn, kn = apply_rope(q.clone().requires_grad_(), k, cos, sin)
    assert qo.grad_fn is None and qn.grad_fn is None and qg.grad_fn is not None
    for a, b in ((qo, qg.detach()), (ko, kg.detach()), (qn, qo), (kn, ko)):
        assert torch.equal(a, b)


def test_cos_and_sin_with_different_strides():
    # one stride pair is passed for both tables: tables laid out differently are made contiguous
    q, k, cos, sin = _qk(2, 5, 4, 2, 16, torch.float32, 12)
    sin_wide = torch.zeros(*sin.shape[:-1], 3 * sin.shape[-1], device=DEV)
    sin_wide[..., : sin.shape[-1]] = sin
    sin_view = sin_wide[..., : sin.shape[-1]]
    assert sin_view.stride() != cos.stride()
    _check(q, k, cos, sin_view)
    _check(q, k, cos[0], sin_view[0])  # 2-D tables


def test_views_of_fused_qkv_projection():
    b, s, hq, hk, d = 2, 6, 4, 2, 16
    q0, k0, cos, sin = _qk(b, s, hq, hk, d, torch.float32, 5)
    qkv = torch.cat([q0.flatten(2), k0.flatten(2), torch.zeros(b, s, hk * d, device=DEV)], -1)
    q = qkv[..., : hq * d].unflatten(-1, (hq, d))
    k = qkv[..., hq * d : (hq + hk) * d].unflatten(-1, (hk, d))
    assert not q.is_contiguous()
    _check(q, k, cos, sin)


def test_gradcheck_triton_fp64():
    q, k, cos, sin = _qk(1, 3, 2, 1, 4, torch.float64, 6)
    q.requires_grad_()
    k.requires_grad_()
    with qkern.backend("triton"):
        assert torch.autograd.gradcheck(
            lambda a, b_: apply_rope(a, b_, cos.double(), sin.double()), (q, k), fast_mode=True
        )


def test_kernel_writes_every_element():
    q, k, cos, sin = _qk(2, 3, 3, 2, 10, torch.float32, 7)
    qo, ko = poisoned(q.shape, q.dtype, DEV), poisoned(k.shape, k.dtype, DEV)
    for backward in (False, True):
        _rope_launch(q, k, cos, sin, qo, ko, backward=backward)
        assert not qo.isnan().any() and not ko.isnan().any()
    # backward rotation undoes the forward one
    q1, k1 = torch.empty_like(q), torch.empty_like(k)
    _rope_launch(q, k, cos, sin, q1, k1, backward=False)
    _rope_launch(q1, k1, cos, sin, qo, ko, backward=True)
    torch.testing.assert_close(qo, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, k, atol=1e-5, rtol=1e-5)


def test_reference_is_hf_apply_rotary_pos_emb_bitwise():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k, cos, sin = _qk(2, 5, 4, 2, 16, torch.bfloat16, 8)
    cos_hf = torch.cat((cos, cos), -1).to(torch.bfloat16)
    sin_hf = torch.cat((sin, sin), -1).to(torch.bfloat16)
    want_q, want_k = llama.apply_rotary_pos_emb(q, k, cos_hf, sin_hf, unsqueeze_dim=2)
    with qkern.backend("reference"):
        got_q, got_k = apply_rope(q.cpu(), k.cpu(), cos.cpu(), sin.cpu())
    assert torch.equal(got_q, want_q.cpu()) and torch.equal(got_k, want_k.cpu())


def test_bad_inputs():
    q, k, cos, sin = _qk(2, 4, 4, 2, 8, torch.float32, 9)
    with pytest.raises(ValueError, match="head_dim must be even"):
        c, s_ = rope_cos_sin(torch.arange(4), torch.ones(3))
        apply_rope(q[..., :7], k[..., :7], c, s_)
    with pytest.raises(ValueError, match="must match q"):
        apply_rope(q, k[:1], cos, sin)
    with pytest.raises(ValueError, match="must match q"):
        apply_rope(q, k[:, :3], cos, sin)
    with pytest.raises(ValueError, match="cos/sin must have shape"):
        apply_rope(q, k, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
    with pytest.raises(ValueError, match="one shape"):
        apply_rope(q, k, cos, sin[:1])
    with pytest.raises(ValueError, match="4-D"):
        apply_rope(q[0], k[0], cos[0], sin[0])
    with pytest.raises(TypeError, match="one dtype"):
        apply_rope(q, k.half(), cos, sin)
    with pytest.raises(TypeError, match="q must have dtype"):
        apply_rope(q.to(torch.int32), k, cos, sin)
    for scalar in (torch.tensor(1.0), torch.ones(8)):  # 0-D / 1-D tables: a named error
        with pytest.raises(ValueError, match="cos/sin must have shape"):
            apply_rope(q, k, scalar.to(DEV), scalar.to(DEV))


@pytest.mark.skipif(not interpreter_enabled(), reason="simulates the GPU launch path on CPU")
def test_repeated_call_launches_directly(monkeypatch):
    q, k, cos, sin = _qk(2, 3, 4, 2, 8, torch.float32, 13)
    q.requires_grad_()
    k.requires_grad_()

    def step():
        with qkern.backend("triton"):
            qo, ko = apply_rope(q, k, cos, sin)
        torch.autograd.grad((qo, ko), (q, k), (torch.ones_like(qo), torch.ones_like(ko)))

    counts, log = direct_launch_counts(monkeypatch, rope_mod, [rope_mod._rope_kernel], [], step)
    assert counts == {"jit": 0, "tuner": 0}
    assert len(log) == 2  # forward and backward, one launch each


@pytest.mark.gpu
def test_repeated_call_launches_directly_gpu(monkeypatch):
    q, k, cos, sin = _qk(2, 300, 32, 8, 128, torch.bfloat16, 14)
    for _ in range(2):  # JIT run (caches the compiled kernel), then a direct launch
        _check(q, k, cos, sin)
    step = lambda: _check(q, k, cos, sin)  # noqa: E731
    assert count_jit_runs(monkeypatch, [rope_mod._rope_kernel], [], step) == {"jit": 0, "tuner": 0}


@pytest.mark.gpu
def test_sequence_lengths_past_the_launch_cache_bound_gpu(monkeypatch):
    # the launch cache holds S and the batch strides by value and is emptied past its bound
    monkeypatch.setattr(rope_mod, "_MAX_COMPILED", 2)
    for s in (5, 17, 64, 5, 300, 17):
        _check(*_qk(2, s, 8, 2, 64, torch.bfloat16, s))


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (28, 4, 128), (16, 16, 64), (8, 2, 96)])
def test_apply_rope_bf16_gpu(hq, hk, d):
    q, k, cos, sin = _qk(2, 257, hq, hk, d, torch.bfloat16, hq, packed=True)
    _check(q, k, cos, sin)
    _check(q, k, cos, sin, inplace=True)


@pytest.mark.gpu
def test_apply_rope_matches_liger_gpu():
    liger = pytest.importorskip("liger_kernel.transformers.rope")
    q, k, cos, sin = _qk(2, 128, 32, 8, 128, torch.bfloat16, 11)
    cos_hf = torch.cat((cos, cos), -1).to(torch.bfloat16)
    sin_hf = torch.cat((sin, sin), -1).to(torch.bfloat16)
    # liger takes (B, H, S, D)
    lq, lk = liger.liger_rotary_pos_emb(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), cos_hf, sin_hf
    )
    want = apply_rope_ref(q.double(), k.double(), cos.double(), sin.double())
    got = apply_rope(q, k, cos, sin)
    assert_close_rule(got[0], want[0], lq.transpose(1, 2), atol=1e-2)
    assert_close_rule(got[1], want[1], lk.transpose(1, 2), atol=1e-2)
