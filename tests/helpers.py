"""Helpers the test files share: where kernels run, the tolerance rule, output poisoning."""

from __future__ import annotations

import torch


def kernel_device() -> str:
    """Device the Triton kernels are tested on: CUDA when present, else CPU via the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def assert_close_rule(
    out: torch.Tensor,
    ref64: torch.Tensor,
    torch_same_dtype: torch.Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 0.0,
    name: str = "output",
) -> None:
    """max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + atol (+ rtol * |ref64| each).

    ``ref64`` is the reference in float64; ``torch_same_dtype`` is the plain-PyTorch computation in
    the kernel's own dtype, whose worst error sets the budget. This is the rule flash-attn's tests
    use (they compare maxima): an element-wise budget would fail a correct bf16 kernel whenever it
    rounds one element the other way from a PyTorch result that happened to round exactly. Without
    ``torch_same_dtype`` the bound is element-wise ``atol + rtol * |ref64|``. NaN never passes.
    """
    out64 = out.detach().to(torch.float64).cpu()
    ref = ref64.detach().to(torch.float64).cpu()
    assert out64.shape == ref.shape, f"{name}: shape {tuple(out64.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out64).any(), f"{name}: NaN in output (unwritten or overflowed)"
    budget = atol + rtol * ref.abs()
    same_max = 0.0
    if torch_same_dtype is not None:
        same = torch_same_dtype.detach().to(torch.float64).cpu()
        assert not torch.isnan(same).any(), f"{name}: NaN in the same-dtype PyTorch result"
        same_max = (same - ref).abs().max().item() if ref.numel() else 0.0
        budget = budget + 2 * same_max
    err = (out64 - ref).abs()
    bad = err > budget
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements over budget; first at {idx}: "
            f"got {out64[idx].item():.6g}, want {ref[idx].item():.6g}, "
            f"budget {budget[idx].item():.3g}; max err {err.max().item():.3g}, "
            f"max err of the same-dtype PyTorch result {same_max:.3g}"
        )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
