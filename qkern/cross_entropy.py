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

Design (the arithmetic is in docs/kernels/cross_entropy.md): one Triton kernel does an online
log-sum-exp pass over vocab chunks and, when a gradient is needed, a second pass in reverse chunk
order that writes it (optionally into the logits buffer). For scalar reductions the gradient is
produced in the forward call and backward only scales it by grad_output, on the device, skipping
the work when it is 1. The fused linear version walks chunks of rows (1536 at V = 128256 in bf16,
from a 384 MiB budget): cuBLAS logits into one reused buffer, the CE kernel in place, then cuBLAS
d(hidden) and, only for a trainable head, d(weight) -- all in forward, so nothing is recomputed.
Timings on H100 are in the docs' "Measured" section.

Limits: logits / hidden / weight in float32, float16 or bfloat16 (the references also take
float64); labels of an integer dtype. Labels outside [0, V) that are not ``ignore_index`` raise a
ValueError when ``validate=True`` (the default), which costs one small reduction and a host sync on
CUDA; with ``validate=False`` such rows give a NaN loss instead of reading out of bounds.
Double backward is not supported. On CPU tensors the references run (``inplace_backward`` is then
ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qkern._backend import (
    FLOAT_DTYPES,
    check_float,
    check_same_device,
    interpreter_enabled,
    next_power_of_2,
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
        first = int(labels[bad][0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
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


@triton.jit
def _tanh(u):
    """tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) <= 1: never overflows."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(u))  # exp(-2|u|) = 2^(-2 log2(e) |u|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _load_chunk(row_ptr, cols, limit, KEEP_IN_L2: tl.constexpr):
    """row[cols] for cols < limit, else 0. KEEP_IN_L2 marks the lines evict-last: pass 2 re-reads
    them; otherwise evict-first, so streaming data does not push them out."""
    mask = cols < limit
    if KEEP_IN_L2:
        x = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last")
    else:
        x = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_first")
    return x


@triton.jit
def _transform(x, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(logit_scale * x) in fp32 (each step only when its flag is set)."""
    z = x.to(tl.float32)
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _lse_step(z, m, s_vec):
    """Online log-sum-exp over a chunk: m' = max(m, max z), s_vec <- s_vec e^(m - m') + e^(z - m').

    The sum stays a per-lane vector (one FFMA per element; reduced once per row), so a chunk costs
    one block-wide reduction (the max). (z - m') is formed before the log2(e) scaling so that
    |z| ~ 1e4 keeps its full relative accuracy."""
    m_new = tl.maximum(m, tl.max(z, 0))
    s_vec = s_vec * tl.exp2((m - m_new) * 1.4426950408889634) + tl.exp2(
        (z - m_new) * 1.4426950408889634
    )
    return m_new, s_vec


@triton.jit
def _ce_row_stats(
    x_row,
    label,
    in_range,
    V,
    eps,
    softcap,
    z_loss,
    logit_scale,
    BLOCK_V: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    KEEP_IN_L2: tl.constexpr,
):
    """Pass 1 over one valid row: returns (loss, m, log s). Full chunks run without masks; the
    ragged last chunk (V % BLOCK_V) masks its tail to -inf."""
    cols0 = tl.arange(0, BLOCK_V)
    n_full = V // BLOCK_V
    # the target logit by one scalar load (a bad label reads column 0 and gives NaN below)
    z_y = _transform(
        tl.load(x_row + tl.where(in_range, label, 0)), logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP
    )
    c = 0.0
    if HAS_SMOOTHING:
        # sum (z - c) with c = z_0: the shift keeps the fp32 sum exact for |z| ~ 1e4
        c = _transform(tl.load(x_row), logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    zs_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    m = -float("inf")
    # software prefetch two chunks deep: chunks i + 1 and i + 2 are in flight while chunk i is
    # reduced (Triton pipelines only loads that feed tl.dot); a prefetch past the row is fully
    # masked and moves no bytes
    x_n1 = _load_chunk(x_row, cols0, V, KEEP_IN_L2)
    x_n2 = _load_chunk(x_row, BLOCK_V + cols0, V, KEEP_IN_L2)
    for i in range(0, n_full):
        x = x_n1
        x_n1 = x_n2
        x_n2 = _load_chunk(x_row, (i + 2) * BLOCK_V + cols0, V, KEEP_IN_L2)
        z = _transform(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        m, s_vec = _lse_step(z, m, s_vec)
        if HAS_SMOOTHING:
            zs_vec += z - c
    if n_full * BLOCK_V < V:
        mask = n_full * BLOCK_V + cols0 < V
        z = _transform(x_n1, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        if HAS_SMOOTHING:
            zs_vec += tl.where(mask, z - c, 0.0)
        m, s_vec = _lse_step(tl.where(mask, z, -float("inf")), m, s_vec)
    log_s = tl.log(tl.sum(s_vec, 0))
    # lse - (1 - eps) z_y - eps/V sum z + z_loss lse^2, with lse = m + log s kept split
    loss = log_s + (1.0 - eps) * (m - z_y)
    if HAS_SMOOTHING:
        loss = loss + eps * (m - c - tl.sum(zs_vec, 0) / V)
    if HAS_ZLOSS:
        loss = loss + z_loss * (m + log_s) * (m + log_s)
    loss = tl.where(in_range, loss, float("nan"))
    return loss, m, log_s


@triton.jit
def _ce_row_grad(
    x_row,
    g_row,
    label,
    in_range,
    m,
    log_s,
    w,
    V,
    eps,
    softcap,
    z_loss,
    logit_scale,
    BLOCK_V: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
):
    """Pass 2 over one valid row, chunks in reverse order (the chunks read last in pass 1 are the
    ones most likely still in L2): g = (a softmax(z) - uni - tgt [j = y]) (1 - tanh^2), the tanh
    factor only with a softcap. The scalars a, uni, tgt fold w, the z-loss factor and logit_scale,
    so a chunk costs one FADD, one FFMA, one exp2 and one FMUL per element. The label's element
    is not special-cased inside the loop (a comparison per element); it is written once more
    after the loop, from its logit loaded before any chunk is overwritten."""
    cols0 = tl.arange(0, BLOCK_V)
    last = tl.cdiv(V, BLOCK_V) - 1
    a = w
    if HAS_ZLOSS:
        a = w * (1.0 + 2.0 * z_loss * (m + log_s))
    tgt = w * (1.0 - eps)
    uni = w * eps / V
    if HAS_SCALE:
        a = a * logit_scale
        tgt = tgt * logit_scale
        uni = uni * logit_scale
    ls2 = log_s * 1.4426950408889634
    # the label's gradient, from its logit read before the loop (in place, the loop overwrites it)
    z_y = tl.load(x_row + tl.where(in_range, label, 0)).to(tl.float32)
    if HAS_SCALE:
        z_y = z_y * logit_scale
    if HAS_SOFTCAP:
        t_y = _tanh(z_y / softcap)
        z_y = softcap * t_y
    d_y = a * tl.exp2((z_y - m) * 1.4426950408889634 - ls2) - tgt
    if HAS_SMOOTHING:
        d_y = d_y - uni
    if HAS_SOFTCAP:
        d_y = d_y * (1.0 - t_y * t_y)
    # prefetch two chunks deep, backwards; a prefetch before column 0 is fully masked (limit 0)
    x_n1 = _load_chunk(x_row, last * BLOCK_V + cols0, V, False)
    x_n2 = _load_chunk(
        x_row, tl.maximum(last - 1, 0) * BLOCK_V + cols0, tl.where(last >= 1, V, 0), False
    )
    for j in range(0, last + 1):
        start = (last - j) * BLOCK_V
        x = x_n1
        x_n1 = x_n2
        pre = start - 2 * BLOCK_V
        x_n2 = _load_chunk(x_row, tl.maximum(pre, 0) + cols0, tl.where(pre >= 0, V, 0), False)
        z = x.to(tl.float32)
        if HAS_SCALE:
            z = z * logit_scale
        if HAS_SOFTCAP:
            t = _tanh(z / softcap)
            z = softcap * t
        d = a * tl.exp2((z - m) * 1.4426950408889634 - ls2)
        if HAS_SMOOTHING:
            d = d - uni
        if HAS_SOFTCAP:
            d = d * (1.0 - t * t)
        cols = start + cols0
        # g_row may alias x_row (in-place gradient): this chunk was read above, the chunks still
        # to be read lie before it
        tl.store(
            g_row + cols, d.to(g_row.dtype.element_ty), mask=cols < V, eviction_policy="evict_first"
        )
    # the barrier orders the chunk stores of every thread before this overwrite of one element
    tl.debug_barrier()
    tl.store(g_row + tl.where(in_range, label, 0), d_y.to(g_row.dtype.element_ty), mask=in_range)


@triton.jit
def _ce_kernel(
    x_ptr,
    stride_x,
    y_ptr,
    g_ptr,
    stride_g,
    loss_ptr,
    stats_ptr,
    wden_ptr,
    wden_val,
    go_ptr,
    stride_go,
    T,
    V,
    ignore_index,
    eps,
    softcap,
    z_loss,
    logit_scale,
    BLOCK_V: tl.constexpr,
    GRID_MULT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    STATS_GIVEN: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WDEN_PTR: tl.constexpr,
    ROW_GO: tl.constexpr,
):
    """Cross-entropy rows: loss, log-sum-exp statistics and (optionally) d loss / d logits.

    Each program walks rows ``pid, pid + nprog, ...`` (GRID_MULT > 0 makes the grid persistent,
    GRID_MULT programs per SM; 0 launches one program per row). Per valid row:

    pass 1 (unless STATS_GIVEN), vocab chunks in order, one read of the row:
        z = softcap(logit_scale * x);  m' = max(m, max z);  s = s exp(m - m') + sum exp(z - m')
        z_y by one scalar load (a label outside [0, V) is never dereferenced), and for smoothing
        sum (z - c) with c = z_0 (a shift that keeps the fp32 sum exact for |z| ~ 1e4)
        lse = m + log s;  loss = lse - (1 - eps) z_y - eps/V sum z + z_loss lse^2, evaluated as
        log s + (1 - eps)(m - z_y) + eps (m - c - sum(z - c)/V) + z_loss lse^2
        stats[row] = (m, log s): softmax = exp(z - m - log s) stays accurate where lse is large
    pass 2 (WRITE_GRAD), chunks in reverse order, writes
        g = w s (1 - tanh^2) ((1 + 2 z_loss lse) softmax(z) - (1 - eps)[j = y] - eps/V)
    with the row weight w = (1 / normalizer) [* grad_output[row] when ROW_GO]; a bad label makes
    it NaN. Rows whose label is ignore_index read nothing: loss 0, stats (0, 0), gradient 0.
    ``g_ptr`` may alias ``x_ptr`` (in-place gradient): each chunk is read before it is written.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if WDEN_PTR:
        w0 = tl.load(wden_ptr).to(tl.float32)
    else:
        w0 = wden_val
    pid64 = pid.to(tl.int64)
    for it in range(0, tl.cdiv(T - pid, nprog)):
        r = pid64 + it * nprog
        label = tl.load(y_ptr + r).to(tl.int64)
        in_range = (label >= 0) & (label < V)
        x_row = x_ptr + r * stride_x
        g_row = g_ptr + r * stride_g
        if label != ignore_index:
            if STATS_GIVEN:
                m = tl.load(stats_ptr + 2 * r)
                log_s = tl.load(stats_ptr + 2 * r + 1)
            else:
                loss, m, log_s = _ce_row_stats(
                    x_row, label, in_range, V, eps, softcap, z_loss, logit_scale, BLOCK_V,
                    HAS_SCALE, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS, WRITE_GRAD,
                )  # fmt: skip
                tl.store(loss_ptr + r, loss)
                tl.store(stats_ptr + 2 * r, m)
                tl.store(stats_ptr + 2 * r + 1, log_s)
            if WRITE_GRAD:
                w = w0
                if ROW_GO:
                    w = w * tl.load(go_ptr + r * stride_go).to(tl.float32)
                w = tl.where(in_range, w, float("nan"))
                _ce_row_grad(
                    x_row, g_row, label, in_range, m, log_s, w, V, eps, softcap, z_loss,
                    logit_scale,
                    BLOCK_V, HAS_SCALE, HAS_SOFTCAP, HAS_SMOOTHING, HAS_ZLOSS,
                )  # fmt: skip
        else:
            if not STATS_GIVEN:
                tl.store(loss_ptr + r, 0.0)
                tl.store(stats_ptr + 2 * r, 0.0)
                tl.store(stats_ptr + 2 * r + 1, 0.0)
            if WRITE_GRAD:
                zero = tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty)
                for j in range(0, tl.cdiv(V, BLOCK_V)):
                    cols = j * BLOCK_V + tl.arange(0, BLOCK_V)
                    tl.store(g_row + cols, zero, mask=cols < V)


def _ce_configs() -> list:
    """Hopper candidates. A row of V = 128256 bf16 is 250.5 KiB. Pass 2 re-reads it from L2 only if
    the rows in flight fit there: one program per SM holds 132 rows = 33 MB (H100/H200 L2:
    50 MB), and the reverse order halves the average reuse distance; two per SM (66 MB) lose part
    of it, more lose most of it (three HBM passes instead of two). Each program must then keep
    enough bytes in flight by itself: 16 warps, 8192-column chunks (16 KiB of bf16) prefetched
    two deep = 32 KiB per SM (~32 GB/s per SM at ~1 us latency, the SM's share of HBM). 16
    columns per thread and chunk keep it at ~113 registers (32 per thread would spill at 16
    warps). Persistent (GRID_MULT 1) and one program per row (GRID_MULT 0, which at 16 warps
    also fits one program per SM) differ only in launch and tail behaviour; the 2-per-SM and
    4096/8-warp configurations (the best before the rewrite) cover the case where more latency
    hiding beats L2 reuse."""
    c = triton.Config
    return pick_configs(
        [
            c({"BLOCK_V": 8192, "GRID_MULT": 1}, num_warps=16),
            c({"BLOCK_V": 8192, "GRID_MULT": 0}, num_warps=16),
            c({"BLOCK_V": 4096, "GRID_MULT": 2}, num_warps=8),
            c({"BLOCK_V": 4096, "GRID_MULT": 0}, num_warps=8),
            c({"BLOCK_V": 2048, "GRID_MULT": 0}, num_warps=4),
        ]
    )


def _prune_ce_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Keep BLOCK_V <= max(2048, next_pow2(V)) (no block far wider than a small vocabulary), and
    for V >= 16384 drop blocks under 4096 (many chunks per row; only worth it for small V)."""
    vocab = int(named_args.get("V", kwargs.get("V")))
    cap = max(2048, next_power_of_2(vocab))
    floor = 4096 if vocab >= 16384 else 1
    kept = [c for c in configs if floor <= c.kwargs["BLOCK_V"] <= cap]
    return kept or configs[:1]


# x_ptr is restored after each timing run: an in-place gradient overwrites the kernel's input.
_ce_kernel_tuned = triton.autotune(
    configs=_ce_configs(),
    key=["V", "HAS_SOFTCAP", "STATS_GIVEN", "WRITE_GRAD"],
    prune_configs_by={"early_config_prune": _prune_ce_configs},
    restore_value=["x_ptr"],
)(_ce_kernel)

# Under the interpreter the block is small so that tests with V of a few hundred or thousand run
# the chunk loop; tests lower it further to exercise more chunks.
_INTERPRET_BLOCK_V = 256


@dataclass(frozen=True)
class _Opts:
    ignore_index: int
    label_smoothing: float
    softcap: float | None
    z_loss: float
    logit_scale: float


def _launch_ce(
    x: torch.Tensor,
    y: torch.Tensor,
    opts: _Opts,
    loss_rows: torch.Tensor,
    stats: torch.Tensor,
    wden: float | torch.Tensor,
    grad: torch.Tensor | None = None,
    go: torch.Tensor | None = None,
    stats_given: bool = False,
) -> None:
    """Run ``_ce_kernel`` on rows of ``x`` (T, V) with unit column stride.

    ``wden`` is the row weight 1/normalizer as a Python float or a 1-element device tensor (no host
    sync); ``grad`` (may be ``x`` itself) receives the gradient; ``go`` (T,) multiplies each row's
    gradient (reduction "none"); ``stats`` (T, 2) fp32 holds (max, log sum exp(z - max)) per row,
    written by pass 1 or, with ``stats_given``, read instead of running pass 1.
    """
    rows, vocab = x.shape
    if rows == 0:
        return
    wden_is_ptr = isinstance(wden, torch.Tensor)
    g = grad if grad is not None else loss_rows
    go_t = go if go is not None else loss_rows
    args = (
        x,
        x.stride(0),
        y,
        g,
        g.stride(0) if grad is not None else 0,
        loss_rows,
        stats,
        wden if wden_is_ptr else loss_rows,
        1.0 if wden_is_ptr else float(wden),
        go_t,
        go_t.stride(0) if go is not None else 0,
        rows,
        vocab,
        int(opts.ignore_index),
        float(opts.label_smoothing),
        float(opts.softcap) if opts.softcap is not None else 1.0,
        float(opts.z_loss),
        float(opts.logit_scale),
    )
    flags = dict(
        HAS_SCALE=opts.logit_scale != 1.0,
        HAS_SOFTCAP=opts.softcap is not None,
        HAS_SMOOTHING=opts.label_smoothing != 0.0,
        HAS_ZLOSS=opts.z_loss != 0.0,
        STATS_GIVEN=stats_given,
        WRITE_GRAD=grad is not None,
        WDEN_PTR=wden_is_ptr,
        ROW_GO=go is not None,
    )
    if interpreter_enabled():
        block = min(_INTERPRET_BLOCK_V, next_power_of_2(vocab))
        _ce_kernel[(rows,)](*args, BLOCK_V=block, GRID_MULT=0, num_warps=4, **flags)
        return
    sms = num_sms(x.device)

    def grid(meta: dict) -> tuple[int]:
        mult = meta["GRID_MULT"]
        return (rows if mult == 0 else min(rows, mult * sms),)

    _ce_kernel_tuned[grid](*args, **flags)


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


def _scale_(t: torch.Tensor | None, go: torch.Tensor) -> None:
    """In place ``t *= go`` for a contiguous ``t`` and a one-element ``go``, without a host sync."""
    if t is None or t.numel() == 0:
        return
    block = 4096
    grid = (max(1, min(triton.cdiv(t.numel(), block), 4 * num_sms(t.device))),)
    _scale_kernel[grid](t, t.numel(), go, BLOCK=block, num_warps=8)


def _row_weight(
    y: torch.Tensor, reduction: str, num_items: int | torch.Tensor | None, ignore_index: int
) -> float | torch.Tensor:
    """1 / normalizer, as a float when known on the host, else as a 1-element device tensor."""
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.device.type == "cpu":
                return 1.0 / max(float(num_items), 1.0)
            return 1.0 / num_items.detach().reshape(1).to(torch.float32).clamp_min(1.0)
        return 1.0 / max(float(num_items), 1.0)
    if reduction == "mean":
        count = (y != ignore_index).sum().reshape(1).to(torch.float32)
        return 1.0 / count.clamp_min(1.0)
    return 1.0


def _reduce_rows(
    loss_rows: torch.Tensor, reduction: str, wden: float | torch.Tensor
) -> torch.Tensor:
    if reduction == "none":
        return loss_rows * wden if not (isinstance(wden, float) and wden == 1.0) else loss_rows
    total = loss_rows.sum()
    return total * wden.reshape(()) if isinstance(wden, torch.Tensor) else total * wden


class _CrossEntropy(torch.autograd.Function):
    """Scalar reductions compute the gradient in the forward pass (pass 2 of the same kernel, so
    the row is re-read while it is warm in L2) and backward only scales it by grad_output, which
    the scale kernel skips when it is 1. Reduction "none" needs grad_output per row, so its
    backward runs the kernel again with the saved log-sum-exp (one read, one write)."""

    @staticmethod
    def forward(ctx, x, y, opts, reduction, wden, inplace):
        rows = x.shape[0]
        loss_rows = torch.empty(rows, dtype=torch.float32, device=x.device)
        stats = torch.empty(rows, 2, dtype=torch.float32, device=x.device)
        ctx.mode = None
        if ctx.needs_input_grad[0] and reduction != "none":
            grad = x if inplace else torch.empty_like(x)
            _launch_ce(x, y, opts, loss_rows, stats, wden, grad=grad)
            if inplace:
                # logits now hold the gradient: any other saved use of them must fail loudly
                torch.autograd.graph.increment_version(x)
            ctx.save_for_backward(grad)
            ctx.mode = "scale"
        else:
            _launch_ce(x, y, opts, loss_rows, stats, wden)
            if ctx.needs_input_grad[0]:
                ctx.save_for_backward(x, y, stats)
                ctx.mode = "rows"
                ctx.opts, ctx.wden, ctx.inplace = opts, wden, inplace
        ctx.used = False
        return _reduce_rows(loss_rows, reduction, wden)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("qkern cross_entropy: backward can run only once per forward")
        ctx.used = True
        if ctx.mode == "scale":
            (grad,) = ctx.saved_tensors
            _scale_(grad, grad_loss.reshape(1).to(torch.float32))
            return grad, None, None, None, None, None
        x, y, stats = ctx.saved_tensors
        grad = x if ctx.inplace else torch.empty_like(x)
        go = grad_loss.to(torch.float32).expand(x.shape[0]).contiguous()
        dummy = torch.empty(0, dtype=torch.float32, device=x.device)
        _launch_ce(x, y, ctx.opts, dummy, stats, ctx.wden, grad=grad, go=go, stats_given=True)
        return grad, None, None, None, None, None


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
    wden = _row_weight(y, reduction, num_items, ignore_index)
    if validate:
        # last before the launch: the host sync inside leaves the GPU idle only for the few
        # microseconds from here to the kernel launch
        _validate_label_range(y, vocab, ignore_index)
    return _CrossEntropy.apply(x, y, opts, reduction, wden, inplace)


# ------------------------------------------------------------------------------------------------
# fused linear cross-entropy: chunks of rows through cuBLAS + the CE kernel in place
# ------------------------------------------------------------------------------------------------

# Bound on the bf16/fp16/fp32 logits chunk. rows = budget / (V * bytes per element): at V = 128256
# in bf16 that is 384 MiB / 250.5 KiB = 1569 -> 1536 rows (whole 128-row matmul tiles; 6 chunks
# for T = 8192 instead of 8 at 256 MiB: a trained head re-reads and re-writes the 1 GiB dW once
# per chunk, so 2 chunks fewer save ~4 GiB of traffic). Together with the per-row loss and
# (max, log-sum) vectors (12 bytes a row) and d(bias) in fp32 (4 V bytes) the extra memory stays
# under 512 MiB (376 MiB buffer + < 1 MiB); d(hidden) and d(weight) are the gradients.
_FLCE_CHUNK_BYTES = 384 * 2**20


def _flce_chunk_rows(rows: int, vocab: int, elt: int) -> int:
    chunk = _FLCE_CHUNK_BYTES // (vocab * elt)
    if chunk >= 128:
        chunk -= chunk % 128
    return max(1, min(rows, chunk))


def _flce_pass(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    y: torch.Tensor,
    opts: _Opts,
    wden: float | torch.Tensor,
    loss_rows: torch.Tensor,
    stats: torch.Tensor,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    go: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One sweep over row chunks: logits = h_c W^T (+ b) into a bounded buffer, CE kernel (loss,
    and the gradient in place when any is needed), dh_c = dlogits W, dW += dlogits^T h_c,
    db += column sums. Returns (dh, dW, db in fp32), None where not needed."""
    rows, _ = h.shape
    vocab = w.shape[0]
    chunk = _flce_chunk_rows(rows, vocab, h.element_size())
    any_grad = need_dh or need_dw or need_db
    buf = torch.empty(chunk, vocab, dtype=h.dtype, device=h.device)
    dh = torch.empty_like(h) if need_dh else None
    dw = (torch.empty_like(w) if rows else torch.zeros_like(w)) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=h.device) if need_db else None
    wt = w.t()
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        hc = h[start:stop]
        logits = buf[: stop - start]
        if b is None:
            torch.mm(hc, wt, out=logits)
        else:
            torch.addmm(b, hc, wt, out=logits)
        _launch_ce(
            logits,
            y[start:stop],
            opts,
            loss_rows[start:stop],
            stats[start:stop],
            wden,
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
    def forward(ctx, h, w, b, y, opts, reduction, wden):
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
            _flce_pass(h, w, b, y, opts, wden, loss_rows, stats, False, False, False)
            ctx.save_for_backward(h, w, b, y)
            ctx.mode, ctx.opts, ctx.wden = "recompute", opts, wden
        else:
            dh, dw, db = _flce_pass(
                h, w, b, y, opts, wden, loss_rows, stats, need_dh, need_dw, need_db
            )
            ctx.save_for_backward(dh, dw, db)
            ctx.mode = "scale"
        ctx.bias_dtype = b.dtype if b is not None else None
        return _reduce_rows(loss_rows, reduction, wden)

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
                h, w, b, y, ctx.opts, ctx.wden, loss_rows, stats, *ctx.need, go=go
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
) -> torch.Tensor:
    if w.dtype != h.dtype or (b is not None and b.dtype != h.dtype):
        raise TypeError(
            "hidden, weight and bias must share one dtype on the Triton path, got "
            f"hidden {h.dtype}, weight {w.dtype}" + (f", bias {b.dtype}" if b is not None else "")
        )
    vocab = w.shape[0]
    opts = _Opts(ignore_index, label_smoothing, softcap, z_loss, logit_scale)
    wden = _row_weight(y, reduction, num_items, ignore_index)
    if validate:
        _validate_label_range(y, vocab, ignore_index)
    return _FusedLinearCrossEntropy.apply(
        h.contiguous(), w, b, y.contiguous(), opts, reduction, wden
    )


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
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels, ...)`` without the (T, V) logits.

    ``hidden`` (..., H), ``weight`` (V, H) (the lm_head), ``bias`` (V,) or None, ``labels`` (...).
    Gradients flow to ``hidden`` and, only when they require grad, to ``weight`` and ``bias``; a
    frozen head (QLoRA) never computes d(weight).
    """
    _check_options(reduction, num_items, label_smoothing, softcap, z_loss, logit_scale)
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
