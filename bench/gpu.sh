#!/usr/bin/env bash
# Every GPU figure in one run, for a lent GPU: bench/gpu.py does the work (see its docstring).
#
#   bash bench/gpu.sh              # one H100/H200: under 8 minutes, one JSON line per figure
#   bash bench/gpu.sh --dry-run    # the same steps on CPU with tiny shapes
#   bash bench/gpu.sh --logs DIR   # keep each step's log in DIR
#
# Random weights of the real shapes and pretrained: false codecs: nothing is downloaded, and
# the Hugging Face libraries are told so, so a missing file fails instead of fetching.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/voxtral-torch-ext}"
exec uv run python bench/gpu.py "$@"
