"""Rotary position embedding (RoPE), HuggingFace's ``rotate_half`` layout, q and k in one launch.

For a head vector x of even size D split into halves x1 = x[:D/2], x2 = x[D/2:], and angles
theta_i = pos * inv_freq_i (i < D/2):

    out[:D/2] = x1 * cos(theta) - x2 * sin(theta)
    out[D/2:] = x2 * cos(theta) + x1 * sin(theta)

which is HF's ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)``. The backward is the rotation
by -theta (the same kernel with sin negated), since the rotation is orthogonal.

Frequencies: :func:`rope_inv_freq` computes ``inv_freq`` exactly as HF transformers does (float32,
same operation order) for no scaling, ``linear`` and ``llama3`` scaling. :func:`rope_cos_sin`
computes angles in float32 as ``position_ids.float() * inv_freq`` (HF's outer product) and returns
float32 cos and sin of shape ``position_ids.shape + (D/2,)``; position ids are arbitrary, so packed
sequences can restart at 0.

Numerics of :func:`apply_rope`: HF casts cos/sin to the activation dtype and rounds each product
and the sum to that dtype. The kernel loads cos/sin in float32, computes in float32 and rounds
once, which is at least as accurate. The reference :func:`apply_rope_ref` (the CPU path) follows
HF exactly: cos/sin cast to the activation dtype first.

Layout: q (B, S, Hq, D) and k (B, S, Hk, D) with Hq != Hk allowed (GQA); any strides over B, S
and heads with a unit stride along D (views of a fused qkv projection work without a copy);
cos/sin (B, S, D/2), (1, S, D/2) or (S, D/2). ``inplace=True`` writes the result into q and k
(saves two activation-sized buffers; the backward needs only cos/sin, so this is safe for
autograd). No gradient flows to cos/sin. Head dims: any even D up to 1024. Dtypes: float16,
bfloat16, float32, float64 (float64 computes in float64). Partial rotary (rotating fewer than D
dims) is not supported.

Memory traffic per call: read q, k, write q', k', plus cos/sin (2 * B*S*D/2 * 4 B, about 1/Hq of q
in bf16 for Hq=32); one program per token loads its cos/sin row once for all heads of q and k.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qkern._backend import check_float, check_same_device, get_backend, next_power_of_2
from qkern._backend import use_triton as _use_triton
from qkern.nf4 import _launch
from qkern.rms_norm import _align_bits

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# ----------------------------------------------------------------------------------------------
# frequencies
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(
    head_dim: int, base: float = 10000.0, scaling: dict | None = None
) -> torch.Tensor:
    """Inverse frequencies (float32, shape (head_dim // 2,)) as HF transformers computes them.

    ``inv_freq_i = 1 / base ** (2i / head_dim)``, then per ``scaling["rope_type"]`` (alias
    ``"type"``):

    * ``None`` / ``"default"``: unchanged;
    * ``"linear"``: divided by ``factor`` (positions interpolated by ``factor``);
    * ``"llama3"``: with wavelength ``w_i = 2*pi / inv_freq_i`` and
      L = original_max_position_embeddings, low-frequency wavelengths ``w > L / low_freq_factor``
      are divided by ``factor``;
      high-frequency ones ``w < L / high_freq_factor`` are kept; in between they are blended with
      ``s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)`` as
      ``(1 - s) * inv_freq / factor + s * inv_freq``.
    """
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even integer >= 2, got {head_dim!r}")
    if not base > 0:
        raise ValueError(f"base must be > 0, got {base!r}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponent)
    if scaling is None:
        return inv_freq
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling must be a dict or None, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq

    def param(key: str) -> float:
        if key not in scaling:
            raise ValueError(f"rope scaling {rope_type!r} needs the key {key!r}")
        return scaling[key]

    if rope_type == "linear":
        factor = param("factor")
        return inv_freq / factor
    if rope_type == "llama3":
        factor = param("factor")
        low_freq_factor = param("low_freq_factor")
        high_freq_factor = param("high_freq_factor")
        old_context_len = param("original_max_position_embeddings")
        if high_freq_factor == low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor != low_freq_factor")
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(
        f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) of ``position_ids.float()[..., None] * inv_freq``.

    Shapes: position_ids (...) integer or float, inv_freq (D/2,); outputs (..., D/2) on
    position_ids' device.
    """
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1:
        raise ValueError("inv_freq must be a 1-D tensor of shape (head_dim // 2,)")
    if position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be integer or float, got {position_ids.dtype}")
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq.to(
        device=position_ids.device, dtype=torch.float32
    )
    return freqs.cos(), freqs.sin()


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _head_ptrs(PTR, b, s, H, stride_b, stride_s, stride_h, d, dmask, BLOCK_H: tl.constexpr):
    """Pointers to the first half (x1) of every head of token (b, s), and the (heads, D/2) mask."""
    h = tl.arange(0, BLOCK_H)
    mask = (h < H)[:, None] & dmask[None, :]
    return PTR + b * stride_b + s * stride_s + h[:, None] * stride_h + d[None, :], mask


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    S,
    HQ,
    HK,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_qob,
    stride_qos,
    stride_qoh,
    stride_kob,
    stride_kos,
    stride_koh,
    stride_cb,
    stride_cs,
    ACC: tl.constexpr,
    BACKWARD: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    """One program per token (b, s): loads cos/sin[b, s, :] once and rotates every head of q and
    of k, out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin (BACKWARD: by -theta, sin negated).
    Arithmetic in ACC, one rounding per output.

    All four input tiles (q and k, both halves: (Hq + Hk) * D elements, 10 KiB at 32 + 8 heads of
    128 in bf16) are loaded before any is rotated and stored, so a program has its whole token in
    flight at once. Each half-row is D/2 contiguous elements, so loads and stores are 16-byte
    vectors along D."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    q_src, q_mask = _head_ptrs(Q, b, s, HQ, stride_qb, stride_qs, stride_qh, d, dmask, BLOCK_HQ)
    k_src, k_mask = _head_ptrs(K, b, s, HK, stride_kb, stride_ks, stride_kh, d, dmask, BLOCK_HK)
    q1 = tl.load(q_src, mask=q_mask, other=0.0)
    q2 = tl.load(q_src + HALF, mask=q_mask, other=0.0)
    k1 = tl.load(k_src, mask=k_mask, other=0.0)
    k2 = tl.load(k_src + HALF, mask=k_mask, other=0.0)
    cos = tl.load(COS + b * stride_cb + s * stride_cs + d, mask=dmask, other=0.0).to(ACC)[None, :]
    sin = tl.load(SIN + b * stride_cb + s * stride_cs + d, mask=dmask, other=0.0).to(ACC)[None, :]
    if BACKWARD:
        sin = -sin
    q_dst, _ = _head_ptrs(QO, b, s, HQ, stride_qob, stride_qos, stride_qoh, d, dmask, BLOCK_HQ)
    k_dst, _ = _head_ptrs(KO, b, s, HK, stride_kob, stride_kos, stride_koh, d, dmask, BLOCK_HK)
    q1 = q1.to(ACC)
    q2 = q2.to(ACC)
    tl.store(q_dst, (q1 * cos - q2 * sin).to(QO.dtype.element_ty), mask=q_mask)
    tl.store(q_dst + HALF, (q2 * cos + q1 * sin).to(QO.dtype.element_ty), mask=q_mask)
    k1 = k1.to(ACC)
    k2 = k2.to(ACC)
    tl.store(k_dst, (k1 * cos - k2 * sin).to(KO.dtype.element_ty), mask=k_mask)
    tl.store(k_dst + HALF, (k2 * cos + k1 * sin).to(KO.dtype.element_ty), mask=k_mask)


def _cos_sin_args(
    cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """cos/sin with unit last stride and the (batch, seq) strides both are read with; a batch of 1
    or a 2-D (S, D/2) table broadcasts over the batch (batch stride 0)."""
    cst = cos.stride()
    if cst[-1] == 1 and sin.stride() == cst:  # the usual case: one layout, unit last stride
        if len(cst) == 2:
            return cos, sin, 0, cst[0]
        return cos, sin, (0 if cos.shape[0] == 1 else cst[0]), cst[1]
    if cst[-1] != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    cst, sst = cos.stride(), sin.stride()
    if cos.dim() == 2:
        cb, cs, sb, ss = 0, cst[0], 0, sst[0]
    else:
        one = cos.shape[0] == 1
        cb, cs, sb, ss = (0 if one else cst[0]), cst[1], (0 if one else sst[0]), sst[1]
    if (cb, cs) != (sb, ss):  # one stride pair is passed for both tables
        cos, sin = cos.contiguous(), sin.contiguous()
        return _cos_sin_args(cos, sin)
    return cos, sin, cb, cs


# Host time per call: the kernel is launched directly through qkern.nf4._launch (the compiled
# kernel cached per device and specialization, no JIT dispatch), with its compile-time arguments
# from a plan cached per (Hq, Hk, D, dtypes, direction). The launch key holds the 23 runtime
# arguments' ints by value (cheaper than deriving what Triton specializes them on; the batch
# strides and S move with the sequence length, so the cache is emptied when it grows past
# _MAX_COMPILED entries and refills through one JIT dispatch per shape) and the pointers' 16-byte
# alignment.
_COMPILED: dict = {}  # nf4._launch's cache: (device, launch key) -> compiled kernel
_MAX_COMPILED = 1024
_PLANS: dict = {}  # plan key -> compile-time arguments


def _plan(pk: tuple) -> dict:
    """Block sizes and num_warps for (Hq, Hk, D): a program moves its token's q and k, (Hq + Hk)
    * D elements in and out; 4 warps give each thread 40 of the 5120 elements of 32 + 8 heads of
    128, 8 warps above 8192 elements. Fixed rather than tuned (the choice comes from the shape
    alone, so no autotuner runs on any call)."""
    hq, hk, d, dtype, backward = pk[:5]
    half = d // 2
    _PLANS[pk] = meta = {
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
        "BACKWARD": backward,
        "HALF": half,
        "BLOCK_HALF": next_power_of_2(half),
        "BLOCK_HQ": next_power_of_2(hq),
        "BLOCK_HK": next_power_of_2(hk),
        "num_warps": 4 if (hq + hk) * d <= 8192 else 8,
    }
    return meta


def _launch_rope(q, qs, k, ks, qo, ko, cos, sin, scb: int, scs: int, backward: bool) -> None:
    """One launch, one program per token; ``qs``/``ks`` are q's and k's strides."""
    bsz, seq, hq, d = q.shape
    if bsz * seq == 0:
        return
    hk = k.shape[2]
    pk = (hq, hk, d, q.dtype, backward, k.dtype, qo.dtype, ko.dtype, cos.dtype, sin.dtype)
    meta = _PLANS.get(pk) or _plan(pk)
    qos, kos = qo.stride(), ko.stride()
    al = _align_bits(
        q.data_ptr(), k.data_ptr(), qo.data_ptr(), ko.data_ptr(), cos.data_ptr(), sin.data_ptr()
    )
    if len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.clear()
    _launch(
        _rope_kernel,
        (bsz * seq, 1, 1),
        (
            q, k, qo, ko, cos, sin, seq, hq, hk,
            qs[0], qs[1], qs[2], ks[0], ks[1], ks[2],
            qos[0], qos[1], qos[2], kos[0], kos[1], kos[2],
            scb, scs,
        ),
        meta,
        _COMPILED,
        (pk, seq, qs, ks, qos, kos, scb, scs, al),
    )  # fmt: skip


def _rope_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    qo: torch.Tensor,
    ko: torch.Tensor,
    backward: bool,
) -> None:
    """Rotate q, k (B, S, H, D), unit stride along D, by theta (``backward``: by -theta) into
    qo, ko."""
    cos, sin, scb, scs = _cos_sin_args(cos, sin)
    _launch_rope(q, q.stride(), k, k.stride(), qo, ko, cos, sin, scb, scs, backward)


def _forward(q, k, cos, sin, inplace: bool):
    """(q', k', cos, sin, (batch, seq) strides of cos/sin): q' and k' are q and k themselves
    when ``inplace`` and both have unit stride along D."""
    qs, ks = q.stride(), k.stride()
    q_in, k_in = q, k
    if qs[3] != 1:
        q_in = q.contiguous()
        qs = q_in.stride()
    if ks[3] != 1:
        k_in = k.contiguous()
        ks = k_in.stride()
    if inplace and q_in is q and k_in is k:
        qo, ko = q, k
    else:
        qo, ko = torch.empty_like(q_in), torch.empty_like(k_in)
    cos, sin, scb, scs = _cos_sin_args(cos, sin)
    _launch_rope(q_in, qs, k_in, ks, qo, ko, cos, sin, scb, scs, False)
    return qo, ko, cos, sin, (scb, scs)


class RoPEFunction(torch.autograd.Function):
    """Rotates q and k in one launch; backward rotates dq', dk' by -theta in one launch.
    Saves only cos and sin. The host work per call is the launch plus the output allocations."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, inplace: bool):
        qo, ko, cos, sin, cos_strides = _forward(q, k, cos, sin, inplace)
        if qo is q:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.cos_strides = cos_strides
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin = ctx.saved_tensors
        qs, ks = dqo.stride(), dko.stride()
        if qs[3] != 1:
            dqo = dqo.contiguous()
            qs = dqo.stride()
        if ks[3] != 1:
            dko = dko.contiguous()
            ks = dko.stride()
        dq, dk = torch.empty_like(dqo), torch.empty_like(dko)
        _launch_rope(dqo, qs, dko, ks, dq, dk, cos, sin, *ctx.cos_strides, True)
        return dq, dk, None, None, None


# ----------------------------------------------------------------------------------------------
# reference and public API
# ----------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style RoPE: cos/sin (B,S,D/2) or (S,D/2) duplicated to D, cast to the activation dtype,
    then ``x * cos + rotate_half(x) * sin`` in that dtype (differentiable)."""

    def expand(c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        c = torch.cat((c, c), dim=-1).to(dtype)
        return c.unsqueeze(-2)  # broadcast over heads: (..., S, 1, D)

    cq, sq = expand(cos, q.dtype), expand(sin, q.dtype)
    ck, sk = expand(cos, k.dtype), expand(sin, k.dtype)
    return q * cq + _rotate_half(q) * sq, k * ck + _rotate_half(k) * sk


def _valid(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the inputs pass every check of :func:`_check`: one expression over the shapes
    and dtypes, so valid calls (all of them, in a model) skip the checks with their messages."""
    qsh, ksh, csh = q.shape, k.shape, cos.shape
    dt = q.dtype
    return (
        dt in _DTYPES
        and k.dtype == dt
        and cos.dtype in _DTYPES
        and sin.dtype in _DTYPES
        and len(qsh) == 4
        and len(ksh) == 4
        and ksh[0] == qsh[0]
        and ksh[1] == qsh[1]
        and ksh[3] == qsh[3]
        and qsh[3] % 2 == 0
        and qsh[3] <= 1024
        and sin.shape == csh
        and len(csh) in (2, 3)
        and csh[-1] * 2 == qsh[3]
        and (
            (len(csh) == 2 and csh[0] == qsh[1])
            or (len(csh) == 3 and csh[1] == qsh[1] and (csh[0] == 1 or csh[0] == qsh[0]))
        )
        and k.device == q.device
        and cos.device == q.device
        and sin.device == q.device
    )


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_float(q, "q", _DTYPES)
    check_float(k, "k", _DTYPES)
    check_float(cos, "cos", _DTYPES)
    check_float(sin, "sin", _DTYPES)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D (batch, seq, heads, head_dim), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    bsz, seq, _, d = q.shape
    if k.shape[0] != bsz or k.shape[1] != seq or k.shape[3] != d:
        raise ValueError(
            f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head_dim"
        )
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}")
    if d > 1024:
        raise ValueError(f"head_dim must be at most 1024, got {d}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    ok = (cos.dim() == 2 and tuple(cos.shape) == (seq, d // 2)) or (
        cos.dim() == 3 and cos.shape[0] in (1, bsz) and tuple(cos.shape[1:]) == (seq, d // 2)
    )
    if not ok:
        raise ValueError(
            f"cos/sin must have shape ({bsz}, {seq}, {d // 2}) or ({seq}, {d // 2}) for q "
            f"{tuple(q.shape)} (half the head dim, as rope_cos_sin returns), got {tuple(cos.shape)}"
        )
    check_same_device(q=q, k=k, cos=cos, sin=sin)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B,S,Hq,D) and k (B,S,Hk,D) by the angles whose cos/sin are given.

    ``inplace=True`` lets the op write the result into q and k and return them: the Triton path
    does so whenever q and k have unit stride along D; the reference path only outside autograd.
    Always use the returned tensors. Gradients flow to q and k, not to cos/sin.
    """
    if not (
        isinstance(q, torch.Tensor)
        and isinstance(k, torch.Tensor)
        and isinstance(cos, torch.Tensor)
        and isinstance(sin, torch.Tensor)
        and _valid(q, k, cos, sin)
    ):
        _check(q, k, cos, sin)
    # use_triton's answer without its call for the common case (CUDA tensors, backend "auto")
    if not (
        q.is_cuda and k.is_cuda and cos.is_cuda and sin.is_cuda and get_backend() == "auto"
    ) and not _use_triton(q, k, cos, sin):
        qo, ko = apply_rope_ref(q, k, cos, sin)
        if inplace and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
            q.copy_(qo)
            k.copy_(ko)
            return q, k
        return qo, ko
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return _forward(q, k, cos, sin, inplace)[:2]  # inference: no autograd node
    if cos.requires_grad or sin.requires_grad:  # no gradient flows to the tables
        cos, sin = cos.detach(), sin.detach()
    return RoPEFunction.apply(q, k, cos, sin, bool(inplace))
