"""Text generation with a KV cache: prefill, then one token per step; greedy or sampled.

Batched prompts of different lengths are prefilled packed (no padding): the prompts are
concatenated into one (1, T) row with ``cu_seqlens`` and attention runs in varlen form, each row's
keys and values going to its own slot of the :class:`~qkern_train.model.KVCache`. Decoding then
feeds one token per row; while all rows have equal lengths the dense attention path runs, else
the varlen one (see ``KVCache``). Only the last position of each prompt goes through the LM head.

Sampling order per step (HF's): repetition penalty (on every token seen in the prompt or
generated: positive logits divided by the penalty, negative ones multiplied), then temperature,
top-k, top-p (the smallest set of most likely tokens whose probability reaches p; the most likely
token always stays), then a draw from the softmax with ``torch.multinomial`` on a seeded
generator. ``temperature == 0`` is greedy (argmax; top-k/top-p are then irrelevant).

A row stops at an end-of-sequence id (not included in the output), when a stop string appears in
its generated text (the text is cut before it), or after ``max_new_tokens``. In a batch, the room
left in the context is set by the longest prompt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from qkern_train.model import KVCache, Transformer, context_length


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings
    eos_token_ids: list[int] | None = None  # None: the tokenizer's and the model config's
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(
    logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits (B, V) after repetition penalty, temperature, top-k and top-p (masked
    entries are -inf). ``seen`` (B, V) bool marks the tokens the penalty applies to."""
    logits = logits.float()
    if seen is not None and config.repetition_penalty != 1.0:
        p = config.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if config.greedy:
        return logits
    logits = logits / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop = (probs.cumsum(-1) - probs) >= config.top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    config: GenerationConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    logits = process_logits(logits, config, seen)
    if config.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _model_dtype(model: Transformer) -> torch.dtype:
    return model.embed_tokens.weight.dtype


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompts: list[list[int]],
    config: GenerationConfig | None = None,
    on_token: Callable[[int, int], bool] | None = None,
) -> list[list[int]]:
    """Generated ids (EOS excluded) for each prompt (a list of token ids).

    ``on_token(row, token_id)`` is called for every new token of an unfinished row; returning
    True stops that row (used for stop strings and streaming).
    """
    config = config or GenerationConfig()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    cfg = model.config
    ctx = context_length(cfg)
    lens = [len(p) for p in prompts]
    if max(lens) >= ctx:
        raise ValueError(
            f"prompt of {max(lens)} tokens is too long: the model's context is {ctx} tokens "
            "(max_position_embeddings), which leaves no room to generate"
        )
    for p in prompts:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    eos = set(config.eos_token_ids if config.eos_token_ids is not None else cfg.eos_token_id)
    steps = min(config.max_new_tokens, ctx - max(lens))
    b = len(prompts)
    device = model.embed_tokens.weight.device
    cache = KVCache(cfg, b, max(lens) + steps, _model_dtype(model), device)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)

    # prefill: dense when the prompts have one length, packed varlen otherwise
    if len(set(lens)) == 1:
        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        last = model.hidden_states(ids, kv_cache=cache)[:, -1]
    else:
        flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        hidden = model.hidden_states(
            flat.unsqueeze(0), cu_seqlens=cu.to(device), max_seqlen=max(lens), kv_cache=cache
        )
        last = hidden[0, (cu[1:] - 1).long().to(device)]
    logits = model.lm_logits(last)

    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(b, cfg.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=device)] = True

    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(steps):
        nxt = sample_next(logits, config, seen, generator)
        tokens = nxt.tolist()
        for i, t in enumerate(tokens):
            if done[i]:
                continue
            if t in eos:
                done[i] = True
                continue
            out[i].append(t)
            if on_token is not None and on_token(i, t):
                done[i] = True
        if all(done) or step == steps - 1:
            break
        if seen is not None:
            seen.scatter_(1, nxt.unsqueeze(1), True)
        logits = model.lm_logits(model.hidden_states(nxt.unsqueeze(1), kv_cache=cache)[:, -1])
    return out


def generate(
    model: Transformer,
    tokenizer,
    prompts: str | list[str],
    config: GenerationConfig | None = None,
    stream: Callable[[int, str], None] | None = None,
    add_special_tokens: bool = True,
    **overrides,
) -> list[str]:
    """Completions (text after the prompt) of each prompt.

    ``stream(row, text)`` receives text as it is generated (never part of a stop string).
    Keyword arguments override fields of ``config`` (e.g. ``max_new_tokens=64``).
    """
    config = replace(config or GenerationConfig(), **overrides)
    if isinstance(prompts, str):
        prompts = [prompts]
    tokenizer.check_vocab(model.config.vocab_size)
    if config.eos_token_ids is None:
        eos = list(dict.fromkeys([*tokenizer.eos_token_ids, *model.config.eos_token_id]))
        config = replace(config, eos_token_ids=eos)
    ids = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    decoders = [tokenizer.stream_decoder() for _ in prompts]
    emitted = [0] * len(prompts)  # characters already streamed
    final: list[str | None] = [None] * len(prompts)
    hold = max((len(s) for s in config.stop), default=1) - 1  # may start a stop string

    def emit(i: int, upto: int) -> None:
        if stream is not None and upto > emitted[i]:
            stream(i, decoders[i].text[emitted[i] : upto])
        emitted[i] = max(emitted[i], upto)

    def on_token(i: int, t: int) -> bool:
        piece = decoders[i].push(t)
        if not piece:
            return False
        text = decoders[i].text
        if config.stop:
            start = max(0, len(text) - len(piece) - hold)
            cut = [p for s in config.stop if (p := text.find(s, start)) >= 0]
            if cut:
                final[i] = text[: min(cut)]
                emit(i, min(cut))
                return True
        emit(i, len(text) - hold)
        return False

    generate_ids(model, ids, config, on_token)
    results = []
    for i, dec in enumerate(decoders):
        if final[i] is None:
            dec.flush()
            final[i] = dec.text
            emit(i, len(dec.text))
        results.append(final[i])
    return results


# ------------------------------------------------------------------------------------------------
# command line: qkern-train generate | chat
# ------------------------------------------------------------------------------------------------


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``qkern-train generate`` and ``qkern-train chat``."""
    parser.add_argument("--model", required=True, help="HF-format model directory")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format)")
    parser.add_argument(
        "--prompt", action="append", default=None, help="prompt text (repeatable; chat: turns)"
    )
    parser.add_argument("--system", default=None, help="chat: system message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 = greedy (default: greedy unless "
        "the model's generation_config.json asks for sampling)",
    )
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--load-in-4bit", action="store_true", help="quantize projections to NF4")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """GenerationConfig from the options, defaults from the model's generation_config.json."""
    gen_file = Path(args.model) / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    sampled = bool(gen.get("do_sample", False))

    def from_file(key: str, default: float, sampling_only: bool = True) -> float:
        value = gen.get(key) if (sampled or not sampling_only) else None
        return default if value is None else value

    # HF's own defaults when generation_config.json samples without naming a value
    defaults = {
        "temperature": from_file("temperature", 1.0) if sampled else 0.0,
        "top_p": from_file("top_p", 1.0),
        "top_k": from_file("top_k", 50) if sampled else 0,
        "repetition_penalty": from_file("repetition_penalty", 1.0, sampling_only=False),
    }

    def pick(value, key: str):
        return defaults[key] if value is None else value

    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=float(pick(args.temperature, "temperature")),
        top_p=float(pick(args.top_p, "top_p")),
        top_k=int(pick(args.top_k, "top_k")),
        repetition_penalty=float(pick(args.repetition_penalty, "repetition_penalty")),
        stop=list(args.stop or []),
        seed=args.seed,
    )


def _load(args: argparse.Namespace):
    from qkern_train.checkpoint import load_model
    from qkern_train.tokenizer import load_tokenizer

    model = load_model(
        args.model, load_in_4bit=args.load_in_4bit, dtype=args.dtype, device=args.device
    )
    if args.adapter:
        if importlib.util.find_spec("qkern_train.lora") is None:
            raise ValueError("--adapter needs qkern_train.lora, which this install lacks")
        from qkern_train import lora

        lora.load_adapter(model, args.adapter)
    tokenizer = load_tokenizer(args.model)
    tokenizer.check_vocab(model.config.vocab_size)
    return model.eval(), tokenizer


def _print_piece(_row: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_generate(args: argparse.Namespace) -> int:
    """``qkern-train generate``: complete each --prompt (or stdin) and print the results."""
    try:
        config = config_from_args(args)
        model, tokenizer = _load(args)
        prompts = args.prompt or [sys.stdin.read()]
        if args.stream:
            for p in prompts:
                generate(model, tokenizer, [p], config, stream=_print_piece)
                sys.stdout.write("\n")
        else:
            for i, text in enumerate(generate(model, tokenizer, prompts, config)):
                if len(prompts) > 1:
                    print(f"--- [{i}]")
                print(text)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """``qkern-train chat``: a conversation through the tokenizer's chat template.

    Turns come from --prompt (non-interactive) or stdin lines; "/reset" clears the history and
    "/exit" ends. Each turn re-renders the whole conversation and prefills it again.
    """
    try:
        config = config_from_args(args)
        model, tokenizer = _load(args)
        tokenizer.apply_chat_template([{"role": "user", "content": ""}])  # fail early
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = args.prompt is None and sys.stdin.isatty()
    turns = iter(args.prompt) if args.prompt is not None else None
    while True:
        if turns is not None:
            user = next(turns, None)
        else:
            try:
                user = input("> ") if interactive else sys.stdin.readline()
            except EOFError:
                user = None
            if user == "" and not interactive:
                user = None
        if user is None or user.strip() in ("/exit", "/quit"):
            return 0
        user = user.rstrip("\n")
        if user.strip() == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        try:
            reply = generate(
                model,
                tokenizer,
                [prompt],
                config,
                add_special_tokens=False,
                stream=_print_piece if args.stream or interactive else None,
            )[0]
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not (args.stream or interactive):
            sys.stdout.write(reply)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})
