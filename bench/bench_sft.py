"""A short SFT run through the trainer: packing, NF4 + LoRA, tokens/s and peak memory.

Unlike bench_e2e (one fixed batch, the competitors' setting), this drives
:class:`qkern_train.trainer.Trainer` the way a user does: a dataset of examples of varied lengths
(128..2048 tokens, random ids; only the speed means anything), packed into rows of
``max_seq_length`` with per-document positions and varlen attention (no attention across
documents), response-only targets, micro-batches with gradient accumulation, AdamW, cosine
schedule with warm-up, clipping, gradient checkpointing, JSONL metrics. The model is the
Llama-3.2-1B shape of bench_e2e with random weights, NF4 + double quant, LoRA r=16 alpha=16 on all
seven projections. Tokens/s counts input tokens of the packed rows (the trainer's own metric),
averaged over the steps after the first two (compilation, autotuning, allocator warm-up).

    PYTHONPATH=. python3 bench/bench_sft.py [--steps 12] [--json OUT.json]
    PYTHONPATH=. python3 bench/bench_sft.py --tiny   # a CPU-sized smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment  # noqa: E402


def synthetic_examples(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list:
    """``n`` examples of random ids, lengths uniform in [lo, hi]; the first quarter of each is a
    prompt (no loss), the rest the response (loss)."""
    from qkern_train.data import Example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(lo, hi)
        prompt = length // 4
        out.append(
            Example(
                [rng.randrange(vocab) for _ in range(length)],
                [False] * prompt + [True] * (length - prompt),
                f"synthetic:{i}",
            )
        )
    return out


def run_sft(
    tiny: bool = False, steps: int = 12, micro_batch: int = 4, accum: int = 2, seq: int = 2048
) -> dict:
    from qkern_train.config import OutputSection, TrainSection
    from qkern_train.data import BatchPlanner
    from qkern_train.trainer import Trainer

    if tiny:
        from qkern_train.lora import LoraConfig, apply_lora
        from qkern_train.model import ModelConfig, build_model

        cfg = ModelConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg, torch.float32, "cpu")
        from qkern_train.checkpoint import quantize_model

        quantize_model(model)
        apply_lora(model, LoraConfig(r=4, alpha=4), seed=0)
        vocab, device = cfg.vocab_size, "cpu"
        seq, micro_batch, lo, hi = 64, 2, 8, 64
    else:
        from bench.bench_e2e import SHAPES, build_qlora_model

        model = build_qlora_model("1b")
        vocab, device = SHAPES["1b"]["vocab_size"], "cuda"
        lo, hi = 128, seq
    n_examples = max(64, steps * micro_batch * accum * (2 * seq) // (lo + hi) + 16)
    examples = synthetic_examples(n_examples, vocab, lo, hi)
    data = BatchPlanner(examples, micro_batch_size=micro_batch, max_seq_length=seq, packing=True)
    train = TrainSection(
        max_steps=steps, micro_batch_size=micro_batch, gradient_accumulation_steps=accum,
        lr=2e-4, warmup_steps=2, gradient_checkpointing="on", logging_steps=1,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        Trainer(
            model, data, train, out_dir, output=OutputSection(progress_bar=False, plot=False)
        ).fit()
        wall = time.perf_counter() - t0
        records = [
            json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().split("\n") if x
        ]
    steps_rec = [r for r in records if "tokens_per_s" in r]
    timed = steps_rec[2:] or steps_rec
    return dict(
        shape="tiny" if tiny else "llama-3.2-1b",
        steps=len(steps_rec),
        micro_batch_size=micro_batch,
        gradient_accumulation_steps=accum,
        max_seq_length=seq,
        tokens_per_s_mean=statistics.mean(r["tokens_per_s"] for r in timed),
        tokens_per_s_median=statistics.median(r["tokens_per_s"] for r in timed),
        peak_mem_gb=max(r["peak_mem_gb"] for r in steps_rec),
        peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        losses=[r["loss"] for r in steps_rec if "loss" in r],
        wall_s=wall,
    )


def run(ceilings=None) -> list:
    """The suite entry (bench/run_all.py): one row with the 1B SFT run's tokens/s and memory."""
    from bench.common import Row

    r = run_sft()
    ms = r["micro_batch_size"] * r["gradient_accumulation_steps"] * r["max_seq_length"]
    ms = ms / r["tokens_per_s_mean"] * 1e3  # time of one optimizer step (16,384 tokens)
    extra = {k: r[k] for k in ("tokens_per_s_mean", "tokens_per_s_median", "peak_mem_gb")}
    return [Row("sft", f"{r['shape']} packed S{r['max_seq_length']}", "qkern", ms, extra=extra)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("the 1B run needs a CUDA device (use --tiny on a CPU)")
        return 2
    r = run_sft(tiny=args.tiny, steps=args.steps)
    r["environment"] = environment()
    print(
        f"sft {r['shape']}: {r['steps']} steps, {r['tokens_per_s_mean']:.0f} tokens/s "
        f"(median {r['tokens_per_s_median']:.0f}), peak {r['peak_mem_gb']:.2f} GB, "
        f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, wall {r['wall_s']:.0f} s"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
