"""NF4 dequantize / quantize: qkern vs bitsandbytes on the same card, same process.

Cases (bf16 weights, blocksize 64, NF4): dequantize with double quantization at 4096x4096,
14336x4096, 8192x8192, 128256x4096; without double quantization at 4096x4096; quantize (with
double quantization) at 4096x4096.

Fewest bytes (read once + write once):
  dequant, dq on : n/2 packed + n/64 absmax codes + 4 * ceil(n/64/256) nested + 2n output
  dequant, dq off: n/2 packed + 4 * n/64 absmax + 2n output
  quantize       : 2n input + n/2 packed + n/64 codes + 4 * ceil(n/64/256) nested

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

Host time: the "nf4_host" rows time 2000 back-to-back calls on a 256x256 weight, whose kernels
take ~2-3 us on the GPU, so the wall time per call is the host's time to issue one call
(validation + launch); qkern's dequantize_4bit should stay well below the GPU time of a
4096x4096 dequantization (~11 us), or it would be what the 4096x4096 row measures.

Extras: "kernels"/"copies" are the CUDA kernels and memory copies one call puts on the GPU
(profiler), "syncs" the synchronizing calls it makes (CUDA sync debug mode), for qkern and, with
a bnb_ prefix, for bitsandbytes; "wall_us" (quantize) is the time per call of 200 back-to-back
calls without the L2 flush, i.e. the larger of host and GPU time per call; "tile" the dequantize
tile configuration chosen for the shape.

Targets (issue 2): >= 80% of copy bandwidth everywhere (4096x4096 <= ~18 us, >= 1.6x bnb),
>= 90% at 128256x4096; quantize >= 10x faster than bitsandbytes.
"""

from __future__ import annotations

import math
import time

import torch

from bench.common import Ceilings, Row, bench_ms

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

    # quantize 4096x4096 with double quant
    n = 4096 * 4096
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    nb = n // BLOCKSIZE
    qbytes = 2 * n + n / 2 + nb + 4 * math.ceil(nb / 256)
    ms = bench_ms(lambda: qkern.quantize_4bit(w, BLOCKSIZE, "nf4", True))
    # back-to-back calls without the cache flush: the larger of host and GPU time per call
    extra = {"wall_us": round(1e3 * _wall_per_call_ms(lambda: qkern.quantize_4bit(w), 200), 1)}
    extra.update(_gpu_ops(lambda: qkern.quantize_4bit(w, BLOCKSIZE, "nf4", True)))
    packed, state = qkern.quantize_4bit(w, BLOCKSIZE, "nf4", True)
    pr, sr = nf4.quantize_4bit_ref(w, BLOCKSIZE, "nf4", True)
    # the reference uses the IEEE reciprocal, the kernel bitsandbytes' hardware one: count the
    # (near-threshold) indices where they differ
    extra["bytes_differing_vs_ref"] = int((packed != pr).sum())
    if F is not None:
        ms_b = bench_ms(
            lambda: F.quantize_4bit(
                w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
            )
        )
        pb, sb = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        extra["speedup_vs_bnb"] = ms_b / ms
        extra["bytes_differing_vs_bnb"] = int((packed != pb).sum())
        extra["codes_differing_vs_bnb"] = int((state.absmax != sb.absmax).sum())
        extra["nested_differing_vs_bnb"] = int((state.nested_absmax != sb.state2.absmax).sum())
        extra["offset_equal_bnb"] = state.offset == sb.offset.item()
        bnb_ops = _gpu_ops(
            lambda: F.quantize_4bit(
                w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
            )
        )
        extra.update({f"bnb_{k}": v for k, v in bnb_ops.items()})
        rows.append(Row("nf4_quantize", "4096x4096 dq=True bf16", "bitsandbytes", ms_b, qbytes))
    rows.append(Row("nf4_quantize", "4096x4096 dq=True bf16", "qkern", ms, qbytes, extra=extra))

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
    case = "quantize 256x256 dq=True (wall/call)"
    rows.append(
        Row(
            "nf4_host",
            case,
            "qkern",
            _wall_per_call_ms(lambda: qkern.quantize_4bit(w, BLOCKSIZE, "nf4", True), 500),
        )
    )
    return rows


if __name__ == "__main__":  # PYTHONPATH=. python3 bench/bench_nf4.py
    from bench.common import format_table, measure_ceilings

    ceil = measure_ceilings()
    print(format_table(run(ceil), ceil))
