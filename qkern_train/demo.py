"""End-to-end demo: a tokenizer and a tiny Llama from scratch, then QLoRA fine-tuning.

    python -m qkern_train.demo [--quick] [--out DIR] [--seed N] [--threads N]

Everything is generated here: no network, no downloaded model or dataset.

1. **Corpus and tokenizer.** "Generic" text: counting runs (``41 42 43 44``), alphabet runs
   (``k l m n``) and word salad. A byte-level BPE tokenizer (the ``tokenizers`` library) is
   trained on it; numbers up to :data:`MAX_NUMBER` end up as single tokens, as in Llama 3's
   tokenizer (which splits numbers into chunks of up to three digits).
2. **Pre-training.** A tiny Llama (4 layers, hidden 128, about 1M parameters; 2 layers with
   ``--quick``) is trained from random initialization on that text — all weights, fp32 — and
   saved as an HF-format model directory (16-bit safetensors, config.json, tokenizer files).
   Counting is written with spaces, so "the next number" is a next-token (bigram) fact the model
   picks up within a hundred steps.
3. **QLoRA fine-tuning.** The directory is loaded with ``load_in_4bit=True`` (NF4 + double
   quantization), LoRA adapters go on all seven projections of every layer, and only they train,
   on chat-formatted questions: ``what number comes after 47`` -> ``48`` and
   ``count three numbers after 47`` -> ``48 49 50`` (three phrasings each). The loss is on the
   answers only (response masking through the chat template).
4. **Evaluation.** Held-out questions — about numbers that never occur in any fine-tuning
   question — measure exact-match accuracy of greedy answers before and after fine-tuning.
5. **Outputs.** Sample answers, the adapter (HF PEFT format), a merged 16-bit model (merged in
   float32 from the original 16-bit weights) whose accuracy is measured again after reloading it,
   metrics JSONL and loss-curve PNGs for both phases.

Why the gain is honest: pre-training shows counting, never a question, the chat tokens or the
words of the questions next to numbers, so the base model cannot answer (accuracy about 0: it
has never seen the format). Fine-tuning teaches the format on a part of the numbers; the held-out
numbers are asked about only at evaluation, so answering them correctly means the model connects
the new format to what it learned in pre-training — the situation of real instruction tuning,
in miniature.

On a CUDA device the same code runs qkern's Triton kernels (NF4 dequantization, fused QLoRA
layers, flash attention, fused cross-entropy) with packed varlen batches and a bf16 fine-tuning
phase; on a CPU the PyTorch references in fp32, with padded batches (the reference varlen
attention loops over documents) and one thread (tiny matrices do not gain from more, and
OpenMP threads spin-waiting on a busy machine lose a lot). ``--quick`` is the short run CI uses.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# A minimal chat template: BOS, then <|user|>text / <|assistant|>text</s> turns. Rendering a
# conversation up to a turn with the generation prompt is a prefix of rendering it with the
# answer, which the data pipeline's response-only masking relies on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_NUMBER = 300  # numbers 0..MAX_NUMBER-1 are asked about (answers go up to MAX_NUMBER + 2)
WORDS = (
    "the a one cat dog sun moon red big small is and of we see so it to in on at my your "
    "what number comes after count three next which follows then up from"
).split()
# Every question ends with its number, so the answer starts right after it, as the next number
# does in the pre-training text.
QUESTIONS_NEXT = ["what number comes after {n}", "which number follows {n}",
                  "what comes after {n}"]  # fmt: skip
QUESTIONS_COUNT = ["count three numbers after {n}", "count up three from {n}",
                   "what are the next three numbers after {n}"]  # fmt: skip


def build_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 384):
    """Train a byte-level BPE tokenizer on ``texts`` and write an HF tokenizer directory.

    Byte-level pre-tokenization with a prefix space (so a word is the same token at the start of
    a text and after a space), BOS added by the post-processor, :data:`CHAT_TEMPLATE` as the chat
    template and ``</s>`` as EOS. Returns the loaded qkern Tokenizer.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from qkern_train.tokenizer import load_tokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return load_tokenizer(out)


# ---------------------------------------------------------------------------------------------
# Generated data


def pretraining_corpus(n_docs: int, seed: int) -> list[str]:
    """Documents of a few "sentences": counting runs, alphabet runs, word salad."""
    rng = random.Random(f"corpus-{seed}")
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(2, 4)):
            r = rng.random()
            if r < 0.6:
                start = rng.randrange(MAX_NUMBER)
                parts.append(" ".join(str(start + k) for k in range(rng.randint(3, 8))))
            elif r < 0.75:
                start = rng.randrange(20)
                parts.append(" ".join(LETTERS[start : start + rng.randint(3, 7)]))
            else:
                parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))))
        docs.append(". ".join(parts) + ".")
    return docs


def split_numbers(seed: int, n_heldout: int) -> tuple[list[int], list[int]]:
    """(train numbers, held-out numbers): a seeded random split of 0..MAX_NUMBER-1."""
    nums = list(range(MAX_NUMBER))
    random.Random(f"split-{seed}").shuffle(nums)
    return sorted(nums[n_heldout:]), sorted(nums[:n_heldout])


def question(n: int, kind: int, phrasing: int) -> tuple[str, str]:
    """(question, answer) about number n: kind 0 = successor, 1 = the next three numbers."""
    if kind == 0:
        return QUESTIONS_NEXT[phrasing].format(n=n), str(n + 1)
    return QUESTIONS_COUNT[phrasing].format(n=n), f"{n + 1} {n + 2} {n + 3}"


def finetune_rows(numbers: list[int]) -> list[dict]:
    """Every question kind and phrasing about each number, as chat messages."""
    rows = []
    for n in numbers:
        for kind in (0, 1):
            for p in range(3):
                q, a = question(n, kind, p)
                rows.append(
                    {
                        "messages": [
                            {"role": "user", "content": q},
                            {"role": "assistant", "content": a},
                        ]
                    }
                )
    return rows


def heldout_questions(numbers: list[int]) -> list[tuple[str, str]]:
    """One question per held-out number, alternating kinds and phrasings."""
    return [question(n, i % 2, (i // 2) % 3) for i, n in enumerate(numbers)]


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Settings:
    """Sizes and hyperparameters of one demo run (FULL and QUICK below)."""

    pretrain_docs: int = 4000
    pretrain_steps: int = 150
    pretrain_batch: int = 48  # documents per step
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 20
    finetune_steps: int = 120
    finetune_batch: int = 32  # questions per step
    finetune_lr: float = 3e-3
    finetune_warmup: int = 5
    # a short run on a tiny model: a constant LR without clipping learns the task fastest here
    finetune_schedule: str = "constant"
    max_grad_norm: float = 0.0
    lora_r: int = 8
    n_heldout: int = 60
    hidden: int = 128
    layers: int = 4
    vocab: int = 700  # the BPE trainer stops below this when it runs out of merges


FULL = Settings()
QUICK = replace(
    FULL, pretrain_docs=2000, pretrain_steps=80, finetune_steps=100, n_heldout=30, layers=2
)


def _rows(examples, per_step: int, capacity: int) -> int:
    """Packed rows of ``capacity`` tokens that hold about ``per_step`` examples."""
    mean = sum(e.num_inputs for e in examples) / len(examples)
    return max(1, round(per_step * mean / capacity))


def _say(msg: str) -> None:
    print(msg, flush=True)


def accuracy(model, tokenizer, items: list[tuple[str, str]]) -> tuple[int, list[str]]:
    """Exact matches of greedy answers to ``items`` ((question, answer) pairs), and the answers."""
    from qkern_train.generate import GenerationConfig, generate

    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q, _ in items
    ]
    model.eval()
    answers = generate(
        model, tokenizer, prompts, GenerationConfig(max_new_tokens=6), add_special_tokens=False
    )
    answers = [a.strip() for a in answers]
    return sum(a == want for a, (_, want) in zip(answers, items)), answers


def run_demo(
    out: str | Path,
    quick: bool = False,
    seed: int = 0,
    device: str = "auto",
    settings: Settings | None = None,
) -> dict:
    """Run the whole demo into directory ``out``; returns a summary (numbers the tests check)."""
    from qkern_train import data as D
    from qkern_train.checkpoint import load_model, save_model
    from qkern_train.config import OutputSection, TrainSection
    from qkern_train.lora import (
        LoraConfig,
        apply_lora,
        copy_tokenizer_files,
        load_adapter,
        merge_and_save,
        save_adapter,
        summary,
    )
    from qkern_train.model import ModelConfig, build_model, count_parameters
    from qkern_train.plotting import plot_metrics
    from qkern_train.trainer import Trainer, resolve_device, resolve_precision

    s = settings or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    ft_dtype = resolve_precision("auto", dev)
    packing = dev.type == "cuda"  # varlen kernels on the GPU; padded batches for the CPU refs
    t_start = time.perf_counter()
    quiet = OutputSection(progress_bar=False, plot=False)
    result: dict = {"device": str(dev)}
    mode = "quick" if quick else "full"
    _say(
        f"qkern demo ({mode}): tiny Llama from scratch + QLoRA on generated data; device {dev}"
        + (f", {torch.get_num_threads()} CPU thread(s)" if dev.type == "cpu" else "")
    )

    # 1. corpus and tokenizer ----------------------------------------------------------------
    docs = pretraining_corpus(s.pretrain_docs, seed)
    base_dir = out / "base"
    tok = build_tokenizer(docs, base_dir, vocab_size=s.vocab)
    split = [n for n in range(MAX_NUMBER + 3) if len(tok.encode(f" {n}", False)) != 1]
    if split:
        raise RuntimeError(f"tokenizer did not learn single tokens for numbers {split[:5]}")
    _say(
        f"[1/5] corpus: {len(docs)} documents of counting runs, alphabet runs and word salad "
        f"(e.g. {docs[0][:48]!r}...); byte-level BPE tokenizer with {tok.vocab_size} tokens"
    )

    # 2. pre-training ------------------------------------------------------------------------
    mcfg = ModelConfig(
        architecture="llama", vocab_size=tok.vocab_size, hidden_size=s.hidden,
        intermediate_size=3 * s.hidden, num_hidden_layers=s.layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id, torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(mcfg, dtype=torch.float32, device=dev)
    records = [D.Record({"text": d}, f"corpus:{i + 1}") for i, d in enumerate(docs)]
    examples, _ = D.tokenize_records(records, tok, fmt="text", max_seq_length=128)
    mbs = _rows(examples, s.pretrain_batch, 128) if packing else s.pretrain_batch
    planner = D.BatchPlanner(examples, mbs, 128, packing, seed=seed, pad_id=tok.pad_token_id)
    pre_cfg = TrainSection(
        seed=seed, max_steps=s.pretrain_steps, micro_batch_size=mbs,
        gradient_accumulation_steps=1, lr=s.pretrain_lr, warmup_steps=s.pretrain_warmup,
        lr_scheduler="constant", max_grad_norm=s.max_grad_norm,
        weight_decay=0.01, gradient_checkpointing="off", logging_steps=1,
    )  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    pre = Trainer(model, planner, pre_cfg, out / "pretrain", output=quiet)
    res = pre.fit()
    losses = [r["loss"] for r in pre.history if "loss" in r]
    save_model(model, base_dir, dtype=torch.bfloat16)
    result["pretrain_loss"] = (losses[0], losses[-1])
    n_params = count_parameters(model)
    _say(
        f"[2/5] pre-trained a {s.layers}-layer Llama ({n_params / 1e6:.2f}M parameters) for "
        f"{res['steps']} steps: loss {losses[0]:.2f} -> {losses[-1]:.2f} "
        f"({time.perf_counter() - t0:.0f} s); saved as an HF model directory: {base_dir}"
    )
    plot_metrics(out / "pretrain" / "metrics.jsonl", out / "pretrain" / "loss_curve.png")
    del model, pre

    # 3. QLoRA fine-tuning -------------------------------------------------------------------
    train_nums, held_nums = split_numbers(seed, s.n_heldout)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    rows = finetune_rows(train_nums)
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = heldout_questions(held_nums)
    held_rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in held
    ]
    (data_dir / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_rows))
    train_ex, stats = D.load_examples(data_dir / "train.jsonl", tok, max_seq_length=64)
    held_ex, _ = D.load_examples(data_dir / "heldout.jsonl", tok, max_seq_length=64)

    model = load_model(base_dir, load_in_4bit=True, dtype=ft_dtype, device=dev)
    lcfg = LoraConfig(r=s.lora_r, alpha=2 * s.lora_r)
    apply_lora(model, lcfg, seed=seed)
    before, _ = accuracy(model, tok, held)
    result["before"] = before / len(held)
    compute = str(ft_dtype).replace("torch.", "")
    _say(
        f"[3/5] QLoRA: NF4 base ({compute} compute), LoRA r={s.lora_r} on all projections: "
        f"{summary(model)}"
    )
    _say(
        f"      task: {len(rows)} training questions about {len(train_nums)} numbers, e.g. "
        f"{rows[1]['messages'][0]['content']!r} -> {rows[1]['messages'][1]['content']!r}; "
        f"{len(held)} held-out questions about numbers never asked in training"
    )
    _say(f"      data: {stats.report.format()}")
    _say(
        f"      held-out exact match BEFORE fine-tuning: {before}/{len(held)} "
        f"({100 * before / len(held):.1f}%)"
    )
    mbs = _rows(train_ex, s.finetune_batch, 64) if packing else s.finetune_batch
    pad = tok.pad_token_id
    ft_planner = D.BatchPlanner(train_ex, mbs, 64, packing, seed=seed, pad_id=pad)
    held_planner = D.BatchPlanner(held_ex, mbs, 64, packing, shuffle=False, pad_id=pad)
    ft_cfg = TrainSection(
        seed=seed, max_steps=s.finetune_steps, micro_batch_size=mbs,
        gradient_accumulation_steps=1, lr=s.finetune_lr, warmup_steps=s.finetune_warmup,
        max_grad_norm=s.max_grad_norm, lr_scheduler=s.finetune_schedule,
        eval_steps=max(1, s.finetune_steps // 4), gradient_checkpointing="on",
    )  # fmt: skip
    t0 = time.perf_counter()
    ft = Trainer(
        model,
        ft_planner,
        ft_cfg,
        out / "finetune",
        eval_data=held_planner,
        output=quiet,
        lora_config=lcfg,
        base_model_path=str(base_dir),
    )
    res = ft.fit()
    losses = [r["loss"] for r in ft.history if "loss" in r]
    evals = [r["eval_loss"] for r in ft.history if "eval_loss" in r]
    result["finetune_loss"] = (losses[0], losses[-1])
    _say(
        f"      fine-tuned {res['steps']} steps ({time.perf_counter() - t0:.0f} s): train loss "
        f"{losses[0]:.2f} -> {losses[-1]:.3f}; held-out loss "
        + " -> ".join(f"{v:.3f}" for v in evals)
    )
    after, answers = accuracy(model, tok, held)
    result["after"] = after / len(held)
    _say(
        f"      held-out exact match AFTER fine-tuning:  {after}/{len(held)} "
        f"({100 * after / len(held):.1f}%)"
    )
    plot_metrics(out / "finetune" / "metrics.jsonl", out / "finetune" / "loss_curve.png")

    # 4. samples -----------------------------------------------------------------------------
    _say("[4/5] held-out samples (greedy):")
    for (q, want), got in list(zip(held, answers))[:6]:
        _say(f"      {q!r:48} -> {got!r:14} {'ok' if got == want else 'want ' + repr(want)}")

    # 5. adapter and merged model ------------------------------------------------------------
    adapter_dir = save_adapter(model, out / "adapter", lcfg, base_path=str(base_dir))
    del model, ft
    base = load_model(base_dir, load_in_4bit=False, dtype=torch.float32, device=dev)
    load_adapter(base, adapter_dir)
    merged_dir = merge_and_save(base, out / "merged", dtype=torch.bfloat16)
    copy_tokenizer_files(base_dir, merged_dir)
    merged = load_model(merged_dir, dtype=ft_dtype, device=dev)
    merged_ok, _ = accuracy(merged, tok, held)
    result["merged"] = merged_ok / len(held)
    _say(
        f"[5/5] adapter (HF PEFT format): {adapter_dir}; merged 16-bit model: {merged_dir} "
        f"(held-out exact match after reloading it: {merged_ok}/{len(held)})"
    )
    _say(
        f"      loss curves: {out / 'pretrain' / 'loss_curve.png'}, "
        f"{out / 'finetune' / 'loss_curve.png'}"
    )
    result["seconds"] = time.perf_counter() - t_start
    _say(
        f"held-out accuracy {100 * result['before']:.1f}% -> {100 * result['after']:.1f}% "
        f"after QLoRA fine-tuning; total time {result['seconds']:.0f} s"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qkern_train.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="short run (CI)")
    p.add_argument("--out", default="demo_out", help="output directory (default ./demo_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, see docs)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
