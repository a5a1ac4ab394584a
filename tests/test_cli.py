"""qkern-train command line: sft (TOML + overrides), merge, data-check, generate, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from qkern_train.checkpoint import load_model, save_model
from qkern_train.cli import main
from qkern_train.demo import build_tokenizer
from qkern_train.model import ModelConfig, build_model
from qkern_train.plotting import read_png_size

# tiny matmuls: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    texts = [" ".join(random.Random(i).choice("abcdefgh") for _ in range(20)) for i in range(50)]
    tok = build_tokenizer(texts + ["reverse: what is 12 + 34 ?"], d, vocab_size=300)
    cfg = ModelConfig(
        architecture="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    save_model(build_model(cfg), d, dtype=torch.bfloat16)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(24):
        w = [rng.choice("abcdefgh") for _ in range(rng.randint(2, 5))]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "reverse: " + " ".join(w)},
                    {"role": "assistant", "content": " ".join(w[::-1])},
                ]
            }
        )
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_sft_merge_generate(tmp_path, model_dir, data_file, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f"""
[model]
path = "{model_dir}"
[lora]
r = 4
alpha = 8
[data]
path = "{data_file}"
max_seq_length = 64
eval_split = 4
[train]
max_steps = 3
micro_batch_size = 2
gradient_accumulation_steps = 2
lr = 1e-2
eval_steps = 2
save_steps = 2
[output]
dir = "{tmp_path / "out"}"
progress_bar = false
"""
    )
    rc = main(
        [
            "sft",
            "--config",
            str(cfg),
            "--train.max_steps=4",
            "--output.save_merged=true",
            "--output.merged_dtype=float32",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "recommended max_seq_length" in out and "done: 4 steps" in out
    run = tmp_path / "out"
    for f in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "config.toml",
        "checkpoint-4/trainer_state.json",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
    ):
        assert (run / f).is_file(), f
    assert read_png_size(run / "loss_curve.png") == (640, 400)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4]
    # merge from the command line equals the merge sft did (same 16-bit base + adapter)
    rc = main(
        [
            "merge",
            "--model",
            str(model_dir),
            "--adapter",
            str(run / "adapter"),
            "--out",
            str(tmp_path / "m2"),
            "--dtype",
            "float32",
        ]
    )
    assert rc == 0
    a = load_model(run / "merged", dtype=torch.float32, device="cpu")
    b = load_model(tmp_path / "m2", dtype=torch.float32, device="cpu")
    x = torch.randint(3, 100, (1, 9))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    capsys.readouterr()
    rc = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--adapter",
            str(run / "adapter"),
            "--prompt",
            "reverse: a b",
            "--max-new-tokens",
            "3",
            "--load-in-4bit",
        ]
    )
    assert rc == 0


def test_sft_errors_before_training(tmp_path, model_dir, data_file, capsys):
    base = [
        "sft",
        f"--model.path={model_dir}",
        f"--data.path={data_file}",
        f"--output.dir={tmp_path / 'o'}",
        "--train.max_steps=1",
    ]
    assert main([*base, "--train.learning_rate=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main([*base, f"--model.path={tmp_path / 'nope'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    assert main([*base, f"--data.path={bad}"]) == 2
    assert "bad.jsonl:2: missing field 'output'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # nothing trained


def test_data_check(tmp_path, model_dir, data_file, capsys):
    assert (
        main(
            [
                "data-check",
                "--data",
                str(data_file),
                "--tokenizer",
                str(model_dir),
                "--max-seq-length",
                "16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "24 records, 24 usable examples" in out and "p95" in out and out.endswith("ok\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data_file.read_text() + "{oops\n" + '{"messages": []}\n')
    assert main(["data-check", "--data", str(bad), "--tokenizer", str(model_dir)]) == 1
    out = capsys.readouterr().out
    assert "2 bad record(s)" in out
    assert "bad.jsonl:25: malformed JSON line" in out
    assert "bad.jsonl:26: conversation has no assistant turn" in out
