"""Cross-entropy benchmarks: the lm_head + loss of a Llama-3 sized vocabulary, forward + backward.

Case: T = 8192 rows, H = 4096, V = 128256, bf16, labels all valid. Every timing is forward +
backward; the peak column is torch.cuda.max_memory_allocated() above what was allocated before the
call (inputs excluded, gradients included: d(weight) alone is V H 2 B = 1002 MiB), and
``peak_minus_grads_MiB`` subtracts the gradients the call must return.

Floors on an H100 (~700 TFLOP/s bf16, ~3000 GB/s copy); the larger of the two is the floor:

* linear + CE, trained head: 3 products of 2 T H V = 8.61 TFLOP each (logits, d hidden,
  d weight) = 25.8 TFLOP -> 36.9 ms; bytes (read W twice, h, write dW, dh) ~ 3.3 GB -> 1.1 ms.
* linear + CE, frozen head: 2 products = 17.2 TFLOP -> 24.6 ms.
* CE on logits: read the bf16 logits once, write the bf16 gradient once: 2 x 2.10 GB = 4.2 GB
  -> 1.40 ms (0.99 ms at the H200's 4250 GB/s); the flops (a few per element) are far below the
  matmul floor, but two exp2 per element on the 16/clk/SM special-function unit take ~0.5 ms.
  "qkern" is the default (validate=True: the label check reads a count copied to the host while
  the kernel runs), "qkern-novalidate" skips it, "qkern-inplace" writes the gradient into the
  logits. The "CE logits ... loss only" case (no gradient: pass 1 alone, one read, floor 2.1 GB)
  separates pass 1 from pass 2 when reading the numbers.

Chunk sweep (linear + CE): "qkern-c<R>" rows force R rows per chunk (the private override of the
rule in qkern/cross_entropy.py; "qkern" is the rule's own choice, its ``chunk_rows`` extra) for R
in 1024 ... 2048: the logits buffer is R x V x 2 B (250.5 MiB at 1024, 501 MiB at 2048), and the
d-hidden product (R x H output, K = V) fills 0.97 / 1.21 / 1.45 / 1.70 / 1.94 waves of 128 x 256
tiles on 132 SMs. The default "qkern" rows also carry a kernel-time breakdown from the profiler
(GEMM, CE kernel, label scans, other; ``gaps_ms`` = do_bench time minus the kernels' sum) and the
cuBLAS kernels that ran (their names give tile shape and split-K / stream-K).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench.common import Ceilings, Row, bench_ms, kernel_events

T, H, V = 8192, 4096, 128256
MIB = 2**20
SWEEP_ROWS = (1024, 1280, 1536, 1792, 2048)


def _peak_extra_mib(fn) -> float:
    """Peak allocation during ``fn`` above the allocation before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-300)).item()


def _kernel_breakdown(step) -> dict:
    """GPU time per kernel family of one ``step`` (profiled, 3 steps averaged), in ms, and the
    cuBLAS kernels with their calls per step and mean microseconds."""
    step()
    torch.cuda.synchronize()
    iters = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    fams = {"gemm_ms": 0.0, "ce_ms": 0.0, "scan_ms": 0.0, "other_ms": 0.0}
    gemms: dict[str, list[float]] = {}
    for name, us in kernel_events(prof):
        low = name.lower()
        if "_ce_kernel" in low:
            fams["ce_ms"] += us
        elif "label_scan" in low:
            fams["scan_ms"] += us
        elif any(k in low for k in ("gemm", "xmma", "nvjet", "cutlass", "splitk", "sm90")):
            fams["gemm_ms"] += us
            gemms.setdefault(name[:72], []).append(us)
        else:
            fams["other_ms"] += us
    out = {k: v / iters / 1e3 for k, v in fams.items()}
    top = sorted(gemms.items(), key=lambda kv: -sum(kv[1]))[:4]
    out["gemm_kernels"] = " | ".join(
        f"{n} x{len(v) / iters:g} {sum(v) / len(v):.0f}us" for n, v in top
    )
    return out


def _linear_rows(ceilings: Ceilings) -> list[Row]:
    import qkern

    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=gen) * H**-0.5
    y = torch.randint(0, V, (T,), device="cuda", generator=gen)
    flop_mm = 2 * T * H * V

    providers = {
        "torch": lambda hh, ww: F.cross_entropy((hh @ ww.t()).float(), y),
        "qkern": lambda hh, ww: qkern.fused_linear_cross_entropy(hh, ww, y),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def liger_fn(hh, ww):
            out = liger(ww, hh, y)
            return out[0] if isinstance(out, tuple) else out

        providers["liger"] = liger_fn
    except Exception:  # liger-kernel not installed
        pass

    rows: list[Row] = []
    for train_w in (True, False):
        hh = h.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(train_w)
        case = f"lin+CE T{T} H{H} V{V} " + ("dW" if train_w else "frozen")
        grad_mib = (hh.numel() + (ww.numel() if train_w else 0)) * 2 / MIB
        results = {}
        for name, fn in providers.items():

            def step(fn=fn, hh=hh, ww=ww):
                hh.grad = None
                ww.grad = None
                loss = fn(hh, ww)
                loss.backward()
                return loss

            loss = step()  # warm-up (and autotune) outside the measurement
            grads = (hh.grad.clone(), ww.grad.clone() if train_w else None)
            results[name] = (loss.detach().float(), grads)
            hh.grad = ww.grad = None
            peak = _peak_extra_mib(step)
            hh.grad = ww.grad = None
            ms = bench_ms(step, warmup=1, rep=400)
            hh.grad = ww.grad = None
            del step
            torch.cuda.empty_cache()
            rows.append(
                Row(
                    "cross_entropy",
                    case,
                    name,
                    ms,
                    flops=(3 if train_w else 2) * flop_mm,
                    extra={"peak_extra_MiB": peak, "peak_minus_grads_MiB": peak - grad_mib},
                )
            )
        ref_loss, (ref_dh, ref_dw) = results["torch"]
        case_rows = {r.provider: r for r in rows[-len(providers) :]}
        for row in case_rows.values():
            row.extra["vs_torch"] = row.ms / case_rows["torch"].ms
            if "liger" in case_rows:
                row.extra["vs_liger"] = row.ms / case_rows["liger"].ms
            if row.provider != "torch":
                loss, (dh, dw) = results[row.provider]
                row.extra["loss_rel_err"] = abs(loss.item() - ref_loss.item()) / ref_loss.item()
                row.extra["dh_rel_err"] = _rel(dh, ref_dh)
                if dw is not None:
                    row.extra["dw_rel_err"] = _rel(dw, ref_dw)
        rows += _chunk_sweep(hh, ww, y, train_w, case, case_rows, ref_dh, grad_mib)
    return rows


def _chunk_sweep(hh, ww, y, train_w, case, case_rows, ref_dh, grad_mib) -> list[Row]:
    """qkern at forced chunk sizes (do_bench with a modest rep), and the default's breakdown."""
    import qkern

    ce = importlib.import_module("qkern.cross_entropy")  # the module, not the lazy export

    def step():
        hh.grad = None
        ww.grad = None
        loss = qkern.fused_linear_cross_entropy(hh, ww, y)
        loss.backward()
        return loss

    default = case_rows["qkern"]
    default.extra["chunk_rows"] = ce._flce_chunk_rows(T, V, H, 2, train_w, hh.device)
    default.extra.update(_kernel_breakdown(step))
    kern = sum(default.extra[k] for k in ("gemm_ms", "ce_ms", "scan_ms", "other_ms"))
    default.extra["gaps_ms"] = default.ms - kern
    hh.grad = ww.grad = None
    torch.cuda.empty_cache()
    rows = []
    try:
        for chunk in SWEEP_ROWS:
            ce._FLCE_CHUNK_ROWS = chunk
            step()  # warm-up
            err = _rel(hh.grad, ref_dh)
            hh.grad = ww.grad = None
            peak = _peak_extra_mib(step)
            hh.grad = ww.grad = None
            ms = bench_ms(step, warmup=1, rep=150)
            hh.grad = ww.grad = None
            torch.cuda.empty_cache()
            rows.append(
                Row(
                    "cross_entropy",
                    case,
                    f"qkern-c{chunk}",
                    ms,
                    flops=(3 if train_w else 2) * 2 * T * H * V,
                    extra={
                        "peak_extra_MiB": peak,
                        "peak_minus_grads_MiB": peak - grad_mib,
                        "buffer_MiB": chunk * V * 2 / MIB,
                        "vs_torch": ms / case_rows["torch"].ms,
                        "dh_rel_err": err,
                    },
                )
            )
    finally:
        ce._FLCE_CHUNK_ROWS = None
    return rows


def _ce_grad_rel_err(grad: torch.Tensor, base: torch.Tensor, y: torch.Tensor) -> float:
    """||grad - ref|| / ||ref|| for the mean cross-entropy's d/dlogits, ref = (softmax - onehot) / T
    in fp32, built 1024 rows at a time (no second T x V fp32 tensor)."""
    num = den = 0.0
    for s in range(0, base.shape[0], 1024):
        ref = torch.softmax(base[s : s + 1024].float(), dim=-1)
        ref[torch.arange(ref.shape[0], device=ref.device), y[s : s + 1024]] -= 1.0
        ref /= base.shape[0]
        num += (grad[s : s + 1024].float() - ref).square().sum().item()
        den += ref.square().sum().item()
    return (num / den) ** 0.5


def _logits_rows(ceilings: Ceilings) -> list[Row]:
    import qkern

    gen = torch.Generator(device="cuda").manual_seed(1)
    base = torch.randn(T, V, device="cuda", dtype=torch.bfloat16, generator=gen) * 2
    y = torch.randint(0, V, (T,), device="cuda", generator=gen)
    floor_bytes = 2 * T * V * 2  # read logits once + write the gradient once (bf16)
    case = f"CE logits T{T} V{V} bf16"

    providers = {
        "torch": lambda x: F.cross_entropy(x.float(), y),
        "qkern": lambda x: qkern.cross_entropy(x, y),
        "qkern-inplace": lambda x: qkern.cross_entropy(x, y, inplace_backward=True),
        # the default validate=True costs a label check and one host sync per call; this row
        # shows that cost (the docs say so; the default rows above are the headline numbers)
        "qkern-novalidate": lambda x: qkern.cross_entropy(x, y, validate=False),
    }
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()

        def liger_fn(x):
            out = liger(x, y)
            return out[0] if isinstance(out, tuple) else out

        providers["liger"] = liger_fn  # also writes the gradient into its input
    except Exception:  # liger-kernel not installed
        pass

    ref_loss = F.cross_entropy(base.float(), y)
    rows: list[Row] = []
    for name, fn in providers.items():
        x = base.clone().requires_grad_(True)

        def step(fn=fn, x=x):
            x.grad = None
            loss = fn(x)
            loss.backward()
            return loss

        loss = step()
        err = abs(loss.item() - ref_loss.item()) / ref_loss.item()
        grad_err = _ce_grad_rel_err(x.grad, base, y)
        x.grad = None
        with torch.no_grad():
            x.copy_(base)  # in-place providers overwrote it with the gradient
        peak = _peak_extra_mib(step)
        x.grad = None
        ms = bench_ms(step, warmup=5, rep=200)
        rows.append(
            Row(
                "cross_entropy",
                case,
                name,
                ms,
                bytes=floor_bytes,
                extra={"peak_extra_MiB": peak, "loss_rel_err": err, "grad_rel_err": grad_err},
            )
        )
        del x
        torch.cuda.empty_cache()
    by_name = {r.provider: r for r in rows}
    ce = importlib.import_module("qkern.cross_entropy")  # the module, not the lazy export
    tuner = ce._ce_kernel_tuned
    # the configuration the autotuner kept (one entry per tuning key) and the last tuning's times
    by_name["qkern"].extra["tuned"] = " | ".join(
        f"{cfg.kwargs}" for key, cfg in tuner.cache.items() if V // 2 in key or V in key
    )
    timings = getattr(tuner, "configs_timings", None) or {}
    by_name["qkern"].extra["tune_ms"] = " | ".join(
        f"{c.kwargs}: {t if isinstance(t, float) else t[0]:.3f}" for c, t in timings.items()
    )
    for row in rows:
        row.extra["vs_torch"] = row.ms / by_name["torch"].ms
        if "liger" in by_name:
            row.extra["vs_liger"] = row.ms / by_name["liger"].ms

    # pass 1 alone (no gradient): one read of the logits
    with torch.no_grad():
        ms = bench_ms(lambda: qkern.cross_entropy(base, y, validate=False), warmup=5, rep=200)
        err = abs(qkern.cross_entropy(base, y).item() - ref_loss.item()) / ref_loss.item()
    rows.append(
        Row(
            "cross_entropy",
            case + " loss only",
            "qkern-novalidate",
            ms,
            bytes=T * V * 2,
            extra={"loss_rel_err": err},
        )
    )
    return rows


def run(ceilings: Ceilings) -> list[Row]:
    rows = _logits_rows(ceilings)
    torch.cuda.empty_cache()
    rows += _linear_rows(ceilings)
    return rows


if __name__ == "__main__":  # PYTHONPATH=. python3 bench/bench_cross_entropy.py
    from bench.common import format_table, measure_ceilings

    c = measure_ceilings()
    print(format_table(run(c), c))
