"""QLoRA linear benchmarks: training fwd+bwd at M=8192 and the small-M (decode) forward.

Floors on one H100 (~700 TFLOP/s bf16 matmul, ~3000 GB/s copy); the larger one is the floor.

fwd+bwd, M=8192, r=16 (FLOPs: 2·M·N·K forward + 2·M·N·K for dX, no dW; the adapter adds
6·M·r·(N+K), under 1%):
  4096 -> 4096    551 GFLOP  -> 0.79 ms   bytes (x, y, dY, dX, W twice 4-bit) ~0.27 GB -> 0.09 ms
  4096 -> 14336  1926 GFLOP  -> 2.75 ms   ~0.72 GB -> 0.24 ms
  14336 -> 4096  1926 GFLOP  -> 2.75 ms   ~0.72 GB -> 0.24 ms
  -> compute bound; the target is <= 1.05x plain torch with a frozen bf16 weight.

forward, small M (bytes: the NF4 weight N·K/2 + absmax; x and y are tiny):
  4096 x 4096   M=1..64:  8.4 MB (+0.26 MB uint8 absmax) -> 2.9 µs;  2·M·N·K <= 2.1 GFLOP -> 3 µs
  14336 x 4096  M=1..64: 29.4 MB (+0.92 MB)               -> 10 µs;   <= 7.5 GFLOP -> 11 µs at M=64
  -> memory bound up to M ~ 64 (bf16 weight instead: 33.5 / 117 MB -> 11 / 39 µs).
  On an H200 (4.3 TB/s copy measured) the byte floors are 2.1 / 7.2 µs.
  nf4_matmul's own floor is instruction issue for the dequant: ~8.3 SASS instructions per
  weight at M = 1 (a gather from the code table, its address, nibble and x unpacking, FMAs),
  ~10.5 for the tensor-core path (M = 3..16) -> 58.7M weights / (132 SMs x 128 lanes x
  1.98 GHz) ≈ 14.5 / 18 µs at 14336x4096, 4.1 / 5.2 µs at 4096x4096: above the byte floor.
  Small ops are easily host-bound: each small-M row records host_us (Python + launch per call,
  200 calls without waiting for the GPU) and gpu_us (kernel time with a cold L2, every call
  queued behind a spin kernel so no host gap is timed) next to do_bench's number; when
  host_us > gpu_us, do_bench reports host time. nf4_matmul's host path is built for < 10 µs.
"""

from __future__ import annotations

import time

import torch

from bench.common import Ceilings, Row, bench_ms, gpu_us

M_TRAIN = 8192
RANK = 16
SCALING = 2.0
TRAIN_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in K, out N)
SMALL_M_SHAPES = [(4096, 4096), (14336, 4096)]  # (N, K)
SMALL_MS = {(4096, 4096): [1, 2, 8, 16, 32, 64, 128], (14336, 4096): [1, 2, 8, 16, 32, 64]}


def _host_us(fn, n: int = 200) -> float:
    """Host µs per call: ``n`` back-to-back calls timed without waiting for the GPU.

    The Python of the op plus its launches (the GPU queue does not fill in 200 calls). When this
    exceeds the GPU time of the op, the op is host-bound and do_bench's number is host time.
    """
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t / n * 1e6


def _wall_us(fn, n: int = 200) -> float:
    """Wall-clock µs per call of ``n`` back-to-back calls, then one sync: max(host, GPU) time.

    do_bench's events hide host time up to the length of its L2-flush kernel; this number shows
    whether the host (Python, launch overhead) or the GPU bounds a small op.
    """
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _quantized(n: int, k: int):
    from qkern.nf4 import dequantize_4bit, quantize_4bit

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = quantize_4bit(w)
    return w, packed, state, dequantize_4bit(packed, state, dtype=torch.bfloat16)


def _train_case(k: int, n: int) -> list[Row]:
    import qkern.qlora as ql

    rows = []
    _, packed, state, w = _quantized(n, k)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M_TRAIN, k, device="cuda", dtype=torch.bfloat16, generator=g)
    a = torch.randn(RANK, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5
    b = torch.randn(n, RANK, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    gy = torch.randn(M_TRAIN, n, device="cuda", dtype=torch.bfloat16, generator=g)
    for t in (x, a, b):
        t.requires_grad_()

    def torch_fb():
        y = x @ w.t() + SCALING * ((x @ a.t()) @ b.t())
        return y, torch.autograd.grad(y, (x, a, b), gy)

    def qkern_fb(dropout=0.0, seed=None):
        y = ql.qlora_linear(x, packed, state, a, b, SCALING, dropout=dropout, dropout_seed=seed)
        return y, torch.autograd.grad(y, (x, a, b), gy)

    def torch_fb_dropout():
        xd = torch.nn.functional.dropout(x, 0.1)
        y = x @ w.t() + SCALING * ((xd @ a.t()) @ b.t())
        return y, torch.autograd.grad(y, (x, a, b), gy)

    # correctness of what is timed: against fp32 math on the same (dequantized) weight
    y_q, g_q = qkern_fb()
    with torch.no_grad():
        xf, af, bf, wf, gf = x.float(), a.float(), b.float(), w.float(), gy.float()
        y_ref = xf @ wf.t() + SCALING * ((xf @ af.t()) @ bf.t())
        u = gf @ bf
        refs = (
            gf @ wf + SCALING * u @ af,
            SCALING * u.t() @ xf,
            SCALING * gf.t() @ (xf @ af.t()),
        )
    err = {"relerr_y": _rel(y_q, y_ref)}
    err.update({f"relerr_d{nm}": _rel(gq, r) for nm, gq, r in zip("xab", g_q, refs)})
    y_t, g_t = torch_fb()
    err_t = {"relerr_y": _rel(y_t, y_ref)}
    err_t.update({f"relerr_d{nm}": _rel(gt, r) for nm, gt, r in zip("xab", g_t, refs)})
    y_q = g_q = y_t = g_t = y_ref = refs = None
    # the dropout path against the same fp32 math on the mask that the seed draws
    y_q, g_q = qkern_fb(0.1, seed=1234)
    with torch.no_grad():
        keep = ql.lora_dropout_mask(1234, (M_TRAIN, k), 0.1, "cuda")
        xd = torch.where(keep, (x / 0.9).to(torch.bfloat16).float(), 0.0)
        keep = None
        td = xd @ af.t()
        refs = (
            gf @ wf + SCALING * torch.where(xd != 0, u @ af / 0.9, 0.0),
            SCALING * u.t() @ xd,
            SCALING * gf.t() @ td,
        )
        err_d = {"relerr_y": _rel(y_q, xf @ wf.t() + SCALING * (td @ bf.t()))}
    # (dX's reference masks by xd != 0: exact here, x has no zeros)
    err_d.update({f"relerr_d{nm}": _rel(gq, r) for nm, gq, r in zip("xab", g_q, refs)})
    y_q = g_q = refs = xd = td = u = xf = wf = gf = None

    flops = 4.0 * M_TRAIN * n * k + 6.0 * M_TRAIN * RANK * (n + k)
    case = f"M={M_TRAIN} {k}->{n} r={RANK}"
    t_torch = bench_ms(torch_fb)
    rows.append(Row("qlora_fwdbwd", case, "torch-bf16W", t_torch, flops=flops, extra=err_t))
    for lora_first in (True, False):
        ql._LORA_FIRST = lora_first
        t_q = bench_ms(qkern_fb)
        extra = {"ratio_vs_torch": t_q / t_torch, "lora_first": lora_first}
        if lora_first:
            extra["wall_us"] = _wall_us(qkern_fb, 20)
            extra["torch_wall_us"] = _wall_us(torch_fb, 20)
        rows.append(Row("qlora_fwdbwd", case, "qkern", t_q, flops=flops, extra={**extra, **err}))
    ql._LORA_FIRST = True
    t_qd = bench_ms(lambda: qkern_fb(0.1))
    t_td = bench_ms(torch_fb_dropout)
    rows.append(Row("qlora_fwdbwd", case + " p=0.1", "torch-bf16W", t_td, flops=flops))
    rows.append(
        Row(
            "qlora_fwdbwd",
            case + " p=0.1",
            "qkern",
            t_qd,
            flops=flops,
            extra={"ratio_vs_torch": t_qd / t_td, **err_d},
        )
    )
    return rows


def _decode_lora_rows(n: int, k: int, packed, state, w) -> list[Row]:
    """qlora_linear forward with an r=16 adapter and no grad (decode through the model) at
    M = 1 and 8, against the same LoRA linear on a bf16 weight in plain torch."""
    import qkern.qlora as ql

    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(RANK, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5
    b = torch.randn(n, RANK, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    for m in (1, 8):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)

        def ours():
            return ql.qlora_linear(x, packed, state, a, b, SCALING)  # noqa: B023

        def plain():
            return x @ w.t() + SCALING * ((x @ a.t()) @ b.t())  # noqa: B023

        with torch.no_grad():
            err = _rel(ours(), plain().float())
            t_q, t_t = bench_ms(ours), bench_ms(plain)
            for name, fn, t in (("qkern", ours, t_q), ("torch-bf16W", plain, t_t)):
                extra = {"host_us": _host_us(fn), "gpu_us": gpu_us(fn)}
                if name == "qkern":
                    extra.update(relerr=err, ratio_vs_torch=t_q / t_t)
                case = f"M={m} {n}x{k} r={RANK} no_grad"
                rows.append(Row("qlora_decode", case, name, t, flops=2.0 * m * n * k, extra=extra))
    return rows


def _config_name(cfg: dict | None) -> str:
    """A short name of an nf4_matmul configuration, e.g. fma-n64-v16-u4-d1-w4-s8."""
    if cfg is None:
        return "fallback"
    kind = ("fma", "dot", "dotT", "dotP", "native")[int(cfg["DOT"])]
    return (
        f"{kind}-n{cfg['BLOCK_N']}-v{cfg['VEC']}-u{cfg['UNROLL']}-d{cfg['DECODE']}"
        f"-w{cfg['num_warps']}-s{cfg['PER_SM']}"
    )


def small_m_candidates(m: int, k: int, state) -> list[dict]:
    """Every nf4_matmul candidate for bf16 x of M rows against this weight, native included
    where it runs."""
    import qkern.qlora as ql

    native = ql._native_supported(m, k, state, torch.bfloat16, torch.device("cuda"))
    return ql._nf4_candidates(m, torch.bfloat16, native)


def _variant_rows(n: int, k: int) -> list[Row]:
    """GPU time of every nf4_matmul candidate (forced) at M = 1, 2, 8, 16: the side-by-side
    comparison behind the tuner's choice, with a cold L2 (see bench.common.gpu_us)."""
    import qkern.qlora as ql

    rows = []
    _, packed, state, w = _quantized(n, k)
    nbytes = packed.numel() + state.absmax.numel() * state.absmax.element_size()
    try:
        for m in (1, 2, 8, 16):  # the M the tuner already compiled for
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w.float().t()
            for cfg in small_m_candidates(m, k, state):
                ql.NF4_MATMUL_CONFIG = cfg
                ql._MM_CACHE.clear()  # a new entry with the forced configuration
                y = ql.nf4_matmul(x, packed, state)
                t = gpu_us(lambda: ql.nf4_matmul(x, packed, state), n=10)  # noqa: B023
                rows.append(
                    Row(
                        "nf4_matmul_variant",
                        f"M={m} {n}x{k}",
                        _config_name(cfg),
                        t / 1e3,
                        bytes=nbytes + (m * k + m * n) * 2,
                        flops=2.0 * m * n * k,
                        extra={"relerr": _rel(y, ref), "gpu_us": t},
                    )
                )
    finally:
        ql.NF4_MATMUL_CONFIG = None
        ql._MM_CACHE.clear()
    return rows


def _small_m_case(n: int, k: int) -> list[Row]:
    import qkern.qlora as ql

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception:  # not installed here
        bnb = None

    rows = []
    w_raw, packed, state, w = _quantized(n, k)
    bnb_w = bnb_state = None
    if bnb is not None:
        bnb_w, bnb_state = bnbf.quantize_4bit(
            w_raw, blocksize=64, quant_type="nf4", compress_statistics=True
        )
    nbytes = packed.numel() + state.absmax.numel() * state.absmax.element_size()
    crossover = None
    for m in SMALL_MS[(n, k)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        case = f"M={m} {n}x{k}"
        flops = 2.0 * m * n * k
        io = (m * k + m * n) * 2
        ref = x.float() @ w.float().t()
        y = ql.nf4_matmul(x, packed, state)
        t_q = bench_ms(lambda: ql.nf4_matmul(x, packed, state))  # noqa: B023
        t_bf16 = bench_ms(lambda: x @ w.t())  # noqa: B023

        def dequant_mm():
            return x @ ql.dequant_workspace(packed, state, torch.bfloat16).t()  # noqa: B023

        t_dq = bench_ms(dequant_mm)
        if crossover is None and t_q > t_dq:
            crossover = m

        def ours():
            return ql.nf4_matmul(x, packed, state)  # noqa: B023

        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        extra = {
            "relerr": _rel(y, ref),
            "vs_bf16": t_bf16 / t_q,
            "vs_dequant_mm": t_dq / t_q,
            # host vs GPU: host_us > gpu_us means do_bench measured the Python, not the kernel
            "host_us": _host_us(ours),
            "host_us_out": _host_us(lambda: ql.nf4_matmul(x, packed, state, out=out)),  # noqa: B023
            "gpu_us": gpu_us(ours),
            "wall_us": _wall_us(ours),
            # the configuration the tuner kept for this shape (see qlora._NF4_MM_CONFIGS)
            "config": _config_name(ql._mm_lookup(x, packed, state, None).config),
        }
        if bnb is not None:

            def bnb_mm():
                return bnb.matmul_4bit(x, bnb_w.t(), quant_state=bnb_state)  # noqa: B023

            with torch.no_grad():
                y_b = bnb_mm()
                t_b = bench_ms(bnb_mm)
                bnb_extra = {
                    "relerr": _rel(y_b, ref),
                    "host_us": _host_us(bnb_mm),
                    "gpu_us": gpu_us(bnb_mm),
                }
            extra["vs_bnb"] = t_b / t_q
            rows.append(
                Row(
                    "nf4_matmul",
                    case,
                    "bitsandbytes",
                    t_b,
                    bytes=nbytes + io,
                    flops=flops,
                    extra=bnb_extra,
                )
            )
        bf16_extra = {
            "host_us": _host_us(lambda: x @ w.t()),  # noqa: B023
            "gpu_us": gpu_us(lambda: x @ w.t()),  # noqa: B023
        }
        rows.append(
            Row(
                "nf4_matmul",
                case,
                "torch-bf16W",
                t_bf16,
                bytes=n * k * 2 + io,
                flops=flops,
                extra=bf16_extra,
            )
        )
        rows.append(
            Row(
                "nf4_matmul",
                case,
                "qkern-dequant+mm",
                t_dq,
                bytes=nbytes + n * k * 4 + io,
                flops=flops,
            )
        )
        rows.append(
            Row("nf4_matmul", case, "qkern", t_q, bytes=nbytes + io, flops=flops, extra=extra)
        )
    rows += _decode_lora_rows(n, k, packed, state, w)
    rows.append(
        Row(
            "nf4_matmul",
            f"crossover {n}x{k}",
            "qkern",
            0.0,
            extra={
                "first_M_slower_than_dequant_mm": crossover or f">{SMALL_MS[(n, k)][-1]}",
                "NF4_MATMUL_MAX_M": ql.NF4_MATMUL_MAX_M,
            },
        )
    )
    return rows


def run(ceilings: Ceilings | None) -> list[Row]:
    rows = []
    for n, k in SMALL_M_SHAPES:
        rows += _small_m_case(n, k)
        rows += _variant_rows(n, k)
        torch.cuda.empty_cache()
    for k, n in TRAIN_SHAPES:
        rows += _train_case(k, n)
        torch.cuda.empty_cache()
    return rows
