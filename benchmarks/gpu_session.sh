#!/usr/bin/env bash
# One device-machine call for what only a GPU shows (issues 5, 6, 7); each stage runs under
# its own time limit so one slow stage cannot take the rest with it. STAGES picks them:
#   tests      pytest -m gpu (kernels on CUDA, no host sync, GPU-only unit tests)
#   kernels    vlpt bench kernels (IPOT / Sinkhorn / masked gather vs eager torch and POT)
#   train      vlpt bench train, UNITER-base bf16 at UNITER's shapes, ZeRO stages $ZERO_STAGES
#   albef      the ALBEF pixel demo in bf16 ZeRO-2 (500 steps, retrieval R@k)
#   albef-base ALBEF-base bf16 at 256 px: 30 optimizer steps, end-to-end samples/s
# Run from the repository root with the packages the image lacks in .whl/ (deepspeed,
# webdataset, pot, ...) and demo_pixels/ already written; results go to $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}
STAGES=${STAGES:-tests kernels train albef albef-base}
ZERO_STAGES=${ZERO_STAGES:-2}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
stage() { echo; echo "=== $(date +%T) $*"; }
quiet() { grep -v -e '^\[transformers\]' -e 'UserWarning: barrier' -e 'return func(\*args' -e 'ProcessGroupNCCL'; }
VLPT="python3 -m vlpt"

stage setup
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false
unset DS_ACCELERATOR
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"

for s in $STAGES; do case $s in
tests)
  stage "pytest -m gpu"
  timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/unit/test_loader.py --timeout=60 2>&1 | tail -8 ;;
kernels)
  stage "bench kernels"
  timeout 130 $VLPT bench kernels --reps 10 --warmup 2 --out "$OUT/kernels-h200.json" 2>&1 | tail -60 ;;
train)
  stage "bench train: UNITER-base bf16, ZeRO $ZERO_STAGES"
  [ -f /tmp/uniter_shapes/vocab.txt ] || python3 benchmarks/uniter_shape_data.py --out /tmp/uniter_shapes --samples 2048
  for z in $ZERO_STAGES; do
    timeout 100 $VLPT bench train --config benchmarks/configs/uniter-base-bf16.yaml --steps 20 --warmup 5 \
      --parallel.zero_stage=$z --profile-steps ${PROFILE_STEPS:-0} --out "$OUT/train-h200-uniter-base-bf16-zero$z.json" 2>&1 | quiet | tail -6
  done ;;
albef)
  stage "ALBEF pixel demo, bf16 ZeRO-2"
  timeout 150 $VLPT pretrain --config configs/pretrain/demo-albef.yaml --precision.dtype=bf16 \
    --parallel.zero_stage=2 --data.num_workers=8 --tracking.enabled=false --train.progress=false \
    --train.run_dir=/tmp/albef-demo-gpu 2>&1 | quiet | tail -30
  cp /tmp/albef-demo-gpu/summary.json "$OUT/albef-demo-bf16-summary.json" ;;
albef-base)
  stage "ALBEF-base bf16, 256 px"
  python3 -c "from pathlib import Path; from benchmarks.uniter_shape_data import write_vocab; write_vocab(Path('/tmp/vocab30522.txt'), 30522)"
  timeout 120 $VLPT pretrain --config benchmarks/configs/albef-base-bf16.yaml --data.num_workers=12 2>&1 | quiet | tail -14
  cp /tmp/albef-base-gpu/summary.json "$OUT/albef-base-bf16-summary.json" ;;
*) echo "unknown stage $s" ;;
esac; done
stage done
