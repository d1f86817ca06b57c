"""Tests of tasks/molecule.py with real RDKit on hand-written SMILES, plus one real Dockstring docking and one
docking timeout (both skipped only when the optional extra, requirements-dock.txt, is not installed)."""
import json
import math
import random
import subprocess
import sys
import threading
import time

import pytest

from tasks import TaskError, load_task
from tasks import molecule as M

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
CAFFEINE = "Cn1c(=O)c2c(ncn2C)n(C)c1=O"


def task(task_id):
    return load_task("molecule", task_id)


# ---- parse: canonical candidates, rejections with reasons, robustness ----
def test_two_spellings_share_one_canonical_key():
    t = task("qed")
    spellings = ['["OC(=O)c1ccccc1OC(C)=O"]', '{"response": ["CC(=O)OC1=CC=CC=C1C(O)=O"]}', f'["{ASPIRIN}"]']
    keys = {tuple(t.parse(s).candidates) for s in spellings}
    assert keys == {(ASPIRIN,)}, keys


def test_surrounding_text_and_code_fences_are_tolerated():
    t = task("qed")
    for text in ['Sure! Here it is: ["CCO"] Hope it helps.', '```json\n{"response": ["CCO"]}\n```',
                 'I counted [1, 2] then ["CCO"]', "CCO", "```\nCCO\n```"]:
        assert t.parse(text).candidates == ["CCO"], text


@pytest.mark.parametrize("smiles, reason", [
    ("C1CC", "invalid SMILES"),  # unclosed ring
    ("hello", "invalid SMILES"),
    ("CC(=O)[O-].[Na+]", "several fragments"),  # a salt: Dockstring refuses several fragments
    ("[H][H]", "0 heavy atoms"),
    ("C" * 101, "101 heavy atoms"),
    ("CB(C)C", "element(s) B"),  # no Vina atom type for boron
    ("C$C", "bond other than"),  # quadruple bond; `$` would also reach Dockstring's shell string
    ("[CH3]", "radical"),
    ("C C", "not a SMILES string"),
])
def test_rejected_molecules_carry_a_reason(smiles, reason):
    parsed = task("qed").parse(json.dumps([smiles]))
    assert parsed.candidates == [] and reason in parsed.error, parsed


def test_render_parses_back_to_the_candidate():
    t = task("qed")
    assert t.parse(t.render("C[NH3+]")).candidates == ["C[NH3+]"]


def test_only_per_completion_molecules_are_taken():
    parsed = task("qed").parse('["CCO", "CCN"]')
    assert parsed.candidates == ["CCO"] and "1 extra" in parsed.error, parsed


def test_parse_never_raises_on_garbage():
    t, rng = task("qed"), random.Random(0)
    garbage = ["", "   ", "[]", "{}", '{"response": 3}', "[" * 100_000, '["' + "C" * 10_000 + '"]', "\x00\xff" * 5000,
               '["C\x00C"]', None, b"CCO", 42]
    garbage += ["".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(1, 5000))) for _ in range(50)]
    garbage += ["".join(rng.choice('[]{}",CNOc1()=#') for _ in range(rng.randrange(1, 3000))) for _ in range(50)]
    t0 = time.time()
    for g in garbage:
        parsed = t.parse(g)
        assert parsed.candidates or parsed.error, repr(g)[:80]
        for c in parsed.candidates:  # whatever survives is a canonical, rewardable molecule
            assert M.check_molecule(c) == (c, None) and t.reward([c])[0].reward > 0, c
    assert time.time() - t0 < 20, "parse is too slow on garbage"


# ---- cheap objectives ----
def test_qed_matches_published_values():
    t = task("qed")
    # Bickerton et al. 2012 (Nature Chem., QED paper) list aspirin at 0.55; ibuprofen is far more drug-like.
    aspirin, ibuprofen = t.reward([ASPIRIN, "CC(C)Cc1ccc(C(C)C(=O)O)cc1"])
    assert abs(aspirin.reward - 0.55) < 0.01, aspirin
    assert ibuprofen.reward > aspirin.reward, (ibuprofen, aspirin)
    assert not t.solved(aspirin) and t.solved(M.Score(0.948))


def test_similarity_reference_scores_one_and_is_solved():
    for task_id in ("similarity:celecoxib", "similarity:CC1=CC=C(C=C1)C1=CC(=NN1C1=CC=C(C=C1)S(N)(=O)=O)C(F)(F)F"):
        t = task(task_id)
        (celecoxib,) = t.parse('["Cc1ccc(cc1)-c1cc(nn1-c1ccc(cc1)S(N)(=O)=O)C(F)(F)F"]').candidates
        score = t.reward([celecoxib])[0]
        assert score.reward == 1.0 and t.solved(score), score
    # The toluene half of celecoxib shares some bits; methane shares none, yet a valid molecule never scores 0.
    part, methane = t.reward(["Cc1ccccc1", "C"])
    assert 0.0 < part.reward < 1.0 and not t.solved(part), part
    assert methane.info["tanimoto"] == 0.0 and methane.reward == M.FLOOR, methane


def test_fingerprint_twin_is_close_but_not_found():
    t = task("similarity:C[C@H](N)O")  # its mirror image has the same (achiral) Morgan fingerprint
    twin = t.reward(["C[C@@H](N)O"])[0]
    assert twin.info["tanimoto"] == 1.0 and twin.reward == 0.999 and not t.solved(twin), twin


def test_plogp_terms_and_monotone_mapping():
    t = task("plogp")
    # Octane and cyclooctane: the 8-ring costs a cycle penalty of 8 - 6 = 2; none for benzene.
    octane, cyclooctane, benzene = t.reward(["CCCCCCCC", "C1CCCCCCC1", "c1ccccc1"])
    assert cyclooctane.info["cycle_penalty"] == 2 and benzene.info["cycle_penalty"] == 0
    for s in (octane, cyclooctane, benzene):
        expect = s.info["logp"] - s.info["sa"] - s.info["cycle_penalty"]
        assert math.isclose(s.info["plogp"], expect) and 0 < s.reward < 1, s
    chains = t.reward(["C" * n for n in (5, 10, 20, 40)])  # each CH2 adds logP and little SA
    assert [s.info["plogp"] for s in chains] == sorted(s.info["plogp"] for s in chains), chains
    assert [s.reward for s in chains] == sorted(s.reward for s in chains), chains
    grid = [M.plogp_reward(p / 2) for p in range(-40, 80)]
    assert all(a < b for a, b in zip(grid, grid[1:])) and M.plogp_reward(0.0) == 0.5
    assert M.plogp_reward(-1e6) == M.FLOOR and not t.solved(M.Score(0.999))


def test_evaluate_is_json_and_ranks_by_reward():
    t = task("qed")
    mols = [ASPIRIN, "CCO", "CC(C)Cc1ccc(C(C)C(=O)O)cc1"]
    out = t.evaluate(list(zip(mols, t.reward(mols))))
    json.dumps(out)
    assert out["best_molecule"] == mols[2] and out["n_scored"] == 3 and out["n_failed"] == 0, out
    assert out["best_reward"] >= out["top3_mean"] and not out["solved"], out
    assert t.evaluate([])["best_reward"] == 0.0


def test_prompts_name_the_objective_and_the_format():
    t = task("qed")
    assert '["CCO"]' in t.prompt()[-1]["content"] and "QED" in t.prompt()[-1]["content"]
    assert "CCN (score 0.400)" in t.neighbour_prompt("CCN", 0.4)[-1]["content"]
    opro = t.opro_prompt([("CCN", 0.3), ("CCO", 0.4)])[-1]["content"]
    assert opro.index("CCN (score") < opro.index("CCO (score"), "worst to best"
    ns = [t.neighbour_prompt(c, 0.4)[-1]["content"] for c in ("CCN", "CCCCO")]
    assert ns[1].startswith(ns[0][:ns[0].index("CCN (score")]), "the anchor comes last: the rest is shared"
    hidden = task("similarity:celecoxib").prompt()[-1]["content"]
    assert "celecoxib" not in hidden and "S(N)" not in hidden, "the reference must stay hidden"


def test_bad_task_ids_raise_task_error(monkeypatch):
    for bad in ("foo", "similarity:", "similarity:not_a_molecule", "qed:1", "dock:"):
        with pytest.raises(TaskError):
            task(bad)
    assert task(None).task_id == "similarity:celecoxib"
    monkeypatch.setitem(sys.modules, "dockstring", None)  # as if the extra were not installed
    with pytest.raises(TaskError, match="requirements-dock.txt"):
        task("dock:CA2")


# ---- docking (needs the extra) ----
@pytest.mark.slow
def test_one_real_docking_follows_the_paper_formula():
    dockstring = pytest.importorskip("dockstring", reason="docking extra not installed")
    from rdkit import Chem
    from rdkit.Chem import QED
    assert sorted(dockstring.list_all_target_names()) == sorted(M.DOCK_TARGETS)
    with pytest.raises(TaskError, match="dockstring"):
        task("dock:NOT_A_TARGET")
    t = task("dock:ca2")
    assert "CA2" in t.prompt()[-1]["content"]
    try:
        (score,) = t.reward([CAFFEINE])  # rigid and small: ~15 s on 2 cores
    finally:
        t.close()
    vina, qed = score.info["vina"], QED.qed(Chem.MolFromSmiles(CAFFEINE))
    assert -12 < vina < -2, score
    assert math.isclose(score.reward, 1 - (vina + (1 - qed) + 12) / 10), score


@pytest.mark.slow
def test_docking_timeout_scores_zero_and_kills_its_processes(monkeypatch):
    pytest.importorskip("dockstring", reason="docking extra not installed")
    groups, popen = [], subprocess.Popen

    def spy(*args, **kwargs):  # the worker leads a new session, so its pid is the group of vina and obabel
        proc = popen(*args, **kwargs)
        groups.append(proc.pid)
        return proc

    monkeypatch.setattr(M.subprocess, "Popen", spy)
    t = task("dock:CA2")
    t.dock_timeout = 5.0  # long enough for protonation and embedding, so vina is running when it is killed
    t0 = time.time()
    scores = t.reward([CAFFEINE, ASPIRIN])  # two at once: the pool runs both
    assert time.time() - t0 < 15, "timed-out dockings were waited for"
    assert len(groups) == 2 and all(s.reward == 0.0 and "timed out" in s.info["error"] for s in scores), scores
    assert [p for g in groups for p in M.group_members(g)] == [], "processes of a timed-out docking are still running"
    t.close()



@pytest.mark.slow
def test_close_kills_running_dockings():
    pytest.importorskip("dockstring", reason="docking extra not installed")
    t, out = task("dock:CA2"), []
    worker = threading.Thread(target=lambda: out.extend(t.reward([CAFFEINE])))
    worker.start()
    time.sleep(3)
    t.close()  # what run.py does on Ctrl-C or at the end
    worker.join(timeout=10)
    assert not worker.is_alive() and out[0].reward == 0.0 and "rc -9" in out[0].info["error"], out
