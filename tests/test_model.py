"""qkern_train.model: config parsing, parity with transformers on tiny random models (fp32, CPU),
NF4 loading against transformers with the same dequantized weights, packed rows, the loss and
the gradient-checkpointing hook."""

from __future__ import annotations

import json

import pytest
import torch

import qkern
from qkern_train.checkpoint import load_model
from qkern_train.generate import GenerationConfig, generate_ids
from qkern_train.model import ModelConfig, build_model, count_parameters
from tests.helpers import rel_err

VOCAB = 96
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that the scaling changes most of the 8 frequencies of head_dim 16
    "original_max_position_embeddings": 16,
}


def tiny_config(**kw) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    base.update(kw)
    return ModelConfig(**base)


def hf_model(kind: str, tied: bool = False, sliding_window: int | None = 4, seed: int = 0):
    """A tiny random transformers model (eager attention) with every weight randomized, so that
    norms, biases and the RoPE scaling all matter."""
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            **common, rope_scaling=dict(LLAMA3_SCALING), rope_theta=500000.0
        )
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=sliding_window)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, rms_norm_eps=1e-5)
    else:
        raise AssertionError(kind)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def save_hf(model, path) -> None:
    model.save_pretrained(str(path), safe_serialization=True)


@pytest.mark.parametrize(
    "kind,tied",
    [("llama", True), ("llama", False), ("mistral", False), ("qwen2", False), ("qwen2", True)],
)
def test_parity_with_transformers(tmp_path, kind, tied):
    hf = hf_model(kind, tied)
    save_hf(hf, tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, device="cpu")
    assert (ours.lm_head is None) == tied
    assert count_parameters(ours) == hf.num_parameters()
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # greedy generation with the KV cache gives transformers' tokens
    prompt = ids[0, :5]
    n_new = 10
    with torch.no_grad():
        hf_out = hf.generate(
            prompt[None], max_new_tokens=n_new, do_sample=False, pad_token_id=0,
            eos_token_id=None,
        )[0, 5:].tolist()  # fmt: skip
    ours_out = generate_ids(
        ours, [prompt.tolist()], GenerationConfig(max_new_tokens=n_new, eos_token_ids=[])
    )[0]
    assert ours_out == hf_out


def test_mistral_window_matters(tmp_path):
    """The sliding window (4) is shorter than the sequence (12): outputs differ from full
    attention in transformers, and ours follows."""
    hf = hf_model("mistral", sliding_window=4)
    full = hf_model("mistral", sliding_window=None)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        a, b = hf(ids).logits, full(ids).logits
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)  # first W positions see everything
    assert rel_err(a[:, 6:], b[:, 6:]) > 1e-3
    save_hf(hf, tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, device="cpu")
    assert ours.layers[0].self_attn.window == (3, 0)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_nf4_parity_with_transformers(tmp_path, kind):
    """load_in_4bit: our NF4 model equals transformers holding our dequantized weights."""
    hf = hf_model(kind)
    save_hf(hf, tmp_path)
    ours = load_model(tmp_path, load_in_4bit=True, dtype=torch.float32, device="cpu")
    n_q = 0
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, qkern.QLoRALinear):
                target = hf.get_submodule("model." + name)
                w = module.base_weight(torch.float32)
                assert rel_err(w, target.weight) < 0.15  # NF4 is ~10% relative error
                target.weight.copy_(w)
                if module.bias is not None:
                    torch.testing.assert_close(module.bias, target.bias)
                n_q += 1
    assert n_q == 2 * 7
    assert isinstance(ours.embed_tokens.weight, torch.nn.Parameter)
    assert ours.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
        hf_out = hf.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours_out = generate_ids(
        ours, [ids[0, :4].tolist()], GenerationConfig(max_new_tokens=6, eos_token_ids=[])
    )[0]
    assert ours_out == hf_out[0, 4:].tolist()


# ------------------------------------------------------------------------------------------------
# config parsing
# ------------------------------------------------------------------------------------------------


def _hf_dict(**kw) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "silu",
    }
    d.update(kw)
    return d


def test_config_rope_forms_agree():
    old = ModelConfig.from_hf(_hf_dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)))
    new = ModelConfig.from_hf(_hf_dict(rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0}))
    oldest = ModelConfig.from_hf(
        _hf_dict(rope_theta=500000.0, rope_scaling={**LLAMA3_SCALING, "type": "llama3"})
    )
    assert old == new
    assert oldest.rope_scaling["rope_type"] == "llama3" and oldest.rope_theta == 500000.0
    assert old.rope_theta == 500000.0 and old.rope_scaling["factor"] == 8.0
    default = ModelConfig.from_hf(
        _hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    )
    assert default.rope_scaling is None and default.rope_theta == 1e6
    # round trip through to_hf
    assert ModelConfig.from_hf(old.to_hf()) == old


def test_config_defaults_and_lists():
    c = ModelConfig.from_hf(_hf_dict(num_key_value_heads=None, eos_token_id=[5, 7]))
    assert c.num_key_value_heads == 4 and c.head_dim == 16
    assert c.eos_token_id == [5, 7]
    c = ModelConfig.from_hf(_hf_dict(eos_token_id=3, head_dim=32))
    assert c.eos_token_id == [3] and c.head_dim == 32


def test_config_qwen2_sliding_layers():
    d = _hf_dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=8)
    assert ModelConfig.from_hf(d).sliding_window is None  # use_sliding_window defaults to off
    c = ModelConfig.from_hf({**d, "use_sliding_window": True, "max_window_layers": 1})
    assert c.attention_bias
    assert [c.layer_window(i) for i in range(2)] == [None, (7, 0)]


def test_config_errors():
    with pytest.raises(ValueError, match=r"unsupported architecture 'GPT2LMHeadModel'.*Llama"):
        ModelConfig.from_hf(_hf_dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    with pytest.raises(ValueError, match="hidden_act must be 'silu'.*'gelu'"):
        ModelConfig.from_hf(_hf_dict(hidden_act="gelu"))
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        ModelConfig.from_hf(_hf_dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="lacks the required key 'vocab_size'"):
        d = _hf_dict()
        del d["vocab_size"]
        ModelConfig.from_hf(d)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        tiny_config(num_key_value_heads=3)


def test_config_from_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_hf_dict()))
    assert ModelConfig.from_file(tmp_path).vocab_size == 128
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_file(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------
# forward variants
# ------------------------------------------------------------------------------------------------


def test_packed_rows_equal_separate_rows():
    """Packed documents with cu_seqlens: same logits as running each document alone."""
    torch.manual_seed(0)
    model = build_model(tiny_config(sliding_window=3, architecture="mistral")).eval()
    docs = [torch.randint(0, VOCAB, (n,)) for n in (5, 1, 7)]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], cu_seqlens=cu)
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed[0], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D and end at the token count 13"):
        model(torch.cat(docs)[None], cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32))


def test_loss_matches_logits_cross_entropy():
    torch.manual_seed(0)
    model = build_model(tiny_config(tie_word_embeddings=True))
    ids = torch.randint(0, VOCAB, (2, 9))
    labels = torch.randint(0, VOCAB, (2, 9))
    labels[0, :3] = -100
    loss = model.loss(ids, labels)
    want = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    summed = model.loss(ids, labels, num_items=100)
    torch.testing.assert_close(summed, want * (labels >= 0).sum() / 100, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels shape"):
        model.loss(ids, labels[:, :4])


def test_gradient_checkpointing_hook():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    ids = torch.randint(0, VOCAB, (1, 8))
    model.loss(ids, ids).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(len(args))
        # no dropout anywhere: the recompute needs no stashed RNG state
        assert kwargs == {"preserve_rng_state": False}
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    model.gradient_checkpointing = True
    model.checkpoint_fn = counting_checkpoint
    model.train()
    model.loss(ids, ids).backward()
    assert len(calls) == model.config.num_hidden_layers
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=n)
    model.eval()  # not in training: the hook is not used
    calls.clear()
    model.loss(ids, ids)
    assert not calls


def test_build_model_init_and_inputs():
    torch.manual_seed(0)
    cfg = tiny_config(attention_bias=True)
    model = build_model(cfg, dtype=torch.float16)
    assert model.embed_tokens.weight.dtype == torch.float16
    w = model.layers[0].mlp.up_proj.weight.float()
    assert 0.015 < w.std().item() < 0.025
    assert torch.all(model.layers[0].self_attn.q_proj.bias == 0)
    assert torch.all(model.norm.weight == 1)
    assert model._inv_freq_cpu.dtype == torch.float32  # RoPE frequencies never rounded
    assert count_parameters(model) == cfg.num_parameters()
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# the Triton kernels inside the model
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_triton_path_matches_reference_cpu():
    """The whole model through the Triton kernels (interpreter on CPU, fp32): forward, loss and
    gradients equal the reference path."""
    torch.manual_seed(0)
    model = build_model(tiny_config(architecture="mistral", sliding_window=4))
    ids = torch.randint(0, VOCAB, (1, 9))
    ref_loss = model.loss(ids, ids)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with qkern.backend("triton"):
        loss = model.loss(ids, ids)
        loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_gpu_bf16_close_to_transformers(tmp_path, kind):
    """bf16 on CUDA (Triton kernels) is as close to the fp32 logits as transformers' bf16 is."""
    hf = hf_model(kind)
    save_hf(hf, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 40))  # longer than Mistral's window of 4
    with torch.no_grad():
        ref = hf(ids).logits
        hf_bf16 = hf.to("cuda", torch.bfloat16)(ids.cuda()).logits
    ours = load_model(tmp_path, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        got = ours(ids.cuda())
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) <= 2 * rel_err(hf_bf16, ref) + 1e-3
    nf4 = load_model(tmp_path, load_in_4bit=True, dtype=torch.bfloat16, device="cuda")
    # the CPU model must hold the same 4-bit codes: quantize the same bf16 weights (the quantizer
    # is bit-exact across devices), then compute in fp32. Quantizing the fp32 weights instead
    # moves every weight near a code midpoint to the other code (0.068 rel. error on its own).
    cpu_nf4 = load_model(tmp_path, load_in_4bit=True, dtype=torch.bfloat16, device="cpu").float()
    with torch.no_grad():
        assert rel_err(nf4(ids.cuda()), cpu_nf4(ids)) <= 2 * rel_err(hf_bf16, ref) + 1e-3


@pytest.mark.gpu
def test_gpu_fp32_matches_cpu_reference():
    torch.manual_seed(0)
    model = build_model(tiny_config(architecture="qwen2", attention_bias=True)).eval()
    ids = torch.randint(0, VOCAB, (3, 33))
    cu = torch.tensor([0, 10, 40, 99], dtype=torch.int32)
    with torch.no_grad():
        ref = model(ids)
        ref_packed = model(ids.view(1, -1), cu_seqlens=cu)
        model.cuda()
        got = model(ids.cuda())
        got_packed = model(ids.view(1, -1).cuda(), cu_seqlens=cu.cuda())
    assert rel_err(got, ref) < 1e-5
    assert rel_err(got_packed, ref_packed) < 1e-5


@pytest.mark.gpu
def test_gpu_training_step_replays_as_cuda_graph():
    """A whole QLoRA training step (NF4 base, LoRA, checkpointing, fused linear CE, AdamW) can be
    captured as one CUDA graph, and replaying it trains exactly as the eager steps do: no kernel
    may sync with the host, allocate outside the graph's pool, or launch on another stream."""
    import functools

    from qkern_train.checkpoint import quantize_model
    from qkern_train.cuda_graph import capture_train_step, side_stream_steps
    from qkern_train.lora import LoraConfig, apply_lora, lora_parameters

    torch.manual_seed(0)
    model = build_model(tiny_config(), torch.bfloat16, "cuda")
    quantize_model(model)
    apply_lora(model, LoraConfig(r=4, alpha=8), seed=0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    model.train()
    model.gradient_checkpointing = True
    model.checkpoint_fn = functools.partial(
        torch.utils.checkpoint.checkpoint, use_reentrant=False, preserve_rng_state=False
    )
    params = lora_parameters(model)
    ids = torch.randint(0, VOCAB, (2, 48), device="cuda")
    labels = torch.roll(ids, -1, 1)
    start = [p.detach().clone() for p in params]
    side = torch.cuda.Stream()

    def steps(n: int, graph: bool) -> list[float]:
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
        # eager steps (the graph's warm-up) off the legacy stream
        losses = side_stream_steps(model, opt, ids, labels, 2 if graph else n, side)
        if graph:
            g, static = capture_train_step(model, opt, ids, labels)
            for _ in range(n - 2):
                g.replay()
                losses.append(static.detach().clone())
        torch.cuda.synchronize()
        return [float(x) for x in losses]

    eager = steps(6, graph=False)
    replayed = steps(6, graph=True)
    assert eager[-1] < eager[0]  # it trains
    assert replayed == eager
