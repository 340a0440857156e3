#!/usr/bin/env bash
# Install plmrun and what it needs. CPU torch first (pinned, so pip never pulls a multi-GB CUDA build),
# then the package; --dev adds test dependencies (peft included: plmrun finetune --method lora) and mmseqs2
# (homology-aware splits). Run it inside a virtual environment (see the README).
# An installed torch is kept: on a GPU machine install your CUDA build of torch first.
# TORCH_INDEX: where the CPU build comes from (default PyTorch's CPU index; empty: pip's own sources only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
if ! $PY -c "import torch" 2>/dev/null; then
    # torch alone from that index, then its dependencies from pip's usual sources
    $PY -m pip install --quiet --no-deps "torch==2.13.0" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
    $PY -m pip install --quiet "torch==2.13.0"
fi
if [[ "${1:-}" == "--dev" ]]; then
    $PY -m pip install --quiet -e ".[dev]"
    if ! command -v mmseqs >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1; then
            SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
            $SUDO apt-get update -qq && $SUDO apt-get install -y -qq mmseqs2 >/dev/null
        else
            echo "warning: mmseqs2 not found and apt-get unavailable; install it for 'plmrun data split'" >&2
        fi
    fi
else
    $PY -m pip install --quiet -e .
fi
$PY -c "import plmrun, torch; print(f'plmrun {plmrun.__version__} with torch {torch.__version__}')"
