"""A whole QLoRA training step (forward, backward, optimizer) captured once as a CUDA graph.

For fixed shapes only (the same ids/labels tensors are refilled between replays). PyTorch's
whole-network recipe: warm-up steps on a side stream (Triton compiles and autotunes there, the
optimizer state and workspaces are allocated), then one step captured with gradients reset to
None, so backward allocates them in the graph's pool. Requirements on the step: an optimizer
built with ``capturable=True`` (its step counter on the GPU), checkpointing without RNG-state
stashing (``preserve_rng_state=False``; dropout 0), and no host syncs in any kernel. The
warm-up must run on the side stream and not the legacy default one: autograd keeps each leaf's
gradient accumulator on the stream it last ran on, and one left on the default stream cannot
join the capture.
"""

from __future__ import annotations

import torch


def side_stream_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    stream: torch.cuda.Stream,
) -> list[torch.Tensor]:
    """``n`` eager training steps (zero_grad, ``model.loss``, backward, step) on ``stream``,
    ordered after the current stream's work and before its later work; the detached losses."""
    losses = []
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(ids, labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().clone())
            del loss
    torch.cuda.current_stream().wait_stream(stream)
    return losses


def capture_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture one training step (after ``side_stream_steps`` warmed it up); returns the graph
    and the static loss tensor each ``graph.replay()`` rewrites."""
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = model.loss(ids, labels)
        static_loss.backward()
        optimizer.step()
    return graph, static_loss
