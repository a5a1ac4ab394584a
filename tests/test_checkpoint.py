"""qkern_train.checkpoint: name map, round trips (16-bit, sharded, bitsandbytes 4-bit), HF
compatibility of what we write, and clear errors for bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkern
from qkern_train.checkpoint import (
    INDEX_FILE,
    from_hf_name,
    iter_hf_tensors,
    load_model,
    save_model,
    save_quantized,
    to_hf_name,
)
from qkern_train.model import ModelConfig, build_model

VOCAB = 80


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=[2],
    )
    base.update(kw)
    return ModelConfig(**base)


def random_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_model(tiny(**kw))
    with torch.no_grad():  # biases and norms away from their init values, so they are checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def state(model) -> dict[str, torch.Tensor]:
    return {n: t.float() for n, t in iter_hf_tensors(model, torch.float32)}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_name_map_round_trip():
    model = random_model(attention_bias=True)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" in names
    for n in names:
        hf = to_hf_name(n)
        assert hf.startswith("model.") or hf == "lm_head.weight"
        assert from_hf_name(hf) == n
    assert to_hf_name("layers.1.self_attn.q_proj.bias") == "model.layers.1.self_attn.q_proj.bias"
    assert from_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(ValueError, match="no HF name for parameter 'layers.0.foo.weight'"):
        to_hf_name("layers.0.foo.weight")


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_fp32_and_sharded(tmp_path, tied):
    model = random_model(tie_word_embeddings=tied, attention_bias=True)
    save_model(model, tmp_path / "a", dtype=torch.float32)
    a = load_model(tmp_path / "a", dtype=torch.float32, device="cpu")
    assert_same_tensors(state(model), state(a))
    save_model(a, tmp_path / "b", dtype=torch.float32, max_shard_size="40KB")
    index = json.loads((tmp_path / "b" / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "b" / "model.safetensors").exists()
    for f in shards:
        assert (tmp_path / "b" / f).is_file()
    b = load_model(tmp_path / "b", dtype=torch.float32, device="cpu")
    assert_same_tensors(state(a), state(b))
    assert b.config == a.config
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids), b(ids))


def test_bf16_save_and_load(tmp_path):
    model = random_model()
    save_model(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for t in load_file(tmp_path / "model.safetensors").values():
        assert t.dtype == torch.bfloat16
    loaded = load_model(tmp_path, dtype=torch.float32, device="cpu")
    want = {k: v.to(torch.bfloat16).float() for k, v in state(model).items()}
    assert_same_tensors(want, state(loaded))
    assert load_model(tmp_path, dtype="bf16", device="cpu").norm.weight.dtype == torch.bfloat16


def test_transformers_reads_what_we_write(tmp_path):
    """Our safetensors + config.json load in transformers with the same logits."""
    transformers = pytest.importorskip("transformers")
    model = random_model(architecture="qwen2", attention_bias=True, tie_word_embeddings=True)
    save_model(model, tmp_path, dtype=torch.float32, max_shard_size="60KB")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_reads_transformers_sharded(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    hf.save_pretrained(str(tmp_path), max_shard_size="50KB")
    assert (tmp_path / INDEX_FILE).is_file()
    ours = load_model(tmp_path, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_bnb_4bit_round_trip(tmp_path):
    """save_quantized writes the bitsandbytes format; loading it gives NF4 modules with the same
    bytes as quantizing on load, without re-quantizing when saved again."""
    model = random_model(attention_bias=True)
    save_model(model, tmp_path / "fp", dtype=torch.float32)
    q_on_load = load_model(tmp_path / "fp", load_in_4bit=True, dtype=torch.float32, device="cpu")
    save_quantized(model, tmp_path / "bnb", dtype=torch.float32)

    cfg = json.loads((tmp_path / "bnb" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    tensors = load_file(tmp_path / "bnb" / "model.safetensors")
    p = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[p].dtype == torch.uint8 and tensors[p].shape == (64 * 64 // 2, 1)
    assert tensors[p + ".absmax"].dtype == torch.uint8  # double quantization
    meta = json.loads(bytes(tensors[p + ".quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [64, 64] and meta["blocksize"] == 64
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32

    for load_in_4bit in (False, True):  # pre-quantized weights stay NF4 either way
        pre = load_model(
            tmp_path / "bnb", load_in_4bit=load_in_4bit, dtype=torch.float32, device="cpu"
        )
        for (n, m), (_, m2) in zip(pre.named_modules(), q_on_load.named_modules()):
            if isinstance(m2, qkern.QLoRALinear):
                assert isinstance(m, qkern.QLoRALinear), n
                assert torch.equal(m.packed, m2.packed), n
                assert torch.equal(m.quant_state.absmax, m2.quant_state.absmax), n
                assert (m.bias is None) == (m2.bias is None), n
                assert m.bias is None or torch.equal(m.bias, m2.bias), n
        ids = torch.randint(0, VOCAB, (2, 5))
        with torch.no_grad():
            assert torch.equal(pre(ids), q_on_load(ids))

    # saving a loaded NF4 model again writes the same bytes (no re-quantization)
    save_quantized(pre, tmp_path / "bnb2", dtype=torch.float32)
    assert_same_tensors(tensors, load_file(tmp_path / "bnb2" / "model.safetensors"))
    # and a 16-bit save of an NF4 model writes the dequantized weights
    save_model(pre, tmp_path / "deq", dtype=torch.float32)
    deq = load_file(tmp_path / "deq" / "model.safetensors")
    torch.testing.assert_close(deq[p], pre.layers[0].self_attn.q_proj.base_weight(torch.float32))


def test_bnb_quantized_lm_head_is_dequantized(tmp_path):
    model = random_model()
    save_model(model, tmp_path, dtype=torch.float32)
    tensors = load_file(tmp_path / "model.safetensors")
    packed, st = qkern.quantize_4bit(tensors["lm_head.weight"])
    tensors.update(st.as_bnb_dict("lm_head.weight", packed=packed))
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path, dtype=torch.float32, device="cpu")
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    assert torch.equal(
        loaded.lm_head.weight, qkern.dequantize_4bit(packed, st, dtype=torch.float32)
    )


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = random_model(attention_bias=True)
    save_model(model, tmp_path, dtype=torch.float32)
    return tmp_path


def _edit(path, fn) -> None:
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(tiny().to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*pytorch_model.bin.*pickle"):
        load_model(tmp_path, device="cpu")
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path, device="cpu")


def test_truncated_file_names_it(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors.*truncated"):
        load_model(saved, device="cpu")


def test_missing_shard(tmp_path):
    save_model(random_model(), tmp_path, dtype=torch.float32, max_shard_size="40KB")
    shards = sorted(set(json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"].values()))
    (tmp_path / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard .*{shards[1]} is missing"):
        load_model(tmp_path, device="cpu")


def test_missing_and_extra_tensors(saved):
    _edit(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        load_model(saved, device="cpu")


def test_extra_tensor(saved):
    _edit(saved, lambda t: t.update({"model.layers.5.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"does not use: model.layers.5.mlp.up_proj.weight"):
        load_model(saved, device="cpu")


def test_ignored_inv_freq(saved):
    _edit(
        saved, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    )
    load_model(saved, device="cpu")


def test_shape_mismatch_names_tensor(saved):
    _edit(
        saved, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)})
    )
    with pytest.raises(
        ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[16, 64\]; "
        r"config.json implies \[32, 64\]"
    ):  # fmt: skip
        load_model(saved, device="cpu")


def test_dtype_mismatch_names_tensor(saved):
    _edit(saved, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has dtype I32"):
        load_model(saved, device="cpu")


def test_unsupported_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(architectures=["GemmaForCausalLM"], model_type="gemma")
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'GemmaForCausalLM'; supported: LlamaForCausalLM.*Qwen2"):
        load_model(saved, device="cpu")


def test_unsupported_quantization(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization 'gptq' is not supported"):
        load_model(saved, device="cpu")


def test_bad_bnb_state(saved, tmp_path):
    model = random_model()
    save_quantized(model, tmp_path / "q", dtype=torch.float32)
    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(f)
    tensors.pop("model.layers.0.mlp.down_proj.weight.nested_absmax")
    save_file(tensors, f)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight'.*nested_absmax"):
        load_model(tmp_path / "q", device="cpu")


def test_bad_dtype_argument(saved):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model(saved, dtype="int8", device="cpu")


def test_quantize_model_matches_load_in_4bit(tmp_path):
    from qkern_train.checkpoint import quantize_model

    model = random_model(attention_bias=True)
    save_model(model, tmp_path, dtype=torch.float32)
    loaded = load_model(tmp_path, load_in_4bit=True, dtype=torch.float32, device="cpu")
    quantize_model(model)
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert sum(isinstance(m, qkern.QLoRALinear) for m in model.modules()) == 14
