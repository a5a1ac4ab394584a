"""LoRA: injection, init, PEFT adapter files (and parity with HF PEFT), loading, merging."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import qkern
from qkern_train.checkpoint import load_model, save_model
from qkern_train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraConfig,
    LoRALinear,
    adapted_modules,
    apply_lora,
    load_adapter,
    lora_parameters,
    merge_and_save,
    read_adapter_config,
    save_adapter,
)
from qkern_train.model import ModelConfig, build_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# tiny matmuls: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> ModelConfig:
    base = dict(
        architecture="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=[2], torch_dtype="float32",
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_config(**kw)).eval()


def randomize_b(model, seed=1):
    """Nonzero B so the adapter changes the output (B = 0 at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapted_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def ids(batch=2, seq=7, vocab=96, seed=3):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_apply_lora_freezes_base_and_inits_like_peft():
    model = tiny_model()
    x = ids()
    before = model(x)
    names = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS), seed=0)
    assert len(names) == 2 * 7 and names[0] == "layers.0.self_attn.q_proj"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B")}
    assert len(lora_parameters(model)) == 28
    for m in adapted_modules(model).values():
        assert isinstance(m, LoRALinear) and m.scaling == 2.0
        assert (m.lora_B == 0).all() and m.lora_A.dtype == torch.float32
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt(5)) on (r, in)
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.5 * bound
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B = 0: exactly the base


def test_seeded_init_same_for_dense_and_nf4_modules():
    dense = tiny_model()
    nf4 = tiny_model()
    for name, m in list(nf4.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            parent, _, child = name.rpartition(".")
            setattr(nf4.get_submodule(parent), child, qkern.QLoRALinear.from_linear(m))
    cfg = LoraConfig(r=4, alpha=4, init_lora_weights="gaussian", use_rslora=True)
    apply_lora(dense, cfg, seed=7)
    apply_lora(nf4, cfg, seed=7)
    for (n1, a), (n2, b) in zip(adapted_modules(dense).items(), adapted_modules(nf4).items()):
        assert n1 == n2 and isinstance(b, qkern.QLoRALinear)
        assert torch.equal(a.lora_A, b.lora_A) and a.scaling == b.scaling == 2.0
    other = tiny_model()
    apply_lora(other, cfg, seed=8)
    first = next(iter(adapted_modules(other).values()))
    assert not torch.equal(first.lora_A, next(iter(adapted_modules(dense).values())).lora_A)


def test_lora_linear_math_and_dropout():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5, bias=True)
    m = LoRALinear(lin)
    m.add_adapter(3, 6.0, dropout=0.0, use_rslora=False)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(4, 8, dtype=torch.float64)
    w = lin.weight.double() + 2.0 * m.lora_B.double() @ m.lora_A.double()
    want = x @ w.t() + lin.bias.double()
    got = m.double()(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(m.merged_weight(torch.float64), w)
    m.lora_dropout = 0.5
    m.train()
    assert not torch.allclose(m(x), want)  # dropout active in training
    m.eval()
    torch.testing.assert_close(m(x), want)


def test_target_errors():
    with pytest.raises(ValueError, match=r"matched no module; linear modules: \['down_proj'"):
        apply_lora(tiny_model(), LoraConfig(target_modules=["qproj"]))
    model = tiny_model()
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    only = tiny_model()
    names = apply_lora(only, LoraConfig(r=2, target_modules=["v_proj"], layers_to_transform=[1]))
    assert names == ["layers.1.self_attn.v_proj"]


def test_adapter_files_and_round_trip(tmp_path):
    model = tiny_model()
    cfg = LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], train_lm_head=True
    )
    apply_lora(model, cfg, seed=0)
    randomize_b(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    save_adapter(model, tmp_path / "a", cfg, base_path="base/dir")
    conf = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    for key in (
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "bias",
        "use_rslora",
        "use_dora",
        "fan_in_fan_out",
        "base_model_name_or_path",
        "inference_mode",
        "init_lora_weights",
        "modules_to_save",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
    ):
        assert key in conf, key
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8
    assert conf["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert conf["modules_to_save"] == ["lm_head"]
    with safe_open(str(tmp_path / "a" / ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    assert a.shape == (4, 32) and b.shape == (32, 4)  # A (r, in), B (out, r)
    assert "base_model.model.lm_head.weight" in keys and len(keys) == 2 * 2 * 3 + 1
    x = ids()
    want = model(x)
    fresh = tiny_model()  # same base weights, no adapter
    got_cfg = load_adapter(fresh, tmp_path / "a")
    assert got_cfg.r == 4 and got_cfg.train_lm_head
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in fresh.parameters())  # inference by default


def test_load_adapter_errors(tmp_path):
    model = tiny_model()
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    apply_lora(model, cfg)
    save_adapter(model, tmp_path / "a", cfg)
    other = tiny_model()
    apply_lora(other, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"has shape \(4, 32\), the model expects \(2, 32\)"):
        load_adapter(other, tmp_path / "a")
    other = tiny_model()
    apply_lora(other, LoraConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="does not fit this model: missing"):
        load_adapter(other, tmp_path / "a")
    conf = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(ValueError, match="unsupported adapter features: use_dora"):
        read_adapter_config(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_model(), tmp_path / "missing")


@pytest.mark.parametrize("nf4", [False, True])
def test_merged_model_logits_equal_base_plus_adapter(tmp_path, nf4):
    base = tiny_model(tie_word_embeddings=True)
    save_model(base, tmp_path / "base", dtype=torch.float32)
    model = load_model(tmp_path / "base", load_in_4bit=nf4, dtype=torch.float32, device="cpu")
    cfg = LoraConfig(r=4, alpha=8)
    apply_lora(model, cfg, seed=0)
    randomize_b(model)
    x = ids()
    want = model(x)
    merge_and_save(model, tmp_path / "merged", dtype=torch.float32)
    assert not adapted_modules(model)
    merged = load_model(tmp_path / "merged", dtype=torch.float32, device="cpu")
    got = merged(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if nf4:  # the adapter really is in the merged weights
        plain = load_model(tmp_path / "base", load_in_4bit=True, dtype=torch.float32, device="cpu")
        assert (plain(x) - want).abs().max() > 1e-3


def _hf_twin(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_adapter_loads_in_hf_peft_with_same_outputs(tmp_path):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = tiny_model()
    save_model(model, tmp_path / "base", dtype=torch.float32)
    cfg = LoraConfig(r=4, alpha=16, use_rslora=True)
    apply_lora(model, cfg, seed=0)
    randomize_b(model)
    save_adapter(model, tmp_path / "adapter", cfg, base_path=str(tmp_path / "base"))
    x = ids()
    ours = model(x)
    hf = peft.PeftModel.from_pretrained(_hf_twin(tmp_path / "base"), str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = hf(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    plain = tiny_model()(x)
    assert (plain - ours).abs().max() > 1e-3  # the adapter matters for the comparison


def test_hf_peft_adapter_loads_in_ours(tmp_path):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = tiny_model()
    save_model(model, tmp_path / "base", dtype=torch.float32)
    hf = _hf_twin(tmp_path / "base")
    pcfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        init_lora_weights="gaussian",
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(hf, pcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(str(tmp_path / "peft"))
    x = ids()
    with torch.no_grad():
        want = pm(input_ids=x).logits
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_save_checks_the_config_and_can_derive_it(tmp_path):
    model = tiny_model()
    apply_lora(
        model,
        LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    )
    with pytest.raises(ValueError, match=r"does not describe the adapter of layers\.1"):
        save_adapter(model, tmp_path / "a", LoraConfig(r=16, alpha=16))
    save_adapter(model, tmp_path / "a")  # config derived from the model
    cfg = read_adapter_config(tmp_path / "a")
    assert (cfg.r, cfg.scaling, cfg.target_modules, cfg.layers_to_transform) == (
        4,
        2.0,
        ["q_proj", "up_proj"],
        [1],
    )
    fresh = tiny_model()
    load_adapter(fresh, tmp_path / "a")
    assert list(adapted_modules(fresh)) == list(adapted_modules(model))


@pytest.mark.parametrize("tied", [True, False])
def test_trained_embeddings_keep_float32_masters(tied):
    """A fully trained embedding / LM head of a bf16 model trains a float32 copy: an Adam step
    of lr 1e-5 moves it (in bf16 most of those updates would round to nothing), and the model
    still computes in bf16."""
    model = build_model(tiny_config(tie_word_embeddings=tied), torch.bfloat16).train()
    apply_lora(model, LoraConfig(r=2, alpha=2, train_embeddings=True, train_lm_head=True))
    full = [model.embed_tokens.weight] + ([] if tied else [model.lm_head.weight])
    assert all(w.dtype == torch.float32 and w.requires_grad for w in full)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)
    )
    assert model(ids).dtype == torch.bfloat16
    before = [w.detach().clone() for w in full]
    opt = torch.optim.AdamW(full, lr=1e-5, weight_decay=0.0)
    model.loss(ids, ids).backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in full)
    opt.step()
    for w, b in zip(full, before):
        moved = w.detach() != b
        assert moved.any()
        # the same update applied to the bf16 weight would leave most moved entries unchanged
        in_bf16 = b.to(torch.bfloat16) + (w.detach() - b).to(torch.bfloat16)
        assert (in_bf16[moved] == b.to(torch.bfloat16)[moved]).float().mean() > 0.5
