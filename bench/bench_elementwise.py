"""RMSNorm, RoPE, SwiGLU forward+backward, and the fused LoRA MLP block's activation memory.

Floors (H200 as measured in the suite: ~4270 GB/s copy, ~690 TFLOP/s bf16 matmul; H100: ~3000
GB/s, ~700 TFLOP/s; the larger floor is the bound):

* RMSNorm 16384 x 4096 bf16, fwd+bwd: bytes = fwd (read x, write y) + bwd (read x, dy, write
  dx) = 5 x 128 MiB = 671 MB -> 0.157 ms on H200 (0.224 ms on H100); FLOPs ~10 per element =
  0.7 GFLOP -> 1 us. Bytes bound. (dW adds a 4096-float partial per program: a few MB.)
* RoPE q (8, 2048, 32, 128), k (8, 2048, 8, 128) bf16, fwd+bwd: q+k = 168 MB, read and written
  in each pass = 671 MB, plus the float32 cos/sin tables (8, 2048, 64) read in each pass = 17 MB:
  688 MB -> 0.161 ms (0.229 ms); FLOPs 6 per element pair: negligible. Bytes bound.
* SwiGLU (16384, 14336) bf16, fwd+bwd: one tensor is 470 MB; fwd reads 2 writes 1, bwd reads 3
  writes 2: 8 x 470 MB = 3.76 GB -> 0.88 ms (1.25 ms); FLOPs ~20 per element = 4.7 GFLOP -> 7 us.
* Fused LoRA MLP, Llama-3-8B shapes (M=8192 tokens, 4096 -> 14336 -> 4096, r=16, NF4):
  the unavoidable GEMMs are 3 forward + 3 backward (dh, dx via gate, dx via up) of
  2·M·4096·14336 FLOPs = 5.77 TFLOP -> 8.4 ms (8.2 ms); recomputing gate/up adds 2 more (+33%).
  The memory row reports the activation bytes each variant keeps between forward and backward.

Each row times the eager call (Python, autograd and kernel launches included, as a training step
pays them): when the host needs longer to issue a call than the GPU needs to run it, that row
measures the host. Its ``host_ms`` is the host time of one call alone (calls issued without
waiting for the GPU); ``host_ms`` close to ``ms`` means the row is host-bound. ``kernel_ms`` is
the GPU time of the call's kernels alone (profiler, launch gaps excluded) and ``kernel_GBs`` the
bandwidth they reach: the kernel's share of the roofline, measured the same way for every
provider. (CUDA-graph replays were tried for the kernel-only time, but a provider that cannot be
captured left the CUDA RNG in capture state on an H200 and broke every later measurement.)

Every case checks the timed qkern output once against the reference (rel. error in ``extra``).
"""

from __future__ import annotations

import time

import torch

from bench.common import Ceilings, Row, bench_ms, kernel_ms
from qkern.fused_lora import lora_mlp
from qkern.qlora import QLoRALinear
from qkern.rms_norm import rms_norm, rms_norm_ref
from qkern.rope import apply_rope, apply_rope_ref, rope_cos_sin, rope_inv_freq
from qkern.swiglu import swiglu, swiglu_ref

BF16 = torch.bfloat16


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _host_ms(step, calls: int = 10, repeats: int = 5) -> float:
    """Host time of one call of ``step``: wall time of a few calls issued back to back without
    waiting for the GPU (kernel launches are asynchronous and a few dozen fit in the launch
    queue, so the host never blocks), best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        best = min(best, (time.perf_counter() - t0) / calls * 1e3)
        torch.cuda.synchronize()
    return best


def _time(
    rows: list[Row],
    bench: str,
    case: str,
    name: str,
    step,
    nbytes: float,
    extra: dict,
    rep: int = 100,
) -> None:
    """Append the eager row of ``step`` with its host time per call in ``extra``."""
    ms = bench_ms(step, rep=rep)
    kms = kernel_ms(step)
    extra = {**extra, "host_ms": _host_ms(step), "kernel_ms": kms, "kernel_GBs": nbytes / kms / 1e6}
    rows.append(Row(bench, case, name, ms, bytes=nbytes, extra=extra))


def _fwd_bwd(fn, inputs, grads):
    """A closure running fn(*inputs) and its backward (output grads ``grads``)."""
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, wanted, grads, allow_unused=True)

    return step


# ----------------------------------------------------------------------------------------------


def _bench_rms_norm(rows: list[Row]) -> None:
    m, n = 16384, 4096
    x = torch.randn(m, n, device="cuda", dtype=BF16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=BF16)
    nbytes = 5 * m * n * 2
    for w_grad in (True, False):
        w = (torch.rand(n, device="cuda") + 0.5).to(BF16).requires_grad_(w_grad)
        case = f"{m}x{n} bf16 dW={'yes' if w_grad else 'no'}"
        want = rms_norm_ref(x.detach().float(), w.detach().float())
        err = _rel(rms_norm(x, w), want)
        providers = {"qkern": rms_norm, "torch": rms_norm_ref}
        try:
            from liger_kernel.transformers.rms_norm import LigerRMSNorm

            liger = LigerRMSNorm(n, eps=1e-6).to("cuda", BF16)
            with torch.no_grad():
                liger.weight.copy_(w)
            liger.weight.requires_grad_(w_grad)
            providers["liger"] = lambda x_, w_, _m=liger: _m(x_)
        except Exception:  # liger-kernel not installed
            pass
        for name, fn in providers.items():
            # liger's default backward writes dx over dy: give it its own copy
            grad = dy.clone() if name == "liger" else dy
            extra = {"rel_err": err} if name == "qkern" else {}
            _time(rows, "rms_norm", case, name, _fwd_bwd(fn, (x, w), (grad,)), nbytes, extra)


def _bench_rope(rows: list[Row]) -> None:
    b, s, hq, hk, d = 8, 2048, 32, 8, 128
    q = torch.randn(b, s, hq, d, device="cuda", dtype=BF16, requires_grad=True)
    k = torch.randn(b, s, hk, d, device="cuda", dtype=BF16, requires_grad=True)
    dq = torch.randn_like(q)
    dk = torch.randn_like(k)
    pos = torch.arange(s, device="cuda").expand(b, s)
    cos, sin = rope_cos_sin(pos, rope_inv_freq(d, 500000.0).cuda())
    qk_bytes = (q.numel() + k.numel()) * 2
    nbytes = 4 * qk_bytes + 2 * 2 * cos.numel() * 4
    case = f"q{tuple(q.shape)} k{tuple(k.shape)} bf16"
    want = apply_rope_ref(q.detach().float(), k.detach().float(), cos, sin)
    got = apply_rope(q, k, cos, sin)
    err = max(_rel(got[0], want[0]), _rel(got[1], want[1]))
    providers = {"qkern": apply_rope, "torch": apply_rope_ref}
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        cos_full = torch.cat((cos, cos), -1).to(BF16)
        sin_full = torch.cat((sin, sin), -1).to(BF16)

        def liger(q_, k_, c_, s_):
            # liger takes (B, H, S, D): a model in our (B, S, H, D) layout passes transposed views
            return liger_rotary_pos_emb(q_.transpose(1, 2), k_.transpose(1, 2), cos_full, sin_full)

        providers["liger"] = liger
    except Exception:  # liger-kernel not installed
        pass
    for name, fn in providers.items():
        grads = (dq, dk) if name != "liger" else (dq.transpose(1, 2), dk.transpose(1, 2))
        extra = {"rel_err": err} if name == "qkern" else {}
        _time(rows, "rope", case, name, _fwd_bwd(fn, (q, k, cos, sin), grads), nbytes, extra)


def _bench_swiglu(rows: list[Row]) -> None:
    m, n = 16384, 14336
    gate = torch.randn(m, n, device="cuda", dtype=BF16, requires_grad=True)
    up = torch.randn(m, n, device="cuda", dtype=BF16, requires_grad=True)
    dh = torch.randn(m, n, device="cuda", dtype=BF16)
    nbytes = 8 * m * n * 2
    case = f"{m}x{n} bf16"
    with torch.no_grad():
        err = _rel(swiglu(gate, up), swiglu_ref(gate.float(), up.float()))
    providers = {"qkern": swiglu, "torch": swiglu_ref}
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        providers["liger"] = LigerSiLUMulFunction.apply
    except Exception:  # liger-kernel not installed
        pass
    for name, fn in providers.items():
        extra = {"rel_err": err} if name == "qkern" else {}
        step = _fwd_bwd(fn, (gate, up), (dh,))
        _time(rows, "swiglu", case, name, step, nbytes, extra, rep=50)
        torch.cuda.empty_cache()


def _bench_fused_mlp(rows: list[Row]) -> None:
    m, h, i, r = 8192, 4096, 14336, 16
    torch.manual_seed(0)
    mods = []
    for n_out, n_in in ((i, h), (i, h), (h, i)):
        w = torch.randn(n_out, n_in, device="cuda", dtype=BF16) / n_in**0.5
        mod = QLoRALinear.from_linear(w)
        mod.add_adapter(r, lora_alpha=32.0, dtype=BF16)
        with torch.no_grad():
            mod.lora_B.normal_(0, 0.01)
        mods.append(mod)
        del w
    x = torch.randn(m, h, device="cuda", dtype=BF16, requires_grad=True)
    dy = torch.randn(m, h, device="cuda", dtype=BF16)
    flops = 6 * 2 * m * h * i
    variants = {
        "qkern-fused": lambda x_: lora_mlp(x_, *mods),
        "qkern-fused-keep": lambda x_: lora_mlp(x_, *mods, recompute=False),
        "unfused-chain": lambda x_: mods[2](swiglu(mods[0](x_), mods[1](x_))),
    }
    want = variants["unfused-chain"](x).detach()
    for name, fn in variants.items():
        params = [x] + [p for mod in mods for p in (mod.lora_A, mod.lora_B)]
        step = _fwd_bwd(lambda *a, _f=fn: _f(a[0]), params, (dy,))
        step()  # warm the workspace and the autotuners
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = fn(x)
        kept = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
        fwd_peak = torch.cuda.max_memory_allocated() - base
        torch.autograd.grad(y, params, dy)
        step_peak = torch.cuda.max_memory_allocated() - base
        err = _rel(y, want)
        del y
        ms = bench_ms(step, warmup=5, rep=20)
        rows.append(
            Row(
                "lora_mlp",
                f"M={m} {h}->{i}->{h} r={r} nf4",
                name,
                ms,
                flops=flops,
                extra={
                    "act_MB": kept / 1e6,
                    "fwd_peak_MB": fwd_peak / 1e6,
                    "step_peak_MB": step_peak / 1e6,
                    "x_MB": x.numel() * 2 / 1e6,
                    "rel_err_vs_chain": err,
                },
            )
        )
        torch.cuda.empty_cache()


def run(ceilings: Ceilings | None) -> list[Row]:
    rows: list[Row] = []
    _bench_rms_norm(rows)
    torch.cuda.empty_cache()
    _bench_rope(rows)
    torch.cuda.empty_cache()
    _bench_swiglu(rows)
    torch.cuda.empty_cache()
    _bench_fused_mlp(rows)
    return rows


if __name__ == "__main__":
    from bench.common import format_table, measure_ceilings

    c = measure_ceilings()
    print(format_table(run(c), c))
