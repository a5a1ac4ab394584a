"""Shared pieces of the benchmark suite: timing, ceilings, result rows and files.

Every benchmark times with ``triton.testing.do_bench`` (median, after warm-up) on random data,
with its baseline in the same process on the same card, and reports each result as a fraction of
the ceilings measured in the same run: device-to-device copy bandwidth (bytes read + written) and
the bf16 matrix-product rate.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Row:
    """One measurement: what ran, how long, and the work it did."""

    bench: str  # e.g. "nf4_dequant"
    case: str  # e.g. "4096x4096 dq=True"
    provider: str  # "qkern", "torch", "bitsandbytes", "liger", "sdpa-flash", ...
    ms: float
    bytes: float = 0.0  # fewest bytes the op must move (read once + write once)
    flops: float = 0.0
    extra: dict = field(default_factory=dict)  # peak memory, errors, ratios, notes

    def rates(self, ceilings: Ceilings | None) -> dict:
        out = {}
        if self.bytes:
            gbs = self.bytes / self.ms / 1e6
            out["GB/s"] = gbs
            if ceilings:
                out["%copy"] = 100 * gbs / ceilings.copy_gbs
        if self.flops:
            tfs = self.flops / self.ms / 1e9
            out["TFLOP/s"] = tfs
            if ceilings:
                out["%matmul"] = 100 * tfs / ceilings.matmul_tflops
        return out


@dataclass
class Ceilings:
    copy_gbs: float
    matmul_tflops: float


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` on the current CUDA device (do_bench, events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


_L2_FLUSH: list = []


def gpu_us(fn: Callable[[], object], n: int = 30, flush: str = "dirty") -> float:
    """GPU µs per call with the host out of the way (median of ``n``), after an L2 flush.

    A spin kernel (~4 ms) holds the stream while the host queues ``n`` rounds of (flush, start
    event, fn, end event), so every fn starts the moment its flush ends: the events time the
    kernels alone, as do_bench would if the host were infinitely fast. ``flush``: "dirty"
    zero-fills 256 MB, as do_bench does (the dirty lines left in L2 are written back while fn
    runs); "clean" reads 256 MB (nothing to write back); "warm" flushes nothing.
    """
    if not _L2_FLUSH:
        buf = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        _L2_FLUSH.extend((buf, torch.empty((), dtype=torch.int64, device="cuda")))
    buf, sink = _L2_FLUSH
    words = buf.view(torch.int64)
    fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    torch.cuda._sleep(8_000_000)  # cycles: ~4 ms at ~2 GHz, more than the host needs to queue
    for s, e in zip(starts, ends):
        if flush == "dirty":
            buf.zero_()
        elif flush == "clean":
            torch.sum(words, dim=0, out=sink)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
    return times[n // 2]


def kernel_events(prof) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU kernel / memcpy / memset a torch profiler saw."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out.append((e.name, float(e.time_range.elapsed_us())))
    return out


def kernel_ms(fn: Callable[[], object], iters: int = 20) -> float:
    """GPU time of one call of ``fn``: the summed durations of the kernels it launches, per call.

    do_bench times back-to-back calls with events, so when the host needs longer to issue a call
    than the GPU needs to run it (small kernels behind Python launchers and autograd), it measures
    the host. This measures the kernels alone (launch gaps excluded), for the kernel's share of a
    roofline; report it beside the do_bench time, never instead of it."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(us for _, us in kernel_events(prof)) / iters / 1e3


def _copy_ms(n: int) -> float:
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src))


def _matmul_ms(n: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return bench_ms(lambda: a @ b)


def measure_ceilings() -> Ceilings:
    """Device copy bandwidth (2 GiB, read + write) and bf16 8192^3 matmul rate on random data."""
    n = 1 << 30  # 2 GiB of bf16
    copy_ms = _copy_ms(n)
    mm_ms = _matmul_ms(8192)
    torch.cuda.empty_cache()
    return Ceilings(copy_gbs=2 * 2 * n / copy_ms / 1e6, matmul_tflops=2 * 8192**3 / mm_ms / 1e9)


def environment() -> dict:
    import triton

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            card=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1)
        )
    for mod in ("bitsandbytes", "liger_kernel", "transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # not installed on this machine
            pass
    return env


def write_results(path: Path, rows: list[Row], ceilings: Ceilings | None, env: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "ceilings": asdict(ceilings) if ceilings else None,
        "rows": [{**asdict(r), **r.rates(ceilings)} for r in rows],
    }
    path.write_text(json.dumps(payload, indent=1))


def format_table(rows: list[Row], ceilings: Ceilings | None) -> str:
    lines = [
        f"{'bench':<14} {'case':<34} {'provider':<14} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
        f"{'TFLOP/s':>8} {'%mm':>5}  extra"
    ]
    for r in rows:
        rt = r.rates(ceilings)
        extra = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items()
        )
        lines.append(
            f"{r.bench:<14} {r.case:<34} {r.provider:<14} {r.ms:>9.4f} "
            f"{rt.get('GB/s', 0):>8.0f} {rt.get('%copy', 0):>6.1f} "
            f"{rt.get('TFLOP/s', 0):>8.1f} {rt.get('%matmul', 0):>5.1f}  {extra}"
        )
    return "\n".join(lines)
