"""Typed training configuration: nested dataclasses, loaded from TOML, overridden from the CLI.

The dataclasses below are the one source of truth for every option (defaults, types, docs). A
config file is TOML with one table per section::

    [model]
    path = "models/Llama-3.1-8B"
    load_in_4bit = true

    [lora]
    r = 16

    [train]
    lr = 2e-4

and any field can be overridden on the command line as ``--section.key=value`` (or
``--section.key value``). Values are converted to the field's type: ``true/false/1/0/yes/no`` for
booleans, ``a,b,c`` (or a TOML/JSON list ``["a","b"]``) for lists, ``none`` for optional fields.
Unknown sections or keys are errors with a did-you-mean suggestion, raised before anything loads.

TOML is read with :mod:`tomllib` (Python 3.11+) or, on Python 3.10, the ``tomli`` package when it
is installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkern_train.lora import LoraConfig


class ConfigError(ValueError):
    """A configuration problem: unknown key, wrong type or an invalid value."""


@dataclass
class ModelSection:
    """Which base model to load and how."""

    path: str = ""  # HF-format model directory (config.json + *.safetensors)
    tokenizer: str = ""  # tokenizer directory; empty = the model directory
    load_in_4bit: bool = True  # NF4 base weights (QLoRA); false = 16-bit base (LoRA)
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, ...


@dataclass
class DataSection:
    """Training data: where, which format, how examples become token rows."""

    path: str = ""  # .json / .jsonl / .txt file (or a directory of them)
    format: str = "auto"  # auto, alpaca, sharegpt, messages, text
    template: str = "auto"  # auto (chat template if the tokenizer has one), alpaca, chat
    system_prompt: str = ""  # prepended as a system message for chat formats (if non-empty)
    train_on_responses_only: bool = True  # mask prompt tokens (instruction formats)
    max_seq_length: int = 2048  # tokens per example; also the packed row length
    overlong: str = "truncate"  # truncate (and count), drop, error
    packing: bool = True  # pack examples into rows (varlen attention, no cross-attention)
    eval_path: str = ""  # separate eval file; else eval_split of the training data
    eval_split: float = 0.0  # fraction (< 1) or number of examples (>= 1) held out for eval


@dataclass
class TrainSection:
    """The optimisation loop."""

    seed: int = 42
    max_steps: int = -1  # optimizer steps; -1 = run `epochs` epochs
    epochs: float = 1.0
    micro_batch_size: int = 1  # rows (packed) or examples (unpacked) per forward pass
    gradient_accumulation_steps: int = 8
    lr: float = 2e-4
    lr_scheduler: str = "cosine"  # cosine, linear, constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    min_lr_ratio: float = 0.0  # cosine/linear decay floor, as a fraction of lr
    weight_decay: float = 0.0  # never applied to norms and biases
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # adamw (torch, fused on CUDA), adamw8bit (qkern.optim8bit)
    # compute dtype of the model: auto (bf16 on a GPU that has it, else fp32), bf16, fp16 (with
    # loss scaling), fp32. Adapter weights and optimizer state stay fp32 in every case.
    precision: str = "auto"
    gradient_checkpointing: str = "on"  # on, off, offload (activations to CPU memory)
    # fused cross-entropy: MiB for the logits of one row chunk (0 = qkern's default, 256 MiB);
    # smaller saves peak memory for a little speed
    loss_chunk_mib: int = 0
    eval_steps: int = 0  # evaluate every N steps (0 = only at the end, if there is eval data)
    early_stopping_patience: int = 0  # stop after N evals without improvement (0 = off)
    early_stopping_threshold: float = 0.0  # minimum eval-loss decrease that counts
    logging_steps: int = 1  # metrics line every N steps
    save_steps: int = 0  # checkpoint every N steps (0 = only the final adapter)
    save_total_limit: int = 2  # keep the newest N checkpoints (0 = keep all)
    resume_from: str = ""  # "", "auto" (newest checkpoint in output.dir), or a checkpoint dir


@dataclass
class OutputSection:
    """Where results go and which loggers run."""

    dir: str = "runs/sft"
    progress_bar: bool = True
    tensorboard: bool = False  # only if tensorboard is installed
    wandb_project: str = ""  # only if wandb is installed
    plot: bool = True  # loss_curve.png at the end
    save_merged: bool = False  # also write a merged 16-bit model to <dir>/merged
    merged_dtype: str = "bfloat16"


@dataclass
class TrainConfig:
    """Everything `qkern-train sft` needs."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check values that have a fixed set of choices or a range (types are checked on load)."""
        choices = {
            ("data", "format"): ("auto", "alpaca", "sharegpt", "messages", "text"),
            ("data", "template"): ("auto", "alpaca", "chat"),
            ("data", "overlong"): ("truncate", "drop", "error"),
            ("train", "lr_scheduler"): ("cosine", "linear", "constant"),
            ("train", "optimizer"): ("adamw", "adamw8bit"),
            ("train", "precision"): ("auto", "bf16", "fp16", "fp32"),
            ("train", "gradient_checkpointing"): ("on", "off", "offload"),
            ("lora", "init_lora_weights"): ("kaiming", "gaussian"),
        }
        for (section, key), allowed in choices.items():
            value = getattr(getattr(self, section), key)
            if value not in allowed:
                raise ConfigError(f"{section}.{key} = {value!r} is not one of {list(allowed)}")
        positive = [
            ("data", "max_seq_length"),
            ("train", "micro_batch_size"),
            ("train", "gradient_accumulation_steps"),
            ("train", "logging_steps"),
        ]
        for section, key in positive:
            if getattr(getattr(self, section), key) < 1:
                raise ConfigError(f"{section}.{key} must be >= 1")
        if self.train.max_steps == 0 or (self.train.max_steps < 0 and self.train.epochs <= 0):
            raise ConfigError("train.max_steps must be > 0, or -1 with train.epochs > 0")
        if self.train.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        if not 0.0 <= self.train.warmup_ratio < 1.0:
            raise ConfigError("train.warmup_ratio must be in [0, 1)")
        if self.train.loss_chunk_mib < 0:
            raise ConfigError("train.loss_chunk_mib must be >= 0 (0 = the default)")
        if self.data.eval_split < 0:
            raise ConfigError("data.eval_split must be >= 0")
        try:
            self.lora.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Loading and overriding


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(
                "reading TOML configs on Python 3.10 needs the 'tomli' package "
                "(pip install tomli), or use Python 3.11+"
            ) from None
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None


# names other trainers use for our keys, so the did-you-mean finds them
_ALIASES = {
    "learning_rate": "lr",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "lora_r": "r",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "max_length": "max_seq_length",
    "seq_len": "max_seq_length",
    "output_dir": "dir",
    "scheduler": "lr_scheduler",
    "dataset": "path",
}


def _suggest(name: str, candidates: list[str]) -> str:
    if _ALIASES.get(name) in candidates:
        return f"; did you mean {_ALIASES[name]!r}?"
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(candidates)}"


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, from_string: bool) -> Any:
    """Convert ``value`` to type ``tp`` (from TOML values, or from a CLI string)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_string and value.lower() == "none")):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, from_string)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if from_string:
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: cannot parse list {value!r}: {e}") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
            from_string = False
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]", from_string) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if from_string:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: expected a JSON object, got {value!r}: {e}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table/dict, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if from_string:
            low = value.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected a boolean (true/false), got {value!r}")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if tp is int:
        if from_string:
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if from_string:
            try:
                return float(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and where.endswith("gradient_checkpointing"):
            # TOML `gradient_checkpointing = true` reads naturally; map it onto the string choices
            return "on" if value else "off"
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _apply_section(obj: Any, values: dict[str, Any], section: str, from_string: bool) -> None:
    types_ = _field_types(type(obj))
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(
                f"unknown key {section}.{key}" + _suggest(key, sorted(types_)),
            )
        setattr(obj, key, _coerce(value, types_[key], f"{section}.{key}", from_string))


def from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from a nested dict (TOML tables), starting from ``base`` or the defaults."""
    cfg = base or TrainConfig()
    sections = _field_types(TrainConfig)
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown section [{section}]" + _suggest(section, sorted(sections)))
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table, got {values!r}")
        _apply_section(getattr(cfg, section), values, section, from_string=False)
    return cfg


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """``["--train.lr=1e-4", "--lora.r", "8"]`` -> ``{"train": {"lr": "1e-4"}, "lora": {...}}``."""
    out: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"unexpected argument {arg!r}; overrides look like --section.key=value"
            )
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            value = args[i + 1]
            i += 1
        section, _, key = name.partition(".")
        if not section or not key or "." in key:
            raise ConfigError(f"bad override {arg!r}; expected --section.key=value")
        out.setdefault(section.replace("-", "_"), {})[key.replace("-", "_")] = value
        i += 1
    return out


def apply_overrides(cfg: TrainConfig, args: list[str]) -> TrainConfig:
    """Apply ``--section.key=value`` strings to ``cfg`` (in place; returned for chaining)."""
    sections = _field_types(TrainConfig)
    for section, values in parse_overrides(args).items():
        if section not in sections:
            raise ConfigError(
                f"unknown section {section!r} in --{section}.*"
                + _suggest(section, sorted(sections))
            )
        _apply_section(getattr(cfg, section), values, section, from_string=True)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the TOML file (if given), then the overrides; validated."""
    cfg = TrainConfig()
    if path:
        cfg = from_dict(_load_toml(Path(path)), cfg)
    if overrides:
        apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def to_toml(cfg: TrainConfig) -> str:
    """Render a config as TOML (the run's resolved config is written next to its outputs)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {v!r} to TOML")

    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, v in values.items():
            if v is None:
                continue  # TOML has no null: an absent key means the default (None)
            lines.append(f"{key} = {value(v)}")
        lines.append("")
    return "\n".join(lines)
