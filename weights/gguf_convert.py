"""llama.cpp GGUF file -> plain Hugging Face folder, for the architectures `llama` and `qwen2`.

Every tensor is dequantised to float32 with the `gguf` package (F32, F16, Q8_0, Q4_0/1, Q4_K, Q6_K, ...) and
renamed to Hugging Face's names; llama.cpp's row permutation of a llama's q_proj and k_proj is undone (it
applies none to qwen2). tokenizer.json is rebuilt from the file's vocabulary, merges, token types and
pre-tokenizer name, as transformers' GGUF loader does (integrations/gguf/gguf_tokenizer_mapping.py).
The weights stream to model.safetensors one block of rows at a time, so a conversion never holds the float32
model (7 GB for a 1.5B model with an untied head), only the GGUF reader's metadata and one block.
"""
import json
import os

import numpy as np

from model import ModelError

ARCHITECTURES = {  # general.architecture -> (config.json architectures entry, q/k rows permuted by llama.cpp)
    "llama": ("LlamaForCausalLM", True),  # convert_hf_to_gguf.py's LlamaModel interleaves RoPE halves
    "qwen2": ("Qwen2ForCausalLM", False),  # Qwen2Model writes q/k as Hugging Face has them
}

TENSOR_NAMES = {  # GGUF name -> Hugging Face name; {i} is the layer
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",  # qwen2
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# llama.cpp's `tokenizer.ggml.pre` names the regex its vocabulary's merges were learned with. None: the GPT-2
# regex inside ByteLevel. 'smollm' splits every digit first; 'qwen2' is Qwen2Tokenizer's PRETOKENIZE_REGEX
# (single digits, letters with one leading non-letter, punctuation runs keeping their newlines).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": None, "gpt2": None, "smollm": "digits", "qwen2": QWEN2_SPLIT}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
BLOCK_BYTES = 64 << 20  # float32 bytes dequantised at a time


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Its converter interleaves the two halves of each head
    (rows [a0, a1, ..., b0, b1, ...] -> [a0, b0, a1, b1, ...]) for its RoPE kernel; rotate-half wants them back."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name):
    parts = gguf_name.split(".")
    key = ".".join(["blk", "{i}"] + parts[2:]) if parts[0] == "blk" else gguf_name
    if key not in TENSOR_NAMES:
        raise ModelError(f"GGUF tensor '{gguf_name}' has no Hugging Face counterpart here (llama, qwen2 only)")
    return TENSOR_NAMES[key].format(i=parts[1] if parts[0] == "blk" else "")


def convert_gguf(gguf_path, out_dir, log=lambda msg: None):
    """Write config.json, generation_config.json, model.safetensors, tokenizer.json and tokenizer_config.json."""
    from gguf import GGUFReader

    r = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in r.fields.items()
            if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    arch = meta["general.architecture"]
    if arch not in ARCHITECTURES:
        raise ModelError(f"{os.path.basename(gguf_path)}: GGUF architecture '{arch}' is not converted "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    hf_arch, permuted = ARCHITECTURES[arch]

    def a(key):  # the architecture's own metadata keys: llama.block_count, qwen2.block_count, ...
        return meta[f"{arch}.{key}"]

    n_head, n_kv = a("attention.head_count"), a("attention.head_count_kv")
    log(f"dequantising {len(r.tensors)} tensors to float32 ({arch})")
    names = write_weights(gguf_path, r.tensors, os.path.join(out_dir, "model.safetensors"),
                          {"attn_q.weight": n_head, "attn_k.weight": n_kv} if permuted else {})

    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    config = {
        "architectures": [hf_arch], "model_type": arch,
        "vocab_size": len(tokens),
        "hidden_size": a("embedding_length"),
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "rms_norm_eps": float(f"{a('attention.layer_norm_rms_epsilon'):.6g}"),  # f32 -> 1e-05
        "rope_theta": float(a("rope.freq_base")),
        "max_position_embeddings": a("context_length"),
        "tie_word_embeddings": "lm_head.weight" not in names, "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if f"{arch}.attention.key_length" in meta:  # a head_dim other than hidden / heads
        config["head_dim"] = a("attention.key_length")
    if arch == "qwen2":
        config["use_sliding_window"] = False  # llama.cpp runs qwen2 with full attention on every layer
    _write_json(out_dir, "config.json", config)
    log("rebuilding tokenizer.json from the GGUF vocabulary")
    stops = build_tokenizer(r, meta, tokens, out_dir, a("context_length"))
    _write_json(out_dir, "generation_config.json", {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),  # one id, as upstream writes one
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")})


def write_weights(gguf_path, tensors, out_path, permute):
    """model.safetensors, written tensor by tensor and block by block of rows: the header first (every shape
    is known from the GGUF before any data is read), then the data in header order. Returns the HF names."""
    from gguf.quants import dequantize

    header, offset, plan = {"__metadata__": {"format": "pt"}}, 0, []
    for t in tensors:
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists dimensions fastest-first
        name = hf_name(t.name)
        nbytes = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        heads = next((n for suffix, n in permute.items() if t.name.endswith(suffix)), None)
        plan.append((t, shape, heads))
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    with open(gguf_path, "rb") as src, open(out_path, "wb") as dst:
        dst.write(len(head).to_bytes(8, "little") + head)
        for t, shape, heads in plan:
            rows = int(np.prod(shape[:-1]))
            row_bytes = int(t.n_bytes) // rows
            # Whole heads are needed to undo a permutation: q/k are small, so they are done in one block.
            step = rows if heads else max(1, BLOCK_BYTES // (4 * shape[-1]))
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                # Plain reads rather than the reader's memory map: mapped pages would stay in our memory.
                src.seek(int(t.data_offset) + r0 * row_bytes)
                raw = np.frombuffer(src.read(n * row_bytes), dtype=np.uint8).reshape(n, row_bytes)
                w = np.ascontiguousarray(dequantize(raw, t.tensor_type), dtype=np.float32)
                assert w.shape == (n, shape[-1]), f"{t.name}: dequantised to {w.shape}, expected {(n, shape[-1])}"
                if heads:
                    w = unpermute_rope_rows(w, heads)
                dst.write(w.tobytes())
    return [k for k in header if k != "__metadata__"]


def build_tokenizer(r, meta, tokens, out_dir, context):
    """tokenizer.json (byte-level BPE) and tokenizer_config.json from the GGUF vocabulary and metadata.
    Returns the stop ids for generation_config.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model = meta["tokenizer.ggml.model"]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise ModelError(f"only byte-level BPE ('gpt2') GGUF vocabularies are rebuilt, got '{model}'")
    if pre not in PRE_TOKENIZERS:
        raise ModelError(f"GGUF pre-tokenizer '{pre}' is not supported ({', '.join(PRE_TOKENIZERS)})")
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    # A token with a character outside the byte alphabet is stored as raw text; spell it in bytes, as
    # transformers does, so the vocabulary lookup finds it.
    byte_char = _bytes_to_unicode()
    alphabet = set(byte_char.values())
    spelled = [t if set(t) <= alphabet else "".join(byte_char[b] for b in t.encode()) for t in tokens]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges,
                              unk_token=spelled[unk] if unk is not None else None))
    split = PRE_TOKENIZERS[pre]
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:  # the regex does the splitting, so ByteLevel only maps bytes to its alphabet
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                             use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens ('<|im_start|>') become special added tokens, matched whole and dropped by
    # decode(skip_special_tokens); user-defined ones ('<tool_call>') are matched whole but kept in decoded
    # text, as in the upstream tokenizer.json llama.cpp took them from. A control token written outside
    # the byte alphabet is a llama.cpp mislabel; adding it would grow the vocabulary (transformers skips it too).
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, s, ty in zip(tokens, spelled, types) if ty == USER_DEFINED and t == s])
    assert tk.get_vocab_size(with_added_tokens=True) == len(tokens), "added tokens reuse their vocabulary ids"
    tk.save(os.path.join(out_dir, "tokenizer.json"))

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    template = meta.get("tokenizer.chat_template")
    _write_json(out_dir, "tokenizer_config.json", {
        # For byte-level vocabularies with their own regex, a class that takes tokenizer.json as it is.
        "tokenizer_class": "GPT2Tokenizer" if split in (None, "digits") else "PreTrainedTokenizerFast",
        "bos_token": tok("bos_token_id"), "eos_token": tok("eos_token_id"),
        "pad_token": tok("padding_token_id"), "unk_token": tok("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "model_max_length": context, "chat_template": template,
    })
    return stop_ids(meta, tokens, types, template, {"bos_token": tok("bos_token_id"), "eos_token": tok("eos_token_id")})


def stop_ids(meta, tokens, types, template, special):
    """Ids that end a reply: the metadata's eos (and eot/eom, where llama.cpp wrote them), the control token
    the chat template closes a turn with, and the padding token when it is a control token.

    Qwen2.5's metadata says eos = '<|im_end|>' (the template's end of turn too) and pad = '<|endoftext|>', its
    end-of-document token; upstream's generation_config stops on both, and so does llama.cpp (it stops on
    control tokens it knows by name). A model that emits its pad token has nothing more to say, so pad is
    the source for the second id. SmolLM2 keeps its single stop: its pad is its eos."""
    stops = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    pad = meta.get("tokenizer.ggml.padding_token_id")
    if pad is not None and types[pad] == CONTROL:
        stops.append(pad)
    if template:
        # Render one user turn and take the first control token after its content: the end-of-turn marker.
        from tokenizer import _compile
        text = _compile(template).render(messages=[{"role": "user", "content": "\x00"}],
                                         add_generation_prompt=False, tools=None, **special)
        after = text.split("\x00", 1)[1] if "\x00" in text else ""
        found = [(after.find(t), i) for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in after]
        if found:
            stops.append(min(found)[1])
    return sorted({int(s) for s in stops if s is not None})


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _write_json(out_dir, name, obj):
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(obj, f, indent=2)
