"""Llama-family decoder-only transformer built on qkern ops.

One file: the config dataclass, then the modules, then the KV cache used by generation.

Supported checkpoints (``config.json`` ``model_type`` / ``architectures``):

* ``llama`` (Llama 2, Llama 3 / 3.1 / 3.2): GQA, ``llama3`` (and ``linear``) RoPE scaling, tied or
  untied embeddings, optional ``attention_bias`` / ``mlp_bias``.
* ``mistral``: sliding-window attention (``sliding_window`` W → a query at i sees keys i-W+1..i).
* ``qwen2`` (Qwen2 / Qwen2.5): bias on q/k/v (not o), sliding window only when
  ``use_sliding_window`` is true, and then only on layers ``>= max_window_layers``.

Every hot op goes through qkern's public functions, so the Triton kernels plug in without model
changes (on CPU tensors their pure-PyTorch references run):

* ``qkern.rms_norm`` (through ``qkern.RMSNorm``) for the two norms per layer and the final norm;
* ``qkern.rope_cos_sin`` once per forward, ``qkern.apply_rope`` on q and k in every layer;
* ``qkern.flash_attention`` (dense, varlen for packed rows, window for Mistral, q of one token
  against the cache when decoding);
* ``qkern.swiglu`` for silu(gate) * up;
* ``qkern.QLoRALinear`` for NF4 projections, and ``qkern.lora_qkv`` / ``qkern.lora_mlp`` (fused
  blocks) when every projection of the block is a QLoRALinear whose adapter (if any) draws no
  dropout;
* ``qkern.fused_linear_cross_entropy`` for the loss (never materializes the T x V logits).

Only ``hidden_act == "silu"`` exists in these families; anything else is refused.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import qkern

# model_type -> the HF class name written into "architectures"
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def _supported_list() -> str:
    return ", ".join(f"{cls} (model_type {mt!r})" for mt, cls in ARCHITECTURES.items())


@dataclass
class ModelConfig:
    """Shape and numerics of a model; ``from_hf`` reads an HF ``config.json`` dict."""

    architecture: str = "llama"  # "llama" | "mistral" | "qwen2"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 32.0, ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2: True); o_proj never has one
    mlp_bias: bool = False
    sliding_window: int | None = None  # keys a query may see, itself included
    # per-layer "full_attention" | "sliding_attention"; None: every layer uses sliding_window
    layer_types: list[str] | None = None
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {_supported_list()}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )

    # -- HF config.json --------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """Parse an HF ``config.json`` dict (``rope_scaling`` and ``rope_parameters`` forms)."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in ARCHITECTURES:
            known = [mt for mt, cls_name in ARCHITECTURES.items() if cls_name in archs]
            if not known:
                what = archs[0] if archs else (model_type or "<none given>")
                raise ValueError(
                    f"unsupported architecture {what!r}; supported: {_supported_list()}"
                )
            model_type = known[0]
        act = d.get("hidden_act", d.get("hidden_activation", "silu"))
        if act != "silu":
            raise ValueError(f"hidden_act must be 'silu' for {model_type} models, got {act!r}")

        # RoPE: newer files keep rope_theta inside rope_parameters, older ones at the top level
        # with a separate rope_scaling dict ("type" in the oldest ones).
        params = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or None
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        merged = {**(scaling or {}), **{k: v for k, v in params.items() if k != "rope_theta"}}
        if "type" in merged and "rope_type" not in merged:
            merged["rope_type"] = merged.pop("type")
        merged.pop("type", None)
        rope_type = merged.get("rope_type", "default")
        from qkern.rope import SUPPORTED_ROPE_TYPES

        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if d.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        rope_scaling = None if rope_type == "default" else merged

        sliding = d.get("sliding_window")
        layer_types = d.get("layer_types")
        if model_type == "qwen2":
            if not d.get("use_sliding_window", False):
                sliding, layer_types = None, None
            elif layer_types is None:
                mwl = d.get("max_window_layers", d["num_hidden_layers"])
                layer_types = [
                    "sliding_attention" if i >= mwl else "full_attention"
                    for i in range(d["num_hidden_layers"])
                ]
        elif model_type == "llama":
            sliding, layer_types = None, None
        if sliding is None:
            layer_types = None
        eos = d.get("eos_token_id")
        eos_list = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        dtype = d.get("torch_dtype", d.get("dtype")) or "bfloat16"
        try:
            return cls(
                architecture=model_type,
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads"),
                head_dim=d.get("head_dim"),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=rope_scaling,
                max_position_embeddings=d.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias")),
                mlp_bias=bool(d.get("mlp_bias", False)),
                sliding_window=sliding,
                layer_types=layer_types,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos_list,
                pad_token_id=d.get("pad_token_id"),
                torch_dtype=str(dtype).replace("torch.", ""),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the required key {e.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (a file, or a directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(d)

    def to_hf(self) -> dict:
        """An HF ``config.json`` dict (both RoPE forms, so old and new readers agree)."""
        rope_params = {"rope_type": "default", **(self.rope_scaling or {})}
        rope_params["rope_theta"] = self.rope_theta
        d = {
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": rope_params,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0]
            if len(self.eos_token_id) == 1
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
        }
        if self.architecture == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        if self.architecture == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.architecture == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            if self.layer_types is not None and "sliding_attention" in self.layer_types:
                d["max_window_layers"] = self.layer_types.index("sliding_attention")
        if self.layer_types is not None:
            d["layer_types"] = list(self.layer_types)
        return d

    def layer_window(self, i: int) -> tuple[int, int] | None:
        """flash_attention ``window`` of layer ``i``: (W - 1, 0) under a sliding window W."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[i] != "sliding_attention":
            return None
        return (self.sliding_window - 1, 0)

    def num_parameters(self) -> int:
        """Parameter count of the 16-bit model this config describes."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size
        mlp += (2 * self.intermediate_size + h) if self.mlp_bias else 0
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------


def _is_qlora(m: nn.Module) -> bool:
    return isinstance(m, qkern.QLoRALinear)


def _fusable(*mods: nn.Module) -> bool:
    """All NF4 linears whose adapters (if any) draw no dropout: the fused qkern blocks apply."""
    return all(
        _is_qlora(m) and (m.lora_A is None or not m.lora_dropout or not m.training) for m in mods
    )


class Attention(nn.Module):
    """GQA self-attention: q/k/v projections, RoPE, flash attention, output projection."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.window = config.layer_window(layer_idx)
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        if _fusable(self.q_proj, self.k_proj, self.v_proj):
            q, k, v = qkern.lora_qkv(x, self.q_proj, self.k_proj, self.v_proj)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        v = v.view(b, s, self.num_kv_heads, self.head_dim)
        q, k = qkern.apply_rope(q, k, cos, sin)
        if kv_cache is not None:
            o = kv_cache.attend(self.layer_idx, q, k, v, self.window)
        elif cu_seqlens is not None:
            # packed documents: (B*S, H, D) rows, attention never crosses a cu_seqlens boundary
            o = qkern.flash_attention(
                q.reshape(b * s, self.num_heads, self.head_dim),
                k.reshape(b * s, self.num_kv_heads, self.head_dim),
                v.reshape(b * s, self.num_kv_heads, self.head_dim),
                causal=True,
                window=self.window,
                cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen,
            )
        else:
            o = qkern.flash_attention(q, k, v, causal=True, window=self.window)
        return self.o_proj(o.reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fusable(self.gate_proj, self.up_proj, self.down_proj):
            return qkern.lora_mlp(x, self.gate_proj, self.up_proj, self.down_proj)
        return self.down_proj(qkern.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = qkern.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = qkern.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cu_seqlens, max_seqlen, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position ids (1, total) restarting at 0 at every document start in ``cu_seqlens``."""
    idx = torch.arange(total, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].long()
    doc = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)
    return (idx - starts[doc]).unsqueeze(0)


class Transformer(nn.Module):
    """Decoder-only LM with HF-like module names (``embed_tokens``, ``layers[i]...``, ``norm``,
    ``lm_head``; ``lm_head`` is None when the embeddings are tied)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = qkern.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # RoPE frequencies in float32, deliberately not a buffer: module.to(bfloat16) must not
        # round them (positions up to 128k times a rounded frequency would be far off).
        from qkern.rope import rope_inv_freq

        with torch.device("cpu"):
            self._inv_freq_cpu = rope_inv_freq(
                config.head_dim, config.rope_theta, config.rope_scaling
            )
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.gradient_checkpointing = False
        # the fused cross-entropy's logits buffer budget in bytes (None: qkern's default)
        self.loss_chunk_bytes: int | None = None
        # called like torch.utils.checkpoint.checkpoint(layer, *inputs, preserve_rng_state=...)
        self.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def lm_weight(self) -> torch.Tensor:
        """The (V, H) output projection: lm_head.weight, or the embedding when tied."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        # a trained head/embedding may hold a float32 master copy (qkern_train.lora): compute in
        # the model's dtype (the norms' dtype); the cast is differentiable, so grads reach it
        return w if w.dtype == self.norm.weight.dtype else w.to(self.norm.weight.dtype)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq[device]

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of final-normed hidden states."""
        return F.linear(hidden, self.lm_weight)

    # -- forward ---------------------------------------------------------------------------------

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, S, H) of ``input_ids`` (B, S).

        Packed rows: ``input_ids`` (1, T) with int32 ``cu_seqlens`` (documents + 1); positions
        then restart at 0 per document unless ``position_ids`` are given. With ``kv_cache`` the
        new tokens are appended to the cache (see :class:`KVCache`) and positions continue from
        each row's cached length.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seq) tensor of token ids")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        b, s = input_ids.shape
        if cu_seqlens is not None and max_seqlen is None:
            # checking needs the values on the host (a sync on CUDA): done only when the caller
            # did not pass max_seqlen, which promises cu_seqlens is right (as flash_attention does)
            if cu_seqlens.dim() != 1 or int(cu_seqlens[-1]) != b * s:
                raise ValueError(
                    f"cu_seqlens must be 1-D and end at the token count {b * s}, got "
                    f"{cu_seqlens.tolist() if cu_seqlens.numel() < 20 else cu_seqlens.shape}"
                )
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if kv_cache is not None:
            pos = kv_cache.begin(b, s, cu_seqlens)
            position_ids = pos if position_ids is None else position_ids
        elif position_ids is None:
            if cu_seqlens is not None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, b * s).view(b, s)
            else:
                position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        cos, sin = qkern.rope_cos_sin(position_ids, self.inv_freq(input_ids.device))
        h = self.embed_tokens(input_ids)
        if h.dtype != self.norm.weight.dtype:  # float32 master of a trained embedding
            h = h.to(self.norm.weight.dtype)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # the recompute must draw the same random numbers only where something random runs
        # (LoRA dropout); stashing and restoring the RNG states costs host time per layer
        rng = ckpt and any(getattr(m, "lora_dropout", 0.0) > 0 for m in self.modules())
        for layer in self.layers:
            if ckpt and kv_cache is None:
                h = self.checkpoint_fn(
                    layer, h, cos, sin, cu_seqlens, max_seqlen, preserve_rng_state=rng
                )
            else:
                h = layer(h, cos, sin, cu_seqlens, max_seqlen, kv_cache)
        if kv_cache is not None:
            kv_cache.commit()
        return self.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, S, V) in the model dtype."""
        return self.lm_logits(
            self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen, kv_cache)
        )

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        num_items: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of the next-token predictions; ``labels`` are aligned with ``input_ids``
        (already shifted by the data pipeline, -100 = ignored). Mean over valid labels, or the sum
        divided by ``num_items`` when given."""
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen)
        return qkern.fused_linear_cross_entropy(
            hidden.flatten(0, 1),
            self.lm_weight,
            labels.flatten(),
            num_items=num_items,
            chunk_bytes=self.loss_chunk_bytes,
        )


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """HF-style init: normal(0, std) for linear and embedding weights, zero biases, unit norms."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
            elif isinstance(m, qkern.RMSNorm):
                m.weight.fill_(1.0)


def build_model(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Transformer:
    """A randomly initialised model (seed with ``torch.manual_seed`` first), built on ``device``."""
    with torch.device(device):
        model = Transformer(config)
    init_weights(model)
    return model.to(dtype)


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys/values per layer, (B, max_len, Hkv, D) each, and a length per row.

    Row i's tokens occupy positions [0, lengths[i]) of its slot: there is no padding inside the
    cache, so batched prompts of different lengths need no attention mask. A forward with the
    cache appends its new tokens to every row and attends over each row's whole prefix:

    * **dense** step — input (B, S) and every row at the same length L: the new k/v are copied to
      [L, L+S) and ``flash_attention(q, k[:, :L+S], v[:, :L+S])`` runs with bottom-right causal
      alignment (prefill of equal-length prompts, and decode while lengths agree);
    * **varlen** step — rows at different lengths, or packed input (1, T) with ``cu_seqlens``
      (prefill of prompts of different lengths without padding): the new k/v are scattered to
      each row's next positions, each row's prefix is gathered into a packed (total, Hkv, D)
      tensor and ``flash_attention`` runs in varlen form with ``cu_seqlens`` (new tokens) and
      ``cu_seqlens_k`` (whole prefixes). The gather reads as many bytes as the attention does.

    Positions handed to RoPE continue from each row's length. Rows are not removed when they
    finish; the generator just ignores their tokens.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if batch_size < 1 or max_len < 1:
            raise ValueError(
                f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}"
            )
        shape = (batch_size, max_len, config.num_key_value_heads, config.head_dim)
        self.k = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.v = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.batch_size, self.max_len = batch_size, max_len
        self.device = torch.device(device)
        self.lengths = [0] * batch_size
        self._plan: dict | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def begin(self, b: int, s: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """Plan a step that adds tokens of an input (b, s); returns its position ids (b, s)."""
        dev = self.device
        if cu_seqlens is not None:
            counts = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            if len(counts) != self.batch_size:
                raise ValueError(
                    f"cu_seqlens has {len(counts)} documents, the cache {self.batch_size} rows"
                )
        else:
            if b != self.batch_size:
                raise ValueError(f"input has batch {b}, the cache {self.batch_size} rows")
            counts = [s] * b
        new = [n + c for n, c in zip(self.lengths, counts)]
        if max(new) > self.max_len:
            raise ValueError(
                f"KV cache overflow: a row would reach {max(new)} tokens, the cache holds "
                f"{self.max_len}"
            )
        old = self.lengths
        if cu_seqlens is None and len(set(old)) == 1:
            start = old[0]
            self._plan = {"mode": "dense", "end": start + s, "start": start, "new": new}
            return torch.arange(start, start + s, device=dev).expand(b, s)
        # varlen: flat indices into the (B*max_len, Hkv, D) view of each layer's buffer
        L = self.max_len
        write = torch.cat([i * L + old[i] + torch.arange(c) for i, c in enumerate(counts)])
        read = torch.cat([i * L + torch.arange(n) for i, n in enumerate(new)])
        pos = torch.cat([old[i] + torch.arange(c) for i, c in enumerate(counts)])
        cu_q = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
        self._plan = {
            "mode": "varlen",
            "write": write.to(dev),
            "read": read.to(dev),
            "cu_q": cu_q.to(dev),
            "cu_k": cu_k.to(dev),
            "max_q": max(counts),
            "max_k": max(new),
            "new": new,
        }
        return pos.to(dev).view(b, s)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: tuple[int, int] | None,
    ) -> torch.Tensor:
        """Store this step's k/v of ``layer`` and attend q (b, s, Hq, D) over each row's prefix."""
        p = self._plan
        if p is None:
            raise RuntimeError("KVCache.attend called outside a model forward")
        kc, vc = self.k[layer], self.v[layer]
        if p["mode"] == "dense":
            kc[:, p["start"] : p["end"]] = k
            vc[:, p["start"] : p["end"]] = v
            return qkern.flash_attention(
                q, kc[:, : p["end"]], vc[:, : p["end"]], causal=True, window=window
            )
        b, s, hq, d = q.shape
        hk = k.shape[2]
        kf = kc.view(-1, hk, d)
        vf = vc.view(-1, hk, d)
        kf.index_copy_(0, p["write"], k.reshape(-1, hk, d))
        vf.index_copy_(0, p["write"], v.reshape(-1, hk, d))
        o = qkern.flash_attention(
            q.reshape(b * s, hq, d),
            kf.index_select(0, p["read"]),
            vf.index_select(0, p["read"]),
            causal=True,
            window=window,
            cu_seqlens=p["cu_q"],
            max_seqlen=p["max_q"],
            cu_seqlens_k=p["cu_k"],
            max_seqlen_k=p["max_k"],
        )
        return o.view(b, s, hq, d)

    def commit(self) -> None:
        if self._plan is not None:
            self.lengths = self._plan["new"]
        self._plan = None


def context_length(config: ModelConfig) -> int:
    """Longest sequence the model is configured for (prompt plus generated tokens)."""
    return int(config.max_position_embeddings)


def count_parameters(model: nn.Module) -> int:
    """Logical parameter count, NF4 weights counted by their unpacked size."""
    total = 0
    for m in model.modules():
        if _is_qlora(m):
            total += m.in_features * m.out_features
            total += 0 if m.bias is None else m.bias.numel()
        else:
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


__all__ = [
    "ARCHITECTURES",
    "Attention",
    "DecoderLayer",
    "KVCache",
    "MLP",
    "ModelConfig",
    "Transformer",
    "build_model",
    "context_length",
    "count_parameters",
    "init_weights",
]
