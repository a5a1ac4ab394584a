"""RMSNorm: y = (x / sqrt(mean(x^2) + eps)) * weight over the last dimension, forward and backward.

Numerics follow Llama's RMSNorm as HuggingFace implements it, in this order:

    rstd = 1 / sqrt(mean(float32(x)^2) + eps)       # statistics in float32
    xhat = round_to(x.dtype, float32(x) * rstd)      # normalised row, rounded to the input dtype
    y    = round_to(x.dtype, xhat * weight)          # product in float32, rounded once

The reference :func:`rms_norm_ref` and the kernels use the same order, so on bf16 inputs with a bf16
weight the result equals HF's ``weight * hidden.to(input_dtype)`` up to the float32 summation order
of the mean. The output dtype is always ``x.dtype`` (HF returns float32 when the weight is float32
and x is not; we do not). Float64 inputs compute in float64 end to end (used by gradient checks).

Backward, with g = dy * weight and xhat = float32(x) * rstd (the roundings to x.dtype are
treated as identity for dx, as autograd does through HF's casts):

    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * round_to(x.dtype, xhat)     # the factor the forward multiplied w by

dw is accumulated per program over a contiguous block of rows into a float32 partial buffer of
shape (programs, N) and reduced once afterwards: no atomics. The number of programs (2 to 16 per
SM, tuned) trades load overlap against partial-buffer traffic: 132 SMs * 4 * 4096 * 4 B = 8.6 MB
written and read back, against 671 MB moved by fwd+bwd at 16384 x 4096 bf16. When the weight
does not require a gradient (frozen norms in QLoRA) the backward only computes dx, one row per
program.

Limits: x of any leading shape with a last dimension of at most 65536 elements (one row is held in
registers; efficient up to ~16K); dtypes float16, bfloat16, float32, float64 (weight of any of
these). No in-place variant: the forward output cannot overwrite x because the backward needs
x, and x is the residual stream that stays alive anyway, so the forward saves only x (by
reference) and rstd (4 B per row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkern._backend import check_float, check_same_device, next_power_of_2, num_sms, pick_configs
from qkern._backend import use_triton as _use_triton

MAX_WIDTH = 65536
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Backward with dW: P programs per SM each loop over a contiguous block of rows and keep one
# float32 dW partial row. More programs overlap more loads with the per-row reductions (and fill
# the last wave better) but write and re-read a larger partial buffer: at N=4096, 132 SMs, 16
# per SM is 2112 x 16 KiB = 35 MB written + read, 10% of the 671 MB the op moves; 2 per SM is
# 1.3%. The tuner picks P together with num_warps; the host reads the choice back to know how
# many partial rows to reduce.
_BWD_PROGRAMS_PER_SM = (4, 2, 8, 16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(
    configs=pick_configs([triton.Config({}, num_warps=w) for w in (4, 8, 16, 2)]),
    key=["N", "ROWS", "BLOCK_N"],
)
@triton.jit
def _rms_norm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    M,
    N,
    stride_x,
    stride_y,
    eps,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """ROWS rows per program. rstd_r = 1/sqrt(sum_j x_rj^2 / N + eps) in ACC (float32, or float64
    for float64 input); y_rj = round(round(x_rj * rstd_r) * w_j), rounding to Y's dtype."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    mean_sq = tl.sum(x * x, axis=1) / N
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    xhat = (x * rstd[:, None]).to(Y.dtype.element_ty).to(ACC)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    y = xhat * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.autotune(
    configs=pick_configs(
        [
            triton.Config({"PROGRAMS_PER_SM": p}, num_warps=w)
            for p in _BWD_PROGRAMS_PER_SM
            for w in (8, 4, 16)
        ]
    ),
    key=["N", "BLOCK_N", "COMPUTE_DW"],
)
@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PART,
    M,
    N,
    stride_dy,
    stride_x,
    stride_dx,
    ACC: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # sets the grid (host side) only
):
    """Program p of P handles rows [p*R, min((p+1)*R, M)), R = cdiv(M, P). Per row, with
    g = dy*w and xhat = x*rstd (unrounded, as autograd differentiates the float32 math):
    dx = rstd*(g - xhat*sum(g*xhat)/N).
    With COMPUTE_DW it also sums dy*round(xhat) over its rows (the forward multiplied w by the
    rounded xhat) and stores that partial dW row at DW_PART[p, :] (float32/ACC)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    rows_per_program = tl.cdiv(M, tl.num_programs(0))
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = tl.minimum(row_start + rows_per_program, M) - row_start  # may be <= 0: no rows
    for i in range(0, n_rows):
        row64 = row_start + i
        x = tl.load(X + row64 * stride_x + cols, mask=cmask, other=0.0).to(ACC)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=cmask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + row64)
        xhat = x * rstd
        g = dy * w
        c = tl.sum(g * xhat, axis=0) / N
        dx = (g - xhat * c) * rstd
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=cmask)
        if COMPUTE_DW:
            # the forward multiplied w by xhat rounded to x's dtype
            dw += dy * xhat.to(X.dtype.element_ty).to(ACC)
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw, mask=cmask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _rows_2d(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as (rows, n) with unit stride along n (a view when possible, else a copy)."""
    t2 = t.reshape(-1, n)
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _fwd_rows_per_program(block_n: int) -> int:
    # Narrow rows (head-dim norms, tests) would leave most lanes idle with one row per program:
    # pack rows until a program holds ~2048 elements. Wide rows (hidden sizes) get one row each.
    return max(1, min(64, 2048 // block_n))


def _rms_norm_fwd(
    x2: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    y: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
):
    """y (M, N) and rstd (M,) for 2-D x2 with unit stride along N; ``y``/``rstd`` may be given."""
    m, n = x2.shape
    if y is None:
        y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if rstd is None:
        rstd = torch.empty((m,), dtype=_acc_dtype(x2.dtype), device=x2.device)
    if m == 0:
        return y, rstd
    block_n = next_power_of_2(n)
    rows = _fwd_rows_per_program(block_n)
    grid = (triton.cdiv(m, rows),)
    _rms_norm_fwd_kernel[grid](
        x2, weight, y, rstd, m, n, x2.stride(0), y.stride(0), float(eps),
        ACC=_tl_acc(x2.dtype), ROWS=rows, BLOCK_N=block_n,
    )  # fmt: skip
    return y, rstd


def _rms_norm_bwd(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
    dx: torch.Tensor | None = None,
):
    """dx (M, N), and dw (N,) in weight's dtype when ``compute_dw``; ``dx`` may be given."""
    m, n = x2.shape
    if dx is None:
        dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        dw = torch.zeros_like(weight) if compute_dw else None
        return dx, dw
    block_n = next_power_of_2(n)
    sms = num_sms(x2.device)

    def programs(per_sm: int) -> int:
        # without dW there is no partial buffer to keep small: one row per program
        return min(m, per_sm * sms) if compute_dw else m

    acc = _acc_dtype(x2.dtype)
    max_programs = programs(max(_BWD_PROGRAMS_PER_SM))
    part = torch.empty((max_programs, n) if compute_dw else (1,), dtype=acc, device=x2.device)
    _rms_norm_bwd_kernel[lambda meta: (programs(meta["PROGRAMS_PER_SM"]),)](
        dy2, x2, weight, rstd, dx, part, m, n,
        dy2.stride(0), x2.stride(0), dx.stride(0),
        ACC=_tl_acc(x2.dtype), COMPUTE_DW=compute_dw, BLOCK_N=block_n,
    )  # fmt: skip
    dw = None
    if compute_dw:
        used = programs(_rms_norm_bwd_kernel.best_config.kwargs["PROGRAMS_PER_SM"])
        dw = part[:used].sum(0).to(weight.dtype)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RMSNorm kernels. Saves x and rstd (one float per row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        x2 = _rows_2d(x, n)
        y, rstd = _rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows_2d(dy, x2.shape[1])
        dx, dw = _rms_norm_bwd(dy2, x2, weight, rstd, compute_dw=ctx.needs_input_grad[1])
        dx = dx.view(dy.shape) if ctx.needs_input_grad[0] else None
        return dx, dw, None


# ----------------------------------------------------------------------------------------------
# reference and public API
# ----------------------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-PyTorch RMSNorm in the order stated in the module docstring (differentiable)."""
    acc = _acc_dtype(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = (xf * rstd).to(x.dtype)
    return (xhat.to(acc) * weight.to(acc)).to(x.dtype)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_float(x, "x", _DTYPES)
    check_float(weight, "weight", _DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one)")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match the last dimension of x "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_same_device(x=x, weight=weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape); output in ``x.dtype``.

    Gradients flow to ``x`` and, when it requires grad, to ``weight``.
    """
    _check(x, weight, eps)
    if not _use_triton(x, weight):
        return rms_norm_ref(x, weight, eps)
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(
            f"rms_norm kernel supports rows up to {MAX_WIDTH} elements, got {x.shape[-1]}"
        )
    return RMSNormFunction.apply(x, weight, float(eps))


class RMSNorm(torch.nn.Module):
    """``y = rms_norm(x, weight, eps)`` with a trainable ``weight`` initialised to ones."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
