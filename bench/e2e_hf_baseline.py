"""HF transformers + PEFT + bitsandbytes QLoRA baseline, re-measured next to qkern's run.

The anchor setting exactly: ``LlamaForCausalLM`` (sdpa attention) built in bf16 from a seed, every
projection replaced by ``bitsandbytes.nn.Linear4bit`` (nf4, double quant, bf16 compute), PEFT LoRA
r=16 alpha=16 dropout 0 on the seven projections, gradient checkpointing (non-reentrant) with
``enable_input_require_grads``, fused ``torch.optim.AdamW`` lr 2e-4 on the adapters, random token
ids as inputs and ``labels=input_ids``, median of 6 steps after 2 warm-up steps. One difference
from the anchor script: the bf16 weights are quantized where they are (on the GPU) instead of
being copied to the host and back first; the quantized model is the same.

Same work check (1B shape): the seeded HF model's bf16 weights are also loaded into a qkern
model (through the checkpoint name map) and quantized by qkern; the step-0 training losses of
both on the same token ids are compared, and so are the NF4 bytes of every projection
(``nf4_packed_equal`` / ``nf4_absmax_equal``: fraction of identical bytes; 1.0 when qkern's
quantizer matches bitsandbytes bit for bit).

    PYTHONPATH=. python3 bench/e2e_hf_baseline.py [--configs 1b-b2-s2048,8b-b2-s2048] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_e2e import (  # noqa: E402
    COMMON_HF,
    LORA,
    LR,
    SHAPES,
    STEPS,
    WARMUP,
    Case,
    _free,
    _gib,
    _is_oom,
    model_config,
    parse_case,
    step_flops,
    train_steps,
)
from bench.common import Ceilings, Row, environment, format_table  # noqa: E402

PROVIDER = "hf+peft+bnb"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKEN_SEED = 1234  # the same generator seed as bench_e2e.train_steps: the same token ids


def available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_hf_dense(shape: str, seed: int = 0):
    """bf16 ``LlamaForCausalLM`` with HF's random init, on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {k: v for k, v in SHAPES[shape].items() if k != "name"}
    cfg = LlamaConfig(**kw, **COMMON_HF, attn_implementation="sdpa")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


def quantize_bnb(model) -> None:
    """Every projection -> ``Linear4bit`` (nf4, double quant, bf16 compute), in place."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False,
                    compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                    device="meta",
                )  # fmt: skip
                new.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4",
                    compress_statistics=True, module=new,
                )  # fmt: skip
                setattr(parent, name, new.cuda())  # .cuda() quantizes the bf16 weight
                del child
    _free()


def add_peft(model):
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                     bias="none", task_type="CAUSAL_LM", target_modules=TARGETS)  # fmt: skip
    return get_peft_model(model, cfg)


def train_steps_hf(model, shape: str, batch: int, seq: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=True)
    vocab = SHAPES[shape]["vocab_size"]
    g = torch.Generator(device="cuda").manual_seed(TOKEN_SEED)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=g)
    model.train()
    _free()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    peak_warm = (0, 0)
    for i in range(WARMUP + STEPS):
        if i == WARMUP:
            peak_warm = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.detach())
        del out
    alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    del opt
    step_s = statistics.median(times[WARMUP:])
    return dict(
        step_s=step_s, times=times, tokens_per_s=batch * seq / step_s, peak_alloc=alloc,
        peak_reserved=reserved, peak_alloc_warm=max(alloc, peak_warm[0]),
        peak_reserved_warm=max(reserved, peak_warm[1]), losses=[float(x) for x in losses],
    )  # fmt: skip


def qkern_from_hf(hf_model, shape: str) -> torch.nn.Module:
    """A qkern model holding copies of ``hf_model``'s bf16 weights (through the checkpoint name
    map), projections quantized by qkern, LoRA adapters added."""
    from qkern_train.checkpoint import from_hf_name, quantize_model
    from qkern_train.lora import LoraConfig, apply_lora
    from qkern_train.model import ModelConfig, Transformer

    # the HF model's own config (RoPE and norm settings as HF resolved them), same shape as ours
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    assert config.hidden_size == model_config(shape).hidden_size
    with torch.device("meta"):
        ours = Transformer(config)
    wanted = dict(ours.named_parameters())
    for name, t in hf_model.state_dict().items():
        mine = from_hf_name(name)
        if mine is None or mine not in wanted:  # e.g. lm_head.weight of a tied model
            continue
        mod_name, attr = mine.rsplit(".", 1)
        param = torch.nn.Parameter(t.detach().clone(), requires_grad=False)
        setattr(ours.get_submodule(mod_name), attr, param)
    left = [n for n, p in ours.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"HF state dict did not cover {left[:5]}")
    quantize_model(ours)
    apply_lora(ours, LoraConfig(**LORA), seed=0)
    return ours.train()


def _nf4_agreement(ours, hf_model) -> dict:
    """Fractions of identical packed-weight bytes and absmax codes over all projections."""
    same_w = total_w = same_a = total_a = 0
    for i, layer in enumerate(hf_model.model.layers):
        for block in ("self_attn", "mlp"):
            for name in TARGETS:
                theirs = getattr(getattr(layer, block), name, None)
                if theirs is None:
                    continue
                mine = getattr(getattr(ours.layers[i], block), name)
                w_t, w_m = theirs.weight.data.reshape(-1), mine.packed.reshape(-1)
                a_t, a_m = theirs.weight.quant_state.absmax.reshape(-1), mine.quant_state.absmax
                same_w += int((w_t == w_m).sum()) if w_t.shape == w_m.shape else 0
                same_a += int((a_t == a_m.reshape(-1)).sum()) if a_t.numel() == a_m.numel() else 0
                total_w += w_m.numel()
                total_a += a_m.numel()
    return dict(
        nf4_packed_equal=round(same_w / max(total_w, 1), 6),
        nf4_absmax_equal=round(same_a / max(total_a, 1), 6),
    )


def loss_agreement_and_run(shape: str, cases: list[Case]) -> list[Row]:
    """Build the seeded HF model; check qkern's step-0 loss on its weights; time HF's cases."""
    rows: list[Row] = []
    t0 = time.perf_counter()
    hf = build_hf_dense(shape)
    agreement, agreement_case = None, None
    if shape == "1b":
        ours = qkern_from_hf(hf, shape)
        case = cases[0] if cases else parse_case("1b-b2-s2048")
        mine = train_steps(ours, case, case.seq, steps=1, warmup=0)
        quantize_bnb(hf)
        agreement = dict(loss_qkern=mine["losses"][0], **_nf4_agreement(ours, hf))
        agreement_case = case
        del ours
        _free()
    else:
        quantize_bnb(hf)
    model = add_peft(hf)
    print(f"[e2e-hf] built {SHAPES[shape]['name']} in {time.perf_counter() - t0:.1f} s", flush=True)
    for case in cases:
        try:
            r = train_steps_hf(model, shape, case.batch, case.seq)
        except Exception as e:
            if not _is_oom(e):
                raise
            rows.append(Row("e2e", case.name, PROVIDER, ms=float("nan"), extra={"error": "oom"}))
            _free()
            continue
        rows.append(
            Row("e2e", case.name, PROVIDER, ms=r["step_s"] * 1e3,
                flops=step_flops(shape, case.batch, case.seq),
                extra=dict(tokens_per_s=round(r["tokens_per_s"], 1),
                           peak_alloc_gib=_gib(r["peak_alloc"]),
                           peak_reserved_gib=_gib(r["peak_reserved"]),
                           peak_alloc_incl_warmup_gib=_gib(r["peak_alloc_warm"]),
                           loss_step0=round(r["losses"][0], 4),
                           loss_last=round(r["losses"][-1], 4)))
        )  # fmt: skip
        if agreement is not None and case is agreement_case:
            hf_loss = r["losses"][0]
            d = agreement["loss_qkern"] - hf_loss
            extra = dict(loss_hf=round(hf_loss, 5), loss_qkern=round(agreement["loss_qkern"], 5),
                         abs_diff=round(abs(d), 6), rel_diff=round(abs(d) / abs(hf_loss), 7),
                         nf4_packed_equal=agreement["nf4_packed_equal"],
                         nf4_absmax_equal=agreement["nf4_absmax_equal"])  # fmt: skip
            rows.append(Row("e2e", f"{case.name} step-0 loss", "qkern-vs-hf", ms=float("nan"),
                            extra=extra))  # fmt: skip
    del model, hf
    _free()
    return rows


def run(ceilings: Ceilings | None = None, configs: list[str] | None = None) -> list[Row]:
    """HF+PEFT+bnb rows for ``configs`` (default 1B B2 S2048 and 8B B2 S2048), plus the 1B step-0
    loss agreement row."""
    names = configs or ["1b-b2-s2048", "8b-b2-s2048"]
    cases = [parse_case(n) for n in names]
    rows: list[Row] = []
    for shape in ("1b", "8b"):
        mine = [c for c in cases if c.shape == shape and c.seq is not None]
        if mine:
            rows += loss_agreement_and_run(shape, mine)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="1b-b2-s2048,8b-b2-s2048")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not available():
        print("needs a CUDA device, transformers, peft and bitsandbytes")
        return 2
    from bench.common import write_results

    env = environment()
    rows = run(None, [n for n in args.configs.split(",") if n])
    print(format_table(rows, None))
    if args.json:
        write_results(Path(args.json), rows, None, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
