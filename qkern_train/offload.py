"""Activation checkpointing that parks each layer's input in pinned CPU memory.

``offloaded_checkpoint(fn, *args, **kwargs)`` is a drop-in for
``torch.utils.checkpoint.checkpoint`` as the model's ``checkpoint_fn``: the forward runs ``fn``
without building a graph and keeps only its inputs; the backward recomputes ``fn`` with a graph
and back-propagates through it. What differs is where the inputs wait:

* Large floating-point CUDA inputs (at least ``MIN_OFFLOAD_NUMEL`` elements: the hidden states,
  B*S*H) are copied to pinned host memory on a side CUDA stream and the GPU tensor is released.
  The side stream first waits for the compute stream (the input must be finished), and the
  input's memory is marked as in use by the side stream (``record_stream``) so the caching
  allocator cannot hand it to later compute kernels before the copy has read it. The compute
  stream never waits for the copy.
* In the backward the input comes back on the side stream into a buffer allocated from the
  compute stream's pool (the side stream first waits for the compute stream, so earlier users of
  that memory are done), and the compute stream waits on an event before recomputing. When a
  layer's backward starts, the input of the layer that ran before it in the forward (the next one
  the backward needs) is fetched at once, so that copy overlaps this layer's recompute and
  backward: at most two layer inputs are on the GPU at a time.
* Everything else (position ids, cu_seqlens, RoPE tables, small tensors, non-tensors, CPU
  tensors) is kept by reference, as plain checkpointing does. Without CUDA this is plain
  recompute checkpointing.

Memory: plain checkpointing keeps L layer inputs of B*S*H*2 bytes on the GPU (Llama-3.1-8B at
S=8192: 32 x 64 MiB = 2 GiB; at S=65536, 16 GiB); here that lives in host memory, and the GPU
holds two. Transfer: each input crosses PCIe twice (64 MiB at ~25-50 GB/s is 1.3-2.6 ms against
~6 ms of forward compute per layer at that shape), hidden behind compute when the link keeps up.
Pinned buffers come from PyTorch's caching host allocator, which rounds sizes up to powers of two.

Gradients: ``fn``'s own parameters (LoRA adapters) receive gradients during the recompute. The
backward always runs, even when no input requires a gradient (the first layer's input comes from
a frozen embedding), because a dummy input that requires grad is attached. Like
``torch.utils.checkpoint`` the CPU and CUDA random states are saved and restored for the
recompute (dropout masks repeat), and the autocast state is re-entered.

Limits: ``fn`` must return a tensor or a tuple of tensors; inputs must not be modified in place
after the call (the copy to the host is asynchronous); outputs are not double-differentiable; as
with reentrant checkpointing, parameters used inside ``fn`` get their gradients from
``.backward()`` (accumulated into ``.grad``), not from ``torch.autograd.grad(..., inputs=...)``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

# Inputs smaller than this stay on the GPU: offloading RoPE tables (S x D/2 floats) or masks
# saves little and costs a PCIe round trip; hidden states are millions of elements.
MIN_OFFLOAD_NUMEL = 1 << 20

_side_streams: dict[torch.device, torch.cuda.Stream] = {}
_chain = threading.local()  # .last: weakref to the most recent _SavedInputs of this thread


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def _offloadable(t: Any) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.is_cuda
        and t.is_floating_point()
        and t.numel() >= MIN_OFFLOAD_NUMEL
    )


class _HostCopy:
    """One input parked in pinned host memory, and the way back."""

    def __init__(self, t: torch.Tensor) -> None:
        self.device = t.device
        self.requires_grad = t.requires_grad
        self.stream = _side_stream(t.device)
        compute = torch.cuda.current_stream(t.device)
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(compute)  # t has been written by the compute stream
        with torch.cuda.stream(self.stream):
            self.host.copy_(t, non_blocking=True)
        # t may be freed as soon as we return: keep its memory from being reused by the compute
        # stream until the side stream's copy (queued above) has read it
        t.record_stream(self.stream)
        self.gpu: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None

    def prefetch(self) -> None:
        """Start the copy back to the GPU on the side stream (idempotent)."""
        if self.gpu is not None or self.host is None:
            return
        compute = torch.cuda.current_stream(self.device)
        # the buffer comes from the compute stream's pool; whoever used that memory before on the
        # compute stream must be done before the side stream overwrites it
        self.stream.wait_stream(compute)
        self.gpu = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        with torch.cuda.stream(self.stream):
            self.gpu.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)

    def fetch(self) -> torch.Tensor:
        """The input on the GPU, ordered before the compute stream's next kernels."""
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        gpu, self.gpu, self.host = self.gpu, None, None  # the host buffer returns to the cache
        return gpu


class _SavedInputs:
    """The inputs of one checkpointed call: host copies, plus a link to the call before it."""

    def __init__(self, copies: dict[int, _HostCopy]) -> None:
        self.copies = copies
        last = getattr(_chain, "last", None)
        self.prev: weakref.ref | None = last
        _chain.last = weakref.ref(self)

    def prefetch(self) -> None:
        for c in self.copies.values():
            c.prefetch()

    def fetch(self) -> dict[int, torch.Tensor]:
        return {i: c.fetch() for i, c in self.copies.items()}


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu")]


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, n_args, kw_names, preserve_rng, _dummy, *flat):  # type: ignore[override]
        ctx.fn, ctx.n_args, ctx.kw_names, ctx.preserve_rng = fn, n_args, kw_names, preserve_rng
        ctx.autocast = _autocast_state()
        cuda_devices = sorted({t.device.index for t in flat if isinstance(t, torch.Tensor) and
                               t.is_cuda})  # fmt: skip
        ctx.cuda_devices = cuda_devices
        if preserve_rng:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in cuda_devices]

        copies: dict[int, _HostCopy] = {}
        kept: list[torch.Tensor] = []
        # per flat entry: ("host", requires_grad) | ("kept", requires_grad) | ("value", object)
        ctx.layout = []
        for i, a in enumerate(flat):
            if _offloadable(a):
                copies[i] = _HostCopy(a)
                ctx.layout.append(("host", a.requires_grad))
            elif isinstance(a, torch.Tensor):
                ctx.layout.append(("kept", a.requires_grad))
                kept.append(a)
            else:
                ctx.layout.append(("value", a))
        ctx.saved = _SavedInputs(copies) if copies else None
        ctx.save_for_backward(*kept)

        args, kwargs = _unflatten(flat, n_args, kw_names)
        with torch.no_grad():
            return fn(*args, **kwargs)

    @staticmethod
    def backward(ctx, *grad_outputs):  # type: ignore[override]
        fetched: dict[int, torch.Tensor] = {}
        if ctx.saved is not None:
            fetched = ctx.saved.fetch()
            prev = ctx.saved.prev() if ctx.saved.prev is not None else None
            if prev is not None:
                prev.prefetch()  # overlaps with this layer's recompute and backward
        kept = iter(ctx.saved_tensors)
        inputs: list[Any] = []
        for i, (kind, info) in enumerate(ctx.layout):
            if kind == "value":
                inputs.append(info)
                continue
            t = fetched[i] if kind == "host" else next(kept)
            inputs.append(t.detach().requires_grad_(info))

        args, kwargs = _unflatten(inputs, ctx.n_args, ctx.kw_names)
        devices = [torch.device("cuda", d) for d in ctx.cuda_devices]
        with torch.random.fork_rng(devices=devices, enabled=ctx.preserve_rng):
            if ctx.preserve_rng:
                torch.set_rng_state(ctx.cpu_rng)
                for d, state in zip(devices, ctx.cuda_rng):
                    torch.cuda.set_rng_state(state, d)
            with torch.enable_grad(), _autocast_ctx(ctx.autocast):
                outputs = ctx.fn(*args, **kwargs)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [
            (o, g)
            for o, g in zip(outputs, grad_outputs)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.saved = None
        grads = tuple(
            t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs
        )
        return (None, None, None, None, None, *grads)


class _autocast_ctx:
    """Re-enter the autocast state the forward ran under (CUDA and CPU)."""

    def __init__(self, state: list[tuple[str, bool, torch.dtype]]) -> None:
        self.ctxs = [torch.autocast(d, dtype=dt, enabled=en) for d, en, dt in state]

    def __enter__(self) -> None:
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc: object) -> None:
        for c in reversed(self.ctxs):
            c.__exit__(*exc)


def _unflatten(flat, n_args: int, kw_names: tuple[str, ...]):
    return tuple(flat[:n_args]), dict(zip(kw_names, flat[n_args:]))


# One leaf that requires grad, passed to every call so that the Function's outputs require grad
# (and its backward runs) even when no real input does.
_DUMMY = torch.empty(0, requires_grad=True)


def offloaded_checkpoint(
    fn: Callable[..., Any],
    *args: Any,
    use_reentrant: bool | None = None,
    preserve_rng_state: bool = True,
    **kwargs: Any,
) -> Any:
    """Checkpoint ``fn(*args, **kwargs)`` with its large CUDA inputs parked in pinned host memory.

    Accepts (and ignores) ``use_reentrant`` so it can replace ``torch.utils.checkpoint.checkpoint``
    where that is called with it. Under ``torch.no_grad()`` it simply calls ``fn``.
    """
    del use_reentrant  # always the Function-based (recompute-in-backward) form
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    kw_names = tuple(kwargs)
    flat = (*args, *kwargs.values())
    return _OffloadedCheckpoint.apply(fn, len(args), kw_names, preserve_rng_state, _DUMMY, *flat)
