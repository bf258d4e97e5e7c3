#!/usr/bin/env bash
# The main job: sets up .venv (idempotent), then runs the end-to-end GENOME+ demo on SmolLM2-135M with real vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} VLLM_CPU_NUM_OF_RESERVED_CPU=0
exec .venv/bin/genome demo "$@"
