"""Cross-entropy on logits, and fused linear cross-entropy that never materializes T x V logits.

Math (per row r with logits x_r of length V and label y_r; eps = label_smoothing, c = softcap,
s = logit_scale, zl = z_loss)::

    z_j   = s * x_j, then z_j = c * tanh(z_j / c) when a softcap is given
    lse   = log sum_j exp(z_j)                          (online over vocab chunks, fp32)
    loss  = lse - (1 - eps) * z_y - (eps / V) * sum_j z_j + zl * lse^2
    dz_j  = (1 + 2 zl lse) softmax(z)_j - (1 - eps) [j == y] - eps / V
    dx_j  = w_r * s * (1 - tanh^2) * dz_j               (the tanh factor only with a softcap)

Rows whose label equals ``ignore_index`` contribute 0 to the loss and get a zero gradient. Label
smoothing follows ``torch.nn.functional.cross_entropy``: (1 - eps) * NLL + eps * mean_j(-log p_j),
both parts masked by ``ignore_index``.

Reductions and the normalizer ``num_items``:

* ``num_items`` given (int >= 0 or a 0-d tensor, the number of target tokens over every
  gradient-accumulation micro-batch): ``"mean"`` and ``"sum"`` both return
  ``sum(row losses) / max(num_items, 1)``; ``"none"`` returns the row losses divided by it (so their
  sum is that same scalar). Summing the losses of all micro-batches then equals the mean over the
  whole batch exactly.
* without ``num_items``: ``"mean"`` divides the sum by the number of non-ignored rows (0 valid rows
  give loss 0 and zero gradients, not NaN), ``"sum"`` returns the sum, ``"none"`` the row losses
  (0 on ignored rows).

The loss is returned in float32 (float64 for float64 inputs on the reference path).

Design (the arithmetic is in docs/kernels/cross_entropy.md): a one-program label scan lists the
rows to compute (and counts them and the bad labels); then a persistent kernel, one program per
SM for long rows, walks its rows: pass 1 an online log-sum-exp with per-thread state, pass 2
(when a gradient is needed) the same row in reverse chunk order, re-read from L2, writing the
gradient (optionally into the logits buffer); one register queue prefetches across passes and
rows. For scalar reductions the gradient is produced in the forward call and backward only scales
it by grad_output, on the device, skipping the work when it is 1. The fused linear version walks
chunks of rows (a multiple of 256 chosen by a GEMM-wave model within a 256 MiB buffer budget:
1024 at T = 8192, H = 4096, V = 128256 in bf16): cuBLAS logits into one reused buffer, the CE
kernel in place, then cuBLAS d(hidden) and, only for a trainable head, d(weight) -- all in
forward, so nothing is recomputed. Timings are in the docs' "Measured" section.

Limits: logits / hidden / weight in float32, float16 or bfloat16 (the references also take
float64); labels of an integer dtype. Labels outside [0, V) that are not ``ignore_index`` raise a
ValueError naming the label and its row when ``validate=True`` (the default): on CUDA the count
from the label scan reaches the host while the kernel runs, so the check costs no GPU idle time
(it is skipped inside a CUDA graph capture); the kernel has run by then (bad rows hold NaN, an
in-place gradient is written). ``validate=False`` skips the check and its host sync: such rows
give a NaN loss instead of reading out of bounds.
Double backward is not supported. On CPU tensors the references run (``inplace_backward`` is then
ignored).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qkern._backend import (
    FLOAT_DTYPES,
    check_float,
    check_same_device,
    interpreter_enabled,
    num_sms,
    pick_configs,
    use_triton,
)

_REDUCTIONS = ("none", "sum", "mean")


# ------------------------------------------------------------------------------------------------
# input checks shared by both paths
# ------------------------------------------------------------------------------------------------


def _check_options(
    reduction: str,
    num_items: int | torch.Tensor | None,
    label_smoothing: float,
    softcap: float | None,
    z_loss: float,
    logit_scale: float,
) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    if not float(z_loss) >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if not float(logit_scale) != 0.0 or float(logit_scale) != float(logit_scale):
        raise ValueError(f"logit_scale must be a nonzero number, got {logit_scale}")
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(
                    f"num_items must be a scalar (0-d) tensor, got shape {tuple(num_items.shape)}"
                )
        elif isinstance(num_items, bool) or not isinstance(num_items, int | float):
            raise TypeError(f"num_items must be an int or a 0-d tensor, got {type(num_items)}")
        elif num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")


def _check_labels(labels: torch.Tensor, rows: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    flat = labels.reshape(-1)
    if flat.numel() != rows:
        raise ValueError(
            f"labels must hold one label per row: got {flat.numel()} labels for {rows} rows "
            f"(labels shape {tuple(labels.shape)})"
        )
    return flat


def _validate_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """One reduction over the labels and one host sync (on CUDA) to reject out-of-range labels."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found "
            f"{int(labels[row])} at row {row} ({int(bad.sum())} such label(s))"
        )


def _prepare_logits(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    check_float(logits, "logits", (*FLOAT_DTYPES, torch.float64))
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"logits must have a non-empty last (vocab) dim, got {tuple(logits.shape)}"
        )
    x = logits.reshape(-1, logits.shape[-1])
    y = _check_labels(labels, x.shape[0])
    check_same_device(logits=logits, labels=labels)
    return x, y


def _prepare_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtypes = (*FLOAT_DTYPES, torch.float64)
    check_float(hidden, "hidden", dtypes)
    check_float(weight, "weight", dtypes)
    if bias is not None:
        check_float(bias, "bias", dtypes)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight's H: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    h = hidden.reshape(-1, hidden.shape[-1])
    y = _check_labels(labels, h.shape[0])
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    return h, y


# ------------------------------------------------------------------------------------------------
# pure-PyTorch references (CPU path and test oracle)
# ------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    present = [t for t in tensors if t is not None]
    return torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32


def _reduce_ref(
    rows: torch.Tensor,
    valid: torch.Tensor,
    reduction: str,
    num_items: int | torch.Tensor | None,
) -> torch.Tensor:
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            denom = num_items.detach().to(device=rows.device, dtype=rows.dtype).reshape(())
        else:
            denom = torch.tensor(float(num_items), dtype=rows.dtype, device=rows.device)
        denom = denom.clamp_min(1.0)
        return rows / denom if reduction == "none" else rows.sum() / denom
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp_min(1).to(rows.dtype)


def cross_entropy_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    validate: bool = True,
) -> torch.Tensor:
    """Cross-entropy in plain PyTorch (fp32 math, fp64 for fp64 inputs); see the module docstring.

    Differentiable through autograd; materializes the (T, V) logits in the compute dtype.
    """
    _check_options(reduction, num_items, label_smoothing, softcap, z_loss, logit_scale)
    x, y = _prepare_logits(logits, labels)
    vocab = x.shape[1]
    if validate:
        _validate_label_range(y, vocab, ignore_index)
    z = x.to(_compute_dtype(x)) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < vocab)
    z_target = z.gather(1, torch.where(in_range, y, 0).long()[:, None])[:, 0]
    rows = lse - (1.0 - label_smoothing) * z_target
    if label_smoothing:
        rows = rows - label_smoothing * z.mean(dim=-1)
    if z_loss:
        rows = rows + z_loss * lse * lse
    rows = torch.where(in_range, rows, torch.full_like(rows, float("nan")))
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return _reduce_ref(rows, valid, reduction, num_items)


def fused_linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    validate: bool = True,
) -> torch.Tensor:
    """``cross_entropy_ref(hidden @ weight.T + bias, labels, ...)`` with the product in fp32 (fp64
    for fp64 inputs). Materializes the logits: the oracle, and the CPU path for small models."""
    _check_options(reduction, num_items, label_smoothing, softcap, z_loss, logit_scale)
    h, y = _prepare_linear(hidden, weight, labels, bias)
    ct = _compute_dtype(h, weight, bias)
    logits = h.to(ct) @ weight.to(ct).t()
    if bias is not None:
        logits = logits + bias.to(ct)
    return cross_entropy_ref(
        logits,
        y,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items=num_items,
        label_smoothing=label_smoothing,
        softcap=softcap,
        z_loss=z_loss,
        logit_scale=logit_scale,
        validate=validate,
    )


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _label_scan_kernel(y_ptr, order_ptr, info_ptr, T, V, ignore_index, BLOCK: tl.constexpr):
    """One program reads the T labels once and writes

    * ``order``: the rows whose label is not ``ignore_index`` ("counted" rows, in row order) in
      ``order[0:nv]``, the ignored rows in ``order[nv:T]`` (from the back);
    * ``info = (nv, number of labels outside [0, V) that are not ignore_index, first such row
      (T if none))``.

    The CE kernel deals the counted rows round-robin over its persistent programs (balanced
    however many rows are ignored) and reads nv as the "mean" normalizer; the host reads the bad
    count once to raise the label error. Block-wide prefix sums give each row its slot.
    """
    nv = 0
    ni = 0
    nbad = 0
    first = T
    for start in range(0, T, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < T
        lab = tl.load(y_ptr + offs, mask=inb, other=0).to(tl.int64)
        counted = inb & (lab != ignore_index)
        skipped = inb & (lab == ignore_index)
        bad = counted & ((lab < 0) | (lab >= V))
        ci = counted.to(tl.int32)
        si = skipped.to(tl.int32)
        tl.store(order_ptr + nv + tl.cumsum(ci, 0) - 1, offs, mask=counted)
        tl.store(order_ptr + T - ni - tl.cumsum(si, 0), offs, mask=skipped)
        nv += tl.sum(ci, 0)
        ni += tl.sum(si, 0)
        nbad += tl.sum(bad.to(tl.int32), 0)
        first = tl.minimum(first, tl.min(tl.where(bad, offs, T), 0))
    tl.store(info_ptr, nv)
    tl.store(info_ptr + 1, nbad)
    tl.store(info_ptr + 2, first)


@triton.jit
def _tanh(u):
    """tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) <= 1: never overflows."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(u))  # exp(-2|u|) = 2^(-2 log2(e) |u|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _transform(z, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(logit_scale * z) for fp32 z (each step only when its flag is set)."""
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _unpack(w, PAIRS: tl.constexpr):
    """fp32 logits from loaded units. PAIRS: an int32 word holds two bf16 logits (the even column
    in the low half); a bf16 is the top half of an fp32, so the high logit is the word with its
    low 16 bits cleared and the low one the word shifted up: one integer op per logit. Otherwise
    the unit is one logit (the second result repeats it and is not used)."""
    if PAIRS:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    else:
        lo = w.to(tl.float32)
        hi = lo
    return lo, hi


@triton.jit
def _bf16_bits(f):
    """bf16 bit pattern (round to nearest even) of fp32 ``f`` in the low 16 bits of an int32; the
    interpreter's path (the GPU packs a pair with one cvt instruction)."""
    b = f.to(tl.uint32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int32, bitcast=True)
    return tl.where(f != f, 0x7FC0, r)


@triton.jit
def _pack(g_lo, g_hi, out_ty: tl.constexpr, PAIRS: tl.constexpr, ASM: tl.constexpr):
    """Gradient units to store: PAIRS packs two fp32 into one word of two bf16 (cvt.rn.bf16x2,
    one instruction per pair, on the GPU), otherwise a cast to the output dtype."""
    if PAIRS:
        if ASM:
            w = tl.inline_asm_elementwise(
                "cvt.rn.bf16x2.f32 $0, $1, $2;",
                "=r,f,f",
                [g_hi, g_lo],
                dtype=tl.int32,
                is_pure=True,
                pack=1,
            )
        else:
            w = (_bf16_bits(g_hi) << 16) | (_bf16_bits(g_lo) & 0xFFFF)
    else:
        w = g_lo.to(out_ty)
    return w


@triton.jit
def _ld(base, c, offs, lim, CH: tl.constexpr, EVICT: tl.constexpr, MASKED: tl.constexpr):
    """Chunk ``c`` of a row (``offs`` are the tile's unit offsets), units at or past ``lim``
    masked. evict_last keeps lines pass 2 will re-read in L2; evict_first marks the rest."""
    o = c * CH + offs
    if MASKED:
        v = tl.load(base + o, mask=o < lim, eviction_policy=EVICT)
    else:
        v = tl.load(base + o, eviction_policy=EVICT)
    return v


@triton.jit
def _shift(b0, b1, b2, new, PF: tl.constexpr):
    """Advance the prefetch queue: returns (chunk to use now, new queue)."""
    w = b0
    if PF == 1:
        b0 = new
    elif PF == 2:
        b0 = b1
        b1 = new
    else:
        b0 = b1
        b1 = b2
        b2 = new
    return w, b0, b1, b2


@triton.jit
def _p1(w, c, last, offs, VU, m_t, d_t, s_t, zs_t, c0, logit_scale, softcap,
        CH: tl.constexpr, PAIRS: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr):  # fmt: skip
    """Pass 1 on one chunk: a per-THREAD online log-sum-exp (no cross-thread traffic per chunk).

    Thread t keeps its running max m_t, the reference d_t = fl(m_t log2 e) and
    s_t = sum 2^(z log2 e - d_t) over the logits it has seen. A chunk costs per logit one max,
    one FFMA (z log2 e - d, the product exact inside the FMA), one exp2 and one add; per thread
    one rescale 2^(d_old - d_new) (clamped at 1: only the placeholder d = 0 of a thread that has
    seen nothing can exceed d_new, and its s_t is 0). Only the ragged last chunk (``last``)
    masks its tail to -inf."""
    za, zb = _unpack(w, PAIRS)
    za = _transform(za, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    if PAIRS:
        zb = _transform(zb, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    if last:
        ok = c * CH + offs < VU
        za = tl.where(ok, za, -float("inf"))
        if PAIRS:
            zb = tl.where(ok, zb, -float("inf"))
    mx = tl.max(tl.max(za, 2), 0)
    if PAIRS:
        mx = tl.maximum(mx, tl.max(tl.max(zb, 2), 0))
    m_t = tl.maximum(m_t, mx)
    d_new = tl.where(m_t > -float("inf"), m_t * 1.4426950408889634, 0.0)
    s_t = s_t * tl.exp2(tl.minimum(d_t - d_new, 0.0))
    dd = d_new[None, :, None]
    e = tl.exp2(tl.fma(za, 1.4426950408889634, -dd))
    if PAIRS:
        e += tl.exp2(tl.fma(zb, 1.4426950408889634, -dd))
    s_t += tl.sum(tl.sum(e, 2), 0)
    if HAS_SMOOTHING:
        # sum (z - c0), c0 the row's first logit: the shift keeps the fp32 sum exact at |z| ~ 1e4
        ok2 = c * CH + offs < VU
        zc = tl.where(ok2, za - c0, 0.0)
        if PAIRS:
            zc += tl.where(ok2, zb - c0, 0.0)
        zs_t += tl.sum(tl.sum(zc, 2), 0)
    return m_t, d_new, s_t, zs_t


@triton.jit
def _g(x, hi, a, uni, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
       HAS_SMOOTHING: tl.constexpr):  # fmt: skip
    """d loss / d x for one logit (fp32): a 2^(z log2 e - hi) - uni, times (1 - tanh^2) with a
    softcap; a, uni fold the row weight, z-loss factor, logit_scale and 2^(-residual of hi)."""
    z = x
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    d = a * tl.exp2(tl.fma(z, 1.4426950408889634, -hi))
    if HAS_SMOOTHING:
        d = d - uni
    if HAS_SOFTCAP:
        d = d * (1.0 - t * t)
    return d


@triton.jit
def _p2(w, hi, a, uni, logit_scale, softcap, out_ty: tl.constexpr, PAIRS: tl.constexpr,
        ASM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_SMOOTHING: tl.constexpr):  # fmt: skip
    """Pass 2 on one chunk: the gradient units to store (the label's element is fixed later)."""
    xa, xb = _unpack(w, PAIRS)
    ga = _g(xa, hi, a, uni, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, HAS_SMOOTHING)
    gb = ga
    if PAIRS:
        gb = _g(xb, hi, a, uni, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, HAS_SMOOTHING)
    return _pack(ga, gb, out_ty, PAIRS, ASM)


@triton.jit
def _ce_kernel(
    x_ptr,
    stride_x,
    y_ptr,
    order_ptr,
    info_ptr,
    g_ptr,
    stride_g,
    loss_ptr,
    stats_ptr,
    w_ptr,
    w_val,
    go_ptr,
    stride_go,
    T,
    V,
    VU,
    ignore_index,
    eps,
    softcap,
    z_loss,
    logit_scale,
    NW: tl.constexpr,
    K: tl.constexpr,
    VEC: tl.constexpr,
    PF: tl.constexpr,
    PAIRS: tl.constexpr,
    ASM: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    PASS1: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    W_PTR: tl.constexpr,
    ROW_GO: tl.constexpr,
):
    """Cross-entropy rows: loss, statistics and (optionally) d loss / d logits, persistent grid.

    Rows come from ``order`` (see _label_scan_kernel): program p takes the counted rows
    order[p], order[p + P], ... (P programs), then the ignored rows the same way (loss 0,
    statistics 0, a zero gradient written without reading the row). A row is read in chunks of
    CH = K * (32 NW) * VEC units (a unit is one logit, or with PAIRS an int32 holding two bf16);
    the tile is (K, 32 NW threads, VEC units), so every load is a 16-byte vector per thread and
    each warp's 32 vectors are contiguous. Per counted row r with label y:

    pass 1 (PASS1), chunks in order: per-thread online log-sum-exp (_p1), then one block-wide
    combine: m = max z, L = log2 sum 2^((z - m) log2 e) (so lse = m + L ln 2), and
        loss = (lse - m) + (1 - eps)(m - z_y) + eps (m - c0 - sum(z - c0)/V) + z_loss lse^2,
    times the weight w0 (1/normalizer); z_y is one scalar load (a label outside [0, V) is never
    dereferenced: NaN loss). stats[r] = (m, L).
    pass 2 (WRITE_GRAD), chunks in reverse order (the chunks read last are the first re-read,
    still in L2), writes g = w s (1 - tanh^2)((1 + 2 z_loss lse) softmax(z) - (1 - eps)[j = y]
    - eps/V) with w = w0 [* grad_out[r] with ROW_GO]. softmax = 2^(z log2 e - hi) 2^(-lo) with
    hi + lo = m log2 e + L split in two floats, so one FFMA and one exp2 per logit stay exact at
    |z| ~ 1e4. The label's element is written last, after a barrier, from its logit loaded at row
    start (g may alias x: the in-place gradient).

    Loads run PF chunks ahead through one queue that crosses from pass 1 into pass 2 and from one
    row into the next, so an SM never waits for a row's first bytes. Pass-1 loads are evict_last
    when pass 2 follows, pass-2 loads evict_first, gradient stores streaming (.cs). Needs
    PF <= cdiv(VU, CH) (the host picks PF so).
    """
    NT: tl.constexpr = NW * 32
    CH: tl.constexpr = K * NT * VEC
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if PAIRS:
        xu = x_ptr.to(tl.pointer_type(tl.int32))
        gu = g_ptr.to(tl.pointer_type(tl.int32))
        sxu = stride_x // 2
        sgu = stride_g // 2
    else:
        xu = x_ptr
        gu = g_ptr
        sxu = stride_x
        sgu = stride_g
    offs = (
        tl.arange(0, K)[:, None, None] * (NT * VEC)
        + tl.arange(0, NT)[None, :, None] * VEC
        + tl.arange(0, VEC)[None, None, :]
    )
    n = tl.cdiv(VU, CH)
    nv = tl.load(info_ptr)
    if W_PTR:
        w0 = 1.0 / tl.maximum(tl.load(w_ptr).to(tl.float32), 1.0)
    else:
        w0 = w_val
    # pass-1 loads keep lines in L2 only when pass 2 re-reads them
    if PASS1 and WRITE_GRAD:
        EV1: tl.constexpr = "evict_last"
    else:
        EV1: tl.constexpr = "evict_first"
    R = tl.cdiv(nv - pid, nprog)  # counted rows of this program (pid < nprog, so >= 0)

    # prefetch the first PF chunks of this program's first row
    r0 = tl.load(order_ptr + pid, mask=R > 0, other=0).to(tl.int64)
    lim0 = tl.where(R > 0, VU, 0)
    if PASS1:
        b0 = _ld(xu + r0 * sxu, 0, offs, lim0, CH, EV1, True)
    else:
        b0 = _ld(xu + r0 * sxu, n - 1, offs, lim0, CH, EV1, True)
    b1 = b0
    b2 = b0
    if PF >= 2:
        if PASS1:
            b1 = _ld(xu + r0 * sxu, 1, offs, lim0, CH, EV1, True)
        else:
            b1 = _ld(xu + r0 * sxu, n - 2, offs, lim0, CH, EV1, True)
    if PF >= 3:
        if PASS1:
            b2 = _ld(xu + r0 * sxu, 2, offs, lim0, CH, EV1, True)
        else:
            b2 = _ld(xu + r0 * sxu, n - 3, offs, lim0, CH, EV1, True)

    for i in range(0, R):
        j = pid + i * nprog
        r = tl.load(order_ptr + j).to(tl.int64)
        has_next = i + 1 < R
        r_nx = tl.load(order_ptr + j + nprog, mask=has_next, other=0).to(tl.int64)
        lim_nx = tl.where(has_next, VU, 0)
        base = xu + r * sxu
        base_nx = xu + r_nx * sxu
        x_row = x_ptr + r * stride_x
        label = tl.load(y_ptr + r).to(tl.int64)
        in_range = (label >= 0) & (label < V)
        col_y = tl.where(in_range, label, 0)
        # the target's logit, read before pass 2 can overwrite it
        x_y = tl.load(x_row + col_y).to(tl.float32)
        c0 = 0.0
        if HAS_SMOOTHING:
            c0 = _transform(
                tl.load(x_row).to(tl.float32), logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP
            )
        if PASS1:
            m_t = tl.full([NT], -float("inf"), tl.float32)
            d_t = tl.zeros([NT], tl.float32)
            s_t = tl.zeros([NT], tl.float32)
            zs_t = tl.zeros([NT], tl.float32)
            for q in range(0, n - PF):
                nxt = _ld(base, q + PF, offs, VU, CH, EV1, True)
                w, b0, b1, b2 = _shift(b0, b1, b2, nxt, PF)
                m_t, d_t, s_t, zs_t = _p1(
                    w, q, False, offs, VU, m_t, d_t, s_t, zs_t, c0, logit_scale, softcap,
                    CH, PAIRS, HAS_SCALE, HAS_SOFTCAP, HAS_SMOOTHING,
                )  # fmt: skip
            for q in range(n - PF, n):
                if WRITE_GRAD:
                    # the queue runs on into pass 2 of this row: chunk n - 1 first
                    nxt = _ld(base, 2 * n - 1 - (q + PF), offs, VU, CH, "evict_first", True)
                else:
                    nxt = _ld(base_nx, q + PF - n, offs, lim_nx, CH, EV1, True)
                w, b0, b1, b2 = _shift(b0, b1, b2, nxt, PF)
                m_t, d_t, s_t, zs_t = _p1(
                    w, q, q == n - 1, offs, VU, m_t, d_t, s_t, zs_t, c0, logit_scale, softcap,
                    CH, PAIRS, HAS_SCALE, HAS_SOFTCAP, HAS_SMOOTHING,
                )  # fmt: skip
            # combine the threads: m, and s relative to d = fl(m log2 e)
            m = tl.max(m_t, 0)
            d_row = m * 1.4426950408889634
            part = tl.where(m_t > -float("inf"), s_t * tl.exp2(d_t - d_row), 0.0)
            # L = log2 sum 2^((z - m) log2 e); the FMA gives d_row - m log2 e exactly
            L = tl.log2(tl.sum(part, 0)) + tl.fma(m, -1.4426950408889634, d_row)
            z_y = _transform(x_y, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            lse_m = L * 0.6931471805599453
            loss = lse_m + (1.0 - eps) * (m - z_y)
            if HAS_SMOOTHING:
                loss = loss + eps * (m - c0 - tl.sum(zs_t, 0) / V)
            if HAS_ZLOSS:
                loss = loss + z_loss * (m + lse_m) * (m + lse_m)
            loss = tl.where(in_range, loss, float("nan"))
            tl.store(loss_ptr + r, loss * w0)
            tl.store(stats_ptr + 2 * r, m)
            tl.store(stats_ptr + 2 * r + 1, L)
        else:
            m = tl.load(stats_ptr + 2 * r)
            L = tl.load(stats_ptr + 2 * r + 1)
        if WRITE_GRAD:
            wr = w0
            if ROW_GO:
                wr = wr * tl.load(go_ptr + r * stride_go).to(tl.float32)
            wr = tl.where(in_range, wr, float("nan"))
            hi = tl.fma(m, 1.4426950408889634, L)
            lo = tl.fma(m, 1.4426950408889634, -hi) + L
            a = wr * tl.exp2(-lo)
            if HAS_ZLOSS:
                a = a * (1.0 + 2.0 * z_loss * (m + L * 0.6931471805599453))
            tgt = wr * (1.0 - eps)
            uni = wr * eps / V
            if HAS_SCALE:
                a = a * logit_scale
                tgt = tgt * logit_scale
                uni = uni * logit_scale
            g_row = g_ptr + r * stride_g
            gb = gu + r * sgu
            for p in range(0, n - PF):
                # chunks n - 1 - (p + PF) >= 0 are never the ragged last one: no mask
                nxt = _ld(base, n - 1 - (p + PF), offs, VU, CH, "evict_first", False)
                w, b0, b1, b2 = _shift(b0, b1, b2, nxt, PF)
                o = (n - 1 - p) * CH + offs
                gw = _p2(w, hi, a, uni, logit_scale, softcap, g_ptr.dtype.element_ty, PAIRS,
                         ASM, HAS_SCALE, HAS_SOFTCAP, HAS_SMOOTHING)  # fmt: skip
                tl.store(gb + o, gw, mask=o < VU, cache_modifier=".cs")
            for p in range(n - PF, n):
                # the queue runs on into the next row
                if PASS1:
                    nxt = _ld(base_nx, p + PF - n, offs, lim_nx, CH, EV1, True)
                else:
                    nxt = _ld(base_nx, 2 * n - 1 - (p + PF), offs, lim_nx, CH, EV1, True)
                w, b0, b1, b2 = _shift(b0, b1, b2, nxt, PF)
                o = (n - 1 - p) * CH + offs
                gw = _p2(w, hi, a, uni, logit_scale, softcap, g_ptr.dtype.element_ty, PAIRS,
                         ASM, HAS_SCALE, HAS_SOFTCAP, HAS_SMOOTHING)  # fmt: skip
                tl.store(gb + o, gw, mask=o < VU, cache_modifier=".cs")
            # the label's element: (a softmax - tgt - uni)(1 - tanh^2), after every chunk store
            z = x_y
            if HAS_SCALE:
                z = z * logit_scale
            if HAS_SOFTCAP:
                t_y = _tanh(z / softcap)
                z = softcap * t_y
            d_y = a * tl.exp2(tl.fma(z, 1.4426950408889634, -hi)) - tgt
            if HAS_SMOOTHING:
                d_y = d_y - uni
            if HAS_SOFTCAP:
                d_y = d_y * (1.0 - t_y * t_y)
            tl.debug_barrier()
            tl.store(g_row + col_y, d_y.to(g_ptr.dtype.element_ty), mask=in_range)

    # ignored rows: loss 0, statistics 0, a zero gradient; nothing is read
    zero = tl.zeros([K, NT, VEC], dtype=gu.dtype.element_ty)
    for i in range(0, tl.cdiv(T - nv - pid, nprog)):
        r = tl.load(order_ptr + nv + pid + i * nprog).to(tl.int64)
        if PASS1:
            tl.store(loss_ptr + r, 0.0)
            tl.store(stats_ptr + 2 * r, 0.0)
            tl.store(stats_ptr + 2 * r + 1, 0.0)
        if WRITE_GRAD:
            gb = gu + r * sgu
            for c in range(0, n):
                o = c * CH + offs
                tl.store(gb + o, zero, mask=o < VU, cache_modifier=".cs")


@triton.jit
def _scale_kernel(x_ptr, n, go_ptr, BLOCK: tl.constexpr):
    """x *= grad_output (a device scalar), skipped entirely -- no reads, no writes -- when it is 1:
    the usual loss.backward() then costs one launch instead of a pass over the gradient."""
    go = tl.load(go_ptr).to(tl.float32)
    if go != 1.0:
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        offs0 = tl.arange(0, BLOCK)
        pid64 = pid.to(tl.int64)
        for it in range(0, tl.cdiv(tl.cdiv(n, BLOCK) - pid, nprog)):
            offs = (pid64 + it * nprog) * BLOCK + offs0
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            tl.store(x_ptr + offs, (x.to(tl.float32) * go).to(x_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# launch configuration (the arithmetic is in docs/kernels/cross_entropy.md)
# ------------------------------------------------------------------------------------------------

# Rows at least this long (bytes) take the persistent one-program-per-SM configuration: the
# in-flight rows (one per SM, 132 x 250.5 KiB = 33 MB at V = 128256 in bf16) then fit the 50 MB
# L2 so pass 2 re-reads them from L2, and each program keeps PF chunks of 16 KiB in flight.
_LONG_ROW_BYTES = 64 * 1024

# Long-row candidates (NW warps, K vectors of 16 bytes per thread per chunk, PF chunks ahead);
# the first is the default, the autotuner picks among them once per shape. 16 warps x 2 vectors
# = 16 KiB chunks; three in flight = 48 KiB per SM, enough for an SM's share of HBM bandwidth
# (~32 GB/s) at ~1.5 us loaded latency. The 32-warp variant hides latency with warps instead of
# registers (the same bytes in flight, 64 registers a thread at most).
_LONG_CONFIGS = (
    {"NW": 16, "K": 2, "PF": 3},
    {"NW": 16, "K": 2, "PF": 2},
    {"NW": 32, "K": 1, "PF": 3},
)

# Under the interpreter: one warp and two 16-byte vectors per thread make chunks of 64 units
# (64 fp32 / 128 fp16 / 256 bf16 logits), and 3 programs, so tests with V of a few hundred run
# several chunks per row and several rows per program. Tests lower the program count further.
_INTERPRET_CONFIG = {"NW": 1, "K": 2, "PF": 2, "programs": 3}

_SCAN_BLOCK = 4096
_INTERPRET_SCAN_BLOCK = 8


@dataclass(frozen=True)
class _Opts:
    ignore_index: int
    label_smoothing: float
    softcap: float | None
    z_loss: float
    logit_scale: float
    chunk_bytes: int | None = None  # fused linear CE: logits buffer budget (None: the default)


@dataclass
class _Rows:
    """The label scan's result for one set of rows: ``order`` (counted rows first, then the
    ignored ones) and ``info`` = (counted rows, bad labels, first bad row) on the device."""

    order: torch.Tensor
    info: torch.Tensor


def _scan_labels(
    y: torch.Tensor,
    vocab: int,
    ignore_index: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> _Rows:
    """``out`` = (order, info): int32 buffers of >= max(T, 1) and 4 elements to fill (the fused
    linear loss preallocates them for all its chunks); new ones otherwise."""
    rows = y.numel()
    if out is not None:
        order, info = out
    else:
        order = torch.empty(max(rows, 1), dtype=torch.int32, device=y.device)
        info = torch.empty(4, dtype=torch.int32, device=y.device)
    block = _INTERPRET_SCAN_BLOCK if interpreter_enabled() else _SCAN_BLOCK
    _label_scan_kernel[(1,)](y, order, info, rows, vocab, ignore_index, BLOCK=block, num_warps=8)
    return _Rows(order, info)


class _LabelCheck:
    """The bad-label count goes to pinned host memory by a copy on a side stream that waits only
    for the scan: the CE kernel queued behind the scan on the caller's stream does not wait for
    the copy, and ``finish`` (called after that launch) waits for the copy only, so the GPU keeps
    working while the host checks. One pinned buffer, side stream and two events per thread and
    device (the host reads the buffer before the next call can overwrite it)."""

    _local = threading.local()

    def __init__(self, rows: _Rows) -> None:
        self.info = rows.info
        self.done = None
        if not rows.info.is_cuda:
            return
        if torch.cuda.is_current_stream_capturing():
            self.info = None  # no host sync inside a CUDA graph capture: not checked
            return
        cache = self._local.__dict__.setdefault("bufs", {})
        dev = rows.info.device
        if dev.index not in cache:
            cache[dev.index] = (
                torch.empty(4, dtype=torch.int32, pin_memory=True),
                torch.cuda.Stream(dev),
                torch.cuda.Event(),
                torch.cuda.Event(),
            )
        self.host, side, scanned, self.done = cache[dev.index]
        scanned.record()
        side.wait_event(scanned)
        with torch.cuda.stream(side):
            self.host.copy_(rows.info, non_blocking=True)
            self.done.record(side)

    def finish(self, y: torch.Tensor, vocab: int, ignore_index: int) -> None:
        if self.info is None:
            return
        if self.done is not None:
            self.done.synchronize()
            vals = self.host.tolist()
        else:
            vals = self.info.tolist()
        if vals[1]:
            row = int(vals[2])
            raise ValueError(
                f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found "
                f"{int(y[row])} at row {row} ({vals[1]} such label(s))"
            )


def _units(x: torch.Tensor, g: torch.Tensor | None) -> tuple[bool, int]:
    """(PAIRS, VEC): bf16 rows of even length with even strides and 4-byte aligned bases are read
    as int32 words of two logits; VEC = units per 16-byte vector."""
    vocab = x.shape[1]
    pairs = (
        x.dtype == torch.bfloat16
        and vocab % 2 == 0
        and all(t.stride(0) % 2 == 0 and t.data_ptr() % 4 == 0 for t in (x, g) if t is not None)
    )
    vec = 4 if pairs or x.element_size() == 4 else 8
    return pairs, vec


def _short_config(vu: int, vec: int) -> dict:
    """Rows under _LONG_ROW_BYTES: one 16-byte vector per thread and chunk, 4 or 8 warps (a chunk
    of 128 or 256 vectors covers short rows in one or two chunks), 32 warps' worth of programs
    per SM; L2 reuse is no concern (all rows in flight take a few MB)."""
    nw = 8 if vu > 4 * 32 * vec else 4
    return {"NW": nw, "K": 1, "PF": 2, "ctas_per_sm": 32 // nw}


def _prune_long(configs: list, named_args: dict, **kwargs) -> list:
    """Keep configurations whose prefetch depth fits the row (PF <= chunks per row)."""
    vu = int(named_args.get("VU", kwargs.get("VU")))
    vec = int(named_args.get("VEC", kwargs.get("VEC")))
    kept = [
        c
        for c in configs
        if c.kwargs["PF"] <= triton.cdiv(vu, c.kwargs["K"] * c.kwargs["NW"] * 32 * vec)
    ]
    return kept or configs[:1]


def _long_configs() -> list:
    return pick_configs([triton.Config(dict(c), num_warps=c["NW"]) for c in _LONG_CONFIGS])


# x_ptr is restored after each timing run: an in-place gradient overwrites the kernel's input.
_ce_kernel_tuned = triton.autotune(
    configs=_long_configs(),
    key=["VU", "PAIRS", "VEC", "HAS_SOFTCAP", "PASS1", "WRITE_GRAD"],
    prune_configs_by={"early_config_prune": _prune_long},
    restore_value=["x_ptr"],
)(_ce_kernel)


def _launch_ce(
    x: torch.Tensor,
    y: torch.Tensor,
    rows_info: _Rows,
    opts: _Opts,
    loss_rows: torch.Tensor,
    stats: torch.Tensor,
    weight: tuple[float, torch.Tensor | None],
    grad: torch.Tensor | None = None,
    go: torch.Tensor | None = None,
    stats_given: bool = False,
    config: dict | None = None,
) -> None:
    """Run ``_ce_kernel`` on rows of ``x`` (T, V) with unit column stride.

    ``rows_info`` is the label scan of ``y``; ``weight`` = (w, tensor): the row weight is w, or
    1/max(tensor[0], 1) read on the device when a tensor is given (the "mean" count from a
    scan's info, or a CUDA ``num_items``). ``grad`` (may be ``x`` itself) receives the gradient;
    ``go`` (T,) multiplies each row's gradient (reduction "none"); ``stats`` (T, 2) fp32 holds
    (max, log2 sum 2^((z - max) log2 e)) per row, written by pass 1 or, with ``stats_given``,
    read instead of running pass 1. ``loss_rows`` receives the row losses times the weight.
    ``config`` (tests) forces {NW, K, PF, programs} instead of the rule below.
    """
    rows, vocab = x.shape
    if rows == 0:
        return
    pairs, vec = _units(x, grad)
    vu = vocab // 2 if pairs else vocab
    w_val, w_t = weight
    g = grad if grad is not None else x
    go_t = go if go is not None else loss_rows
    args = (
        x,
        x.stride(0),
        y,
        rows_info.order,
        rows_info.info,
        g,
        g.stride(0),
        loss_rows,
        stats,
        w_t if w_t is not None else loss_rows,
        float(w_val),
        go_t,
        go_t.stride(0) if go is not None else 0,
        rows,
        vocab,
        vu,
        int(opts.ignore_index),
        float(opts.label_smoothing),
        float(opts.softcap) if opts.softcap is not None else 1.0,
        float(opts.z_loss),
        float(opts.logit_scale),
    )
    flags = dict(
        VEC=vec,
        PAIRS=pairs,
        ASM=not interpreter_enabled(),
        HAS_SCALE=opts.logit_scale != 1.0,
        HAS_SOFTCAP=opts.softcap is not None,
        HAS_SMOOTHING=opts.label_smoothing != 0.0,
        HAS_ZLOSS=opts.z_loss != 0.0,
        PASS1=not stats_given,
        WRITE_GRAD=grad is not None,
        W_PTR=w_t is not None,
        ROW_GO=go is not None,
    )
    if config is not None or interpreter_enabled():
        cfg = dict(config if config is not None else _INTERPRET_CONFIG)
        programs = min(rows, cfg.pop("programs"))
        chunks = triton.cdiv(vu, cfg["K"] * cfg["NW"] * 32 * vec)
        cfg["PF"] = min(cfg["PF"], chunks)
        _ce_kernel[(programs,)](*args, **cfg, **flags, num_warps=cfg["NW"])
        return
    sms = num_sms(x.device)
    if vocab * x.element_size() >= _LONG_ROW_BYTES:
        _ce_kernel_tuned[(min(rows, sms),)](*args, **flags)
        return
    cfg = _short_config(vu, vec)
    programs = min(rows, sms * cfg.pop("ctas_per_sm"))
    cfg["PF"] = min(cfg["PF"], triton.cdiv(vu, cfg["K"] * cfg["NW"] * 32 * vec))
    _ce_kernel[(programs,)](*args, **cfg, **flags, num_warps=cfg["NW"])


def _scale_(t: torch.Tensor | None, go: torch.Tensor) -> None:
    """In place ``t *= go`` for a contiguous ``t`` and a one-element ``go``, without a host sync."""
    if t is None or t.numel() == 0:
        return
    block = 4096
    grid = (max(1, min(triton.cdiv(t.numel(), block), 4 * num_sms(t.device))),)
    _scale_kernel[grid](t, t.numel(), go, BLOCK=block, num_warps=8)


def _row_weight(
    reduction: str, num_items: int | torch.Tensor | None, rows_info: _Rows
) -> tuple[float, torch.Tensor | None]:
    """The row weight 1 / normalizer: (value, None) when known on the host, else (1, tensor)
    with the kernel reading 1/max(tensor[0], 1) (no host sync)."""
    if num_items is not None:
        if isinstance(num_items, torch.Tensor) and num_items.device.type != "cpu":
            return 1.0, num_items.detach().reshape(1)
        return 1.0 / max(float(num_items), 1.0), None
    if reduction == "mean":
        return 1.0, rows_info.info  # info[0] = rows whose label is not ignore_index
    return 1.0, None


def _reduce_rows(loss_rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """The kernel already weighted each row: "none" returns them, the others sum them."""
    return loss_rows if reduction == "none" else loss_rows.sum()


class _CrossEntropy(torch.autograd.Function):
    """Scalar reductions compute the gradient in the forward pass (pass 2 of the same kernel, so
    the row is re-read while it is warm in L2) and backward only scales it by grad_output, which
    the scale kernel skips when it is 1. Reduction "none" needs grad_output per row, so its
    backward runs the kernel again with the saved statistics (one read, one write)."""

    @staticmethod
    def forward(ctx, x, y, rows_info, opts, reduction, weight, inplace):
        rows = x.shape[0]
        loss_rows = torch.empty(rows, dtype=torch.float32, device=x.device)
        stats = torch.empty(rows, 2, dtype=torch.float32, device=x.device)
        ctx.mode = None
        if ctx.needs_input_grad[0] and reduction != "none":
            grad = x if inplace else torch.empty_like(x)
            _launch_ce(x, y, rows_info, opts, loss_rows, stats, weight, grad=grad)
            if inplace:
                # logits now hold the gradient: any other saved use of them must fail loudly
                torch.autograd.graph.increment_version(x)
            ctx.save_for_backward(grad)
            ctx.mode = "scale"
        else:
            _launch_ce(x, y, rows_info, opts, loss_rows, stats, weight)
            if ctx.needs_input_grad[0]:
                ctx.save_for_backward(x, y, stats)
                ctx.mode = "rows"
                ctx.rows_info, ctx.opts, ctx.weight, ctx.inplace = rows_info, opts, weight, inplace
        ctx.used = False
        return _reduce_rows(loss_rows, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("qkern cross_entropy: backward can run only once per forward")
        ctx.used = True
        if ctx.mode == "scale":
            (grad,) = ctx.saved_tensors
            _scale_(grad, grad_loss.reshape(1).to(torch.float32))
            return grad, None, None, None, None, None, None
        x, y, stats = ctx.saved_tensors
        grad = x if ctx.inplace else torch.empty_like(x)
        go = grad_loss.to(torch.float32).expand(x.shape[0]).contiguous()
        dummy = torch.empty(0, dtype=torch.float32, device=x.device)
        _launch_ce(
            x, y, ctx.rows_info, ctx.opts, dummy, stats, ctx.weight, grad=grad, go=go,
            stats_given=True,
        )  # fmt: skip
        return grad, None, None, None, None, None, None


def _cross_entropy_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    ignore_index: int,
    reduction: str,
    num_items: int | torch.Tensor | None,
    label_smoothing: float,
    softcap: float | None,
    z_loss: float,
    logit_scale: float,
    inplace: bool,
    validate: bool,
) -> torch.Tensor:
    rows, vocab = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()  # a copy: the in-place gradient then lands in the copy
    y = y.contiguous()
    opts = _Opts(ignore_index, label_smoothing, softcap, z_loss, logit_scale)
    rows_info = _scan_labels(y, vocab, ignore_index)
    # the bad-label count goes to the host while the kernel runs; it is checked after the launch
    check = _LabelCheck(rows_info) if validate and rows else None
    weight = _row_weight(reduction, num_items, rows_info)
    out = _CrossEntropy.apply(x, y, rows_info, opts, reduction, weight, inplace)
    if check is not None:
        check.finish(y, vocab, ignore_index)
    return out


# ------------------------------------------------------------------------------------------------
# fused linear cross-entropy: chunks of rows through cuBLAS + the CE kernel in place
# ------------------------------------------------------------------------------------------------

# Chunk size. Memory: the one (C, V) logits buffer, reused by every chunk, holds the logits and
# then, in place, their gradient; everything else the path allocates is O(T + V): the per-row
# loss and (max, log-sum) vectors (12 B/row), the label scans' row orders (4 B/row for all rows +
# 4 B/row for the chunks), d(bias) in fp32 and one column-sum temporary (8 V B, only with a
# trained bias): 0.2 MiB at T = 8192, V = 128256. d(hidden) and d(weight) are the returned
# gradients, not counted. Budget: 256 MiB, C <= 1046 -> 1024 rows at V = 128256 in bf16.
# Measured on an H200 (T = 8192, H = 4096, frozen / trained head, ms): 1024 rows 27.55 / 40.67,
# 1280: 26.85 / 41.41, 1536: 27.18 / 40.72, 1792: 28.04 / 42.04, 2048: 26.99 / 39.91 -- within
# 2-4% of each other (the wave model below does not predict the order; cuBLAS picks tiles per
# shape), while the buffer is what a QLoRA step's peak memory pays: at the Llama-3.2-1B shape
# (4096 tokens per step) 2048 rows cost 250 MiB more peak memory than 1024. So the budget
# favours memory (the 512 MiB extra-memory target would allow 504 MiB: 2048 rows).
_FLCE_CHUNK_BYTES = 256 * 2**20

# Private override of the rule below (None: the rule). The benchmark sweeps it; tests use it to
# force ragged chunks. Any positive row count is accepted (the budget is not applied).
_FLCE_CHUNK_ROWS: int | None = None

# Cost model of one sweep over the chunks (only relative values matter): a cuBLAS product runs
# whole waves of output tiles over the SMs, so a chunk's products cost
#   ceil(tiles / SMs) * (time of one tile),  one tile = 2 * tile_m * tile_n * K flops,
# for the logits (C x V, K = H), d hidden (C x H, K = V) and d weight (V x H, K = C) products,
# taken under both 128 x 256 and 128 x 128 tiles (cuBLAS picks per shape; the worse of the two
# counts, so a chunk is good under either); plus, with a trained head, the read + write of dW by
# every chunk's accumulation after the first, and a fixed cost per chunk (launches, pipeline
# fill and drain of 3-4 kernels). Example, T = 8192, H = 4096, V = 128256: d hidden has
# (C / 128) * 16 tiles of 128 x 256: 128 at C = 1024 (0.97 waves of 132 SMs), 192 at C = 1536
# (1.45 -> 2 waves, 27% idle), 256 at C = 2048 (1.94 waves), and a 1536-row sweep ends with a
# 512-row chunk of 64 tiles (half the SMs idle through K = 128256).
_FLCE_TILES = ((128, 256), (128, 128))
_FLCE_MM_FLOPS = 700e12  # bf16 dense matmul rate of an H100 / H200 (measured ~690-715 TFLOP/s)
_FLCE_HBM_BYTES = 3.3e12  # copy bandwidth (3.0 TB/s H100, 4.3 TB/s H200)
_FLCE_CHUNK_FIXED_S = 20e-6


def _flce_cost(
    rows: int, chunk: int, vocab: int, hidden: int, elt: int, dw: bool, sms: int
) -> float:
    """Modeled seconds of the chunk loop's products over ``rows`` rows in chunks of ``chunk``."""

    def waves(tiles: int) -> int:
        return -(-tiles // sms)

    def one(c: int) -> float:
        worst = 0.0
        for tm, tn in _FLCE_TILES:
            cm = -(-c // tm)
            flops = waves(cm * -(-vocab // tn)) * hidden + waves(cm * -(-hidden // tn)) * vocab
            if dw:
                flops += waves(-(-vocab // tm) * -(-hidden // tn)) * c
            worst = max(worst, 2.0 * tm * tn * flops * sms / _FLCE_MM_FLOPS)
        return worst + _FLCE_CHUNK_FIXED_S

    full, tail = divmod(rows, chunk)
    cost = full * one(chunk) + (one(tail) if tail else 0.0)
    if dw:
        cost += (full + (1 if tail else 0) - 1) * 2 * vocab * hidden * elt / _FLCE_HBM_BYTES
    return cost


@functools.lru_cache(maxsize=64)
def _flce_best_chunk(
    rows: int, vocab: int, hidden: int, elt: int, dw: bool, sms: int, budget: int
) -> int:
    cap = budget // (vocab * elt)
    if cap < 256:  # very long rows: as many whole 128-row tiles as fit, else what fits
        return max(1, min(rows, cap - cap % 128 if cap >= 128 else cap))
    # multiples of 256 rows (whole tiles of 128 or 256 rows) that fit, and all rows at once when
    # they fit; the cheapest modeled sweep wins, ties go to the smaller buffer
    cands = list(range(256, min(cap, rows) + 1, 256)) + ([rows] if rows <= cap else [])
    return min(cands, key=lambda c: (_flce_cost(rows, c, vocab, hidden, elt, dw, sms), c))


def _flce_chunk_rows(
    rows: int,
    vocab: int,
    hidden: int,
    elt: int,
    dw: bool,
    device: torch.device,
    budget: int | None = None,
) -> int:
    """Rows per chunk: the override, else the cheapest multiple of 256 rows within the budget
    under the wave model above (1024 for both heads at T = 8192, H = 4096, V = 128256 in bf16)."""
    if _FLCE_CHUNK_ROWS is not None:
        return max(1, min(rows, int(_FLCE_CHUNK_ROWS)))
    if rows == 0:
        return 1
    sms = num_sms(device) if device.type == "cuda" else 132
    return _flce_best_chunk(rows, vocab, hidden, elt, dw, sms, budget or _FLCE_CHUNK_BYTES)


def _flce_pass(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    y: torch.Tensor,
    opts: _Opts,
    weight: tuple[float, torch.Tensor | None],
    loss_rows: torch.Tensor,
    stats: torch.Tensor,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    go: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One sweep over row chunks: logits = h_c W^T (+ b) into a bounded buffer, CE kernel (loss,
    and the gradient in place when any is needed), dh_c = dlogits W, dW += dlogits^T h_c,
    db += column sums. Returns (dh, dW, db in fp32), None where not needed.

    Nothing is copied or cast inside the loop: every product writes its output in place (the
    logits into the reused buffer's first rows, dh_c straight into its rows of d hidden, dW by
    the GEMM epilogue), the CE kernel overwrites the logits with their gradient, and the label
    scans fill slices of two buffers allocated once. Per chunk: 2 GEMMs (3 with dW), the label
    scan and the CE kernel (+ a column sum and an add with a trained bias)."""
    rows, _ = h.shape
    vocab = w.shape[0]
    chunk = _flce_chunk_rows(
        rows, vocab, h.shape[1], h.element_size(), need_dw, h.device, opts.chunk_bytes
    )
    any_grad = need_dh or need_dw or need_db
    buf = torch.empty(chunk, vocab, dtype=h.dtype, device=h.device)
    dh = torch.empty_like(h) if need_dh else None
    dw = (torch.empty_like(w) if rows else torch.zeros_like(w)) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=h.device) if need_db else None
    order = torch.empty(max(rows, 1), dtype=torch.int32, device=h.device)
    info = torch.empty(triton.cdiv(rows, chunk), 4, dtype=torch.int32, device=h.device)
    wt = w.t()
    for i, start in enumerate(range(0, rows, chunk)):
        stop = min(rows, start + chunk)
        hc = h[start:stop]
        logits = buf[: stop - start]
        if b is None:
            torch.mm(hc, wt, out=logits)
        else:
            torch.addmm(b, hc, wt, out=logits)
        yc = y[start:stop]
        _launch_ce(
            logits,
            yc,
            _scan_labels(yc, vocab, opts.ignore_index, out=(order[start:stop], info[i])),
            opts,
            loss_rows[start:stop],
            stats[start:stop],
            weight,
            grad=logits if any_grad else None,
            go=go[start:stop] if go is not None else None,
        )
        if need_dh:
            torch.mm(logits, w, out=dh[start:stop])
        if need_dw:
            if start == 0:
                torch.mm(logits.t(), hc, out=dw)
            else:
                dw.addmm_(logits.t(), hc)
        if need_db:
            db += logits.sum(0, dtype=torch.float32)
    return dh, dw, db


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Scalar reductions: every gradient is computed in forward (one logits matmul per chunk, no
    recomputation) and backward scales them by grad_output (skipped on device when it is 1).
    Reduction "none" with gradients: forward computes the losses only and backward recomputes
    the chunks with the per-row grad_output."""

    @staticmethod
    def forward(ctx, h, w, b, y, opts, reduction, weight):
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        need_db = b is not None and ctx.needs_input_grad[2]
        rows = h.shape[0]
        loss_rows = torch.empty(rows, dtype=torch.float32, device=h.device)
        stats = torch.empty(rows, 2, dtype=torch.float32, device=h.device)
        any_grad = need_dh or need_dw or need_db
        ctx.used = False
        ctx.need = (need_dh, need_dw, need_db)
        if any_grad and reduction == "none":
            _flce_pass(h, w, b, y, opts, weight, loss_rows, stats, False, False, False)
            ctx.save_for_backward(h, w, b, y)
            ctx.mode, ctx.opts, ctx.weight = "recompute", opts, weight
        else:
            dh, dw, db = _flce_pass(
                h, w, b, y, opts, weight, loss_rows, stats, need_dh, need_dw, need_db
            )
            ctx.save_for_backward(dh, dw, db)
            ctx.mode = "scale"
        ctx.bias_dtype = b.dtype if b is not None else None
        return _reduce_rows(loss_rows, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError(
                "qkern fused_linear_cross_entropy: backward can run only once per forward"
            )
        ctx.used = True
        if ctx.mode == "scale":
            dh, dw, db = ctx.saved_tensors
            go = grad_loss.reshape(1).to(torch.float32)
            for t in (dh, dw, db):
                _scale_(t, go)
        else:
            h, w, b, y = ctx.saved_tensors
            rows = h.shape[0]
            loss_rows = torch.empty(rows, dtype=torch.float32, device=h.device)
            stats = torch.empty(rows, 2, dtype=torch.float32, device=h.device)
            go = grad_loss.to(torch.float32).expand(rows).contiguous()
            dh, dw, db = _flce_pass(
                h, w, b, y, ctx.opts, ctx.weight, loss_rows, stats, *ctx.need, go=go
            )
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dh, dw, db, None, None, None, None


def _fused_linear_cross_entropy_triton(
    h: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    b: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    num_items: int | torch.Tensor | None,
    label_smoothing: float,
    softcap: float | None,
    z_loss: float,
    logit_scale: float,
    validate: bool,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    if w.dtype != h.dtype or (b is not None and b.dtype != h.dtype):
        raise TypeError(
            "hidden, weight and bias must share one dtype on the Triton path, got "
            f"hidden {h.dtype}, weight {w.dtype}" + (f", bias {b.dtype}" if b is not None else "")
        )
    vocab = w.shape[0]
    opts = _Opts(ignore_index, label_smoothing, softcap, z_loss, logit_scale, chunk_bytes)
    y = y.contiguous()
    # one scan of all labels: the "mean" count and the bad-label check (each row chunk is
    # scanned again for its own row order)
    rows_info = _scan_labels(y, vocab, ignore_index)
    check = _LabelCheck(rows_info) if validate and y.numel() else None
    weight = _row_weight(reduction, num_items, rows_info)
    out = _FusedLinearCrossEntropy.apply(h.contiguous(), w, b, y, opts, reduction, weight)
    if check is not None:
        check.finish(y, vocab, ignore_index)
    return out


# ------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    inplace_backward: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., V) against ``labels`` (...) aligned with the rows.

    See the module docstring for the math, the reductions and ``num_items``. With
    ``inplace_backward=True`` (Triton path) the gradient is written into the logits buffer: when a
    gradient is needed, ``logits`` holds d(loss)/d(logits) instead of the logits as soon as this
    call returns and must not be read or reused (autograd's version counter is bumped, so another
    op that saved ``logits`` for its backward raises instead of silently using the gradient).
    ``validate=False`` skips the bad-label check (the one host sync of a call; see the module
    docstring).
    """
    _check_options(reduction, num_items, label_smoothing, softcap, z_loss, logit_scale)
    x, y = _prepare_logits(logits, labels)
    if use_triton(x, y) and x.dtype != torch.float64:
        return _cross_entropy_triton(
            x,
            y,
            ignore_index,
            reduction,
            num_items,
            float(label_smoothing),
            softcap,
            float(z_loss),
            float(logit_scale),
            inplace_backward,
            validate,
        )
    return cross_entropy_ref(
        x,
        y,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items=num_items,
        label_smoothing=label_smoothing,
        softcap=softcap,
        z_loss=z_loss,
        logit_scale=logit_scale,
        validate=validate,
    )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    validate: bool = True,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels, ...)`` without the (T, V) logits.

    ``hidden`` (..., H), ``weight`` (V, H) (the lm_head), ``bias`` (V,) or None, ``labels`` (...).
    Gradients flow to ``hidden`` and, only when they require grad, to ``weight`` and ``bias``; a
    frozen head (QLoRA) never computes d(weight).

    ``chunk_bytes`` bounds the one logits buffer of a row chunk (the extra peak memory of the
    call besides the returned gradients); None takes the default of 256 MiB. Smaller budgets
    trade a little matmul efficiency for memory (rows per chunk: see ``_flce_chunk_rows``).
    """
    _check_options(reduction, num_items, label_smoothing, softcap, z_loss, logit_scale)
    if chunk_bytes is not None and (
        isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0
    ):
        raise ValueError(f"chunk_bytes must be a positive int or None, got {chunk_bytes!r}")
    h, y = _prepare_linear(hidden, weight, labels, bias)
    if use_triton(h, weight, y, bias) and h.dtype != torch.float64:
        return _fused_linear_cross_entropy_triton(
            h,
            weight,
            y,
            bias,
            ignore_index,
            reduction,
            num_items,
            float(label_smoothing),
            softcap,
            float(z_loss),
            float(logit_scale),
            validate,
            chunk_bytes,
        )
    return fused_linear_cross_entropy_ref(
        h,
        weight,
        y,
        bias,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items=num_items,
        label_smoothing=label_smoothing,
        softcap=softcap,
        z_loss=z_loss,
        logit_scale=logit_scale,
        validate=validate,
    )
