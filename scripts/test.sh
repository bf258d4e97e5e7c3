#!/usr/bin/env bash
# The test command: sets up .venv (idempotent), fetches the embedded model (cached), runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_NUM_OF_RESERVED_CPU=0
.venv/bin/genome fetch-model smollm2-135m
exec .venv/bin/python -m pytest "$@"
