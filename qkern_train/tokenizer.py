"""Tokenizers of HF model directories, without transformers.

* ``tokenizer.json`` is run by the ``tokenizers`` library (BPE, Unigram, WordPiece: whatever the
  file describes, with its normalizer, pre-tokenizer, post-processor and decoder); otherwise
  ``tokenizer.model`` by ``sentencepiece``.
* Special tokens come from ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``,
  ``unk_token``: strings or ``{"content": ...}`` dicts), then ``special_tokens_map.json``, then the
  sentencepiece model's own ids. End-of-sequence ids for generation are the tokenizer's EOS plus
  ``generation_config.json``'s ``eos_token_id`` (an int or a list, e.g. Llama 3's three ids).
* BOS/EOS on ``encode``: when ``tokenizer_config.json`` sets ``add_bos_token`` / ``add_eos_token``,
  those flags decide and the file's post-processor is bypassed (so BOS is never doubled);
  otherwise a ``tokenizer.json`` post-processor decides, and a sentencepiece model adds BOS only
  (the Llama tokenizer's defaults).
* Chat templates: ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named
  templates), or a ``chat_template.jinja`` file, rendered by jinja2's
  ``ImmutableSandboxedEnvironment`` (no attribute access to internals, no mutation of the
  arguments) with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, a ``tojson`` filter that
  does not HTML-escape, and the ``raise_exception`` / ``strftime_now`` helpers templates expect.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _token_str(value: Any) -> str | None:
    """A special-token entry as its string: "<s>" or {"content": "<s>", ...}."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed, immutable jinja2 environment."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(
            f"chat template has a syntax error at line {e.lineno}: {e.message}"
        ) from None


class Tokenizer:
    """Encode/decode with BOS/EOS handling, chat templates and streaming decode.

    Build with :func:`load_tokenizer`. ``backend`` is a ``tokenizers.Tokenizer`` or a
    ``sentencepiece.SentencePieceProcessor``.
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | dict[str, str] | None = None,
        extra_eos_token_ids: list[int] | None = None,
        added_tokens: dict[str, int] | None = None,
    ) -> None:
        self.backend = backend
        self.is_sentencepiece = not hasattr(backend, "encode_batch")
        self._added = dict(added_tokens or {})  # extra special strings (sentencepiece path)
        sp = self.is_sentencepiece
        if sp and bos_token is None and backend.bos_id() >= 0:
            bos_token = backend.id_to_piece(backend.bos_id())
        if sp and eos_token is None and backend.eos_id() >= 0:
            eos_token = backend.id_to_piece(backend.eos_id())
        if sp and unk_token is None and backend.unk_id() >= 0:
            unk_token = backend.id_to_piece(backend.unk_id())
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token_id = self.token_to_id(pad_token)
        self.unk_token_id = self.token_to_id(unk_token)
        # None: let the backend decide (tokenizer.json post-processor); sentencepiece: BOS only
        if sp:
            add_bos_token = True if add_bos_token is None else add_bos_token
            add_eos_token = False if add_eos_token is None else add_eos_token
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        if isinstance(chat_template, list):
            chat_template = {t["name"]: t["template"] for t in chat_template}
        self.chat_template = chat_template
        eos_ids = [self.eos_token_id] if self.eos_token_id is not None else []
        for i in extra_eos_token_ids or []:
            if i not in eos_ids:
                eos_ids.append(int(i))
        self.eos_token_ids: list[int] = eos_ids
        self._templates: dict[str, jinja2.Template] = {}
        if sp:
            specials = {
                t: self.token_to_id(t) for t in (bos_token, eos_token, pad_token, unk_token)
            }
            specials.update(self._added)
            self._special_ids = {i for i in specials.values() if i is not None}
            strings = sorted((t for t, i in specials.items() if t and i is not None), key=len)
            self._split_re = (
                re.compile("(" + "|".join(re.escape(t) for t in reversed(strings)) + ")")
                if strings
                else None
            )
            self._special_by_str = {t: i for t, i in specials.items() if t and i is not None}

    # -- vocabulary ------------------------------------------------------------------------------

    @cached_property
    def vocab_size(self) -> int:
        """Number of token ids (largest id + 1), added tokens included."""
        if self.is_sentencepiece:
            return max([self.backend.get_piece_size() - 1, *self._added.values()]) + 1
        return max(self.backend.get_vocab(with_added_tokens=True).values()) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self.is_sentencepiece:
            if token in self._added:
                return self._added[token]
            i = self.backend.piece_to_id(token)
            # piece_to_id maps unknown pieces to unk; only a real match counts
            return i if self.backend.id_to_piece(i) == token else None
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        if self.is_sentencepiece:
            for t, j in self._added.items():
                if j == i:
                    return t
            return self.backend.id_to_piece(i) if 0 <= i < self.backend.get_piece_size() else None
        return self.backend.id_to_token(i)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise when the tokenizer can produce ids the model's embedding does not have."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(
                f"tokenizer has {self.vocab_size} token ids but the model's embedding has only "
                f"{model_vocab_size} rows: the tokenizer does not belong to this model"
            )

    # -- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` BOS/EOS as configured."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        manual = self.add_bos_token is not None or self.add_eos_token is not None
        if self.is_sentencepiece:
            ids = self._sp_encode(text)
        else:
            ids = self.backend.encode(
                text, add_special_tokens=add_special_tokens and not manual
            ).ids
        if add_special_tokens and manual:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        bos = self.bos_token_id
        if add_special_tokens and bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
            # the text already began with the BOS string (a rendered chat template, a pasted
            # prompt): keep one BOS, as the model was trained with
            ids = ids[1:]
        return list(ids)

    def _sp_encode(self, text: str) -> list[int]:
        # special-token strings in the text (e.g. "<s>" written by a chat template) become their
        # ids; the pieces between them are encoded separately
        if self._split_re is None:
            return self.backend.encode(text)
        ids: list[int] = []
        for part in self._split_re.split(text):
            if not part:
                continue
            if part in self._special_by_str:
                ids.append(self._special_by_str[part])
            else:
                ids.extend(self.backend.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens dropped unless ``skip_special_tokens`` is False."""
        ids = [int(i) for i in ids]
        if not self.is_sentencepiece:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids or i >= self.backend.get_piece_size():
                if run:
                    out.append(self.backend.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self.id_to_token(i) or "")
            else:
                run.append(i)
        if run:
            out.append(self.backend.decode(run))
        return "".join(out)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------------

    def _template(self, name: str | None) -> jinja2.Template:
        source = self.chat_template
        if source is None:
            raise ValueError(
                "this tokenizer has no chat template (no chat_template in tokenizer_config.json "
                "and no chat_template.jinja)"
            )
        if isinstance(source, dict):
            key = name or "default"
            if key not in source:
                raise ValueError(f"no chat template named {key!r}; have {sorted(source)}")
            source = source[key]
        if source not in self._templates:
            self._templates[source] = compile_chat_template(source)
        return self._templates[source]

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        template_name: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the chat template.

        ``add_generation_prompt`` appends the assistant header so the model answers next.
        ``tokenize=True`` returns ids (encoded without adding BOS again: templates write it).
        Extra keyword arguments reach the template (e.g. ``tools``).
        """
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m for m in messages
        ):
            raise ValueError("messages must be a list of dicts with a 'role' key")
        text = self._template(template_name).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            unk_token=self.unk_token or "",
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


class StreamDecoder:
    """Turns a stream of token ids into text pieces, never emitting half a character.

    Decoding token by token is wrong for byte-level BPE (a character spans tokens) and for
    sentencepiece (a leading space depends on the previous piece), so each step decodes a short
    window: the text of ``ids[prefix:]`` minus that of ``ids[prefix:read]``. A result ending in
    U+FFFD (an incomplete UTF-8 sequence) waits for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one id; returns the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], self.skip)
        after = decode(self.ids[self._prefix :], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], self.skip)
        after = decode(self.ids[self._prefix :], self.skip)
        piece = after[len(before) :] if after.startswith(before) else ""
        self._prefix = self._read = len(self.ids)
        self.text += piece
        return piece


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of an HF model directory (``tokenizer.json`` or ``tokenizer.model``)."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    cfg = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    gen = _read_json(directory / "generation_config.json")

    def special(name: str) -> str | None:
        return _token_str(cfg.get(name)) or _token_str(special_map.get(name))

    template = cfg.get("chat_template")
    jinja_file = directory / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    if template is None:
        template = _read_json(directory / "chat_template.json").get("chat_template")
    gen_eos = gen.get("eos_token_id")
    extra_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else gen_eos

    tj, sp_file = directory / "tokenizer.json", directory / "tokenizer.model"
    if tj.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception for bad files
            raise ValueError(f"cannot read {tj}: {e}") from None
        added: dict[str, int] = {}
    elif sp_file.is_file():
        import sentencepiece as spm

        backend = spm.SentencePieceProcessor()
        try:
            backend.Load(str(sp_file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot read {sp_file}: {e}") from None
        added = {
            _token_str(v): int(k)
            for k, v in (cfg.get("added_tokens_decoder") or {}).items()
            if _token_str(v)
        }
    else:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {directory}")
    return Tokenizer(
        backend,
        bos_token=special("bos_token"),
        eos_token=special("eos_token"),
        pad_token=special("pad_token"),
        unk_token=special("unk_token"),
        add_bos_token=cfg.get("add_bos_token"),
        add_eos_token=cfg.get("add_eos_token"),
        chat_template=template,
        extra_eos_token_ids=extra_eos,
        added_tokens=added,
    )
