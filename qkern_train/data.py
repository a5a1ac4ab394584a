"""Training data: read local files, render prompts, tokenize, mask, pack and batch.

Formats (``format = "auto"`` picks one from the first record's keys):

* ``alpaca`` — ``{"instruction": ..., "input": ... (optional), "output": ...}``
* ``sharegpt`` — ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``
* ``messages`` — OpenAI style ``{"messages": [{"role": "user"|"assistant"|"system",
  "content": ...}, ...]}`` (``content`` may be a list of ``{"type": "text", "text": ...}`` parts)
* ``text`` — ``{"text": ...}`` records, or a ``.txt`` file (one document per file), for
  continued pre-training: every token is a target, long documents are split into
  ``max_seq_length`` windows instead of being truncated.

Files are ``.jsonl`` (one record per line), ``.json`` (a top-level array of records) or ``.txt``;
a directory means every such file in it, in sorted order. Errors name the file and line.

Token sequences and labels
    An example is a token sequence ``t[0..n)`` plus a per-token target flag. The model sees
    ``input = t[:-1]`` and ``labels[j] = t[j+1]`` when token j+1 is a target, else -100: labels are
    ALIGNED with input positions, so ``Transformer.loss`` needs no shift. With
    ``train_on_responses_only`` only response tokens (and the EOS after them) are targets.

Rendering
    ``alpaca`` template: the classic instruction/input/response prompt, then the response and EOS.
    ``chat`` template: the tokenizer's Jinja chat template. Each assistant turn's text is found as
    the difference between the conversation rendered up to that turn with the generation prompt
    and rendered including it, and the pieces (prompt, response, prompt, ...) are tokenized
    separately and concatenated. The prompt piece therefore tokenizes exactly as it does at
    inference (``apply_chat_template(..., add_generation_prompt=True)``), and the masking needs no
    character offsets. EOS is appended when a response does not already end in one of the
    tokenizer's end-of-sequence ids; BOS is prepended (alpaca/text) when the tokenizer adds one.

Packing and batches
    ``packing = true``: examples (in a seeded shuffled order) are packed first-fit into rows of
    ``max_seq_length`` input tokens; a micro-batch of ``micro_batch_size`` rows is concatenated
    into one padding-free ``(1, T)`` row with int32 ``cu_seqlens`` (one segment per example) and
    position ids restarting at 0, so attention never crosses an example boundary (varlen flash
    attention). ``packing = false``: ``micro_batch_size`` examples padded on the right to the
    longest one (padding positions have label -100; causal attention keeps them from affecting
    real tokens).
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

FORMATS = ("alpaca", "sharegpt", "messages", "text")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """A problem with the training data; the message names the file and line."""


@dataclass
class Record:
    """One raw record and where it came from."""

    value: Any  # a JSON object (dict) or, for .txt files, the document text
    source: str  # "path:line"


@dataclass
class Example:
    """A tokenized example: the full token sequence and which tokens are training targets."""

    tokens: list[int]
    targets: list[bool]
    source: str
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_inputs(self) -> int:
        """Model input positions: n - 1 (the last token is only ever a label)."""
        return len(self.tokens) - 1

    @property
    def num_targets(self) -> int:
        return sum(self.targets[1:])

    def input_and_labels(self) -> tuple[list[int], list[int]]:
        """``input = t[:-1]``, ``labels[j] = t[j+1]`` if target else -100 (aligned, no shift)."""
        inp = self.tokens[:-1]
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(self.tokens[1:], self.targets[1:])]
        return inp, labels


# ---------------------------------------------------------------------------------------------
# Reading files


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_json_array(path: Path, text: str) -> list[Record]:
    """Records of a top-level JSON array, each with the line its object starts on."""
    dec = json.JSONDecoder()
    i = 0
    n = len(text)

    def skip_ws(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    def fail(j: int, msg: str) -> DataError:
        return DataError(f"{path}:{_line_of(text, j)}: {msg}")

    i = skip_ws(i)
    if i >= n or text[i] != "[":
        raise fail(i, "expected a JSON array of records at the top level (or use .jsonl)")
    i = skip_ws(i + 1)
    records: list[Record] = []
    if i < n and text[i] == "]":
        return records
    while True:
        try:
            value, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})"
            ) from None
        records.append(Record(value, f"{path}:{_line_of(text, i)}"))
        i = skip_ws(end)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < n and text[i] == "]":
            if skip_ws(i + 1) != n:
                raise fail(i + 1, "unexpected content after the top-level array")
            return records
        raise fail(i, "expected ',' or ']' between records")


def read_records(path: str | Path, errors: list[str] | None = None) -> list[Record]:
    """All records of a .jsonl / .json / .txt file, or of every such file in a directory.

    Malformed JSON lines raise :class:`DataError` naming file and line, unless ``errors`` is a
    list, in which case the messages are appended to it and the bad lines skipped.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".txt"))
        if not files:
            raise DataError(f"{path}: directory has no .jsonl, .json or .txt files")
        out: list[Record] = []
        for f in files:
            out.extend(read_records(f, errors))
        return out
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [Record(text, f"{path}:1")] if text.strip() else []
    if path.suffix == ".json":
        return _read_json_array(path, text)
    if path.suffix != ".jsonl":
        raise DataError(
            f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json or .txt"
        )
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(json.loads(line), f"{path}:{lineno}"))
        except json.JSONDecodeError as e:
            msg = f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})"
            if errors is None:
                raise DataError(msg) from None
            errors.append(msg)
    return records


def detect_format(records: list[Record]) -> str:
    """The format of the first record: alpaca, sharegpt, messages or text."""
    if not records:
        raise DataError("cannot detect the format of an empty dataset")
    first = records[0]
    if isinstance(first.value, str):
        return "text"
    if not isinstance(first.value, dict):
        raise DataError(f"{first.source}: a record must be a JSON object, got {first.value!r:.60}")
    keys = first.value.keys()
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{first.source}: cannot tell the format from keys {sorted(keys)}; expected "
        "instruction/output (alpaca), conversations (sharegpt), messages, or text; "
        "or set data.format"
    )


# ---------------------------------------------------------------------------------------------
# Records -> conversations


def _field(rec: Record, key: str, kind: type = str, required: bool = True) -> Any:
    if not isinstance(rec.value, dict):
        raise DataError(f"{rec.source}: a record must be a JSON object, got {rec.value!r:.60}")
    if key not in rec.value or rec.value[key] is None:
        if required:
            raise DataError(f"{rec.source}: missing field {key!r} (record has {sorted(rec.value)})")
        return None
    value = rec.value[key]
    if not isinstance(value, kind):
        raise DataError(
            f"{rec.source}: field {key!r} must be a {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise DataError(f"{where}: only text content parts are supported, got {p!r:.60}")
        return "".join(parts)
    raise DataError(f"{where}: message content must be a string, got {type(content).__name__}")


def to_messages(rec: Record, fmt: str) -> list[dict[str, str]] | str:
    """A record as chat messages ([{"role", "content"}]), or as text for the text format."""
    if fmt == "text":
        if isinstance(rec.value, str):
            return rec.value
        return _field(rec, "text")
    if fmt == "alpaca":
        instruction = _field(rec, "instruction")
        inp = _field(rec, "input", required=False) or ""
        output = _field(rec, "output")
        return [
            {"role": "user", "content": instruction, "input": inp},
            {"role": "assistant", "content": output},
        ]
    if fmt == "sharegpt":
        turns = _field(rec, "conversations", list)
        out = []
        for i, t in enumerate(turns):
            where = f"{rec.source}: conversations[{i}]"
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise DataError(f"{where}: each turn needs 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                raise DataError(
                    f"{where}: unknown speaker {t['from']!r}; expected one of "
                    f"{sorted(_SHAREGPT_ROLES)}"
                )
            out.append({"role": role, "content": _content_text(t["value"], where)})
        return _check_turns(out, rec)
    if fmt == "messages":
        msgs = _field(rec, "messages", list)
        out = []
        for i, m in enumerate(msgs):
            where = f"{rec.source}: messages[{i}]"
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: each message needs 'role' and 'content'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(
                    f"{where}: role {m['role']!r} is not supported (system, user, assistant)"
                )
            out.append({"role": m["role"], "content": _content_text(m["content"], where)})
        return _check_turns(out, rec)
    raise DataError(f"unknown data format {fmt!r}; expected one of {FORMATS}")


def _check_turns(msgs: list[dict[str, str]], rec: Record) -> list[dict[str, str]]:
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{rec.source}: conversation has no assistant turn to train on")
    return msgs


# ---------------------------------------------------------------------------------------------
# Tokenization


def _leading_bos(tokenizer) -> list[int]:
    """[bos] when the tokenizer adds BOS to encoded text, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if tokenizer.encode("", add_special_tokens=True)[:1] == [bos] else []


def _eos_ids(tokenizer) -> list[int]:
    ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in ids:
        ids.insert(0, eos)
    return ids


def _alpaca_pieces(msgs: list[dict[str, str]], rec: Record) -> list[tuple[str, bool]]:
    if [m["role"] for m in msgs if m["role"] != "system"] != ["user", "assistant"]:
        raise DataError(
            f"{rec.source}: the alpaca template takes one user turn and one assistant turn; "
            "use template = 'chat' for multi-turn conversations"
        )
    user = next(m for m in msgs if m["role"] == "user")
    answer = next(m for m in msgs if m["role"] == "assistant")["content"]
    inp = user.get("input", "")
    prompt = (
        ALPACA_PROMPT_WITH_INPUT.format(instruction=user["content"], input=inp)
        if inp
        else ALPACA_PROMPT.format(instruction=user["content"])
    )
    return [(prompt, False), (answer, True)]


def _chat_pieces(tokenizer, msgs: list[dict[str, str]], rec: Record) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_response) pieces (see module docstring)."""
    clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
    full = tokenizer.apply_chat_template(clean, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(clean):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(clean[:i], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(clean[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
            raise DataError(
                f"{rec.source}: the chat template does not render conversations as growing "
                "prefixes, so response tokens cannot be located; set "
                "data.train_on_responses_only = false"
            )
        pieces.append((full[pos : len(before)], False))
        pieces.append((full[len(before) : len(upto)], True))
        pos = len(upto)
    pieces.append((full[pos:], False))
    return [(t, r) for t, r in pieces if t]


def tokenize_record(
    rec: Record,
    fmt: str,
    tokenizer,
    template: str = "auto",
    train_on_responses_only: bool = True,
    system_prompt: str = "",
) -> Example:
    """One record -> an :class:`Example` (no truncation here)."""
    conv = to_messages(rec, fmt)
    eos_ids = _eos_ids(tokenizer)
    if isinstance(conv, str):  # raw text: every token is a target
        tokens = _leading_bos(tokenizer) + tokenizer.encode(conv, add_special_tokens=False)
        if eos_ids:
            tokens.append(eos_ids[0])
        return Example(tokens, [True] * len(tokens), rec.source)
    if system_prompt and not any(m["role"] == "system" for m in conv):
        conv = [{"role": "system", "content": system_prompt}, *conv]
    if template == "auto":
        has_chat = getattr(tokenizer, "chat_template", None) is not None
        template = "alpaca" if fmt == "alpaca" or not has_chat else "chat"
    if template == "alpaca":
        pieces = _alpaca_pieces(conv, rec)
        tokens = list(_leading_bos(tokenizer))
    elif template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(
                f"{rec.source}: template 'chat' needs a tokenizer with a chat template; "
                "this one has none (use data.template = 'alpaca')"
            )
        pieces = _chat_pieces(tokenizer, conv, rec)
        tokens = []  # chat templates write BOS themselves
    else:
        raise DataError(f"unknown template {template!r}; expected auto, alpaca or chat")
    targets = [False] * len(tokens)
    for text, is_response in pieces:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if is_response and eos_ids and not any(t in eos_ids for t in ids):
            ids.append(eos_ids[0])
        tokens.extend(ids)
        targets.extend([is_response or not train_on_responses_only] * len(ids))
    if train_on_responses_only and not any(targets[1:]):
        raise DataError(f"{rec.source}: the response is empty after tokenization")
    return Example(tokens, targets, rec.source)


# ---------------------------------------------------------------------------------------------
# Dataset


@dataclass
class LengthReport:
    """Token counts per example, before truncation."""

    count: int
    mean: float
    median: float
    p95: int
    p99: int
    max: int
    recommended_max_seq_length: int
    over_limit: int  # examples longer than the configured max_seq_length
    max_seq_length: int

    def format(self) -> str:
        return (
            f"{self.count} examples, tokens per example: mean {self.mean:.1f}, median "
            f"{self.median:.0f}, p95 {self.p95}, p99 {self.p99}, max {self.max}; "
            f"{self.over_limit} over max_seq_length={self.max_seq_length}; "
            f"recommended max_seq_length: {self.recommended_max_seq_length}"
        )


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (an actual example length)."""
    k = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def length_report(lengths: list[int], max_seq_length: int) -> LengthReport:
    """Statistics of ``lengths`` and a recommended max_seq_length: p99 rounded up to a multiple
    of 64 (a tile multiple for the kernels), or the max when that costs at most 25% more."""
    if not lengths:
        raise DataError("no examples to report on")
    s = sorted(lengths)
    p99 = _percentile(s, 99)
    target = s[-1] if s[-1] <= 1.25 * p99 else p99
    return LengthReport(
        count=len(s),
        mean=statistics.fmean(s),
        median=statistics.median(s),
        p95=_percentile(s, 95),
        p99=p99,
        max=s[-1],
        recommended_max_seq_length=64 * math.ceil(target / 64),
        over_limit=sum(1 for n in s if n > max_seq_length),
        max_seq_length=max_seq_length,
    )


@dataclass
class DataStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # over-long (policy drop) or no target left after truncation
    chunked: int = 0  # text documents split into several windows
    tokens: int = 0
    targets: int = 0
    report: LengthReport | None = None
    errors: list[str] = field(default_factory=list)


def _fit(ex: Example, max_len: int, fmt: str, overlong: str, stats: DataStats) -> list[Example]:
    """Apply the length limit: text is split into windows, examples truncated/dropped/refused."""
    if len(ex) <= max_len:
        return [ex]
    if fmt == "text":
        stats.chunked += 1
        # windows overlap by one token so every token after the first is predicted exactly once
        out = []
        start = 0
        while start < len(ex) - 1:
            end = min(start + max_len, len(ex))
            out.append(Example(ex.tokens[start:end], ex.targets[start:end], ex.source))
            start = end - 1
        return out
    if overlong == "error":
        raise DataError(
            f"{ex.source}: example has {len(ex)} tokens, more than max_seq_length={max_len} "
            "(raise data.max_seq_length, or set data.overlong = 'truncate' or 'drop')"
        )
    if overlong == "drop":
        stats.dropped += 1
        return []
    cut = Example(ex.tokens[:max_len], ex.targets[:max_len], ex.source, truncated=True)
    if not any(cut.targets[1:]):
        stats.dropped += 1
        return []
    stats.truncated += 1
    return [cut]


def tokenize_records(
    records: list[Record],
    tokenizer,
    fmt: str = "auto",
    template: str = "auto",
    train_on_responses_only: bool = True,
    max_seq_length: int = 2048,
    overlong: str = "truncate",
    system_prompt: str = "",
    collect_errors: bool = False,
) -> tuple[list[Example], DataStats]:
    """Tokenize, mask and length-limit records. With ``collect_errors`` bad records are skipped
    and their messages kept in ``stats.errors``; otherwise the first one raises."""
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be >= 2, got {max_seq_length}")
    if overlong not in ("truncate", "drop", "error"):
        raise DataError(f"overlong must be truncate, drop or error, got {overlong!r}")
    stats = DataStats(records=len(records))
    if not records:
        raise DataError("the dataset is empty (no records)")
    if fmt == "auto":
        fmt = detect_format(records)
    elif fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected auto or one of {FORMATS}")
    examples: list[Example] = []
    lengths: list[int] = []
    for rec in records:
        try:
            ex = tokenize_record(
                rec, fmt, tokenizer, template, train_on_responses_only, system_prompt
            )
            if len(ex) < 2:
                raise DataError(f"{rec.source}: example has fewer than 2 tokens")
            lengths.append(len(ex))
            examples.extend(_fit(ex, max_seq_length, fmt, overlong, stats))
        except DataError as e:
            if not collect_errors:
                raise
            stats.errors.append(str(e))
    if lengths:
        stats.report = length_report(lengths, max_seq_length)
    stats.examples = len(examples)
    stats.tokens = sum(len(e) for e in examples)
    stats.targets = sum(e.num_targets for e in examples)
    if not examples and not collect_errors:
        raise DataError("no usable examples after tokenization (all dropped or empty)")
    return examples, stats


def load_examples(
    path: str | Path,
    tokenizer,
    fmt: str = "auto",
    template: str = "auto",
    train_on_responses_only: bool = True,
    max_seq_length: int = 2048,
    overlong: str = "truncate",
    system_prompt: str = "",
    collect_errors: bool = False,
) -> tuple[list[Example], DataStats]:
    """Read and tokenize a data file (see :func:`tokenize_records`)."""
    errors: list[str] | None = [] if collect_errors else None
    records = read_records(path, errors)
    if not records and not errors:
        raise DataError(f"{path}: the dataset is empty (no records)")
    if not records:
        stats = DataStats(errors=list(errors or []))
        return [], stats
    examples, stats = tokenize_records(
        records,
        tokenizer,
        fmt,
        template,
        train_on_responses_only,
        max_seq_length,
        overlong,
        system_prompt,
        collect_errors,
    )
    stats.errors = list(errors or []) + stats.errors
    return examples, stats


def split_eval(
    examples: list[Example], eval_split: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random subset: a fraction (< 1) or a count (>= 1) of the examples."""
    if eval_split <= 0:
        return examples, []
    n_eval = int(eval_split) if eval_split >= 1 else max(1, round(eval_split * len(examples)))
    if n_eval >= len(examples):
        raise DataError(
            f"eval_split={eval_split} leaves no training examples (dataset has {len(examples)})"
        )
    order = list(range(len(examples)))
    random.Random(f"eval-split-{seed}").shuffle(order)
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals


# ---------------------------------------------------------------------------------------------
# Packing and batches


def pack(lengths: list[int], capacity: int, lookback: int = 64) -> list[list[int]]:
    """Group item indices into rows whose lengths sum to at most ``capacity``.

    First fit in the given order over the last ``lookback`` open rows (bounded work per item;
    deterministic). Every length must be <= capacity.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > row capacity {capacity}")
        for r in range(max(0, len(rows) - lookback), len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


@dataclass
class Batch:
    """One micro-batch, ready for ``model.loss(**batch.model_inputs())``."""

    input_ids: torch.Tensor  # (B, S) long
    labels: torch.Tensor  # (B, S) long, aligned with input_ids, -100 = ignored
    position_ids: torch.Tensor  # (B, S) long
    cu_seqlens: torch.Tensor | None = None  # int32 (docs + 1) for packed rows
    max_seqlen: int | None = None
    num_targets: int = 0
    num_tokens: int = 0  # real (non-padding) input tokens

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(
            move(self.input_ids),
            move(self.labels),
            move(self.position_ids),
            move(self.cu_seqlens),
            self.max_seqlen,
            self.num_targets,
            self.num_tokens,
        )

    def model_inputs(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "max_seqlen": self.max_seqlen,
        }


def collate_packed(examples: list[Example]) -> Batch:
    """Concatenate examples into one padding-free (1, T) row with cu_seqlens and positions."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    cu = [0]
    for ex in examples:
        inp, lab = ex.input_and_labels()
        ids.extend(inp)
        labels.extend(lab)
        pos.extend(range(len(inp)))
        cu.append(cu[-1] + len(inp))
    lab_t = torch.tensor([labels], dtype=torch.long)
    return Batch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        labels=lab_t,
        position_ids=torch.tensor([pos], dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(ex.num_inputs for ex in examples),
        num_targets=int((lab_t != IGNORE_INDEX).sum()),
        num_tokens=len(ids),
    )


def collate_padded(examples: list[Example], pad_id: int = 0) -> Batch:
    """Right-pad examples to the longest one: (B, S) with label -100 on padding."""
    width = max(ex.num_inputs for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        inp, lab = ex.input_and_labels()
        ids[i, : len(inp)] = torch.tensor(inp)
        labels[i, : len(lab)] = torch.tensor(lab)
    return Batch(
        input_ids=ids,
        labels=labels,
        position_ids=torch.arange(width).expand(len(examples), width).clone(),
        num_targets=int((labels != IGNORE_INDEX).sum()),
        num_tokens=sum(ex.num_inputs for ex in examples),
    )


class BatchPlanner:
    """Deterministic micro-batches of a dataset, epoch by epoch.

    Epoch e shuffles the examples with a generator seeded by (seed, e), then packs them into
    rows (packing) or takes them in order; every ``micro_batch_size`` rows/examples make one
    micro-batch. ``micro_batches(e)`` is a pure function of (seed, e), so a resumed run rebuilds
    exactly the same batches and skips the ones already consumed.
    """

    def __init__(
        self,
        examples: list[Example],
        micro_batch_size: int,
        max_seq_length: int,
        packing: bool = True,
        seed: int = 0,
        pad_id: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not examples:
            raise DataError("the dataset is empty")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        too_long = [e for e in examples if e.num_inputs > max_seq_length]
        if too_long:
            raise DataError(
                f"{too_long[0].source}: example of {len(too_long[0])} tokens does not fit "
                f"max_seq_length={max_seq_length}"
            )
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.max_seq_length = max_seq_length
        self.packing = packing
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self._cache: dict[int, list[list[int]]] = {}

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """Example indices of each micro-batch of ``epoch``."""
        if epoch in self._cache:
            return self._cache[epoch]
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"epoch-{self.seed}-{epoch}").shuffle(order)
        if self.packing:
            rows = pack([self.examples[i].num_inputs for i in order], self.max_seq_length)
            units = [[order[j] for j in row] for row in rows]
        else:
            units = [[i] for i in order]
        mb = self.micro_batch_size
        batches = [sum(units[i : i + mb], []) for i in range(0, len(units), mb)]
        self._cache = {epoch: batches}  # keep one epoch: plans are cheap to rebuild
        return batches

    def collate(self, indices: list[int]) -> Batch:
        exs = [self.examples[i] for i in indices]
        return collate_packed(exs) if self.packing else collate_padded(exs, self.pad_id)

    def total_micro_batches(self, epochs: float) -> int:
        """Micro-batches in ``epochs`` (possibly fractional) epochs."""
        full = int(epochs)
        total = sum(len(self.micro_batches(e)) for e in range(full))
        frac = epochs - full
        if frac > 0:
            total += max(1, round(frac * len(self.micro_batches(full))))
        return total

    def stream(self, epoch: int = 0, index: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """Endless (epoch, index, batch) from position (epoch, index) on."""
        while True:
            plan = self.micro_batches(epoch)
            for i in range(index, len(plan)):
                yield epoch, i, self.collate(plan[i])
            epoch, index = epoch + 1, 0
