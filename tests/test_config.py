"""Training config: TOML loading, --section.key overrides with type conversion, did-you-mean."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qkern_train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_config,
    parse_overrides,
    to_toml,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_toml_then_overrides(tmp_path):
    path = write(
        tmp_path,
        """
[model]
path = "m"
load_in_4bit = false
[lora]
r = 8
alpha = 16
target_modules = ["q_proj", "v_proj"]
[train]
lr = 1e-4
epochs = 2
gradient_checkpointing = true
[data]
eval_split = 5
""",
    )
    cfg = load_config(
        path,
        [
            "--train.lr=3e-4",
            "--lora.r",
            "4",
            "--data.packing=false",
            "--lora.target_modules=q_proj,k_proj",
            "--train.max_steps=10",
            "--lora.layers_to_transform=[0, 2]",
        ],
    )
    assert cfg.model.path == "m" and cfg.model.load_in_4bit is False
    assert cfg.lora.r == 4 and cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.lora.layers_to_transform == [0, 2]
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 10
    assert cfg.train.epochs == 2.0 and cfg.data.eval_split == 5.0
    assert cfg.data.packing is False
    assert cfg.train.gradient_checkpointing == "on"  # TOML bool mapped to the string choice


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["--train.lr=5e-5", "--output.dir=x y", "--lora.use_rslora=yes"])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "args, match",
    [
        (["--train.learning_rate=1"], r"unknown key train\.learning_rate.*did you mean 'lr'"),
        (["--trian.lr=1"], r"unknown section 'trian'.*did you mean 'train'"),
        (["--lora.rr=2"], r"unknown key lora\.rr.*did you mean 'r'"),
        (["--train.max_steps=ten"], r"train\.max_steps: expected an integer"),
        (["--data.packing=maybe"], r"data\.packing: expected a boolean"),
        (["--train.lr=fast"], r"train\.lr: expected a number"),
        (["--train.optimizer=sgd"], r"train\.optimizer = 'sgd' is not one of"),
        (["--train.lr"], r"has no value"),
        (["lr=3"], r"overrides look like --section\.key=value"),
        (["--lora.r=0"], r"lora\.r must be a positive integer"),
        (["--lora.dropout=1.5"], r"lora\.dropout must be in"),
    ],
)
def test_bad_overrides(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, args)


def test_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[modle\].*did you mean 'model'"):
        load_config(write(tmp_path, "[modle]\npath='x'\n"))
    with pytest.raises(ConfigError, match=r"unknown key data\.max_seq_len.*'max_seq_length'"):
        load_config(write(tmp_path, "[data]\nmax_seq_len = 10\n"))
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer, got 1\.5"):
        load_config(write(tmp_path, "[train]\nmax_steps = 1.5\n"))
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[train\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c.d", "x=y", "--e-f.g-h=2"]) == {
        "a": {"b": "1"},
        "c": {"d": "x=y"},
        "e_f": {"g_h": "2"},
    }
    cfg = apply_overrides(TrainConfig(), ["--data.system_prompt=a=b"])
    assert cfg.data.system_prompt == "a=b"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
@pytest.mark.parametrize(
    "name", ["llama3.1-8b-qlora.toml", "mistral-7b-qlora.toml", "qwen2.5-7b-qlora.toml"]
)
def test_example_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.load_in_4bit and cfg.model.path and cfg.data.path
