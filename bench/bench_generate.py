"""Generation throughput of qkern_train (prefill and KV-cache decode) on a Llama-3.2-1B-shaped
random model, bf16 and NF4, against transformers (sdpa, same weights) when importable.

Model: hidden 2048, intermediate 8192, 16 layers, 32/8 heads (head_dim 64), vocab 128256, tied
embeddings: 1.236e9 parameters, of which 0.973e9 in projections (P_lin) and 0.263e9 in the
embedding (which is also the LM head).

Floors on one H100 (~700 TFLOP/s bf16, ~3000 GB/s copy); the larger one is the floor.

prefill, B=1, S=2048 (LM head on the last token only):
  FLOPs 2·P_lin·S + 2·S²·hidden·layers (causal attention) = 3.99e12 + 0.27e12 = 4.26e12
  -> 6.1 ms (~335k tokens/s); bytes: the weights once, 2.47 GB bf16 -> 0.82 ms. Compute bound.
decode, one step (every weight read once per step, whatever B; KV cache ~1 MB per row at
  S~150 is negligible; FLOPs 2·1.236e9·B -> 0.004 ms per row):
  bf16: 1.95 GB projections + 0.53 GB LM head = 2.47 GB -> 0.82 ms/step
        -> 1220 tokens/s at B=1, 9760 at B=8.
  NF4:  0.973e9 · 0.5156 B = 0.50 GB + 0.53 GB LM head (bf16) = 1.03 GB -> 0.34 ms/step
        -> 2900 tokens/s at B=1, 23000 at B=8.
Our decode step launches ~15 kernels per layer from Python (no CUDA graphs), so B=1 decode is
expected to be launch/host bound, far from the byte floor; the ratio to transformers is the
number to watch.
"""

from __future__ import annotations

import time

import torch

from bench.common import Ceilings, Row, bench_ms

SHAPE = dict(
    architecture="llama",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    eos_token_id=[128001],
)
DEVICE = "cuda"
PREFILL_S = 2048
DECODE_PROMPT = 16
NEW_TOKENS = 128


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _weight_bytes(model) -> int:
    """Bytes a decode step must read: every parameter and NF4 buffer once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        st = getattr(m, "quant_state", None)
        if st is not None:
            total += st.absmax.numel() * st.absmax.element_size()
            if st.nested_absmax is not None:
                total += st.nested_absmax.numel() * 4
    return total


def _prefill_flops(cfg) -> float:
    p_lin = (
        cfg.num_parameters()
        - cfg.vocab_size * cfg.hidden_size
        - cfg.hidden_size * (2 * cfg.num_hidden_layers + 1)
    )
    attn = 2.0 * PREFILL_S**2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return 2.0 * p_lin * PREFILL_S + attn + 2.0 * cfg.vocab_size * cfg.hidden_size


def _hf_model(model):
    """transformers LlamaForCausalLM (sdpa) holding the same bf16 weights, or None."""
    try:
        import transformers
    except Exception:  # not installed on this machine
        return None
    from qkern_train.checkpoint import iter_hf_tensors

    cfg = transformers.LlamaConfig(**{
        k: v for k, v in model.config.to_hf().items() if k not in ("architectures",)
    })  # fmt: skip
    with torch.device(DEVICE):
        hf = transformers.LlamaForCausalLM._from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    state = dict(iter_hf_tensors(model, torch.bfloat16))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time_decode(run_generate, batch: int) -> tuple[float, float]:
    """(seconds for prefill + NEW_TOKENS steps, seconds for the prefill alone)."""
    # warm-up over the full length: the attention kernels autotune once per power-of-two bucket of
    # the KV length (16 -> 144 crosses four), which must not land in the timed run
    run_generate(batch, NEW_TOKENS)
    _sync()
    t0 = time.perf_counter()
    run_generate(batch, 1)
    _sync()
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_generate(batch, NEW_TOKENS)
    _sync()
    return time.perf_counter() - t0, t_prefill


def _cases(model, label: str, hf=None) -> list[Row]:
    from qkern_train.generate import GenerationConfig, generate_ids
    from qkern_train.model import KVCache

    cfg = model.config
    rows: list[Row] = []
    wbytes = _weight_bytes(model)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, PREFILL_S), device=DEVICE, generator=g)

    @torch.inference_mode()
    def prefill():
        cache = KVCache(cfg, 1, PREFILL_S + 1, model.embed_tokens.weight.dtype, DEVICE)
        return model.lm_logits(model.hidden_states(ids, kv_cache=cache)[:, -1])

    logits = prefill()
    extra = {"tokens_per_s": 0.0}
    if hf is not None:
        with torch.inference_mode():
            ref = hf(ids, logits_to_keep=1).logits[:, -1]
        extra["relerr_vs_hf"] = _rel(logits, ref)
    t = bench_ms(prefill, warmup=5, rep=50)
    extra["tokens_per_s"] = PREFILL_S / t * 1e3
    case = f"prefill B1 S{PREFILL_S} {label}"
    flops = _prefill_flops(cfg)
    rows.append(Row("generate", case, "qkern", t, bytes=wbytes, flops=flops, extra=extra))
    if hf is not None:
        with torch.inference_mode():
            t_hf = bench_ms(lambda: hf(ids, logits_to_keep=1), warmup=5, rep=50)
        rows.append(
            Row("generate", case, "transformers", t_hf, bytes=wbytes, flops=flops,
                extra={"tokens_per_s": PREFILL_S / t_hf * 1e3, "qkern_speedup": t_hf / t})
        )  # fmt: skip

    prompts = torch.randint(0, cfg.vocab_size, (8, DECODE_PROMPT), generator=g.manual_seed(1),
                            device=DEVICE).tolist()  # fmt: skip

    def ours(batch: int, n: int, ragged: bool = False):
        ps = [p[: DECODE_PROMPT - (i % 4 if ragged else 0)] for i, p in enumerate(prompts[:batch])]
        return generate_ids(model, ps, GenerationConfig(max_new_tokens=n, eos_token_ids=[]))

    def theirs(batch: int, n: int):
        x = torch.tensor(prompts[:batch], device=DEVICE)
        with torch.inference_mode():
            return hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)  # fmt: skip

    for batch, ragged in ((1, False), (8, False), (8, True)):
        total, pre = _time_decode(lambda b, n: ours(b, n, ragged), batch)  # noqa: B023
        step_ms = (total - pre) / (NEW_TOKENS - 1) * 1e3
        case = f"decode B{batch}{' ragged' if ragged else ''} new{NEW_TOKENS} {label}"
        extra = {"tokens_per_s": batch / step_ms * 1e3, "prefill_ms": pre * 1e3}
        if hf is not None and not ragged:
            a = ours(batch, 16)
            b = theirs(batch, 16)[:, DECODE_PROMPT:].tolist()
            # bf16: greedy paths may part after a near-tie; report how far they agree
            agree = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), 16)
                     for x, y in zip(a, b)]  # fmt: skip
            extra["tokens_equal_hf_of16"] = min(agree)
        rows.append(Row("generate", case, "qkern", step_ms, bytes=wbytes,
                        flops=2.0 * cfg.num_parameters() * batch, extra=extra))  # fmt: skip
        if hf is not None and not ragged:
            total, pre = _time_decode(theirs, batch)
            hf_ms = (total - pre) / (NEW_TOKENS - 1) * 1e3
            rows.append(Row("generate", case, "transformers", hf_ms, bytes=wbytes,
                            flops=2.0 * cfg.num_parameters() * batch,
                            extra={"tokens_per_s": batch / hf_ms * 1e3,
                                   "qkern_speedup": hf_ms / step_ms}))  # fmt: skip
    return rows


def run(ceilings: Ceilings | None = None) -> list[Row]:
    from qkern_train.checkpoint import quantize_model
    from qkern_train.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**SHAPE), dtype=torch.bfloat16, device=DEVICE).eval()
    hf = _hf_model(model)
    rows = _cases(model, "bf16", hf)
    del hf
    torch.cuda.empty_cache()
    quantize_model(model)
    torch.cuda.empty_cache()
    rows += _cases(model, "nf4")
    return rows


if __name__ == "__main__":
    from bench.common import format_table, measure_ceilings

    c = measure_ceilings()
    print(format_table(run(c), c))
