"""One optimizer step: qkern AdamW8bit vs torch fused AdamW (float32 states) vs bitsandbytes
AdamW8bit (when importable), on the LoRA adapters of Llama-3.1-8B and on single large tensors.

Bytes counted (fewest each format must move per element, read + write once; ps = parameter
bytes, gs = gradient bytes): 8-bit states 2*ps + gs + 4 (two uint8 codes read and written) +
16/256 (two float32 absmax per 256 elements, read and written); torch's states live in the
parameter dtype, 2*ps + gs + 4*ps. So for float32 parameters 16.06 B vs 28 B per element, for
bf16 10.06 B vs 14 B; the floors at ~3000 GB/s (H100 copy):

    lora-8b  (448 tensors, 41.9 M elements)  8-bit: 0.22 ms   torch: 0.39 ms
    64M fp32 (one tensor)                    8-bit: 0.36 ms   torch: 0.63 ms
    64M bf16 (one tensor)                    8-bit: 0.23 ms   torch: 0.31 ms

(no FLOP floor: ~20 flops per element are far below the matmul rate). qkern reads each gradient
once more than the floor (the non-finite check runs before any update: + gs per element, 20.06 B
for float32), so its own floor is 0.28 ms for lora-8b on an H100 (0.20 ms at the H200's ~4270
GB/s). A qkern step is a fixed handful of launches whatever the number of tensors (one gradient
check per gradient dtype, one update per parameter group/dtype/state kind, plus a table upload
when a gradient moved): 2 for the adapters. The extras report, per provider, ``launches`` (GPU
kernels and copies in one profiled step), ``kernel_ms`` (their summed GPU time) and ``host_ms``
(the time step() takes to return, GPU work queued; when it exceeds kernel_ms the do_bench time
is host time). ``state_B_per_param`` is the state memory actually allocated.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Ceilings, Row, bench_ms, kernel_events  # noqa: E402

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.999), 1e-8, 0.01


def lora_shapes_8b(r: int = 16) -> list[tuple[int, int]]:
    """(rows, cols) of every lora_A / lora_B of Llama-3.1-8B with adapters on all 7 projections."""
    h, i, kv, layers = 4096, 14336, 1024, 32
    projs = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out)
    shapes = []
    for _ in range(layers):
        for fan_in, fan_out in projs:
            shapes += [(r, fan_in), (fan_out, r)]
    return shapes


def _params(shapes, dtype, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device="cuda", generator=g).to(dtype) * 0.02)
        p.grad = (torch.randn(s, device="cuda", generator=g) * 1e-3).to(dtype)
        ps.append(p)
    return ps


def _bytes(n: int, ps: int, gs: int, eight_bit: bool) -> float:
    return n * (2 * ps + gs + (4 + 16 / 256 if eight_bit else 4 * ps))


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


def _launch_profile(step) -> dict:
    """Host time per step (calls returning, GPU work queued) and the GPU side of one step."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    host_ms = (time.perf_counter() - t0) / 20 * 1e3
    torch.cuda.synchronize()
    out = dict(host_ms=round(host_ms, 4))
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = kernel_events(prof)
        out.update(launches=len(events), kernel_ms=round(sum(us for _, us in events) / 1e3, 4))
    except Exception as e:  # profiler unavailable: keep the host time
        out.update(profile_error=type(e).__name__)
    return out


def _check_once() -> dict:
    """Two steps over a 1 M-element tensor, two LoRA matrices and a small (32-bit state) tensor
    in one optimizer: the multi-tensor kernels vs the CPU reference (codes, parameters)."""
    from qkern.optim8bit import AdamW8bit

    g = torch.Generator().manual_seed(0)
    shapes = [(1 << 20,), (16, 4096), (14336, 16), (100,)]
    ws = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    pa = [torch.nn.Parameter(w.cuda()) for w in ws]
    pb = [torch.nn.Parameter(w.clone()) for w in ws]
    oa, ob = AdamW8bit(pa, lr=LR, weight_decay=WD), AdamW8bit(pb, lr=LR, weight_decay=WD)
    for _ in range(2):
        for a, b, gr in zip(pa, pb, grads):
            a.grad, b.grad = gr.cuda(), gr.clone()
        oa.step()
        ob.step()
    code_diff, rel = 0, 0.0
    for a, b, w in zip(pa, pb, ws):
        for k, v in oa.state[a].items():
            if v.dtype == torch.uint8:
                code_diff = max(code_diff, int((v.cpu().int() - ob.state[b][k].int()).abs().max()))
        upd_a, upd_b = a.detach().cpu() - w, b.detach() - w
        rel = max(rel, float((upd_a - upd_b).norm() / upd_b.norm()))
    return dict(max_code_diff=code_diff, update_rel_err=rel)


def run(ceilings: Ceilings | None = None) -> list[Row]:
    from qkern.optim8bit import AdamW8bit

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    check = _check_once()
    cases = [
        ("lora-8b r16 (448 tensors)", lora_shapes_8b(), torch.float32),
        ("64M fp32", [(8192, 8192)], torch.float32),
        ("64M bf16", [(8192, 8192)], torch.bfloat16),
    ]
    rows: list[Row] = []
    for case, shapes, dtype in cases:
        n = sum(a * b for a, b in shapes)
        ps = gs = torch.tensor([], dtype=dtype).element_size()
        providers = [
            ("qkern", True, lambda p: AdamW8bit(p, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)),
            ("torch-fused", False,
             lambda p: torch.optim.AdamW(p, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                         fused=True)),
        ]  # fmt: skip
        if bnb is not None:
            providers.append(
                ("bitsandbytes", True,
                 lambda p: bnb.optim.AdamW8bit(p, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)),
            )  # fmt: skip
        for name, eight_bit, make in providers:
            params = _params(shapes, dtype)
            opt = make(params)
            opt.step()  # creates the states
            ms = bench_ms(opt.step)
            extra = dict(tensors=len(shapes), state_B_per_param=round(_state_bytes(opt) / n, 3))
            extra.update(_launch_profile(opt.step))
            if name == "qkern":
                extra.update(check)
            rows.append(Row("optim8bit", case, name, ms, bytes=_bytes(n, ps, gs, eight_bit),
                            extra=extra))  # fmt: skip
            del opt, params
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    from bench.common import format_table, measure_ceilings

    c = measure_ceilings()
    print(format_table(run(c), c))
