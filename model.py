"""A hand-written decoder for the Llama family, and the loader that reads Hugging Face folders.

Covers Llama 2/3 (with Llama-3 `rope_scaling`), Mistral, Qwen2/2.5 (bias on q/k/v), Qwen3 (q_norm/k_norm,
explicit head_dim) and SmolLM2. Module names are Hugging Face's, so a checkpoint loads by name with no rename
table ("strip nothing, load strictly"), and a PEFT adapter's keys line up with ours (shared/STYLE.md, rule 2).
The KV cache is not here: attention asks an optional `Cache` for the full keys and values (sampling.py owns
the sampler's cache; fast/shared_prompt.py has the learner's).
"""
import json
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import Tokenizer

SUPPORTED = {  # architectures entry of config.json -> model_type
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class ModelError(ValueError):
    """A model folder we cannot load; the message names the problem and the fix."""


@dataclass
class ModelConfig:
    # Field names are config.json keys, so a config is `ModelConfig.from_hf(json.load(f))`.
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    attention_bias: bool = False  # Llama/Qwen3: bias on q, k, v and o
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral; Qwen2's only if use_sliding_window
    hidden_act: str = "silu"
    # derived in __post_init__
    qkv_bias: bool = field(default=False, init=False)
    o_bias: bool = field(default=False, init=False)
    qk_norm: bool = field(default=False, init=False)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, \
            f"{self.num_attention_heads} query heads do not split into {self.num_key_value_heads} kv groups"
        assert self.head_dim % 2 == 0, f"rotary embedding needs an even head_dim, got {self.head_dim}"
        if self.hidden_act != "silu":
            raise ModelError(f"hidden_act '{self.hidden_act}' is not supported (only silu/SwiGLU)")
        self.qkv_bias = self.attention_bias or self.model_type == "qwen2"  # Qwen2 always has q/k/v bias
        self.o_bias = self.attention_bias and self.model_type != "qwen2"
        self.qk_norm = self.model_type == "qwen3"

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        archs = d.get("architectures") or []
        name = archs[0] if archs else d.get("model_type")
        model_type = SUPPORTED.get(name, name if name in SUPPORTED.values() else None)
        if model_type is None:
            raise ModelError(f"architecture '{name}' is not supported; supported: {', '.join(SUPPORTED)}")
        d = dict(d, model_type=model_type)
        # transformers >= 5 writes rope_theta and rope_scaling together as rope_parameters.
        rope = d.get("rope_parameters")
        if rope:
            d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                d["rope_scaling"] = rope
        if model_type == "qwen2" or model_type == "qwen3":
            if not d.get("use_sliding_window"):
                d["sliding_window"] = None
            elif d.get("max_window_layers", 0) < d["num_hidden_layers"]:
                raise ModelError("Qwen sliding window on only some layers (max_window_layers) is not supported")
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of a model of this config, from its shapes alone (plan.py sizes a run before a fetch)."""
    C, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    layer = C * (q + 2 * kv) + q * C + 3 * C * I + 2 * C
    layer += (q + 2 * kv) * cfg.qkv_bias + C * cfg.o_bias + (2 * I + C) * cfg.mlp_bias + 2 * hd * cfg.qk_norm
    return cfg.vocab_size * C * (1 + (not cfg.tie_word_embeddings)) + cfg.num_hidden_layers * layer + C


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of rotate-half RoPE, (head_dim/2,), with Llama-3 / linear scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / sc["factor"]).float()
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(medium, blended, scaled).float()
    raise ModelError(f"rope_scaling type '{kind}' is not supported (default, linear, llama3)")


def apply_rope(x, cos, sin_signed):
    """Rotate-half RoPE: x*cos + rotate_half(x)*sin, where rotate_half(x) = cat(-x2, x1).

    The sign lives in sin_signed = cat(-sin, sin), so rotate_half becomes one roll (4 ops instead of 7,
    paid 60 times per decoded token)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in float32 as the reference does; bf16 variance loses digits on long rows.
        # (F.rms_norm is bitwise the reference's formula in float32, in one call instead of six.)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if hasattr(self, "q_norm"):  # Qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # cos, sin: (B, 1, T, D)
        y = cache.attend(self.layer_idx, q, k, v, attn_mask) if cache is not None else attention(q, k, v, attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))  # y: (B, H, T, D)


def attention(q, k, v, attn_mask=None):
    """Softmax attention of q (B, H, T, D) over k, v (B, H_kv, S, D) -> (B, H, T, D); H a multiple of H_kv
    (grouped-query attention). attn_mask: bool or additive (B or 1, 1, T, S); None means causal from position 0.
    An explicit mask whenever there is one: is_causal aligns to the top-left corner, which is only right when the
    queries start at position 0 (shared/STYLE.md, rule 14)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and q.shape[2] > 1,
                                          enable_gqa=k.shape[1] != q.shape[1])


class Cache:
    """What attention asks of a KV cache: `update` keeps this call's keys and values and returns all of them, and
    the attention then runs over those. A cache that computes attention its own way overrides `attend`."""

    def update(self, layer: int, k, v):
        raise NotImplementedError

    def attend(self, layer: int, q, k, v, attn_mask):
        k, v = self.update(layer, k, v)  # (B, H_kv, S, D), S = cached + T
        assert attn_mask is not None or q.shape[2] == 1 or k.shape[2] == q.shape[2], \
            "several new tokens after a non-empty cache need an explicit attn_mask"
        return attention(q, k, v, attn_mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, I, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(C, I, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(I, C, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    # packing.PackedDecoder.step restates this layer over stacked products for CPU decoding: change both.
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq = rope_inv_freq(cfg)  # plain tensor, not a buffer: never saved, rebuilt on meta loads

    def hidden_states(self, input_ids, positions=None, cache=None, attn_mask=None, layer_call=None):
        """Final-norm hidden states (B, T, C).

        positions: (B, T) token positions, default 0..T-1 (callers with left padding or a cache pass them).
        cache: a `Cache` (keeps the keys and values; `attend` runs attention over them all).
        attn_mask: bool (B or 1, 1, T, S), True = may attend; None means plain causal from position 0.
        layer_call: optional `f(layer, x, cos, sin, cache, attn_mask)`, e.g. activation checkpointing,
            chosen by the training call rather than wired into the model.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions)
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, D)
        if attn_mask is None and self.config.sliding_window and T > self.config.sliding_window:
            attn_mask = sliding_causal_mask(T, self.config.sliding_window, x.device)
        for layer in self.model.layers:
            if layer_call is None:
                x = layer(x, cos, sin, cache, attn_mask)
            else:
                x = layer_call(layer, x, cos, sin, cache, attn_mask)
        return self.model.norm(x)

    def rope(self, positions):
        """cos and signed sin (for apply_rope) of positions (...) -> (..., D) each, float32 as the reference."""
        freqs = positions.float()[..., None] * self._inv_freq.to(positions.device)  # (..., D/2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def logits(self, h):
        return self.lm_head(h)

    def forward(self, input_ids, **kw):
        """input_ids (B, T) -> logits (B, T, V); keyword arguments as `hidden_states`."""
        return self.logits(self.hidden_states(input_ids, **kw))


def sliding_causal_mask(T, window, device):
    i = torch.arange(T, device=device)
    d = i[:, None] - i[None, :]
    return ((d >= 0) & (d < window))[None, None]  # (1, 1, T, T)


def build_model(cfg: ModelConfig | dict, device="cpu", dtype=torch.float32, seed=None) -> Transformer:
    """A randomly initialised model (tiny configs for tests, real-size ones for GPU benchmarks)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_hf(cfg)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            continue  # norms start at one, as in the reference
        nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.zeros_(p)
    return model.to(dtype)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON ({e}); re-download or re-convert the model folder")


def _safetensors_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise ModelError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_state(path, device="cpu"):
    """All tensors of a folder's safetensors files, by name."""
    from safetensors import SafetensorError, safe_open
    state = {}
    for f in _safetensors_files(path):
        if not os.path.exists(f):
            raise ModelError(f"shard {f} named in the index is missing")
        try:
            with safe_open(f, framework="pt", device=str(device)) as sf:
                for k in sf.keys():
                    state[k] = sf.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelError(f"{f} is corrupt or truncated ({e}); re-download or re-convert it")
    return state


def load_model(path, device="cpu", dtype=torch.float32):
    """Load a Hugging Face folder -> (model, tokenizer). (An embedded model by name: default_model.model_path.)"""
    if not os.path.isdir(path):
        raise ModelError(f"model folder '{path}' does not exist; give a local Hugging Face folder with --model")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelError(f"{path} has no config.json; is it a Hugging Face model folder?")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise ModelError(f"{path} has no tokenizer.json; give a folder that includes it (re-download the model, "
                         f"or save a fast tokenizer into it with transformers' save_pretrained)")
    cfg = ModelConfig.from_hf(_read_json(cfg_path))
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_state(path, device)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the head
    expected = {k: v for k, v in model.state_dict().items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"tensors in {path} do not match a {cfg.model_type} model: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelError(f"tensor {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(v.shape)}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model, Tokenizer(path)
