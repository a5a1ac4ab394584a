"""Where the time of an end-to-end QLoRA step goes: CUDA kernel time per op class.

Builds the benchmark model (default the 1B case of bench_e2e), runs two warm-up steps (Triton
autotuning, allocator warm-up), then records ``--steps`` steps (default 3) with
``torch.profiler`` and sums the GPU time of every kernel into a class by its name:

    matmul            cuBLAS / CUTLASS GEMMs (dense bf16 matmuls: LoRA, dequantized weights, head)
    nf4 fused matmul  qkern kernels that dequantize NF4 inside the matmul
    nf4 dequant       stand-alone NF4 (de)quantization kernels
    attention         flash-attention forward / backward kernels
    norm/rope/swiglu  RMSNorm, RoPE, SwiGLU and other fused elementwise model kernels
    cross-entropy     the (fused linear) cross-entropy kernels
    optimizer         AdamW / AdamW8bit / multi-tensor kernels, gradient norms
    copies            memcpy / memset / fill / copy / cast / cat kernels
    other elementwise PyTorch elementwise and reduction kernels not named above
    other             the rest

It also reports the wall time of the profiled steps and the GPU-idle share (wall time minus the
sum of kernel times, when positive: launch gaps and host synchronization; kernels that overlap,
e.g. copies on the offload stream, make the sum exceed the wall time). The classes go by kernel
names, so the top kernels are listed too: check their classes when kernels are renamed.

    PYTHONPATH=. python3 bench/profile_e2e.py [--case 1b-b2-s2048] [--steps 3]
        [--json OUT/profile.json] [--trace OUT/trace.json] [--cprofile N]

With ``--cprofile N`` it also runs N more steps under Python's cProfile and lists the functions
with the most host time (self and cumulative): when the GPU idles, the step is host-bound and this
list says which Python (launchers, autograd Functions, torch op dispatch) the host spends it in.
cProfile slows Python down, so read shares, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_e2e import (  # noqa: E402
    SHAPES,
    _free,
    build_qlora_model,
    make_optimizer,
    parse_case,
    set_checkpointing,
    shifted_labels,
)
from bench.common import kernel_events  # noqa: E402

# first match wins; patterns are searched in lower-cased kernel names
CLASSES: list[tuple[str, str]] = [
    ("nf4 fused matmul", r"nf4.*(matmul|mm|gemm|dot)|qlora|fused_lora|lora_(mlp|qkv)"),
    ("nf4 dequant", r"nf4|dequant|quantize_4bit|4bit"),
    ("attention", r"attn|attention|flash|fmha|sdpa|_dkdv|_dq_"),
    ("cross-entropy", r"cross_entropy|crossentropy|_ce_|logsumexp|nll_loss|log_softmax"),
    ("optimizer", r"adam|optim|multi_tensor|foreach|lpnorm"),
    ("norm/rope/swiglu", r"rms|norm|rope|rotary|swiglu|silu|gelu"),
    ("matmul", r"gemm|matmul|cutlass|nvjet|xmma|cublas|sm90_|sm80_|_mm_|splitk|gemv"),
    ("copies", r"memcpy|memset|copy|fillfunctor|catarray"),
    ("other elementwise", r"elementwise|vectorized|reduce|unrolled"),
]
_COMPILED = [(name, re.compile(pat)) for name, pat in CLASSES]


def classify(kernel_name: str) -> str:
    low = kernel_name.lower()
    for name, pat in _COMPILED:
        if pat.search(low):
            return name
    return "other"


def _host_profile(step, steps: int, top: int = 45) -> dict:
    """Top functions by self and by cumulative host time over ``steps`` steps under cProfile."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    wall = (time.perf_counter() - t0) / steps
    stats = pstats.Stats(prof)

    def rows(key: int) -> list[dict]:
        items = sorted(stats.stats.items(), key=lambda kv: -kv[1][key])[:top]
        return [
            dict(
                func=f"{Path(f).name}:{line}:{name}",
                calls_per_step=nc / steps,
                self_ms_per_step=tt / steps * 1e3,
                cum_ms_per_step=ct / steps * 1e3,
            )
            for (f, line, name), (_, nc, tt, ct, _) in items
        ]

    return dict(wall_ms_per_step_under_cprofile=wall * 1e3, by_self=rows(2), by_cumulative=rows(3))


def profile(
    case_name: str = "1b-b2-s2048", steps: int = 3, trace: str | None = None, cprofile: int = 0
) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from qkern_train.lora import lora_parameters

    case = parse_case(case_name)
    model = build_qlora_model(case.shape)
    set_checkpointing(model, case.ckpt)
    opt = make_optimizer(lora_parameters(model), case.optim)
    g = torch.Generator(device="cuda").manual_seed(1234)
    ids = torch.randint(
        0, SHAPES[case.shape]["vocab_size"], (case.batch, case.seq), device="cuda", generator=g
    )
    labels = shifted_labels(ids)

    def step() -> None:
        loss = model.loss(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    if trace:
        prof.export_chrome_trace(trace)

    per_class: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    for name, us in kernel_events(prof):
        per_class[classify(name)] += us
        per_kernel[name] += us
    total = sum(per_class.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:30]
    result = dict(
        case=case_name,
        steps=steps,
        wall_ms_per_step=wall_us / steps / 1e3,
        kernel_ms_per_step=total / steps / 1e3,
        gpu_idle_share=max(0.0, 1 - total / wall_us),
        classes={
            k: dict(ms_per_step=v / steps / 1e3, share=v / total if total else 0.0)
            for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])
        },
        top_kernels=[dict(name=n, cls=classify(n), ms_per_step=us / steps / 1e3) for n, us in top],
    )
    if cprofile:
        result["host"] = _host_profile(step, cprofile)
    return result


def format_profile(r: dict) -> str:
    lines = [
        f"{r['case']}: {r['wall_ms_per_step']:.1f} ms/step wall, "
        f"{r['kernel_ms_per_step']:.1f} ms/step in kernels, "
        f"GPU idle {100 * r['gpu_idle_share']:.1f}%",
        f"{'class':<20} {'ms/step':>9} {'share':>7}",
    ]
    for k, v in r["classes"].items():
        lines.append(f"{k:<20} {v['ms_per_step']:>9.2f} {100 * v['share']:>6.1f}%")
    lines.append("\ntop kernels:")
    for t in r["top_kernels"]:
        lines.append(f"  {t['ms_per_step']:>8.3f} ms  {t['cls']:<18} {t['name'][:110]}")
    host = r.get("host")
    if host:
        lines.append(
            f"\nhost (cProfile, {host['wall_ms_per_step_under_cprofile']:.1f} ms/step under it):"
        )
        for title, key in (("by self time", "by_self"), ("by cumulative time", "by_cumulative")):
            lines.append(f"  {title}:  calls/step  self ms  cum ms")
            for h in host[key]:
                lines.append(
                    f"    {h['calls_per_step']:>9.0f} {h['self_ms_per_step']:>8.2f} "
                    f"{h['cum_ms_per_step']:>8.2f}  {h['func'][:100]}"
                )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="1b-b2-s2048")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--trace", default=None, help="also write a chrome trace here")
    ap.add_argument("--cprofile", type=int, default=0, help="also profile N steps' host time")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profiling needs a CUDA device")
        return 2
    r = profile(args.case, args.steps, args.trace, args.cprofile)
    _free()
    print(format_profile(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
