#!/usr/bin/env bash
# The probe on a bare GPU node, in one call from a checkout (docs/cluster.md#latentseek-gpu-probe):
# needs only python3 with a CUDA torch and transformers (and PyYAML); no setup, no network.
#   scripts/gpu_probe.sh [OUT_DIR] [extra gpu_probe arguments]
# writes OUT_DIR/probe.json (default outputs/) for the paper's five shapes within 280 s, and
# prints the memory plans of the 7B, 8B and 14B shapes for both backends first.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs}"
shift || true
python3 -m jobs.gpu_probe --shape qwen2.5-7b,llama-3.1-8b,qwen2.5-14b --plan-only
python3 -m jobs.gpu_probe --shape all --budget-s 280 --out "$out/probe.json" "$@"
