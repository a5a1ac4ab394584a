"""offloaded_checkpoint: gradients equal the un-checkpointed ones (CPU: plain recompute), RNG
replay for dropout, kwargs and non-tensor pass-through, frozen first input, no_grad; on a GPU the
inputs really leave the device and the overlapped copies give the same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from qkern_train.offload import MIN_OFFLOAD_NUMEL, offloaded_checkpoint


class Block(torch.nn.Module):
    """A residual layer with a frozen base weight, a trainable low-rank adapter, dropout, and
    keyword inputs like a transformer layer's (an int position tensor and a float table)."""

    def __init__(self, h: int, r: int = 4, p_drop: float = 0.1) -> None:
        super().__init__()
        self.base = torch.nn.Parameter(torch.randn(h, h) / h**0.5, requires_grad=False)
        self.a = torch.nn.Parameter(torch.randn(r, h) / h**0.5)
        self.b = torch.nn.Parameter(torch.randn(h, r) * 0.1)
        self.drop = torch.nn.Dropout(p_drop)

    def forward(self, x, table=None, position_ids=None, scale=1.0):
        y = x @ self.base.t() + self.drop(x) @ self.a.t() @ self.b.t()
        if table is not None:
            y = y * table[position_ids].unsqueeze(-1)
        return x + scale * torch.nn.functional.gelu(y)


def _stack(h, n, device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleList(Block(h) for _ in range(n)).to(device)


def _run(layers, x, ckpt, table, pos, seed=123):
    torch.manual_seed(seed)
    if x.is_cuda:
        torch.cuda.manual_seed(seed)
    h = x
    for layer in layers:
        if ckpt is None:
            h = layer(h, table, position_ids=pos, scale=0.5)
        else:
            h = ckpt(layer, h, table, position_ids=pos, scale=0.5)
    loss = (h.float() ** 2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for layer in layers for p in (layer.a, layer.b)]


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_cpu_grads_equal_uncheckpointed(input_requires_grad):
    """Dropout inside: the recompute must replay the same mask, or the gradients differ."""
    B, S, H = 2, 5, 16
    ref_layers, ck_layers = _stack(H, 3, "cpu"), _stack(H, 3, "cpu")
    x0 = torch.randn(B, S, H)
    table = torch.rand(S) + 0.5
    pos = torch.arange(S).expand(B, S)
    xr = x0.clone().requires_grad_(input_requires_grad)
    xc = x0.clone().requires_grad_(input_requires_grad)
    loss_r, grads_r = _run(ref_layers, xr, None, table, pos)
    loss_c, grads_c = _run(ck_layers, xc, offloaded_checkpoint, table, pos)
    assert torch.equal(loss_r, loss_c)
    for gr, gc in zip(grads_r, grads_c):
        torch.testing.assert_close(gc, gr, rtol=1e-6, atol=1e-7)
    if input_requires_grad:
        torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-6, atol=1e-7)


def test_cpu_rng_state_not_preserved_changes_mask():
    """With preserve_rng_state=False the recompute draws a new dropout mask: gradients differ
    (shows the replay test above can fail)."""
    B, S, H = 2, 5, 16
    ref_layers, ck_layers = _stack(H, 2, "cpu"), _stack(H, 2, "cpu")
    x0 = torch.randn(B, S, H)

    def ck(fn, *a, **k):
        return offloaded_checkpoint(fn, *a, preserve_rng_state=False, **k)

    _, grads_r = _run(ref_layers, x0.clone(), None, None, None)
    _, grads_c = _run(ck_layers, x0.clone(), ck, None, None)
    assert any(not torch.allclose(a, b) for a, b in zip(grads_r, grads_c))


def test_gradient_to_float_kwarg_and_tuple_outputs():
    w = torch.randn(6, 6, requires_grad=True)

    def fn(x, *, bias, k):
        return x @ w + bias, (x * k).sum()

    x = torch.randn(3, 6, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    y, s = fn(x, bias=bias, k=2)
    (y.sum() + s).backward()
    ref = [t.grad.clone() for t in (x, bias, w)]
    for t in (x, bias, w):
        t.grad = None
    y2, s2 = offloaded_checkpoint(fn, x, bias=bias, k=2)
    assert y2.requires_grad and s2.requires_grad
    (y2.sum() + s2).backward()
    for r, t in zip(ref, (x, bias, w)):
        torch.testing.assert_close(t.grad, r)


def test_no_grad_calls_fn_directly():
    calls = []

    def fn(x):
        calls.append(torch.is_grad_enabled())
        return x * 2

    with torch.no_grad():
        y = offloaded_checkpoint(fn, torch.ones(3, requires_grad=True))
    assert calls == [False] and not y.requires_grad


def test_accepts_use_reentrant_keyword():
    w = torch.randn(4, requires_grad=True)
    y = offloaded_checkpoint(lambda x: (x * w).sum(), torch.ones(4), use_reentrant=False)
    y.backward()
    assert torch.equal(w.grad, torch.ones(4))


def test_gradcheck_float64():
    """Gradients with respect to the inputs (parameters inside fn get theirs through
    ``.backward()``, as with reentrant checkpointing, not through ``torch.autograd.grad``)."""
    w = torch.randn(5, 5, dtype=torch.float64)

    def fn(x, b):
        return torch.tanh(x @ w + b)

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: offloaded_checkpoint(fn, x, b=b), (x, b))


# ----------------------------------------------------------------------------------------------
# GPU: the offload path
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_offload_grads_equal_and_inputs_leave_the_device(dtype):
    B, S, H, L = 2, 1024, 1024, 6  # each hidden state: 2M elements, over MIN_OFFLOAD_NUMEL
    assert B * S * H >= MIN_OFFLOAD_NUMEL
    ref_layers = _stack(H, L, "cuda").to(dtype)
    ck_layers = _stack(H, L, "cuda").to(dtype)
    x0 = torch.randn(B, S, H, device="cuda", dtype=dtype)
    table = torch.rand(S, device="cuda", dtype=dtype) + 0.5
    pos = torch.arange(S, device="cuda").expand(B, S)
    loss_r, grads_r = _run(ref_layers, x0.clone(), None, table, pos)
    loss_c, grads_c = _run(ck_layers, x0.clone(), offloaded_checkpoint, table, pos)
    # the recompute runs the same kernels on the same inputs: equal up to library nondeterminism;
    # a hidden state read before its copy finished would be off by far more than the tolerance
    torch.testing.assert_close(loss_c, loss_r)
    for gr, gc in zip(grads_r, grads_c):
        torch.testing.assert_close(gc, gr)

    # memory after the forward: plain checkpointing keeps L inputs, offloading about none
    def held_after_forward(ckpt):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        h = x0
        for layer in ck_layers:
            h = ckpt(layer, h, table, position_ids=pos, scale=0.5)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        (h.float() ** 2).mean().backward()
        return held

    plain = held_after_forward(
        lambda f, *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False, **k)
    )
    offl = held_after_forward(offloaded_checkpoint)
    one = x0.numel() * x0.element_size()
    assert plain - offl >= (L - 2) * one, (plain, offl, one)


@pytest.mark.gpu
def test_gpu_offload_many_steps_with_side_work():
    """Several steps with unrelated allocations between them: a buffer reused too early or a
    copy read before it finished would corrupt a hidden state and change the gradients."""
    B, S, H, L = 1, 2048, 1024, 8
    layers_ref, layers_ck = _stack(H, L, "cuda"), _stack(H, L, "cuda")
    for step in range(3):
        x0 = torch.randn(B, S, H, device="cuda")
        _, gr = _run(layers_ref, x0.clone(), None, None, None, seed=step)
        junk = [torch.randn(B, S, H, device="cuda") for _ in range(4)]  # churn the allocator
        _, gc = _run(layers_ck, x0.clone(), offloaded_checkpoint, None, None, seed=step)
        del junk
        for a, b in zip(gr, gc):
            torch.testing.assert_close(b, a)
        for layer in list(layers_ref) + list(layers_ck):
            layer.a.grad = layer.b.grad = None
