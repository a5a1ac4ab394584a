"""``qkern-train``: the command line.

    qkern-train sft --config configs/llama3.1-8b-qlora.toml [--section.key=value ...]
    qkern-train generate --model DIR [--adapter DIR] --prompt "..."
    qkern-train chat --model DIR [--adapter DIR]
    qkern-train merge --model DIR --adapter DIR --out DIR [--dtype bfloat16]
    qkern-train data-check --data FILE --tokenizer DIR [--format auto] [--max-seq-length N]

Errors in the input (config keys and values, missing directories, bad data records) are
reported as one ``error: ...`` line with exit status 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys


def _sft(args: argparse.Namespace, rest: list[str]) -> int:
    from qkern_train.config import load_config
    from qkern_train.trainer import run_sft

    cfg = load_config(args.config, rest)
    result = run_sft(cfg)
    final = result["final_loss"]
    print(
        f"done: {result['steps']} steps"
        + (f", final loss {final:.4f}" if final is not None else "")
        + (
            f", best eval loss {result['best_eval_loss']:.4f}"
            if result.get("best_eval_loss") is not None
            else ""
        )
        + f"; adapter in {result['adapter']}"
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    import torch

    from qkern_train.checkpoint import load_model, parse_dtype
    from qkern_train.lora import load_adapter, merge_and_save

    dtype = parse_dtype(args.dtype)
    # merge from the 16-bit base weights (never the NF4 approximation), in float32
    model = load_model(args.model, load_in_4bit=False, dtype=torch.float32, device=args.device)
    load_adapter(model, args.adapter)
    out = merge_and_save(model, args.out, dtype=dtype, tokenizer_dir=args.model)
    print(f"merged {args.adapter} into {args.model} -> {out} ({args.dtype})")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from qkern_train import data as D
    from qkern_train.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    examples, stats = D.load_examples(
        args.data,
        tok,
        fmt=args.format,
        template=args.template,
        train_on_responses_only=not args.train_on_prompts,
        max_seq_length=args.max_seq_length,
        overlong="truncate",
        system_prompt=args.system_prompt,
        collect_errors=True,
    )
    print(f"{args.data}: {stats.records} records, {len(examples)} usable examples")
    if stats.report is not None:
        print(stats.report.format())
        print(
            f"with max_seq_length={args.max_seq_length}: {stats.truncated} would be truncated, "
            f"{stats.dropped} dropped (no response left), {stats.chunked} text documents split"
        )
        print(f"tokens: {stats.tokens} total, {stats.targets} trained on")
    if stats.errors:
        print(f"{len(stats.errors)} bad record(s):")
        for e in stats.errors[: args.max_errors]:
            print(f"  {e}")
        if len(stats.errors) > args.max_errors:
            print(f"  ... and {len(stats.errors) - args.max_errors} more")
        return 1
    if not examples:
        print("no usable examples")
        return 1
    print("ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qkern_train.generate import add_generate_arguments

    p = argparse.ArgumentParser(
        prog="qkern-train",
        description="QLoRA fine-tuning of Llama-family models on qkern kernels.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "sft",
        help="fine-tune LoRA/QLoRA adapters from a TOML config",
        description="Any config key can be overridden as --section.key=value "
        "(e.g. --train.lr=1e-4 --data.path=train.jsonl).",
    )
    s.add_argument("--config", default=None, help="TOML config file (see configs/)")

    for name in ("generate", "chat"):
        g = sub.add_parser(name, help=f"{name} with a model (and an optional adapter)")
        add_generate_arguments(g)

    m = sub.add_parser("merge", help="merge an adapter into its base model (16-bit output)")
    m.add_argument("--model", required=True, help="base model directory (HF format)")
    m.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    m.add_argument("--out", required=True, help="output model directory")
    m.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16, float32")
    m.add_argument("--device", default="cpu", help="where to merge (default cpu)")

    d = sub.add_parser("data-check", help="validate a dataset and report sequence lengths")
    d.add_argument("--data", required=True, help=".jsonl / .json / .txt file or directory")
    d.add_argument("--tokenizer", required=True, help="tokenizer (model) directory")
    d.add_argument("--format", default="auto", help="auto, alpaca, sharegpt, messages, text")
    d.add_argument("--template", default="auto", help="auto, alpaca, chat")
    d.add_argument("--max-seq-length", type=int, default=2048)
    d.add_argument("--system-prompt", default="")
    d.add_argument(
        "--train-on-prompts",
        action="store_true",
        help="count prompt tokens as targets (default: responses only)",
    )
    d.add_argument("--max-errors", type=int, default=20, help="bad records to list")
    return p


def main(argv: list[str] | None = None) -> int:
    from qkern_train.config import ConfigError
    from qkern_train.data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "sft":
        args, rest = parser.parse_known_args(argv)
    else:
        args, rest = parser.parse_args(argv), []
    try:
        if args.command == "sft":
            return _sft(args, rest)
        if args.command == "generate":
            from qkern_train.generate import run_generate

            return run_generate(args)
        if args.command == "chat":
            from qkern_train.generate import run_chat

            return run_chat(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "data-check":
            return _data_check(args)
    except (ConfigError, DataError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad values found while loading (model, adapter, tokenizer)
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
