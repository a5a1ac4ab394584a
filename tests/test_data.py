"""Data pipeline: reading, format detection, rendering, response-only masking, truncation,
length report, packing, batching and deterministic order."""

from __future__ import annotations

import json
import random

import pytest
import torch

from qkern_train import data as D
from qkern_train.demo import build_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog 0123456789",
    "reverse: a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "hello world, what is 12 + 34? it is 46.",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=320)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- reading and errors ------------------------------------------------------------------------


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "", '{"text": "b"', {"text": "c"}])
    with pytest.raises(D.DataError, match=r"d\.jsonl:3: malformed JSON line"):
        D.read_records(p)
    errors: list[str] = []
    recs = D.read_records(p, errors)
    assert [r.value["text"] for r in recs] == ["a", "c"]
    assert [r.source.rsplit(":", 1)[1] for r in recs] == ["1", "4"]
    assert len(errors) == 1 and ":3:" in errors[0]


def test_json_array_records_keep_their_line(tmp_path, tok):
    p = tmp_path / "d.json"
    p.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "input": "x"}\n]\n'
    )
    recs = D.read_records(p)
    assert [r.source for r in recs] == [f"{p}:2", f"{p}:4"]
    with pytest.raises(D.DataError, match=r"d\.json:4: missing field 'output'"):
        D.tokenize_records(recs, tok)
    p.write_text('[{"text": "a"}, {"text": }]')
    with pytest.raises(D.DataError, match=r"d\.json:1: malformed JSON"):
        D.read_records(p)
    p.write_text('{"text": "a"}')
    with pytest.raises(D.DataError, match="JSON array of records at the top level"):
        D.read_records(p)


def test_empty_and_missing(tmp_path, tok):
    p = write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(D.DataError, match="empty"):
        D.load_examples(p, tok)
    with pytest.raises(D.DataError, match="does not exist"):
        D.read_records(tmp_path / "nope.jsonl")
    with pytest.raises(D.DataError, match="unknown data file type"):
        D.read_records(write_jsonl(tmp_path / "x.csv", ["a,b"]))


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        (
            {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
            "sharegpt",
        ),
        (
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
            "messages",
        ),
        ({"text": "t"}, "text"),
    ],
)
def test_detect_format(row, fmt):
    assert D.detect_format([D.Record(row, "f:1")]) == fmt


def test_format_errors(tok):
    def fail(row, match, fmt="auto", **kw):
        with pytest.raises(D.DataError, match=match):
            D.tokenize_records([D.Record(row, "f.jsonl:7")], tok, fmt=fmt, **kw)

    fail({"foo": 1}, r"f\.jsonl:7: cannot tell the format")
    fail({"conversations": [{"from": "alien", "value": "x"}]}, r"f\.jsonl:7.*unknown speaker")
    fail({"messages": [{"role": "user", "content": "x"}]}, r"f\.jsonl:7: .*no assistant turn")
    fail({"messages": [{"role": "tool", "content": "x"}]}, r"role 'tool' is not supported")
    fail({"instruction": 3, "output": "x"}, r"field 'instruction' must be a str")
    fail(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        },
        r"alpaca template takes one user turn",
        template="alpaca",
    )


# ---- rendering and masking ---------------------------------------------------------------------


def targets_text(tok, ex: D.Example) -> str:
    return tok.decode([t for t, m in zip(ex.tokens, ex.targets) if m], skip_special_tokens=False)


def test_alpaca_response_only_masking(tok):
    rec = D.Record({"instruction": "add the numbers", "input": "12 + 34", "output": "46"}, "f:1")
    ex = D.tokenize_record(rec, "alpaca", tok)
    prompt = D.ALPACA_PROMPT_WITH_INPUT.format(instruction="add the numbers", input="12 + 34")
    prompt_ids = tok.encode(prompt, add_special_tokens=True)  # BOS + prompt, as at inference
    assert ex.tokens[: len(prompt_ids)] == prompt_ids
    assert not any(ex.targets[: len(prompt_ids)])
    assert all(ex.targets[len(prompt_ids) :])
    assert ex.tokens[-1] == tok.eos_token_id  # EOS appended and trained on
    assert targets_text(tok, ex).strip() == "46</s>"
    # labels are aligned with inputs: labels[j] is the token after input j, or -100
    inp, labels = ex.input_and_labels()
    assert inp == ex.tokens[:-1]
    for j, lab in enumerate(labels):
        assert lab == (ex.tokens[j + 1] if ex.targets[j + 1] else D.IGNORE_INDEX)
    full = D.tokenize_record(rec, "alpaca", tok, train_on_responses_only=False)
    assert full.tokens == ex.tokens and all(full.targets[1:])  # [0] is never a label


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_chat_template_multi_turn_masking(tok, fmt):
    turns = [
        ("system", "be brief"),
        ("user", "hello world"),
        ("assistant", "a b c"),
        ("user", "what is 12 + 34?"),
        ("assistant", "it is 46."),
    ]
    if fmt == "messages":
        row = {"messages": [{"role": r, "content": c} for r, c in turns]}
    else:
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        row = {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
    ex = D.tokenize_record(D.Record(row, "f:1"), fmt, tok)
    msgs = [{"role": r, "content": c} for r, c in turns]
    # the prompt part tokenizes exactly as the inference prompt does
    prompt = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, tokenize=True)
    assert ex.tokens[: len(prompt)] == prompt and not any(ex.targets[: len(prompt)])
    # targets are the two answers with their end-of-turn EOS, nothing else
    text = targets_text(tok, ex)
    assert text.replace(" ", "") == "abc</s>itis46.</s>"
    # the whole sequence is the rendered conversation
    full = tok.apply_chat_template(msgs, tokenize=True)
    assert tok.decode(ex.tokens, skip_special_tokens=False).replace(" ", "") == tok.decode(
        full, skip_special_tokens=False
    ).replace(" ", "")
    assert ex.tokens.count(tok.eos_token_id) == 2  # no extra EOS: the template wrote them


def test_system_prompt_inserted(tok):
    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    ex = D.tokenize_record(D.Record(row, "f:1"), "messages", tok, system_prompt="sys")
    assert "<|system|>" in tok.decode(ex.tokens, skip_special_tokens=False)


def test_text_documents_split_into_windows(tok):
    text = " ".join(random.Random(0).choice("abcdefgh") for _ in range(120))
    recs = [D.Record({"text": text}, "f:1"), D.Record({"text": "short"}, "f:2")]
    exs, stats = D.tokenize_records(recs, tok, max_seq_length=32)
    whole = D.tokenize_record(recs[0], "text", tok)
    assert stats.chunked == 1 and stats.truncated == 0
    windows = exs[:-1]
    assert all(len(w) <= 32 for w in windows)
    # consecutive windows overlap by one token: every token after the first is a label once
    labels = [t for w in windows for t in w.tokens[1:]]
    assert labels == whole.tokens[1:]
    assert exs[-1].tokens[0] == tok.bos_token_id and exs[-1].tokens[-1] == tok.eos_token_id


def test_overlong_policies(tok):
    long_out = " ".join("abcdefgh") * 10
    recs = [
        D.Record({"instruction": "x", "output": "y"}, "f.jsonl:1"),
        D.Record({"instruction": "x", "output": long_out}, "f.jsonl:2"),
    ]
    short_len = len(D.tokenize_record(recs[0], "alpaca", tok))
    limit = short_len + 5
    exs, st = D.tokenize_records(recs, tok, max_seq_length=limit, overlong="truncate")
    assert st.truncated == 1 and len(exs) == 2 and len(exs[1]) == limit and exs[1].truncated
    assert st.report.over_limit == 1
    exs, st = D.tokenize_records(recs, tok, max_seq_length=limit, overlong="drop")
    assert st.dropped == 1 and len(exs) == 1
    with pytest.raises(D.DataError, match=r"f\.jsonl:2: example has \d+ tokens, more than"):
        D.tokenize_records(recs, tok, max_seq_length=limit, overlong="error")
    # a limit that cuts into the prompt leaves no target: dropped; nothing left is an error
    with pytest.raises(D.DataError, match="no usable examples"):
        D.tokenize_records(recs, tok, max_seq_length=short_len - 3)


def test_collect_errors_mode(tmp_path, tok):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "a", "output": "b"},
            {"instruction": "a"},
            "{bad",
            {"instruction": "c", "output": "d"},
        ],
    )
    exs, st = D.load_examples(p, tok, collect_errors=True)
    assert len(exs) == 2
    assert any(":2: missing field 'output'" in e for e in st.errors)
    assert any(":3: malformed JSON" in e for e in st.errors)


def test_length_report():
    r = D.length_report(list(range(1, 101)), max_seq_length=90)
    assert (r.count, r.max, r.p95, r.p99, r.median, r.over_limit) == (100, 100, 95, 99, 50.5, 10)
    assert r.mean == pytest.approx(50.5) and r.recommended_max_seq_length == 128
    r = D.length_report([10] * 99 + [1000], max_seq_length=64)
    assert r.recommended_max_seq_length == 64  # the single outlier is not worth 1000 tokens
    assert "recommended max_seq_length: 64" in r.format()


# ---- packing and batches -----------------------------------------------------------------------


def fake_examples(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(lengths):
        toks = [rng.randrange(3, 50) for _ in range(n)]
        tg = [False] * (n // 2) + [True] * (n - n // 2)
        out.append(D.Example(toks, tg, f"f:{i + 1}"))
    return out


def test_pack_respects_capacity_and_keeps_every_item():
    rng = random.Random(1)
    lengths = [rng.randint(1, 30) for _ in range(200)]
    rows = D.pack(lengths, 32)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 32 for r in rows)
    assert rows == D.pack(lengths, 32)
    assert len(rows) < 0.8 * 200  # actually packs
    with pytest.raises(ValueError, match="capacity"):
        D.pack([40], 32)


def test_collate_packed_and_padded():
    exs = fake_examples([5, 9, 3])
    b = D.collate_packed(exs)
    assert b.input_ids.shape == (1, 4 + 8 + 2) and b.cu_seqlens.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, 4, 12, 14] and b.max_seqlen == 8
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, *range(8), 0, 1]
    assert b.num_targets == sum(e.num_targets for e in exs) == int((b.labels != -100).sum())
    p = D.collate_padded(exs, pad_id=0)
    assert p.input_ids.shape == (3, 8) and p.cu_seqlens is None
    assert (p.labels[2, 2:] == -100).all() and p.num_targets == b.num_targets
    assert p.num_tokens == b.num_tokens == 14
    for i, ex in enumerate(exs):
        inp, lab = ex.input_and_labels()
        seg = slice(b.cu_seqlens[i], b.cu_seqlens[i + 1])
        assert b.input_ids[0, seg].tolist() == inp == p.input_ids[i, : len(inp)].tolist()
        assert b.labels[0, seg].tolist() == lab


def test_planner_deterministic_and_resumable():
    rng = random.Random(2)
    exs = fake_examples([rng.randint(2, 20) for _ in range(60)])
    a = D.BatchPlanner(exs, micro_batch_size=2, max_seq_length=24, packing=True, seed=5)
    b = D.BatchPlanner(exs, micro_batch_size=2, max_seq_length=24, packing=True, seed=5)
    assert a.micro_batches(0) == b.micro_batches(0)
    assert a.micro_batches(0) != a.micro_batches(1)  # a new order each epoch
    c = D.BatchPlanner(exs, micro_batch_size=2, max_seq_length=24, packing=True, seed=6)
    assert c.micro_batches(0) != a.micro_batches(0)
    for e in (0, 1):  # each epoch covers every example exactly once
        assert sorted(i for mb in a.micro_batches(e) for i in mb) == list(range(60))
    n0 = len(a.micro_batches(0))
    it = a.stream()
    seq = [next(it) for _ in range(n0 + 3)]
    assert seq[n0][:2] == (1, 0)
    again = list(zip(range(4), b.stream(0, n0 - 1)))
    for (_, (e1, i1, b1)), (e2, i2, b2) in zip(again, seq[n0 - 1 :]):
        assert (e1, i1) == (e2, i2) and torch.equal(b1.input_ids, b2.input_ids)
    assert a.total_micro_batches(1.5) == n0 + round(0.5 * len(a.micro_batches(1)))
    with pytest.raises(D.DataError, match="does not fit max_seq_length"):
        D.BatchPlanner(exs, 1, max_seq_length=4)


def test_split_eval():
    exs = fake_examples([4] * 50)
    tr, ev = D.split_eval(exs, 0.1, seed=1)
    assert len(ev) == 5 and len(tr) == 45
    assert {id(e) for e in tr}.isdisjoint({id(e) for e in ev})
    tr2, ev2 = D.split_eval(exs, 5, seed=1)
    assert [e.source for e in ev2] == [e.source for e in ev]
    with pytest.raises(D.DataError, match="leaves no training examples"):
        D.split_eval(exs, 50, seed=1)
