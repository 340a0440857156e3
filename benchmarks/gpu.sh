#!/usr/bin/env bash
# One-command GPU benchmark: check the environment, then train the 133M speedrun config (eager,
# compiled, and compiled with fp8 linears when torchao is installed) and the ESM-2 150M preset
# (ESM-2 recipe: AdamW) for a fixed number of steps on the bundled corpus and print real tokens/s,
# MFU and peak memory; with N > 1 GPUs also the speedrun config on N GPUs
# (torchrun) and its scaling efficiency. Results: benchmarks/results/gpu/*.json and gpu.md.
#
#   bash benchmarks/gpu.sh [--set section.key=value ...]      (extra arguments go to every run)
#   env: TOKEN_BUDGET (tokens per GPU per step, default 65536), WARMUP, WINDOWS, STEPS_PER_WINDOW, NGPU
set -euo pipefail
cd "$(dirname "$0")/.."

TOKEN_BUDGET=${TOKEN_BUDGET:-65536}
WARMUP=${WARMUP:-5}
WINDOWS=${WINDOWS:-5}
STEPS_PER_WINDOW=${STEPS_PER_WINDOW:-4}
OUT=benchmarks/results/gpu
PY=${PYTHON:-python}

fail() { echo "error: $*" >&2; exit 2; }

echo "== environment"
command -v nvidia-smi >/dev/null 2>&1 || fail "nvidia-smi not found: this benchmark needs an NVIDIA GPU and driver"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || fail "nvidia-smi cannot see a GPU"
"$PY" - <<'PYEOF' || fail "torch cannot use CUDA here (install a CUDA build of torch 2.13)"
import sys
import torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__}: torch.cuda.is_available() is False (CUDA build: {torch.version.cuda})",
          file=sys.stderr)
    sys.exit(1)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()}x "
      f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
try:
    import flash_attn
    print(f"flash-attn {flash_attn.__version__}")
except ImportError:
    print("flash-attn not installed (attention_backend=auto uses FlexAttention)")
try:
    import torchao
    print(f"torchao {torchao.__version__} (train.fp8)")
except ImportError:
    print("torchao not installed: the fp8 row is skipped (pip install 'plmrun[fp8]')")
PYEOF
NGPU=${NGPU:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
mkdir -p "$OUT"
# Prepare the bundled corpus once, before any timing or torchrun ranks start.
"$PY" -c "from plmrun.data.corpus import bundled_dataset_dir; print('data:', bundled_dataset_dir())"

COMMON=(--token-budget "$TOKEN_BUDGET" --warmup "$WARMUP" --windows "$WINDOWS" --steps-per-window "$STEPS_PER_WINDOW")
echo "== speedrun_133m, 1 GPU"
"$PY" benchmarks/gpu_bench.py --config speedrun_133m "${COMMON[@]}" --out "$OUT/speedrun_133m_1gpu.json" "$@"
echo "== esm2_150m (ESM-2 recipe: AdamW), 1 GPU"
"$PY" benchmarks/gpu_bench.py --config esm2_150m --set optim.optimizer=adamw "${COMMON[@]}" \
    --out "$OUT/esm2_150m_1gpu.json" "$@"
FILES=("$OUT/speedrun_133m_1gpu.json" "$OUT/esm2_150m_1gpu.json")
echo "== speedrun_133m, 1 GPU, compiled"
"$PY" benchmarks/gpu_bench.py --config speedrun_133m --set train.compile=true "${COMMON[@]}" \
    --out "$OUT/speedrun_133m_1gpu_compile.json" "$@"
FILES+=("$OUT/speedrun_133m_1gpu_compile.json")
if "$PY" -c "import torchao.float8" 2>/dev/null; then
    echo "== speedrun_133m, 1 GPU, fp8 linears (torchao), compiled"
    "$PY" benchmarks/gpu_bench.py --config speedrun_133m --set train.compile=true --set train.fp8=true \
        "${COMMON[@]}" --out "$OUT/speedrun_133m_1gpu_fp8.json" "$@"
    FILES+=("$OUT/speedrun_133m_1gpu_fp8.json")
fi
if [ "$NGPU" -gt 1 ]; then
    echo "== speedrun_133m, $NGPU GPUs (torchrun, DDP)"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" benchmarks/gpu_bench.py \
        --config speedrun_133m "${COMMON[@]}" --out "$OUT/speedrun_133m_${NGPU}gpu.json" "$@"
    FILES+=("$OUT/speedrun_133m_${NGPU}gpu.json")
fi
echo "== results"
"$PY" benchmarks/gpu_bench.py --table "${FILES[@]}" | tee "$OUT/gpu.md"
