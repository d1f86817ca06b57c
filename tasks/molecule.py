"""Molecule optimisation: the answer is a SMILES string, scored by docking (the paper's task) or by a cheap RDKit
objective. Follows shared/PAPER.md ("Rewards", Molecules) and the reference's utils/molecule_utils/molecule_task.py.

Task ids:
    dock:<TARGET>         Dockstring/AutoDock Vina against one of Dockstring's 58 targets (named set "dockstring");
                          reward = clip(1 - (vina + (1 - QED) + 12) / 10, 0, 1). Needs the optional extra:
                          pip install -r requirements-dock.txt
    qed                   QED drug-likeness; "solved" at 0.948, the best QED reported in the literature.
    similarity:<SMILES>   Tanimoto similarity (Morgan r=2, 2048 bits) to a hidden reference molecule; only the
                          reference itself scores 1.0 (= solved). <SMILES> may be an alias: see REFERENCES.
    plogp                 penalised logP = logP - SA score - max(0, largest ring - 6) (the unnormalised JT-VAE/MolDQN
                          form), mapped into (0, 1) by sigmoid(plogp / 4); unbounded, so never "solved".
Default: similarity:celecoxib (GuacaMol's rediscovery target): instant, in-process, and with an exact "found it"
like Semantle's, whereas docking takes ~50 s per molecule here and needs the extra.

One completion holds `per_completion` (default 1) molecules as a JSON list. Rejected in `parse` (no oracle call):
unparsable SMILES, no heavy atom or more than MAX_HEAVY, several fragments or radicals (Dockstring refuses both),
elements outside ELEMENTS or bonds other than single/double/triple/aromatic (Vina has no atom types for them; the
bond rule also keeps `$` out of the shell string Dockstring builds). Valid molecules of the cheap objectives score
at least FLOOR, because the engine masks reward 0 out of the loss: 0 means invalid or failed, never merely poor.
Docking runs one subprocess per molecule (`python -m tasks.molecule ...`), one per core at a time, each its own
process group so that a timeout (dock_timeout, 300 s) or close() kills its obabel and vina too; failures score 0.

Worked example (numbers computed with rdkit 2026.09.1 and dockstring 0.3.4):
    completion 'Sure! ["OC(=O)c1ccccc1OC(C)=O"]' -> parse -> ["CC(=O)Oc1ccccc1C(=O)O"] (aspirin, canonical)
    qed: 0.550; similarity:celecoxib: Tanimoto 0.085; plogp: logP 1.310 - SA 1.580 - 0 = -0.270 -> 0.483
    dock:CA2 on caffeine "Cn1c(=O)c2c(ncn2C)n(C)c1=O": vina -5.6, QED 0.538 -> 1 - (-5.6 + 0.462 + 12)/10 = 0.314
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from rdkit import Chem, DataStructs, RDLogger
from rdkit.Chem import QED, Crippen, rdFingerprintGenerator

from tasks.sandbox import processes
from tasks import Parsed, Preset, Score, Task, TaskError, Tuned

RDLogger.DisableLog("rdApp.*")  # invalid SMILES are routine here; their reason goes to Parsed.error, not stderr

REFERENCES = {  # similarity aliases; celecoxib, troglitazone, thiothixene are GuacaMol's rediscovery targets
    "celecoxib": "Cc1ccc(-c2cc(C(F)(F)F)nn2-c2ccc(S(N)(=O)=O)cc2)cc1",
    "troglitazone": "Cc1c(C)c2c(c(C)c1O)CCC(C)(COc1ccc(CC3SC(=O)NC3=O)cc1)O2",
    "thiothixene": "CN1CCN(CC/C=C2/c3ccccc3Sc3ccc(S(=O)(=O)N(C)C)cc32)CC1",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "ibuprofen": "CC(C)Cc1ccc(C(C)C(=O)O)cc1",
    "caffeine": "Cn1c(=O)c2c(ncn2C)n(C)c1=O",
}
DOCK_TARGETS = [  # Dockstring's 58 targets, in the order of the reference's scripts/dockstring/*.sh
    "IGF1R", "JAK2", "KIT", "LCK", "MAPK14", "MAPKAPK2", "MET", "PTK2", "PTPN1", "SRC", "ABL1", "AKT1", "AKT2",
    "CDK2", "CSF1R", "EGFR", "KDR", "MAPK1", "FGFR1", "ROCK1", "MAP2K1", "PLK1", "HSD11B1", "PARP1", "PDE5A",
    "PTGS2", "ACHE", "MAOB", "CA2", "GBA", "HMGCR", "NOS1", "REN", "DHFR", "ESR1", "ESR2", "NR3C1", "PGR", "PPARA",
    "PPARD", "PPARG", "AR", "THRB", "ADAM17", "F10", "F2", "BACE1", "CASP3", "MMP13", "DPP4", "ADRB1", "ADRB2",
    "DRD2", "DRD3", "ADORA2A", "CYP2C9", "CYP3A4", "HSP90AA1"]
INSTALL = "pip install -r requirements-dock.txt"
ELEMENTS = {"C", "N", "O", "S", "P", "F", "Cl", "Br", "I"}  # Vina's ligand atom types (hydrogens implicit)
BONDS = {Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC}
MAX_HEAVY, MAX_SMILES, MAX_TEXT = 100, 400, 20_000
SMILES_CHARS = re.compile(r"[A-Za-z0-9()\[\]=#@+\-/\\%.:$~*]+")  # printable SMILES alphabet, checked before RDKit
FLOOR = 1e-3  # least reward of a valid molecule (cheap objectives)
QED_SOLVED = 0.948
PLOGP_SCALE = 4.0  # sigmoid(plogp / 4): ZINC's mean (about -0.6) -> 0.46, plogp 5 -> 0.78, 12 -> 0.95
MORGAN = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
VINA_SEED = 974528263  # Dockstring's default: the same molecule always docks to the same score


def check_molecule(smiles) -> tuple[str | None, str | None]:
    """One SMILES -> (canonical SMILES, None) or (None, why it is rejected)."""
    if not isinstance(smiles, str) or not smiles.strip():
        return None, f"not a SMILES string: {str(smiles)[:40]!r}"
    smiles = smiles.strip()
    if len(smiles) > MAX_SMILES or not SMILES_CHARS.fullmatch(smiles):
        return None, f"not a SMILES string: {smiles[:40]!r}"
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None, f"invalid SMILES {smiles[:40]!r}"
    n_heavy = mol.GetNumHeavyAtoms()
    if not 1 <= n_heavy <= MAX_HEAVY:
        return None, f"{n_heavy} heavy atoms in {smiles[:40]!r} (allowed 1-{MAX_HEAVY})"
    if len(Chem.GetMolFrags(mol)) > 1:
        return None, f"several fragments in {smiles[:40]!r}; give one molecule"
    bad = {a.GetSymbol() for a in mol.GetAtoms()} - ELEMENTS
    if bad:
        return None, f"element(s) {','.join(sorted(bad))} in {smiles[:40]!r}; allowed {','.join(sorted(ELEMENTS))}"
    if any(b.GetBondType() not in BONDS for b in mol.GetBonds()):
        return None, f"bond other than single/double/triple/aromatic in {smiles[:40]!r}"
    if any(a.GetNumRadicalElectrons() for a in mol.GetAtoms()):
        return None, f"radical in {smiles[:40]!r}"
    return Chem.MolToSmiles(mol), None


def find_smiles_list(text: str) -> list | None:
    """The first JSON list of strings (or {"response": [...]}) in text; a bare one-token completion counts too."""
    dec = json.JSONDecoder()
    for i, m in enumerate(re.finditer(r"[\[{]", text)):
        if i >= 200:  # bound the work on bracket-heavy garbage
            break
        try:
            value, _ = dec.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            value = value.get("response")
            value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
    bare = re.sub(r"^```\w*|```$", "", text.strip()).strip()  # a fenced or plain lone SMILES
    return [bare] if bare and len(bare.split()) == 1 else None


def penalised_logp(mol) -> tuple[float, dict]:
    from rdkit.Contrib.SA_Score import sascorer  # lazy: it loads a fragment table on first use
    logp, sa = Crippen.MolLogP(mol), sascorer.calculateScore(mol)
    rings = [len(r) for r in mol.GetRingInfo().AtomRings()]
    cycle = max(max(rings, default=0) - 6, 0)
    return logp - sa - cycle, {"logp": logp, "sa": sa, "cycle_penalty": cycle}


def plogp_reward(p: float) -> float:
    """Penalised logP (unbounded) -> (0, 1), strictly increasing until the floor; 0 stays reserved for failures."""
    return max(1 / (1 + math.exp(-max(p, -100.0) / PLOGP_SCALE)), FLOOR)


def dock_score(vina: float, qed: float) -> float:
    """The paper's reward: Vina in kcal/mol (lower is better) and QED share one scale, clipped to [0, 1]."""
    return min(max(1 - (vina + (1 - qed) + 12) / 10, 0.0), 1.0)


class Molecule(Task):
    name = "molecule"
    reward_range = (0.0, 1.0)
    preset = Preset(alpha=2, beta=1, gamma=2, lr=5e-5, lora_r=64, lora_alpha=16, mu=2, steps=40, budget=200,
                    max_new_tokens=256, top_k_anchor=1, opro_k=5, ns_baseline_k=3, opro_baseline_k=5, tuned=(
                        # [ours] a constant learning rate: the reference's linear schedule spans 40 groups x mu, but a
                        # cpu run spends ~1.4 steps per new molecule (repeats cost steps, not calls), so a
                        # 100-molecule run is ~140 steps and would sit at lr 0 after step 40. The paper's lr and scale
                        # stay: on plogp (the tuning objective) the coder model's policy collapsed onto one molecule
                        # at 5e-4 x scale 1 (40x the paper's lr x scale) and was heading there by step 11 at 1e-4 x 1.
                        Tuned(dict(budget=100, max_new_tokens=96, lr_schedule="constant"),
                              "ours: sized for a 2-core CPU; the schedule and the paper's rate kept by scripts/sweep.py on plogp "
                              "(results/sweep/molecule-qwen)"),
                    ))
    model = "qwen2.5-coder-1.5b"  # SmolLM2-135M writes no valid SMILES
    per_completion = 1  # molecules per completion, as in the reference (num_guesses 1)
    # [ours] Start the JSON list for the model (5/16 parsable answers from SmolLM2 rather than 1/16), and stop
    # at its close: '"]' rather than ']', which SMILES use for atoms like [nH].
    answer_prefix = '["'
    stop_strings = ('"]',)
    dock_timeout = 300.0  # seconds per docking; ~50 s is typical on 2 cores, large flexible ligands take longer

    def __init__(self, task_id=None, seed=0):
        task_id = task_id or "similarity:celecoxib"
        super().__init__(task_id, seed)
        kind, _, arg = task_id.partition(":")
        self.kind = kind
        self.slow_reward = kind == "dock"  # a docking takes ~50 s: start it while the group still decodes
        self._live, self._lock, self._stop = set(), threading.Lock(), threading.Event()
        if kind in ("qed", "plogp") and not arg:
            return
        if kind == "similarity" and arg:
            ref, err = check_molecule(REFERENCES.get(arg.lower(), arg))
            if err:
                raise TaskError(f"similarity reference rejected: {err}; aliases: {', '.join(REFERENCES)}")
            self.reference = ref
            self.ref_fp = MORGAN.GetFingerprint(Chem.MolFromSmiles(ref))
            return
        if kind == "dock" and arg:
            return self._init_dock(arg.upper())
        raise TaskError(f"unknown molecule task id '{task_id}'; use dock:<TARGET>, qed, plogp or similarity:<SMILES "
                        f"or alias> (aliases: {', '.join(REFERENCES)})")

    def _init_dock(self, target):
        try:
            from dockstring import list_all_target_names
        except ImportError:
            raise TaskError(f"dock: task ids need dockstring and Open Babel; install them with: {INSTALL}") from None
        if target not in list_all_target_names():
            raise TaskError(f"unknown Dockstring target '{target}'; the 58 valid ones are the named set 'dockstring' "
                            f"(python -c 'import dockstring; print(dockstring.list_all_target_names())')")
        # The worker is run by this interpreter; put its bin/ (where openbabel-wheel puts `obabel`) on PATH.
        self.env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                        PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    os.environ.get("PYTHONPATH", "")]))
        if not any(os.access(os.path.join(p, "obabel"), os.X_OK) for p in self.env["PATH"].split(os.pathsep)):
            raise TaskError(f"dock: task ids need the `obabel` executable; install it with: {INSTALL}")
        self.target = target
        self.cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    @classmethod
    def named_sets(cls):
        return {"dockstring": [f"dock:{t}" for t in DOCK_TARGETS],
                "rediscovery": [f"similarity:{n}" for n in ("celecoxib", "troglitazone", "thiothixene")]}

    # ---- prompts: the objective in words, then the answer format ----
    def _objective(self):
        if self.kind == "dock":
            return (f"Design a drug molecule that binds strongly to the protein {self.target} and is drug-like. "
                    "Both count: the docking score (kcal/mol, lower is better, below -10 is good) and QED "
                    "drug-likeness (0 to 1, above 0.8 is good).")
        if self.kind == "qed":
            return "Design the most drug-like molecule you can: the score is its QED drug-likeness, from 0 to 1."
        if self.kind == "plogp":
            return ("Design a molecule with the highest penalised logP: logP minus synthetic difficulty minus a "
                    "penalty for rings of more than 6 atoms. Scores are from 0 to 1.")
        return ("Find a hidden molecule. The score is the similarity of your molecule to it, from 0 to 1; "
                "1 means you found it.")

    def _format(self):
        n = self.per_completion
        return f'Answer with a JSON list of {n} SMILES string{"s" * (n > 1)} only, like ["CCO"].'

    def prompt(self):
        return [{"role": "user", "content": f"{self._objective()}\n{self._format()}"}]

    # What varies (the anchor, the history) comes last: the prompts of a step share the rest, prefilled once.
    def neighbour_prompt(self, candidate, reward):
        return [{"role": "user", "content": f"{self._objective()}\n{self._format()} Give a variation of my molecule "
                                            f"below that could score higher.\nMy molecule: {candidate} (score "
                                            f"{reward:.3f})"}]

    def opro_prompt(self, history):
        lines = "\n".join(f"{c} (score {r:.3f})" for c, r in history)
        return [{"role": "user", "content": f"{self._objective()}\n{self._format()} Propose new molecules that "
                                            f"could score higher than my past ones, worst to best:\n{lines}"}]

    def render(self, candidate):
        return json.dumps([candidate])  # the answer format the prompts ask for

    # ---- completion -> canonical SMILES ----
    def parse(self, completion):
        if not isinstance(completion, str):
            return Parsed(error=f"completion is {type(completion).__name__}, not text")
        try:
            found = find_smiles_list(completion[:MAX_TEXT])
        except Exception as e:  # the JSON decoder on adversarial input: never let parse raise
            return Parsed(error=f"unreadable completion ({type(e).__name__})")
        if found is None:
            return Parsed(error='no JSON list of SMILES found, expected e.g. ["CCO"]')
        candidates, errors = [], []
        for smiles in found[:self.per_completion]:
            canon, err = check_molecule(smiles)
            if err:
                errors.append(err)
            elif canon not in candidates:
                candidates.append(canon)
        if len(found) > self.per_completion:
            errors.append(f"{len(found) - self.per_completion} extra molecule(s) ignored")
        return Parsed(candidates, "; ".join(errors) or None)

    # ---- candidates -> rewards ----
    def _cheap(self, smiles) -> Score:
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            return Score(0.0, {"error": "invalid SMILES"})
        if self.kind == "qed":
            q = QED.qed(mol)
            return Score(max(q, FLOOR), {"qed": q})
        if self.kind == "plogp":
            p, info = penalised_logp(mol)
            return Score(plogp_reward(p), {"plogp": p, **info})
        sim = DataStructs.TanimotoSimilarity(self.ref_fp, MORGAN.GetFingerprint(mol))
        found = smiles == self.reference  # a fingerprint twin (e.g. a stereoisomer) is close, not found
        return Score(max(sim if found else min(sim, 0.999), FLOOR), {"tanimoto": sim})

    def reward(self, candidates):
        if self.kind != "dock":
            return [self._cheap(c) for c in candidates]
        if not candidates:
            return []
        n = min(self.cpus, len(candidates))  # one docking per core; a lone docking gets all of them
        self._stop.clear()
        pool = ThreadPoolExecutor(n)  # threads only wait: each docking is its own process group
        try:
            return list(pool.map(lambda c: self._dock(c, max(1, self.cpus // n)), candidates))
        except BaseException:  # Ctrl-C mid-step: no docking may outlive us
            self._stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self.close()
            raise
        finally:
            pool.shutdown(wait=True)

    def _dock(self, smiles, num_cpus) -> Score:
        mol = Chem.MolFromSmiles(smiles)
        if mol is None or self._stop.is_set():
            return Score(0.0, {"error": "invalid SMILES" if mol is None else "stopped"})
        qed, t0 = QED.qed(mol), time.time()
        with tempfile.TemporaryDirectory(prefix="dock_") as tmp:
            cmd = [sys.executable, "-m", "tasks.molecule", self.target, smiles, str(num_cpus), tmp]
            # A new session makes the worker, obabel and vina one process group that a timeout kills at once.
            try:
                proc = subprocess.Popen(cmd, cwd=tmp, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True, text=True)
            except OSError as e:  # e.g. out of processes: this docking fails, the run goes on
                return Score(0.0, {"error": f"cannot start docking: {e}", "qed": qed})
            with self._lock:
                self._live.add(proc)
            try:
                out, err = proc.communicate(timeout=self.dock_timeout)
            except subprocess.TimeoutExpired:
                return Score(0.0, {"error": f"docking timed out after {self.dock_timeout:g} s", "qed": qed})
            finally:
                self._kill(proc)  # on timeout kills the group; either way reaps the worker
        seconds = round(time.time() - t0, 1)
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return Score(0.0, {"error": f"docking worker failed (rc {proc.returncode}): {err.strip()[-300:]}",
                               "qed": qed, "seconds": seconds})
        if result.get("vina") is None:
            return Score(0.0, {"error": result.get("error", "no pose found"), "qed": qed, "seconds": seconds})
        vina = result["vina"]
        return Score(dock_score(vina, qed), {"vina": vina, "qed": qed, "seconds": seconds})

    @staticmethod
    def _signal(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's pid is its group id: vina and obabel die with it
        except (ProcessLookupError, PermissionError):
            pass  # already gone

    def _kill(self, proc):
        """Called by the thread that owns proc: kill its group, reap the worker, and return only once every
        process of the group (obabel and vina outlive the worker by a moment: SIGKILL is delivered, not
        awaited) is gone, so a timed-out docking leaves nothing running behind `reward`."""
        self._signal(proc)  # even after the worker exited: vina may still run in its group
        with self._lock:
            self._live.discard(proc)  # before reaping, so close() never signals a recycled pid
        proc.communicate()
        deadline = time.monotonic() + 10
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def solved(self, score):
        if self.kind == "plogp":
            return False  # unbounded objective: the whole budget is spent
        if self.kind == "qed":
            return score.reward >= QED_SOLVED
        return score.reward >= self.reward_range[1]

    def evaluate(self, scored):
        ranked = sorted(scored, key=lambda cs: cs[1].reward, reverse=True)
        top3 = [s.reward for _, s in ranked[:3]]
        best = ranked[0] if ranked else (None, Score(0.0))
        return {"best_reward": best[1].reward, "best_molecule": best[0], "best_info": best[1].info,
                "top3_mean": sum(top3) / len(top3) if top3 else 0.0, "solved": any(self.solved(s) for _, s in scored),
                "n_scored": len(scored), "n_failed": sum(s.reward == 0 for _, s in scored)}

    def close(self):
        """Kill running dockings; their owning threads reap them (two threads must not communicate() at once)."""
        with self._lock:
            for proc in self._live:
                self._signal(proc)


def group_members(pgid) -> list[int]:
    """Live (not zombie) processes of a process group."""
    return [pid for pid, p in processes().items() if p.state != "Z" and p.pgid == pgid]


def dock_worker(target, smiles, num_cpus, workdir):
    """Runs in the docking subprocess: prints one JSON line, {"vina": float | None} or {"error": str}."""
    import logging
    logging.disable(logging.WARNING)  # dockstring warns on charged atoms; the parent only reads our JSON line
    from dockstring import DockstringError, load_target
    try:
        vina, _ = load_target(target, working_dir=workdir).dock(smiles, num_cpus=int(num_cpus), seed=VINA_SEED)
        print(json.dumps({"vina": vina} if vina is not None else {"error": "Vina found no pose"}))
    except DockstringError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {str(e)[:300]}"}))


TASK = Molecule

if __name__ == "__main__":  # the docking subprocess: python -m tasks.molecule TARGET SMILES NUM_CPUS WORKDIR
    dock_worker(*sys.argv[1:])
