"""Sampler tests: cached decoding against the uncached forward pass; the fast step (fast/decode.py: shared
prefix, static and compiled step, packed CPU decoder, blocked draw) against the plain one; seeds, temperature,
top-k/top-p, the draws themselves and stop conditions; on the real tiny model and wider random ones built from
its config."""
import json
import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from weights.default_model import tiny_model_path
from model import build_model, load_model
import fast.decode as decode
import fast.packing as packing
from fast.cascade import SHARE_MIN
from fast.decode import FastStep, sample_blocked
from sampling import Sampler, sample, sampling_logits


@pytest.fixture(scope="module")
def tiny():
    return load_model(tiny_model_path())


def fast(model, tok, **kw):
    """The sampler as run.py builds it: the fast step."""
    return Sampler(model, tok, FastStep(model, **kw))


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
    model, tok = tiny
    stem = tok.encode("a long shared problem statement " * 12)
    assert len(stem) >= SHARE_MIN
    prompts = [stem + tok.encode("first"), stem + tok.encode("the second question")]
    outs = fast(model, tok).generate(prompts, n=[3, 2], max_new_tokens=12, temperature=1.0, stop_ids=(),
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
    static = fast(model, tok)
    static.step.static = True  # the compiled path's logic, run eagerly
    for s in (static, fast(model, tok, compile=True)):
        out = s.generate(prompts, n=[3, 2, 1], max_new_tokens=10, temperature=0, stop_ids=())
        assert [o.ids for o in out] == [o.ids for o in ref]
        assert max(abs(a - b) for o, r in zip(out, ref) for a, b in zip(o.logprobs, r.logprobs)) < 1e-5


class CountPacked(TorchDispatchMode):  # sees every aten call, so it proves which products ran
    def __init__(self, ops):
        super().__init__()
        self.ops, self.calls = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in self.ops
        return func(*args, **(kwargs or {}))


def packed_like_plain(sampler, monkeypatch, prompts, n, stops=(), new=100):
    """Sample with the packed decoder, then with it switched off (the modules), from the same draws: the same
    tokens and log-probabilities within 1e-5. Returns the kernel products per packed decode step (the first
    token comes from the prompt's forward pass)."""
    outs, counts = [], []
    decoder = sampler.step.packed
    step = decoder.step

    def counted(*args):  # only the packed step's own products: the modules' may use the same libraries
        kernels = {packing.KERNELS[p.kernel].op for p in decoder.packs.values()}
        with CountPacked(kernels) as count:
            out = step(*args)
        counts[-1].append(count.calls)
        return out
    monkeypatch.setattr(decoder, "step", counted)
    for rows in (packing.PACK_ROWS, range(0)):  # packed, then plain
        monkeypatch.setattr(decode, "PACK_ROWS", rows)
        counts.append([])
        outs.append(sampler.generate(prompts, n=n, max_new_tokens=new, temperature=1.0, stop_ids=stops,
                                     generator=torch.Generator().manual_seed(1)))
    packed, plain = outs
    assert counts[1] == [] and counts[0], counts
    assert [o.ids for o in packed] == [o.ids for o in plain]
    diff = max(abs(a - b) for o, r in zip(packed, plain) for a, b in zip(o.logprobs, r.logprobs))
    assert diff < 1e-5, diff
    return sum(counts[0]) / len(counts[0])


def wide(**kw):
    """The tiny model's config, wide enough for every product to be packed (packing.PACK_MIN)."""
    cfg = json.load(open(os.path.join(tiny_model_path(), "config.json")))
    return build_model(dict(cfg, hidden_size=128, intermediate_size=256, **kw), seed=0)


def test_a_few_finished_rows_ride_along_on_the_packs_instead_of_a_repack(tiny, monkeypatch):
    # A repack for the smaller batch (and the full one again at the next call) costs far more than a few
    # finished rows riding along: 9 rows, 100 new tokens, most stopping early (one token in 7 stops), keep
    # the packs of 9 rows.
    _, tok = tiny
    sampler = fast(wide(), tok)
    if not sampler.step.packed.available:
        pytest.skip("no packed kernel in this torch build")
    sizes = []
    prepare = sampler.step.packed.prepare
    monkeypatch.setattr(sampler.step.packed, "prepare", lambda rows: sizes.append(rows) or prepare(rows))
    outs = sampler.generate(["hello", "a longer prompt"], n=[5, 4], max_new_tokens=100,
                            stop_ids=list(range(0, 259, 7)), generator=torch.Generator().manual_seed(1))
    early = [len(o.ids) for o in outs if o.stop_reason == "stop_token" and len(o.ids) < 30]
    assert len(early) >= 3 and len(early) * 100 < decode.REPACK_ROW_STEPS, \
        f"the draw should stop a quarter of the rows early, too few to repay a repack: {[len(o.ids) for o in outs]}"
    assert sizes == [9] and sampler.step.packed.rows == 9, f"packs built for {sizes} rows"


@pytest.mark.parametrize("kernel", packing.FLOAT32_KERNELS)
def test_packed_decoder_decodes_like_the_modules(tiny, monkeypatch, kernel):
    # On CPU, decode batches of 1-64 rows run packing.PackedDecoder's step on packed weights (MKL's or
    # oneDNN's) instead of the modules. The same draws must give the same samples: when rows stop (a repack
    # for the smaller batch), when a weight was changed in place after its pack was built (the stale pack must
    # be rebuilt, not used), with a LoRA adapter (packed merged), after an optimiser-like step on it, and off.
    _, tok = tiny
    model = wide()
    sampler = fast(model, tok)
    sampler.step.packed.forced = kernel
    if not sampler.step.packed.available:
        pytest.skip(f"this torch build has no {kernel}")
    prompts, n = ["hello", "a longer prompt"], [5, 4]
    monkeypatch.setattr(decode, "REPACK_ROW_STEPS", 1)  # repack whenever rows stop: the path under test
    per_step = packed_like_plain(sampler, monkeypatch, prompts, n, stops=list(range(0, 259, 37)))
    assert sampler.step.packed.rows < 9, "rows stopped early enough for a repack to the smaller batch"
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
    assert set(sampler.step.packed.kernel.values()) == {kernel}


@pytest.mark.parametrize("arch", [
    dict(architectures=["LlamaForCausalLM"], attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    dict(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False),  # q/k/v bias, no o bias
    dict(architectures=["Qwen3ForCausalLM"], attention_bias=True),  # q/k norm per head before RoPE
], ids=["llama-biases-untied", "qwen2", "qwen3"])
def test_packed_step_restates_every_architecture_feature(tiny, monkeypatch, arch):
    # PackedDecoder.step is the one place besides model.py that spells out a layer's maths (over stacked
    # products). Every feature model.py's layers have must be there too: biases, untied head, q/k norm.
    _, tok = tiny
    model = wide(**arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases start at 0 and norms at 1, which would hide a missing term
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3 + 1.0 *
                        name.endswith("norm.weight"))
    cfg = model.config
    assert (cfg.qkv_bias, cfg.o_bias, cfg.qk_norm) == {
        "llama": (True, True, False), "qwen2": (True, False, False), "qwen3": (True, True, True)}[cfg.model_type]
    sampler = fast(model, tok)
    if not sampler.step.packed.available:
        pytest.skip("no packing kernel in this torch build")
    assert packed_like_plain(sampler, monkeypatch, ["hello", "a longer prompt"], [3, 2], new=20) == 9


def test_the_float32_kernels_are_chosen_by_measurement(tiny, monkeypatch, tmp_path):
    _, tok = tiny
    sampler = fast(wide(), tok)
    if not sampler.step.packed.available:
        pytest.skip("no packing kernel in this torch build")
    monkeypatch.setenv("MIGRATE_CACHE", str(tmp_path))  # a machine that has measured nothing yet
    sampler.generate(["hello"], n=3, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    chosen, seconds, rows = sampler.step.packed.choice[8]
    assert rows == 3 and chosen == sampler.step.packed.kernel, sampler.step.packed.choice
    assert set(seconds) == {k for k in packing.FLOAT32_KERNELS if packing.KERNELS[k].available}
    for kind, name in chosen.items():  # the fastest for each kind of product
        assert seconds[name][kind] == min(s[kind] for s in seconds.values()) > 0, (kind, seconds)


def test_kernels_are_measured_once_per_machine_not_per_process(tiny, monkeypatch, tmp_path):
    """Timing near-tied kernels picked a different mix in each process, and each kernel rounds float32 sums
    its own way, so a seeded run's samples depended on the process. The choice is now kept per machine: a
    new decoder (what a new process starts with) takes the stored choice without timing; another thread
    count is another machine; a damaged store is measured again and rewritten. cpu_linear's route likewise."""
    import fast.cpu_linear as cpu_linear
    model = wide()
    if not packing.PackedDecoder(model).available:
        pytest.skip("no packing kernel in this torch build")
    monkeypatch.setenv("MIGRATE_CACHE", str(tmp_path))
    timed, real = [], packing.PackedDecoder._time_kernels
    monkeypatch.setattr(packing.PackedDecoder, "_time_kernels",
                        lambda self, rows, kinds: timed.append(rows) or real(self, rows, kinds))
    first = packing.PackedDecoder(model)._kernels_for(3)
    assert packing.PackedDecoder(model)._kernels_for(5) == first and timed == [3]  # 5 rows: the same size class
    store = tmp_path / "kernels.json"
    chosen = [v["chosen"] for k, v in json.loads(store.read_text()).items() if "packed float32, 2-8 rows" in k]
    assert chosen == [first], chosen
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        packing.PackedDecoder(model)._kernels_for(3)
    finally:
        torch.set_num_threads(threads)
    assert timed == [3, 3]
    # An instruction cap (measuring as on an AVX2-only CPU) makes the libraries take other kernels: another machine.
    # (Another cap than any this suite runs under, and that one back after.)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41" if cap == "AVX2" else "AVX2")
    packing.PackedDecoder(model)._kernels_for(3)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap) if cap else monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert timed == [3, 3, 3]
    store.write_text('{"half a')
    packing.PackedDecoder(model)._kernels_for(3)
    assert timed == [3, 3, 3, 3] and len(json.loads(store.read_text())) == 1, store.read_text()

    monkeypatch.setattr(cpu_linear, "_CPU_PRODUCTS", {})
    routes, fastest = [], cpu_linear._fastest_product
    monkeypatch.setattr(cpu_linear, "_fastest_product", lambda bucket: routes.append(bucket) or fastest(bucket))
    few = cpu_linear.cpu_products(4)
    cpu_linear._CPU_PRODUCTS.clear()
    assert cpu_linear.cpu_products(7) == few and routes == [1]
    assert few in ("mkl", "mm", "onednn"), few


@pytest.mark.parametrize("weights, product_err", [("int8", 0.02), ("bfloat16", 0.01)])
def test_low_precision_weights_decode_close_to_float32(tiny, weights, product_err):
    """int8 and bfloat16 copies change the numbers, so they are opt-in; they must still be the same policy,
    nearly: each product within product_err of the float32 one (int8: 7-bit activations and 8-bit per-channel
    weights, ~1.5% here; bfloat16: 8-bit mantissas, ~0.4%), and greedy decoding the same tokens with log-probs
    within 0.05. The float32 copies are never within 1e-4 of these (the kernel is really taken)."""
    kern = packing.KERNELS[weights]
    _, tok = tiny
    model = wide()
    if not kern.available:  # a CPU without the instructions (bfloat16 on an AVX2-only one): refused, not emulated
        assert packing.missing_product(weights), weights
        with pytest.raises(packing.CopyRefused, match=f"no fast {weights} product"):
            fast(model, tok, weights=weights)
        return
    with torch.no_grad():
        for _, mods in packing.PackedDecoder(model)._groups():
            w, b, _ = packing._stacked(mods)
            x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0))
            ref = torch.nn.functional.linear(x, w, b)
            err = float((kern.mm(x, kern.pack(w, b, 5), 5) - ref).norm() / ref.norm())
            assert 1e-4 < err < product_err, err
        model.lm_head.weight.mul_(3)  # a sharper next-token distribution, more like a trained model's
    prompts = [tok.encode(p) for p in ("hello there", "a longer prompt here", "third one", "and a fourth")]
    samplers = [fast(model, tok, weights=w) for w in ("float32", weights)]
    outs = [s.generate(prompts, max_new_tokens=40, temperature=0, stop_ids=()) for s in samplers]
    assert samplers[1].step.packed.kernel and set(samplers[1].step.packed.kernel.values()) == {weights}
    for a, b in zip(*outs):
        same = next((i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y), len(a.ids))
        assert same >= 30, (a.ids, b.ids)
        assert max(abs(x - y) for x, y in zip(a.logprobs[:same], b.logprobs[:same])) < 0.05


def test_low_precision_copies_are_refused_where_they_would_not_be_used(tiny):
    # Decoding in float32 under the name int8 would be another policy than the run's label says: each place the
    # packed decoder steps aside (a narrow model, non-float32 weights, a compiled step, a batch over PACK_ROWS)
    # refuses low-precision copies instead of decoding quietly in float32.
    if not packing.KERNELS["int8"].available:
        pytest.skip("no int8 kernel in this torch build")
    model, tok = tiny
    with pytest.raises(ValueError, match=f"narrowest product is {model.config.hidden_size} wide"):
        fast(model, tok, weights="int8")
    with pytest.raises(ValueError, match="weights are bfloat16"):
        fast(wide().to(torch.bfloat16), tok, weights="int8")
    with pytest.raises(ValueError, match="compiled decode step"):
        fast(wide(), tok, compile=True, weights="int8")
    sampler = fast(wide(), tok, weights="int8")
    big = packing.PACK_ROWS.stop
    with pytest.raises(ValueError, match=f"this call has {big}"):
        sampler.generate([tok.encode("hi")], n=big, max_new_tokens=2)
    assert len(sampler.generate([tok.encode("hi")], n=big - 1, max_new_tokens=2)) == big - 1
    assert set(sampler.step.packed.kernel.values()) == {"int8"}


@pytest.mark.parametrize("family", [dict(architectures=["Qwen2ForCausalLM"]),  # bias on q, k, v
                                    dict(architectures=["Qwen3ForCausalLM"], head_dim=48, attention_bias=True)])
def test_packed_decoder_covers_biases_qk_norm_and_shared_prefixes(tiny, monkeypatch, family):
    # The packed step writes each family's features out again (q/k/v and o biases, Qwen3's per-head norms)
    # and reads the shared prefix of the cascade path: it must agree with the modules there too.
    _, tok = tiny
    model = wide(**family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)  # biases start at zero and norms at one; make them matter
    stem = tok.encode("a long shared problem statement " * 12)
    assert len(stem) >= SHARE_MIN
    prompts = [stem + tok.encode("first"), stem + tok.encode("the second question")]
    sampler = fast(model, tok)
    assert packed_like_plain(sampler, monkeypatch, prompts, [3, 2], new=30) == 9
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.add_(0.5)  # a pack's bias, changed in place: rebuild
    packed_like_plain(sampler, monkeypatch, prompts, [3, 2], new=30)


@pytest.mark.parametrize("steps", [None, FastStep], ids=["plain", "fast"])
def test_same_seed_same_samples_and_rows_differ(tiny, steps):
    model, tok = tiny
    s = Sampler(model, tok, steps and steps(model))
    run = lambda seed: [o.ids for o in s.generate(["hello"], n=4, max_new_tokens=16, temperature=1.0,
                                                  generator=torch.Generator().manual_seed(seed))]
    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    assert len({tuple(r) for r in a}) > 1, "rows of a group must differ at temperature 1"


@pytest.mark.parametrize("steps", [None, FastStep], ids=["plain", "fast"])
def test_temperature_zero_is_deterministic(tiny, steps):
    model, tok = tiny
    s = Sampler(model, tok, steps and steps(model))
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


@pytest.mark.parametrize("draw", [sample, sample_blocked], ids=["plain", "blocked"])
def test_sample_draws_from_the_distribution(draw):
    # sample_blocked searches blocks of CDF_BLOCK tokens, then inside one: a vocabulary that is not a whole number
    # of blocks, impossible tokens on block edges and a whole impossible block must still come out right.
    B = decode.CDF_BLOCK
    V = 4 * B - 24
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2
    banned = [0, B - 1, B, V - 1] + list(range(B + 40, 2 * B + 50))
    logits[banned] = float("-inf")
    p = logits.softmax(-1)
    g, counts, n = torch.Generator().manual_seed(1), torch.zeros(V), 0
    for _ in range(8):
        tok, logp = draw(logits.expand(40_000, V), 1.0, 0, 1.0, torch.rand(40_000, 1, generator=g))
        assert torch.allclose(logp, p.log()[tok], atol=1e-5)
        counts += torch.bincount(tok, minlength=V)
        n += len(tok)
    assert counts[banned].sum() == 0, "a zero-probability token was drawn"
    ok = p > 0
    chi2 = ((counts[ok] - n * p[ok]) ** 2 / (n * p[ok])).sum().item()
    dof = int(ok.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)  # ~6 standard deviations of a chi-square


def test_the_blocked_draw_picks_the_plain_draws_token():
    # The same uniform gives the same token, but where u lies within rounding of the boundary between two tokens
    # (the two sum the probabilities in different orders): there the plain cumulative mass at the boundary equals
    # u to float precision. A SmolLM2-sized vocabulary, top-k and top-p among the rows.
    V = 49152
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4000, V, generator=g) * 3
    u = torch.rand(4000, 1, generator=g)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 50, 1.0), (1.0, 0, 0.9)):
        a, la = sample(logits, temperature, top_k, top_p, u)
        b, lb = sample_blocked(logits, temperature, top_k, top_p, u)
        same = a == b
        # log p = logit - log Z, and the two sum Z's 49k terms in different orders: float32 rounding of Z, a few
        # 1e-5 of it whatever the kernels (AVX2's and AVX-512's differ), moves every log-prob by that much.
        assert torch.allclose(la[same], lb[same], rtol=0, atol=1e-4), (la[same] - lb[same]).abs().max()
        cum = torch.softmax(sampling_logits(logits, temperature, top_k, top_p), -1).double().cumsum(-1)
        for i in (a != b).nonzero()[:, 0].tolist():
            edge = cum[i, min(a[i], b[i])].item()
            assert abs(edge - u[i, 0].item()) < 1e-5, (i, a[i], b[i], edge, u[i, 0].item())
        assert int((~same).sum()) <= 10, int((~same).sum())


@pytest.mark.parametrize("kind", ["shared prefix", "packed", "static"])
def test_the_fast_step_draws_the_plain_steps_samples(tiny, kind):
    # run.py samples through FastStep; the plain ModelStep is the definition. Same seed, same samples, log-probs
    # within 1e-5: with a shared prefix (cascade attention), on packed weights, and with the fixed-shape step.
    model, tok = tiny  # too narrow to pack: only the path under test is taken
    model = wide() if kind == "packed" else model
    stem = tok.encode("a long shared problem statement " * 12)
    prompts = [stem + tok.encode("first"), stem + tok.encode("the second question")] if kind != "packed" else \
        [tok.encode("hello"), tok.encode("a longer prompt")]
    step = FastStep(model)
    step.static = kind == "static"
    if kind == "packed" and not step.packed.available:
        pytest.skip("no packing kernel in this torch build")
    outs = [Sampler(model, tok, s).generate(prompts, n=[5, 4], max_new_tokens=40, temperature=1.0,
                                            stop_ids=list(range(0, 259, 37)),
                                            generator=torch.Generator().manual_seed(4)) for s in (None, step)]
    assert [o.ids for o in outs[0]] == [o.ids for o in outs[1]]
    assert max(abs(a - b) for o, r in zip(*outs) for a, b in zip(o.logprobs, r.logprobs)) < 1e-5
    assert (step.cache.prefix_len >= SHARE_MIN) == (kind != "packed") and (step.packed.rows is not None) == \
        (kind == "packed"), "the path under test was taken"


@pytest.mark.parametrize("steps", [None, FastStep], ids=["plain", "fast"])
def test_sampled_tokens_respect_top_k(tiny, steps):
    model, tok = tiny
    s = Sampler(model, tok, steps and steps(model))
    outs = s.generate(["hello"], n=8, max_new_tokens=1, temperature=1.0, top_k=2,
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        allowed = set(model(torch.tensor([tok.encode("hello")]))[0, -1].topk(2).indices.tolist())
    assert {o.ids[0] for o in outs} <= allowed
    for o in outs:  # log-prob under the renormalised top-2 distribution, so > log of the raw softmax
        assert -np.log(2) - 5 < o.logprobs[0] <= 0


@pytest.mark.parametrize("steps", [None, FastStep], ids=["plain", "fast"])
def test_stop_strings_and_max_tokens(tiny, steps):
    model, tok = tiny
    s = Sampler(model, tok, steps and steps(model))
    free = s.generate(["hello"], max_new_tokens=40, temperature=0, stop_ids=())[0]
    assert free.stop_reason == "length" and len(free.ids) == 40
    stop = free.text[5:7]  # a string the greedy continuation is known to produce
    cut = s.generate(["hello"], max_new_tokens=40, temperature=0, stop_strings=[stop], stop_ids=())[0]
    assert cut.stop_reason == "stop_string" and stop in cut.text and len(cut.ids) < 40
    assert free.ids[:len(cut.ids)] == cut.ids
