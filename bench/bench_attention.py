"""Attention benchmark: qkern.flash_attention vs SDPA's FLASH and cuDNN backends, same card.

Cases (bf16, causal, 32 query heads / 8 KV heads unless noted):

    case                      fwd GFLOP   fwd floor (700 TFLOP/s | 3000 GB/s)   fwd+bwd floor
    D128 B8 S2048               274.9       0.393 ms | 0.112 ms                1.37 ms
    D128 B4 S4096               549.8       0.785 ms | 0.112 ms                2.75 ms
    D128 B2 S8192              1099.5       1.571 ms | 0.112 ms                5.50 ms
    D64  B4 S4096               274.9       0.393 ms | 0.056 ms                1.37 ms
    varlen 16 docs, 16384 tok   (random lengths; the FLOP count is computed per run)
    decode B8 Sq1 Sk8192 D128     1.1       0.002 ms | 0.089 ms  (K/V read: bandwidth bound)

FLOPs = 4·B·Hq·Sq·Sk·D, halved for causal (only the lower triangle is needed); fwd+bwd counts
3.5x the forward (2 matmuls forward, 5 backward, of which 1 recomputes QKᵀ). Bytes are the
fewest an attention must move: read Q, K, V and write O (backward: read Q, K, V, O, dO and write
dQ, dK, dV). The floor of a case is the larger of FLOPs/peak and bytes/bandwidth.

SDPA gets K/V with ``enable_gqa=True`` where the backend takes it; otherwise K/V are repeated to
32 heads before timing (the repeat is not timed), noted as ``gqa=repeat`` in ``extra``. The
varlen baseline is SDPA-flash looping over the documents (what a trainer without a varlen kernel
does). Decode compares against SDPA without a causal mask, which is the same thing for one query
aligned to the last key.

Kernel variants: the forward, dK/dV and dQ kernels autotune over plain pointer-load candidates,
TMA tensor-descriptor candidates and (when a child-process probe shows this Triton lowers and
runs them correctly on this card) warp-specialized TMA candidates. The qkern rows report the
winning config of each kernel (``cfg_fwd``/``cfg_dkdv``/``cfg_dq``), the best time of each
variant from the autotuner's timings (``var_<kernel>``, ms by variant), the probe's answer
(``ws``) and the autotuning wall time of the case (``tune_s``).
"""

from __future__ import annotations

import math
import time

import torch

from bench.common import Ceilings, Row, bench_ms

HQ, HKV = 32, 8
DTYPE = torch.bfloat16


def _attn_flops(b: int, sq: int, sk: int, d: int, causal: bool) -> float:
    return 4.0 * b * HQ * sq * sk * d * (0.5 if causal else 1.0)


def _attn_bytes(b: int, sq: int, sk: int, d: int, backward: bool) -> float:
    q_like = b * sq * HQ * d * 2  # Q or O or dO or dQ
    kv_like = b * sk * HKV * d * 2  # K or V or dK or dV
    fwd = 2 * q_like + 2 * kv_like
    return fwd + (4 * q_like + 4 * kv_like if backward else 0)


def _sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend

    out = {"sdpa-flash": SDPBackend.FLASH_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        out["sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION
    return out


def _sdpa_fn(backend, q, k, v, causal: bool):
    """SDPA on (B, S, H, D) tensors through one backend: (fn, gqa note, differentiable leaves).

    Tries enable_gqa first, then K/V repeated to Hq heads (outside the timed closure).
    """
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views
    group = q.shape[2] // k.shape[2]
    krep = vrep = None

    def run_gqa():
        with sdpa_kernel(backend):
            return sdpa(qt, kt, vt, is_causal=causal, enable_gqa=True).transpose(1, 2)

    def run_repeat():
        with sdpa_kernel(backend):
            return sdpa(qt, krep, vrep, is_causal=causal).transpose(1, 2)

    try:
        run_gqa()
        return run_gqa, "enable_gqa", (q, k, v)
    except (RuntimeError, TypeError):
        krep = kt.repeat_interleave(group, dim=1).detach().requires_grad_(k.requires_grad)
        vrep = vt.repeat_interleave(group, dim=1).detach().requires_grad_(v.requires_grad)
        run_repeat()  # raises if the backend cannot run this case at all
        return run_repeat, "repeat", (q, krep, vrep)


def _variant(cfg) -> str:
    kw = cfg.kwargs
    return "tma+ws" if kw.get("WS") else "tma" if kw.get("TMA") else "ptr"


def _cfg_str(cfg) -> str:
    tile = f"{cfg.kwargs.get('BLOCK_M')}x{cfg.kwargs.get('BLOCK_N')}"
    return f"{tile} w{cfg.num_warps} s{cfg.num_stages} {_variant(cfg)}"


def _tuning_report() -> dict:
    """Winning config and best time per variant of the three dense kernels' last tuning."""
    from qkern import attention as attn

    out: dict = {}
    for name, kernel in (
        ("fwd", attn._attn_fwd_kernel),
        ("dkdv", attn._attn_bwd_dkdv_kernel),
        ("dq", attn._attn_bwd_dq_kernel),
    ):
        best = getattr(kernel, "best_config", None)
        if best is not None:
            out[f"cfg_{name}"] = _cfg_str(best)
        by_variant: dict = {}
        for cfg, t in (getattr(kernel, "configs_timings", None) or {}).items():
            ms = t[0] if isinstance(t, (list, tuple)) else t
            v = _variant(cfg)
            by_variant[v] = round(min(by_variant.get(v, float("inf")), float(ms)), 4)
        if by_variant:
            out[f"var_{name}"] = by_variant
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _time_fwd_bwd(fn, inputs: tuple[torch.Tensor, ...], do: torch.Tensor) -> float:
    return bench_ms(lambda: torch.autograd.grad(fn(), inputs, do))


def _dense_rows(b: int, s: int, d: int) -> list[Row]:
    from qkern.attention import flash_attention

    case = f"causal D{d} B{b} S{s} {HQ}/{HKV}h"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, s, HQ, d, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    k = torch.randn(b, s, HKV, d, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    v = torch.randn(b, s, HKV, d, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    do = torch.randn(b, s, HQ, d, device="cuda", dtype=DTYPE, generator=gen)
    flops = _attn_flops(b, s, s, d, True)
    ours = lambda: flash_attention(q, k, v, causal=True)
    rows: list[Row] = []
    tune_start = time.perf_counter()
    out = ours()
    torch.autograd.grad(ours(), (q, k, v), do)  # tunes the backward kernels for this case
    torch.cuda.synchronize()
    tuning = {"tune_s": round(time.perf_counter() - tune_start, 1), **_tuning_report()}
    providers = {"qkern": (ours, "native", (q, k, v))}
    for name, backend in _sdpa_backends().items():
        try:
            providers[name] = _sdpa_fn(backend, q, k, v, True)
        except Exception as e:  # backend not available for this case on this build/card
            rows.append(
                Row("attention", case + " fwd", name, float("nan"), extra={"skip": str(e)[:80]})
            )
    ref = providers["sdpa-flash"][0]() if "sdpa-flash" in providers else None
    fwd_ms, both_ms = {}, {}
    for name, (fn, note, leaves) in providers.items():
        fwd_ms[name] = bench_ms(fn)
        # with repeated K/V, SDPA differentiates the repeated copies (the group sum is not timed)
        both_ms[name] = _time_fwd_bwd(fn, leaves, do)
        extra = {"gqa": note}
        if name == "qkern" and ref is not None:
            extra["rel_err_vs_sdpa"] = _rel_err(out, ref)
        if name == "qkern":
            extra.update(tuning, ws=_WS_STATE.get("ok"), ws_probe_s=_WS_STATE.get("probe_s"))
        rows.append(
            Row("attention", case + " fwd", name, fwd_ms[name], _attn_bytes(b, s, s, d, False),
                flops, dict(extra))
        )  # fmt: skip
        rows.append(
            Row("attention", case + " fwd+bwd", name, both_ms[name],
                _attn_bytes(b, s, s, d, False) + _attn_bytes(b, s, s, d, True), 3.5 * flops,
                dict(extra))
        )  # fmt: skip
    for r in rows:
        base = fwd_ms if r.case.endswith(" fwd") else both_ms
        if r.provider == "qkern" and "sdpa-flash" in base:
            r.extra["x_vs_sdpa_flash"] = base["sdpa-flash"] / r.ms
        if r.provider == "qkern" and "sdpa-cudnn" in base:
            r.extra["x_vs_sdpa_cudnn"] = base["sdpa-cudnn"] / r.ms
    return rows


def _varlen_rows(total: int = 16384, docs: int = 16, d: int = 128) -> list[Row]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from qkern.attention import flash_attention

    gen = torch.Generator().manual_seed(0)
    # random cut points -> document lengths >= 1 summing to total
    cuts = torch.randperm(total - 1, generator=gen)[: docs - 1].add(1).sort().values.tolist()
    bounds = [0, *cuts, total]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    max_len = max(lengths)
    case = f"varlen {docs} docs T{total} D{d} causal (max {max_len})"
    q = torch.randn(total, HQ, d, device="cuda", dtype=DTYPE).requires_grad_()
    k = torch.randn(total, HKV, d, device="cuda", dtype=DTYPE).requires_grad_()
    v = torch.randn(total, HKV, d, device="cuda", dtype=DTYPE).requires_grad_()
    do = torch.randn(total, HQ, d, device="cuda", dtype=DTYPE)
    flops = sum(4.0 * HQ * n * n * d * 0.5 for n in lengths)
    bytes_fwd = total * (2 * HQ + 2 * HKV) * d * 2
    ours = lambda: flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=max_len)
    out = ours()

    def per_document():
        outs = []
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for a, b in zip(bounds[:-1], bounds[1:]):
                qd, kd, vd = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                kd = kd.repeat_interleave(HQ // HKV, dim=1)  # flash path without enable_gqa
                vd = vd.repeat_interleave(HQ // HKV, dim=1)
                outs.append(sdpa(qd, kd, vd, is_causal=True)[0].transpose(0, 1))
        return torch.cat(outs)

    rows = []
    base = {}
    for name, fn in (("qkern", ours), ("sdpa-flash-loop", per_document)):
        f_ms = bench_ms(fn)
        b_ms = _time_fwd_bwd(fn, (q, k, v), do)
        base[name] = (f_ms, b_ms)
        extra = {"rel_err_vs_sdpa": _rel_err(out, per_document())} if name == "qkern" else {}
        rows.append(Row("attention", case + " fwd", name, f_ms, bytes_fwd, flops, dict(extra)))
        rows.append(
            Row("attention", case + " fwd+bwd", name, b_ms, 4 * bytes_fwd, 3.5 * flops, dict(extra))
        )
    rows[0].extra["x_vs_sdpa_loop"] = base["sdpa-flash-loop"][0] / base["qkern"][0]
    rows[1].extra["x_vs_sdpa_loop"] = base["sdpa-flash-loop"][1] / base["qkern"][1]
    return rows


# Decode cases (bf16, one query per sequence unless noted, 32 Q / 8 KV heads, D = 128): the
# K/V read is the whole cost, bytes = 2·B·Sk·Hkv·D·2 (+ q and out); floor = bytes / copy rate
# (~4,250 GB/s on the H200: 63 µs for B8 Sk8192); FLOPs (4·B·Hq·Sq·Sk·D) are < 2% of the matmul
# floor. "ragged" is the packed (cu_seqlens_k) form generation uses once rows differ in length.
_DECODE_CASES = (
    # (batch, query positions, key lengths per sequence)
    (8, 1, [8192] * 8),
    (1, 1, [32768]),
    (32, 1, [2048] * 32),
    (8, 1, [8191, 1, 12000, 3000, 8192, 500, 16384, 4097]),
)


def _cfg_name(cfg) -> str:
    kw = cfg.kwargs
    return f"n{kw['BLOCK_N']}w{cfg.num_warps}s{cfg.num_stages}p{kw.get('PER_SM', 2)}"


def _decode_case(b: int, sq: int, lks: list[int], d: int = 128) -> list[Row]:
    from bench.common import kernel_ms
    from qkern import attention as attn
    from qkern.attention import flash_attention

    ragged = len(set(lks)) > 1
    sk = max(lks)
    tag = f"ragged Sk<={sk}" if ragged else f"Sk{sk}"
    case = f"decode B{b} Sq{sq} {tag} D{d} {HQ}/{HKV}h"
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=DTYPE, generator=gen)  # noqa: E731
    tot_k = sum(lks)
    nbytes = 2 * tot_k * HKV * d * 2 + 2 * b * sq * HQ * d * 2
    flops = sum(4.0 * HQ * sq * n * d for n in lks)
    if ragged:
        q, k, v = rnd(b * sq, HQ, d), rnd(tot_k, HKV, d), rnd(tot_k, HKV, d)
        cu_q = torch.arange(0, b * sq + 1, sq, dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, *torch.tensor(lks).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = cu_k.to("cuda")
        kw = dict(cu_seqlens=cu_q, max_seqlen=sq, cu_seqlens_k=cu_k, max_seqlen_k=sk)
    else:
        q, k, v = rnd(b, sq, HQ, d), rnd(b, sk, HKV, d), rnd(b, sk, HKV, d)
        kw = {}

    def ours():
        with torch.no_grad():
            return flash_attention(q, k, v, causal=True, **kw)

    attn._DECODE_TIMES.clear()
    start = time.perf_counter()
    out = ours()  # tunes (the candidates' timings land in _DECODE_TIMES)
    torch.cuda.synchronize()
    tune_s = time.perf_counter() - start
    ref = attn.flash_attention_ref(q, k, v, causal=True, upcast=True, **kw)
    extra: dict = {"rel_err_vs_ref": _rel_err(out, ref), "tune_s": round(tune_s, 1)}
    for key, timed in attn._DECODE_TIMES.items():
        best = min(timed, key=lambda t: t[1])
        extra["cfg"] = _cfg_name(best[0])
        extra["cands_ms"] = {_cfg_name(c): round(ms, 4) for c, ms in timed}
        bh = key[1]
        extra["splits"] = attn._splits_for(best[0], bh, sk, attn._decode_sms(q.device))
    rows = []
    times = {"qkern": bench_ms(ours)}
    extra["kernel_ms"] = round(kernel_ms(ours), 4)  # GPU time alone; the gap is host time
    if not ragged:
        for name, backend in _sdpa_backends().items():
            try:
                fn, note, _ = _sdpa_fn(backend, q, k, v, False)  # same cost as bottom-right
                times[name] = bench_ms(fn)
                rows.append(Row("attention", case, name, times[name], nbytes, flops, {"gqa": note}))
            except Exception as e:  # backend not available for this case on this build/card
                rows.append(Row("attention", case, name, float("nan"), extra={"skip": str(e)[:80]}))
    for name in ("sdpa-flash", "sdpa-cudnn"):
        if name in times:
            extra[f"x_vs_{name.replace('-', '_')}"] = round(times[name] / times["qkern"], 3)
    rows.insert(0, Row("attention", case, "qkern", times["qkern"], nbytes, flops, extra))
    return rows


def _decode_rows() -> list[Row]:
    rows: list[Row] = []
    for b, sq, lks in _DECODE_CASES:
        rows += _decode_case(b, sq, lks)
        torch.cuda.empty_cache()
    return rows


_WS_STATE: dict = {}


def _enable_warp_specialization() -> None:
    """Let the warp-specialized candidates into autotuning if a child process runs them right."""
    from qkern import attention as attn

    start = time.perf_counter()
    ok = attn.enable_warp_specialization()
    _WS_STATE.update(ok=ok, probe_s=round(time.perf_counter() - start, 1))


def run(ceilings: Ceilings | None = None) -> list[Row]:
    del ceilings  # rows carry bytes/flops; the runner turns them into ratios
    _enable_warp_specialization()
    rows: list[Row] = []
    for b, s, d in ((8, 2048, 128), (4, 4096, 128), (2, 8192, 128), (4, 4096, 64)):
        rows += _dense_rows(b, s, d)
        torch.cuda.empty_cache()
    rows += _varlen_rows()
    rows += _decode_rows()
    assert all(math.isfinite(r.extra.get("rel_err_vs_sdpa", 0.0)) for r in rows)
    return rows


if __name__ == "__main__":
    from bench.common import format_table

    print(format_table(run(), None))
