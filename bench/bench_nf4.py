"""NF4 dequantize / quantize: qkern vs bitsandbytes on the same card, same process.

Cases (bf16 weights, blocksize 64, NF4): dequantize with double quantization at 4096x4096,
14336x4096, 8192x8192, 128256x4096; without double quantization at 4096x4096; quantize with
and without double quantization at 4096x4096.

Fewest bytes (read once + write once):
  dequant, dq on : n/2 packed + n/64 absmax codes + 4 * ceil(n/64/256) nested + 2n output
  dequant, dq off: n/2 packed + 4 * n/64 absmax + 2n output
  quantize, dq on : 2n input + n/2 packed + n/64 codes + 4 * ceil(n/64/256) nested
  quantize, dq off: 2n input + n/2 packed + 4 * n/64 absmax

Floors (the FLOP floor — one multiply per element, 0.02-0.5 us at ~700 TFLOP/s — never binds,
so the byte floor is the floor). H100: copy ~3000 GB/s; H200: 4273 GB/s measured (copy, read +
write) in the run of 2026-11-28:

  case                   bytes            H100 floor   H200 floor   FLOP floor
  4096x4096   dq         42,209,280 B      14.1 us       9.9 us      0.02 us
  14336x4096  dq        147,732,480 B      49.2 us      34.6 us      0.08 us
  8192x8192   dq        168,837,120 B      56.3 us      39.5 us      0.10 us
  128256x4096 dq      1,321,678,080 B     440.6 us     309.3 us      0.75 us
  4096x4096   no dq      42,991,616 B      14.3 us      10.1 us      0.02 us
  quantize 4096x4096 dq  42,209,280 B      14.1 us       9.9 us      (+ torch's mean, 2 launches)
  quantize 4096x4096 -   42,991,616 B      14.3 us      10.1 us      (1 launch)

Host time: the "nf4_host" rows time back-to-back calls on a 256x256 weight, whose kernels
take ~2-3 us on the GPU, so the wall time per call is the host's time to issue one call
(validation + launch); qkern's dequantize_4bit should stay well below the GPU time of a
4096x4096 dequantization (~11 us), or it would be what the 4096x4096 row measures, and
quantize_4bit below its ~15-20 us of kernels.

Quantize is reported three ways, because its do_bench time can be the host's: "qkern" /
"bitsandbytes" rows are do_bench (L2 flushed before each call); "qkern-kernels" /
"bnb-kernels" rows are the GPU time alone, the summed durations of the kernels and memsets one
call launches (profiler, 20 calls; launch gaps excluded), also in the extra "kernel_us"; and
"wall_us" is the time per call of back-to-back calls without the L2 flush, i.e. the larger of
host and GPU time per call. When do_bench or wall_us sit well above the kernel time, the host
is the bound.

Extras: "kernels"/"copies" are the CUDA kernels and memory copies one call puts on the GPU
(profiler), "syncs" the synchronizing calls it makes (CUDA sync debug mode), for qkern and, with
a bnb_ prefix, for bitsandbytes; "tile" the dequantize tile configuration chosen for the shape.

Targets (issue 2): >= 80% of copy bandwidth everywhere (4096x4096 <= ~18 us, >= 1.6x bnb),
>= 90% at 128256x4096; quantize >= 10x faster than bitsandbytes.
"""

from __future__ import annotations

import math
import time

import torch

from bench.common import Ceilings, Row, bench_ms, kernel_ms

SHAPES = [(4096, 4096), (14336, 4096), (8192, 8192), (128256, 4096)]
BLOCKSIZE = 64
# the torch reference materializes int64 indices (8 B per element): check it on shapes up to this
REF_CHECK_MAX = 8192 * 8192


def _dequant_bytes(n: int, dq: bool) -> float:
    nb = n // BLOCKSIZE
    scales = nb + 4 * math.ceil(nb / 256) if dq else 4 * nb
    return n / 2 + scales + 2 * n


def _wall_per_call_ms(fn, calls: int = 2000) -> float:
    """Wall time per call of ``calls`` back-to-back calls (host-bound when kernels are tiny)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e3


def _tile(state) -> str:
    """The dequantize tile configuration the state's cached launch uses (bf16, aligned out):
    outputs per tile / warps / nibble scheme, and the grid when it is persistent."""
    entry = state._plan.launches.get((torch.bfloat16, True)) if state._plan else None
    if entry is None:
        return "?"
    grid, meta = entry[0], entry[1]
    words = "words" if meta["WORDS"] else "outputs"
    tile = f"{meta['ROWS'] * meta['COLS']}/{meta['num_warps']}w/{words}"
    return tile + (f"/persistent{grid[0]}" if meta.get("PERSIST") else "")


def _gpu_ops(fn) -> dict:
    """What one call of ``fn`` puts on the GPU and how often it waits for it: CUDA kernels and
    memory copies (profiler) and synchronizing calls (CUDA sync debug mode warnings)."""
    import warnings

    fn()
    torch.cuda.synchronize()
    out: dict = {}
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["copies"] = sum("memcpy" in name.lower() for name in names)
        out["kernels"] = len(names) - out["copies"]
    except Exception as e:  # profiler unavailable: report what failed, keep the timing rows
        out["profiler_error"] = type(e).__name__
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
        out["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    return ((o - r).norm() / r.norm().clamp_min(1e-300)).item()


def run(ceilings: Ceilings | None = None) -> list[Row]:
    import qkern
    from qkern import nf4

    try:
        import bitsandbytes.functional as F
    except Exception:  # not installed: qkern rows only
        F = None

    rows: list[Row] = []
    torch.manual_seed(0)
    cases = [(shape, True) for shape in SHAPES] + [((4096, 4096), False)]
    for (r, c), dq in cases:
        n = r * c
        w = torch.randn(r, c, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = qkern.quantize_4bit(w, BLOCKSIZE, "nf4", compress_statistics=dq)
        out = torch.empty_like(w)
        case = f"{r}x{c} dq={dq} bf16"
        nbytes = _dequant_bytes(n, dq)
        ms = bench_ms(lambda p=packed, s=state, o=out: qkern.dequantize_4bit(p, s, out=o))
        extra: dict = {"tile": _tile(state)}
        if n == 4096 * 4096 and dq:
            extra.update(
                _gpu_ops(lambda p=packed, s=state, o=out: qkern.dequantize_4bit(p, s, out=o))
            )
        if n <= REF_CHECK_MAX:
            ref = nf4.dequantize_4bit_ref(packed, state)
            extra["rel_err_vs_ref"] = _rel_err(out, ref)
            extra["mismatch_vs_ref"] = int((out != ref).sum())
            del ref
        if F is not None:
            pb, sb = F.quantize_4bit(
                w, blocksize=BLOCKSIZE, compress_statistics=dq, quant_type="nf4"
            )
            out_b = torch.empty_like(w)
            ms_b = bench_ms(
                lambda p=pb, s=sb, o=out_b: F.dequantize_4bit(
                    p, s, out=o, blocksize=BLOCKSIZE, quant_type="nf4"
                )
            )
            extra["speedup_vs_bnb"] = ms_b / ms
            extra["same_bytes_as_bnb"] = bool(torch.equal(pb, packed))
            # bnb dequantizing its own state vs ours dequantizing the same state
            qs = {f"w.{k}": v for k, v in sb.as_dict(packed=True).items()}
            ours_of_bnb = qkern.dequantize_4bit(
                pb, nf4.QuantState.from_bnb_dict(qs, "w").to("cuda")
            )
            extra["mismatch_vs_bnb"] = int((ours_of_bnb != out_b).sum())
            rows.append(Row("nf4_dequant", case, "bitsandbytes", ms_b, nbytes))
            del pb, sb, out_b, ours_of_bnb
        # a plain device copy of the same number of bytes (half read, half written), timed the
        # same way: what this size reaches when only the bytes matter
        src = torch.randn(int(nbytes) // 4, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        ms_copy = bench_ms(lambda d=dst, s=src: d.copy_(s))
        rows.append(Row("nf4_dequant", case, "torch-copy", ms_copy, nbytes))
        del src, dst
        rows.append(Row("nf4_dequant", case, "qkern", ms, nbytes, extra=extra))
        del w, packed, state, out
        torch.cuda.empty_cache()

    # quantize 4096x4096, with and without double quant
    n = 4096 * 4096
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    nb = n // BLOCKSIZE
    for dq in (True, False):
        case = f"4096x4096 dq={dq} bf16"
        scales = nb + 4 * math.ceil(nb / 256) if dq else 4 * nb
        qbytes = 2 * n + n / 2 + scales
        ours = lambda d=dq: qkern.quantize_4bit(w, BLOCKSIZE, "nf4", d)  # noqa: E731
        ms = bench_ms(ours)
        # back-to-back calls without the cache flush: the larger of host and GPU time per call
        extra = {"wall_us": round(1e3 * _wall_per_call_ms(ours, 200), 1)}
        # GPU time alone: the summed durations of the kernels (and memsets) one call launches
        k_ms = kernel_ms(ours, 20)
        extra["kernel_us"] = round(1e3 * k_ms, 1)
        extra.update(_gpu_ops(ours))
        packed, state = ours()
        pr, sr = nf4.quantize_4bit_ref(w, BLOCKSIZE, "nf4", dq)
        # the reference uses the IEEE reciprocal, the kernel bitsandbytes' hardware one: count
        # the (near-threshold) indices where they differ
        extra["bytes_differing_vs_ref"] = int((packed != pr).sum())
        if F is not None:
            theirs = lambda d=dq: F.quantize_4bit(  # noqa: E731
                w, blocksize=BLOCKSIZE, compress_statistics=d, quant_type="nf4"
            )
            ms_b = bench_ms(theirs)
            kb_ms = kernel_ms(theirs, 20)
            pb, sb = theirs()
            extra["speedup_vs_bnb"] = ms_b / ms
            extra["kernel_speedup_vs_bnb"] = kb_ms / k_ms
            extra["bytes_differing_vs_bnb"] = int((packed != pb).sum())
            if dq:
                extra["codes_differing_vs_bnb"] = int((state.absmax != sb.absmax).sum())
                extra["nested_differing_vs_bnb"] = int(
                    (state.nested_absmax != sb.state2.absmax).sum()
                )
                extra["offset_equal_bnb"] = state.offset == sb.offset.item()
            else:
                extra["absmax_differing_vs_bnb"] = int((state.absmax != sb.absmax).sum())
            bnb_extra = {f"bnb_{k}": v for k, v in _gpu_ops(theirs).items()}
            bnb_extra["wall_us"] = round(1e3 * _wall_per_call_ms(theirs, 50), 1)
            rows.append(Row("nf4_quantize", case, "bitsandbytes", ms_b, qbytes, extra=bnb_extra))
            rows.append(Row("nf4_quantize", case, "bnb-kernels", kb_ms, qbytes))
        rows.append(Row("nf4_quantize", case, "qkern", ms, qbytes, extra=extra))
        rows.append(Row("nf4_quantize", case, "qkern-kernels", k_ms, qbytes))
        del packed, state, pr, sr

    # host time per dequantize call (tiny weight: the GPU waits for the host)
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(w)
    case = "dequant 256x256 out= (wall/call)"
    packed, state = qkern.quantize_4bit(w, BLOCKSIZE, "nf4", True)
    ms = _wall_per_call_ms(lambda: qkern.dequantize_4bit(packed, state, out=out))
    rows.append(Row("nf4_host", case, "qkern", ms))
    if F is not None:
        pb, sb = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        ms_b = _wall_per_call_ms(
            lambda: F.dequantize_4bit(pb, sb, out=out, blocksize=BLOCKSIZE, quant_type="nf4")
        )
        rows.append(Row("nf4_host", case, "bitsandbytes", ms_b))
    for dq in (True, False):
        case = f"quantize 256x256 dq={dq} (wall/call)"
        ours = lambda d=dq: qkern.quantize_4bit(w, BLOCKSIZE, "nf4", d)  # noqa: E731
        rows.append(Row("nf4_host", case, "qkern", _wall_per_call_ms(ours, 2000)))
        if F is not None:
            theirs = lambda d=dq: F.quantize_4bit(  # noqa: E731
                w, blocksize=BLOCKSIZE, compress_statistics=d, quant_type="nf4"
            )
            rows.append(Row("nf4_host", case, "bitsandbytes", _wall_per_call_ms(theirs, 500)))
    # the torch operations a quantize call (double quant) cannot avoid, timed alone: its
    # allocations and torch's mean of the block absmax (bitsandbytes' offset), for 4096x4096
    # (262,144 blocks) and 256x256 (1,024 blocks)
    for nb in (4096 * 4096 // BLOCKSIZE, 256 * 256 // BLOCKSIZE):
        a = torch.rand(nb, device="cuda")
        rows.append(
            Row(
                "nf4_host",
                f"mean of {nb} fp32 (wall/call)",
                "torch",
                _wall_per_call_ms(a.mean),
            )
        )
    shapes = (((4096 * 4096 // 2, 1), torch.uint8), ((4096 * 4096 // 64,), torch.float32))
    for shape, dt in shapes:
        alloc = lambda s=shape, d=dt: torch.empty(s, dtype=d, device="cuda")  # noqa: E731
        case = f"empty {list(shape)} {str(dt)[6:]} (wall/call)"
        rows.append(Row("nf4_host", case, "torch", _wall_per_call_ms(alloc)))
    return rows


if __name__ == "__main__":  # PYTHONPATH=. python3 bench/bench_nf4.py
    from bench.common import format_table, measure_ceilings

    ceil = measure_ceilings()
    print(format_table(run(ceil), ceil))
