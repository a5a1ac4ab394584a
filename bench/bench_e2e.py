"""End-to-end QLoRA training benchmark: tokens/s and peak GPU memory of whole training steps.

Setting (the one the anchors in the competitors' table were measured with): random weights at the
real shapes of Llama-3.2-1B (hidden 2048, intermediate 8192, 16 layers, 32/8 heads, vocab 128256,
tied embeddings) and Llama-3.1-8B (4096 / 14336 / 32 layers / 32/8 heads / 128256, untied), bf16
compute, projections in NF4 with double quantization, LoRA r=16 alpha=16 dropout 0 on q, k, v, o,
gate, up, down, gradient checkpointing, AdamW (lr 2e-4) on the adapters, random token ids as
inputs and labels, median step time of 6 steps after 2 warm-up steps. Peak memory is read over
the 6 timed steps (``peak_alloc_gib``) and over warm-up + timed steps (``..._incl_warmup``; the
anchors reset before the warm-up).

Cases are named ``<1b|8b>-b<B>-s<S>`` plus suffixes: ``-offload`` (checkpointed layer inputs in
pinned host memory, :mod:`qkern_train.offload`), ``-8bit`` (:class:`qkern.AdamW8bit` instead of
torch's fused AdamW), ``-nockpt`` (no checkpointing), ``-graph`` (the step replayed as a CUDA
graph), ``-lc<MiB>`` (the fused cross-entropy's logits buffer budget, default 256).
``8b-b1-max[-offload][-8bit]`` searches the longest context that fits at batch 1 (see
:func:`max_context`). Each model is built once and runs all its cases; its 16-bit weights
never exist all at once (built on the meta device, materialized, initialized and quantized
layer by layer).

Floors (model FLOPs over the ~700 TFLOP/s bf16 peak of an H100; bytes are negligible: the NF4
weights are read 3 times per step, 3 x 0.53 B/param = 11 GB for 8B, 4 ms at 3000 GB/s). FLOPs
per step with checkpointing, T = B*S tokens, P = projection parameters, frozen base weights (no
weight gradients), forward + recompute + input-gradient backward = 3 x 2PT; LM head 2 x 2VHT
(forward, input gradient; its logits are not recomputed); causal attention per layer
2*B*S^2*Hq*D for the forward, x4.5 for forward + recompute + backward; LoRA 10*r*(in+out)*T per
projection (three passes plus the two adapter weight gradients):

    1b-b2-s2048   3.12e13 FLOP ->  45 ms (92 k tokens/s at 100% of peak; attention 8%)
    8b-b2-s2048   1.92e14 FLOP -> 274 ms (15.0 k tokens/s; attention 5%)
    8b-b1-s8192   4.43e14 FLOP -> 633 ms (12.9 k tokens/s; attention 18%)

so Unsloth's anchors (22.1 k, 9.5 k, 9.1 k tokens/s on an H100) sit at 24%, 63% and 70% of that
ceiling, and the target (1.3x Unsloth) needs 31%, 82% and 91%. The table prints each case's
TFLOP/s and %matmul from these counts.

Run on a GPU:  PYTHONPATH=. python3 bench/bench_e2e.py [--configs 1b-b2-s2048,8b-b2-s2048]
               [--no-hf] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Ceilings, Row, environment, format_table  # noqa: E402

SHAPES: dict[str, dict] = {
    "1b": dict(
        name="llama-3.2-1b", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    ),
    "8b": dict(
        name="llama-3.1-8b", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        tie_word_embeddings=False,
    ),
}  # fmt: skip
# the anchor scripts' LlamaConfig extras (no RoPE scaling)
COMMON_HF = dict(rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192)
LORA = dict(r=16, alpha=16.0, dropout=0.0)
LR = 2e-4
STEPS, WARMUP = 6, 2

DEFAULT_CASES = [
    "1b-b2-s2048",
    "1b-b2-s2048-offload-8bit",
    "8b-b2-s2048",
    "8b-b2-s2048-offload-8bit",
    "8b-b1-s8192",
    "8b-b1-s8192-offload-8bit",
]
HEADLINE = ("1b-b2-s2048", "8b-b2-s2048", "8b-b1-s8192")

# ANCHORS.md (2026-11-28): tokens/s and peak allocated GiB of HF+PEFT+bnb and Unsloth
ANCHORS: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "H100": {
        "1b-b2-s2048": {"hf": (9827, 8.28), "unsloth": (22140, 1.75)},
        "8b-b2-s2048": {"hf": (5379, 13.76), "unsloth": (9483, 6.91)},
        "8b-b1-s8192": {"hf": (5437, 21.67), "unsloth": (9080, 7.60)},
    },
    "H200": {
        "1b-b2-s2048": {"hf": (11699, 8.28), "unsloth": (26647, 1.75)},
        "8b-b2-s2048": {"hf": (5745, 13.76), "unsloth": (10164, 6.91)},
        "8b-b1-s8192": {"hf": (5967, 21.67), "unsloth": (9623, 7.60)},
    },
}

_CASE_RE = re.compile(
    r"^(1b|8b)-b(\d+)-(?:s(\d+)|(max))((?:-offload|-8bit|-nockpt|-graph|-lc\d+)*)$"
)


@dataclass
class Case:
    name: str
    shape: str  # "1b" | "8b"
    batch: int
    seq: int | None  # None: longest-context search
    ckpt: str  # "on" | "offload" | "off"
    optim: str  # "adamw" | "adamw8bit"
    graph: bool = False  # the whole step (forward, backward, optimizer) replayed as a CUDA graph
    loss_chunk_mib: int = 0  # fused cross-entropy logits buffer (0: qkern's default, 256 MiB)

    @property
    def base(self) -> str:
        """The case without suffixes (the anchors' key)."""
        return f"{self.shape}-b{self.batch}-s{self.seq}"


def parse_case(name: str) -> Case:
    m = _CASE_RE.match(name)
    if not m:
        raise ValueError(
            f"bad case {name!r}: expected <1b|8b>-b<B>-s<S> or 8b-b1-max, with optional "
            "-offload, -8bit, -nockpt, -graph, -lc<MiB> suffixes"
        )
    shape, b, s, is_max, suffix = m.groups()
    if "-offload" in suffix and "-nockpt" in suffix:
        raise ValueError(f"{name!r}: -offload and -nockpt exclude each other")
    ckpt = "offload" if "-offload" in suffix else "off" if "-nockpt" in suffix else "on"
    optim = "adamw8bit" if "-8bit" in suffix else "adamw"
    graph = "-graph" in suffix
    if graph and (ckpt == "offload" or optim != "adamw"):
        raise ValueError(f"{name!r}: -graph runs with plain checkpointing and torch AdamW only")
    lc = re.search(r"-lc(\d+)", suffix)
    loss_mib = int(lc.group(1)) if lc else 0
    return Case(name, shape, int(b), None if is_max else int(s), ckpt, optim, graph, loss_mib)


# ----------------------------------------------------------------------------------------------
# work per step
# ----------------------------------------------------------------------------------------------


def step_flops(shape: str, batch: int, seq: int, r: int = LORA["r"]) -> float:
    """Model FLOPs of one checkpointed QLoRA training step (module docstring)."""
    c = SHAPES[shape]
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hq, hkv, layers = c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]
    d = h // hq
    t = batch * seq
    projs = [(h, hq * d), (h, hkv * d), (h, hkv * d), (hq * d, h), (h, i), (h, i), (i, h)]
    p_lin = sum(a * b for a, b in projs)
    lin = 3 * 2 * p_lin * t
    lora = 10 * r * sum(a + b for a, b in projs) * t
    attn = 4.5 * 2 * batch * seq * seq * hq * d
    head = 2 * 2 * v * h * t
    return float(layers * (lin + lora + attn) + head)


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


def model_config(shape: str):
    from qkern_train.model import ModelConfig

    d = {k: v for k, v in SHAPES[shape].items() if k != "name"}
    d.update(COMMON_HF, model_type="llama", architectures=["LlamaForCausalLM"])
    return ModelConfig.from_hf(d)


def build_qlora_model(shape: str, seed: int = 0, device: str = "cuda") -> torch.nn.Module:
    """Random-weight NF4 model with LoRA adapters, built layer by layer on ``device``.

    The model is created on the meta device; embeddings, norms and the head are materialized,
    initialized (normal(0, 0.02), unit norms) and cast to bf16; then each decoder layer in turn is
    materialized in float32, initialized, cast to bf16 and its projections quantized to NF4, so at
    most one layer's dense weights (8B: 218 M params, 0.9 GB in float32) exist at a time.
    """
    from qkern_train.checkpoint import quantize_model
    from qkern_train.lora import LoraConfig, apply_lora
    from qkern_train.model import Transformer, init_weights

    config = model_config(shape)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config)
    for name, module in model.named_children():
        if name == "layers" or module is None:
            continue
        module.to_empty(device=device)
        init_weights(module)
        module.to(torch.bfloat16)
    for layer in model.layers:
        layer.to_empty(device=device)
        init_weights(layer)
        layer.to(torch.bfloat16)
        quantize_model(layer)
    apply_lora(model, LoraConfig(**LORA), seed=seed)
    return model.train()


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels aligned with ``ids`` (the last position has none): the same B*(S-1)
    predictions HF's ``labels=input_ids`` scores."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def make_optimizer(
    params: list[torch.Tensor], kind: str, capturable: bool = False
) -> torch.optim.Optimizer:
    if kind == "adamw8bit":
        from qkern.optim8bit import AdamW8bit

        return AdamW8bit(params, lr=LR)
    return torch.optim.AdamW(params, lr=LR, fused=True, capturable=capturable)


def set_checkpointing(model: torch.nn.Module, mode: str) -> None:
    from qkern_train.offload import offloaded_checkpoint

    model.gradient_checkpointing = mode != "off"
    if mode == "offload":
        model.checkpoint_fn = offloaded_checkpoint
    else:
        model.checkpoint_fn = functools.partial(
            torch.utils.checkpoint.checkpoint, use_reentrant=False
        )


def train_steps(
    model: torch.nn.Module, case: Case, seq: int, steps: int = STEPS, warmup: int = WARMUP
) -> dict:
    """Run warm-up + timed steps; step times, losses and memory peaks."""
    from qkern_train.lora import lora_parameters

    set_checkpointing(model, case.ckpt)
    model.loss_chunk_bytes = case.loss_chunk_mib * 2**20 or None
    params = lora_parameters(model)
    if case.graph:
        return _graph_train_steps(model, case, seq, params, steps, warmup)
    opt = make_optimizer(params, case.optim)
    vocab = SHAPES[case.shape]["vocab_size"]
    g = torch.Generator(device="cuda").manual_seed(1234)
    ids = torch.randint(0, vocab, (case.batch, seq), device="cuda", generator=g)
    labels = shifted_labels(ids)
    _free()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    peak_warm = (0, 0)
    try:
        for i in range(warmup + steps):
            if i == warmup:
                peak_warm = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
                torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model.loss(ids, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(loss.detach())
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    finally:
        for p in params:
            p.grad = None
        del opt
    timed = times[warmup:] or times
    step_s = statistics.median(timed)
    return dict(
        step_s=step_s,
        times=times,
        tokens_per_s=case.batch * seq / step_s,
        peak_alloc=alloc,
        peak_reserved=reserved,
        peak_alloc_warm=max(alloc, peak_warm[0]),
        peak_reserved_warm=max(reserved, peak_warm[1]),
        losses=[float(x) for x in losses],
    )


def _graph_train_steps(
    model: torch.nn.Module, case: Case, seq: int, params: list, steps: int, warmup: int
) -> dict:
    """Like train_steps, but the whole step is captured once as a CUDA graph and replayed.

    At the 1B shape a step is ~75 ms of kernels issued by ~165 ms of Python (launchers, autograd,
    checkpointing; see profile_e2e), so the GPU idles half the time. A graph replays the same
    kernels with no host work per launch (capture recipe and requirements:
    :mod:`qkern_train.cuda_graph`; cross-entropy skips its host-side label check while a capture
    is running).
    """
    from qkern_train.cuda_graph import capture_train_step, side_stream_steps

    model.checkpoint_fn = functools.partial(
        torch.utils.checkpoint.checkpoint, use_reentrant=False, preserve_rng_state=False
    )
    vocab = SHAPES[case.shape]["vocab_size"]
    g = torch.Generator(device="cuda").manual_seed(1234)
    ids = torch.randint(0, vocab, (case.batch, seq), device="cuda", generator=g)
    labels = shifted_labels(ids)
    # the same steps eagerly from the same adapter weights, as the check that the replayed graph
    # trains exactly as the eager code does (losses compared below)
    start = [p.detach().clone() for p in params]
    opt = make_optimizer(params, case.optim, capturable=True)
    side = torch.cuda.Stream()
    eager_losses = side_stream_steps(model, opt, ids, labels, warmup + 1 + steps, side)
    eager_losses = [float(x) for x in eager_losses]
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    del opt, start
    opt = make_optimizer(params, case.optim, capturable=True)
    _free()
    torch.cuda.reset_peak_memory_stats()
    losses = side_stream_steps(model, opt, ids, labels, warmup + 1, side)
    torch.cuda.synchronize()
    graph, static_loss = capture_train_step(model, opt, ids, labels)
    times = []
    try:
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(static_loss.detach().clone())
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    finally:
        for p in params:
            p.grad = None
        del opt, graph
        set_checkpointing(model, case.ckpt)
    step_s = statistics.median(times)
    losses = [float(x) for x in losses]
    return dict(
        step_s=step_s,
        times=times,
        tokens_per_s=case.batch * seq / step_s,
        peak_alloc=alloc,
        peak_reserved=reserved,
        peak_alloc_warm=alloc,
        peak_reserved_warm=reserved,
        losses=losses,
        graph_vs_eager_max_rel_loss_diff=max(
            abs(a - b) / abs(b) for a, b in zip(losses, eager_losses)
        ),
    )


# ----------------------------------------------------------------------------------------------
# longest context
# ----------------------------------------------------------------------------------------------


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def max_context(
    model: torch.nn.Module,
    case: Case,
    grid: int = 4096,
    probes: tuple[int, int] = (8192, 16384),
    time_budget_s: float = 300.0,
    margin_gib: float = 2.0,
) -> dict:
    """Longest sequence (multiple of ``grid``) whose training step fits at batch 1.

    Peak memory of a step is affine in S here (flash attention and the chunked cross-entropy
    keep nothing quadratic), so one step at each of two probe lengths gives the bytes per token
    and the predicted maximum (card memory minus ``margin_gib`` for the CUDA context and the
    allocator's fragmentation, against peak *allocated* bytes).

    The prediction is then run for real (backing off by ``grid`` on OOM) when its estimated time
    fits ``time_budget_s``: two steps (the first pays Triton autotuning for the new length
    bucket), each estimated as the second probe's step time scaled by model FLOPs, with a factor
    2 of headroom for the autotuning. Otherwise the longest multiple of ``grid`` that does fit
    the budget is run instead and the result says so (``status``): the measured length is then a
    lower bound and the predicted maximum is unverified.
    """
    total = torch.cuda.get_device_properties(0).total_memory
    usable = total - margin_gib * 2**30
    pts = []
    for s in probes:
        r = train_steps(model, case, s, steps=1, warmup=1)
        pts.append((s, r["peak_alloc_warm"], r["times"][-1]))
    (s1, m1, _), (s2, m2, t2) = pts
    slope = (m2 - m1) / (s2 - s1)
    pred = int((s2 + (usable - m2) / slope) // grid * grid) if slope > 0 else s2
    out = dict(predicted=pred, probe_peaks_gib=[_gib(m1), _gib(m2)], bytes_per_token=slope)
    if case.ckpt == "offload":
        # the parked layer inputs take layers * S * hidden * 2 B of pinned host memory, and the
        # caching host allocator rounds each buffer up to a power of two: keep that under 40% of
        # the available host memory (page-locking most of the RAM invites the OOM killer)
        c = SHAPES[case.shape]
        per_token = c["num_hidden_layers"] * c["hidden_size"] * 2 * 2
        host_cap = int(0.4 * _host_available_bytes() / per_token) // grid * grid
        if host_cap < pred:
            out.update(predicted_gpu=pred, host_cap=host_cap)
            pred = host_cap
            out["predicted"] = pred
    t_start = time.perf_counter()

    def affordable(s: int) -> bool:
        est = t2 * step_flops(case.shape, 1, s) / step_flops(case.shape, 1, s2)
        return 4 * est <= time_budget_s - (time.perf_counter() - t_start)

    s = pred
    limited = False
    while s > s2 and not affordable(s):
        s -= grid
        limited = True
    while s > s2:
        try:
            r = train_steps(model, case, s, steps=1, warmup=1)
        except Exception as e:  # OOM at this length: back off
            if not _is_oom(e):
                raise
            _free()
            s -= grid
            continue
        status = "measured below the prediction (time budget)" if limited else "measured"
        if not limited and s < pred:
            status = "measured (backed off from the prediction after OOM)"
        out.update(status=status, seq=s, **r)
        return out
    out.update(status="nothing above the probes measured")
    return out


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def _card_key() -> str | None:
    name = torch.cuda.get_device_properties(0).name if torch.cuda.is_available() else ""
    return next((k for k in ANCHORS if k in name), None)


def _row(case: Case, seq: int, r: dict, provider: str = "qkern") -> Row:
    extra = dict(
        tokens_per_s=round(r["tokens_per_s"], 1),
        peak_alloc_gib=_gib(r["peak_alloc"]),
        peak_reserved_gib=_gib(r["peak_reserved"]),
        peak_alloc_incl_warmup_gib=_gib(r["peak_alloc_warm"]),
        loss_step0=round(r["losses"][0], 4),
        loss_last=round(r["losses"][-1], 4),
    )
    if "graph_vs_eager_max_rel_loss_diff" in r:
        extra["graph_vs_eager_max_rel_loss_diff"] = r["graph_vs_eager_max_rel_loss_diff"]
    card = _card_key()
    base = f"{case.shape}-b{case.batch}-s{seq}"
    if card and base in ANCHORS[card]:
        for who, (tps, mem) in ANCHORS[card][base].items():
            extra[f"x_{who}_anchor"] = round(r["tokens_per_s"] / tps, 3)
            extra[f"mem_{who}_anchor_gib"] = mem
    return Row("e2e", case.name if case.seq else f"{case.name} S={seq}", provider,
               ms=r["step_s"] * 1e3, flops=step_flops(case.shape, case.batch, seq),
               extra=extra)  # fmt: skip


def run_cases(names: list[str], max_budget_s: float = 300.0) -> list[Row]:
    cases = [parse_case(n) for n in names]
    rows: list[Row] = []
    for shape in ("1b", "8b"):
        mine = [c for c in cases if c.shape == shape]
        if not mine:
            continue
        t0 = time.perf_counter()
        model = build_qlora_model(shape)
        print(
            f"[e2e] built {SHAPES[shape]['name']} in {time.perf_counter() - t0:.1f} s", flush=True
        )
        for case in mine:
            try:
                if case.seq is None:
                    r = max_context(model, case, time_budget_s=max_budget_s)
                    brief = {k: v for k, v in r.items() if k not in ("times", "losses")}
                    print(f"[e2e] {case.name}: {json.dumps(brief, default=str)}", flush=True)
                    if "seq" in r:
                        row = _row(case, r["seq"], r)
                    else:
                        row = Row("e2e", case.name, "qkern", ms=float("nan"))
                    row.extra.update(max_context_status=r["status"], predicted_seq=r["predicted"],
                                     bytes_per_token=round(r["bytes_per_token"]))  # fmt: skip
                    rows.append(row)
                else:
                    r = train_steps(model, case, case.seq)
                    rows.append(_row(case, case.seq, r))
            except Exception as e:  # record and go on with the other cases
                what = "oom" if _is_oom(e) else f"{type(e).__name__}: {e}"[:300]
                if what != "oom":
                    traceback.print_exc()
                rows.append(Row("e2e", case.name, "qkern", ms=float("nan"), extra={"error": what}))
            _free()
        del model
        _free()
    return rows


def _add_ratios(rows: list[Row]) -> None:
    """x_hf: our tokens/s over the HF+PEFT+bnb run of the same case in this process."""
    hf = {r.case: r for r in rows if r.provider == "hf+peft+bnb"}
    for r in rows:
        if r.provider == "qkern":
            base = re.sub(r"(-offload|-8bit|-nockpt|-graph|-lc\d+)+$", "", r.case)
            if base in hf and hf[base].ms == hf[base].ms and r.ms == r.ms:  # not NaN
                r.extra["x_hf"] = round(hf[base].ms / r.ms, 3)
                r.extra["mem_vs_hf"] = round(
                    r.extra["peak_alloc_gib"] / hf[base].extra["peak_alloc_gib"], 3
                )


def run(
    ceilings: Ceilings | None = None,
    configs: list[str] | None = None,
    hf: bool = True,
    max_budget_s: float = 300.0,
) -> list[Row]:
    """qkern cases (default :data:`DEFAULT_CASES`), then the HF+PEFT+bitsandbytes baseline on the
    headline cases that ran (when transformers, peft and bitsandbytes import) and the step-0 loss
    agreement on the 1B shape; adds ratios."""
    names = configs or DEFAULT_CASES
    rows = run_cases(names, max_budget_s)
    if hf:
        try:
            from bench import e2e_hf_baseline
        except ImportError as e:  # pragma: no cover - optional baseline
            print(f"[e2e] HF baseline skipped: {e}", flush=True)
        else:
            if e2e_hf_baseline.available():
                base = sorted({parse_case(n).base for n in names if parse_case(n).seq})
                hf_cases = [b for b in HEADLINE if b in base]
                rows += e2e_hf_baseline.run(ceilings, configs=hf_cases)
                _add_ratios(rows)
            else:
                print("[e2e] HF baseline skipped: bitsandbytes/peft/transformers missing")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(DEFAULT_CASES))
    ap.add_argument("--no-hf", action="store_true", help="skip the HF+PEFT+bnb baseline")
    ap.add_argument("--max-budget-s", type=float, default=300.0,
                    help="time allowed for the longest-context try (8b-b1-max)")  # fmt: skip
    ap.add_argument("--json", default=None, help="write rows + environment here")
    ap.add_argument(
        "--warp-specialize",
        action="store_true",
        help="let warp-specialized attention kernels into autotuning (probed first)",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("the end-to-end benchmark needs a CUDA device")
        return 2
    from bench.common import measure_ceilings, write_results

    env = environment()
    if args.warp_specialize:
        from qkern.attention import enable_warp_specialization

        env["attention_warp_specialization"] = enable_warp_specialization()
        print(f"[e2e] warp-specialized attention: {env['attention_warp_specialization']}")
    ceilings = measure_ceilings()
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        parse_case(n)  # fail early on a typo
    rows = run(ceilings, names, hf=not args.no_hf, max_budget_s=args.max_budget_s)
    print(format_table(rows, ceilings))
    if args.json:
        write_results(Path(args.json), rows, ceilings, env)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
