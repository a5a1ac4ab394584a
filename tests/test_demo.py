"""The demo (`python -m qkern_train.demo --quick`): it runs end to end and fine-tuning raises the
held-out accuracy from about zero."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qkern_train import demo
from qkern_train.lora import read_adapter_config
from qkern_train.plotting import read_png_size


def test_heldout_numbers_never_in_finetuning_data():
    train, held = demo.split_numbers(0, 60)
    assert len(held) == 60 and not set(train) & set(held)
    assert set(train) | set(held) == set(range(demo.MAX_NUMBER))
    rows = demo.finetune_rows(train)
    asked = {int(r["messages"][0]["content"].rsplit(" ", 1)[1]) for r in rows}
    assert asked == set(train)
    # pre-training text never shows the chat tokens, and never a question word next to a
    # number: the words only occur in word salad, which holds no numbers
    corpus = " ".join(demo.pretraining_corpus(500, 0))
    assert "<|" not in corpus
    assert not re.search(r"(after|follows|from|three) \d", corpus)
    assert re.search(r"\d+ \d+ \d+", corpus) and "comes" in corpus


def test_quick_demo_shows_accuracy_gain(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    before = re.search(r"BEFORE fine-tuning: (\d+)/(\d+)", out)
    after = re.search(r"AFTER fine-tuning: +(\d+)/(\d+)", out)
    assert before and after, out
    n = int(before.group(2))
    b, a = int(before.group(1)) / n, int(after.group(1)) / n
    assert b <= 0.1 and a >= 0.5, out  # from about zero to most held-out questions right
    assert "held-out samples" in out
    # the outputs a user gets
    assert read_adapter_config(tmp_path / "adapter").r == demo.QUICK.lora_r
    for f in (
        "base/config.json",
        "base/model.safetensors",
        "base/tokenizer.json",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer_config.json",
        "data/train.jsonl",
        "data/heldout.jsonl",
        "finetune/metrics.jsonl",
    ):
        assert (tmp_path / f).is_file(), f
    for phase in ("pretrain", "finetune"):
        assert read_png_size(tmp_path / phase / "loss_curve.png") == (640, 400)
    losses = [
        json.loads(x)["loss"]
        for x in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" not in x
    ]
    assert losses[-1] < 0.5 * losses[0]  # the loss falls
    merged = re.search(r"after reloading it: (\d+)/", out)
    assert merged and int(merged.group(1)) / n >= a - 0.1  # the merged model answers as well


@pytest.mark.gpu
def test_quick_demo_on_gpu(tmp_path):
    result = demo.run_demo(tmp_path, quick=True, device="cuda")
    assert result["device"].startswith("cuda")
    assert result["before"] <= 0.1 and result["after"] >= 0.5
    assert result["merged"] >= result["after"] - 0.1
