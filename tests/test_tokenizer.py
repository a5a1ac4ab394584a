"""qkern_train.tokenizer on tokenizers the tests train themselves: a byte-level BPE
``tokenizer.json`` (Llama-3 style specials) and a sentencepiece unigram ``tokenizer.model``."""

from __future__ import annotations

import io
import json
import random

import jinja2
import pytest

from qkern_train.tokenizer import load_tokenizer

WORDS = (
    "the quick brown fox jumps over lazy dog kernel tensor block quantize attention model "
    "layer token stream cache window rotary norm weight bias vector matrix gradient step "
    "learning rate batch sequence prompt answer question"
).split()
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SH, EH = "<|start_header_id|>", "<|end_header_id|>"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.append(rng.choice(["é", "ü", "日本", "42", "3.14", "!", "?"]))
        lines.append(" ".join(words))
    return lines


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS, EOT, SH, EH],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": {"content": EOT}, "chat_template": TEMPLATE})
    )
    eos_ids = [tok.token_to_id(EOS), tok.token_to_id(EOT)]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return d


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        vocab_size=120,
        model_type="unigram",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return d


# ------------------------------------------------------------------------------------------------
# BPE (tokenizer.json)
# ------------------------------------------------------------------------------------------------


def test_bpe_round_trip_and_bos(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    bos = tok.bos_token_id
    assert bos == tok.token_to_id(BOS) and tok.eos_token_id == tok.token_to_id(EOT)
    for text in ["the quick brown fox", "  lazy  dog\n", "日本 é 3.14!", "unseen wörds ✓"]:
        ids = tok.encode(text)
        assert ids[0] == bos and ids.count(bos) == 1  # the post-processor's BOS
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == BOS + text
    # merges were learnt: far fewer tokens than bytes
    assert len(tok.encode("the quick brown fox", add_special_tokens=False)) < 19 // 2


def test_bpe_flags_override_post_processor(bpe_dir, tmp_path):
    for f in bpe_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "add_bos_token": True, "add_eos_token": True})
    )
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("lazy dog")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # never doubled
    assert ids[-1] == tok.eos_token_id
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    assert load_tokenizer(tmp_path).encode("lazy dog")[0] != tok.bos_token_id


def test_eos_ids_and_vocab_check(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert tok.eos_token_ids == [tok.token_to_id(EOT), tok.token_to_id(EOS)]
    assert tok.vocab_size == 400
    tok.check_vocab(400)
    tok.check_vocab(512)
    with pytest.raises(
        ValueError, match="tokenizer has 400 token ids but the model's embedding has only 399 rows"
    ):
        tok.check_vocab(399)


def test_chat_template(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    messages = [
        {"role": "system", "content": "be brief "},
        {"role": "user", "content": "the quick fox?"},
    ]
    want = f"{BOS}{SH}system{EH}\n\nbe brief{EOT}{SH}user{EH}\n\nthe quick fox?{EOT}"
    assert tok.apply_chat_template(messages) == want
    gen = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert gen == want + f"{SH}assistant{EH}\n\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.token_to_id(EOT)) == 2  # special strings become single ids
    assert tok.decode(ids, skip_special_tokens=False) == gen
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="list of dicts with a 'role' key"):
        tok.apply_chat_template([{"content": "x"}])


def test_chat_template_sandbox(bpe_dir, tmp_path):
    for f in bpe_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for template in (
        "{{ messages.__class__.__mro__ }}",  # reaching Python internals
        "{{ messages.append({'role': 'x'}) }}",  # mutating the caller's list
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the classic escape
    ):
        (tmp_path / "tokenizer_config.json").write_text(
            json.dumps({**cfg, "chat_template": template})
        )
        tok = load_tokenizer(tmp_path)
        messages = [{"role": "user", "content": "hi"}]
        with pytest.raises(jinja2.exceptions.SecurityError):
            tok.apply_chat_template(messages)
        assert messages == [{"role": "user", "content": "hi"}]


def test_chat_template_forms(bpe_dir, tmp_path):
    for f in bpe_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    named = [
        {"name": "default", "template": "D{{ messages | length }}"},
        {"name": "tool_use", "template": "T{{ tools | tojson }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": named}))
    tok = load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "D1"
    assert tok.apply_chat_template(msgs, template_name="tool_use", tools=["é"]) == 'T["é"]'
    with pytest.raises(ValueError, match="no chat template named 'other'"):
        tok.apply_chat_template(msgs, template_name="other")
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(tmp_path).apply_chat_template(msgs)
    (tmp_path / "chat_template.jinja").write_text(
        "J{% for m in messages %}{{ m.role }}{% endfor %}"
    )
    assert load_tokenizer(tmp_path).apply_chat_template(msgs) == "Juser"
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(ValueError, match="syntax error at line 1"):
        load_tokenizer(tmp_path).apply_chat_template(msgs)


def test_stream_decoder_never_splits_characters(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    text = "日本 fox ✓ über 🦊 dog"  # the emoji's 4 bytes are separate byte-level tokens
    ids = tok.encode(text, add_special_tokens=False)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text == dec.text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # held back while a character was incomplete


# ------------------------------------------------------------------------------------------------
# sentencepiece (tokenizer.model)
# ------------------------------------------------------------------------------------------------


def test_spm_round_trip_and_specials(spm_dir):
    tok = load_tokenizer(spm_dir)
    assert tok.is_sentencepiece
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    for text in ["the quick brown fox", "lazy dog jumps over the kernel", "rate 42 !"]:
        ids = tok.encode(text)
        assert ids[0] == 1 and 2 not in ids  # Llama defaults: BOS, no EOS
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    # special-token strings written into the text (as chat templates do) become their ids
    ids = tok.encode("<s>the fox</s>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    # a text that already starts with BOS gets no second one from add_special_tokens
    assert tok.encode("<s>the fox") == tok.encode("the fox")
    assert tok.decode(ids) == "the fox"
    assert tok.vocab_size == tok.backend.get_piece_size()
    dec = tok.stream_decoder()
    for i in tok.encode("the lazy dog", add_special_tokens=False):
        dec.push(i)
    dec.flush()
    assert dec.text == "the lazy dog"  # spaces between pieces survive piecewise decoding


def test_spm_config_flags(spm_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "add_eos_token": True, "chat_template": TEMPLATE})
    )
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("the fox")
    assert ids[0] != 1 and ids[-1] == 2
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<s><|start_header_id|>user")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot read .*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot read .*tokenizer.model"):
        load_tokenizer(tmp_path)


def test_encode_rejects_non_text(bpe_dir):
    with pytest.raises(TypeError, match="text must be a str, got list"):
        load_tokenizer(bpe_dir).encode([1, 2])
