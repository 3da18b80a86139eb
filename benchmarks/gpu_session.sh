#!/usr/bin/env bash
# One device-machine call for what only a GPU shows; each stage runs under its own time limit so
# one slow stage cannot take the rest with it (docs/benchmarks.md, "The GPU session script").
# STAGES picks them; the default set is sized for ~9 minutes on one H100:
#   tests                 pytest -m gpu (kernels on CUDA, no host sync, GPU-only unit tests)
#   sweep-uniter          vlpt bench train --sweep, UNITER-base bf16, ZeRO stages $ZERO_STAGES
#   sweep-albef           the same for ALBEF-base bf16 at 256 px
#   sweep-uniter-compile  UNITER-base ZeRO-2 with train.compile=true (ours compiled), 2 points
# and, not in the default set:
#   sweep-uniter-packed   UNITER-base ZeRO-2 with data.uniter.pack_len=$PACK_LEN, 2 points
#   kernels               vlpt bench kernels (IPOT / Sinkhorn / masked gather vs eager torch and POT)
#   train                 vlpt bench train (one point), UNITER-base bf16, ZeRO stages $ZERO_STAGES
#   albef                 the ALBEF pixel demo in bf16 ZeRO-2 (500 steps, retrieval R@k)
#   albef-base            ALBEF-base bf16 at 256 px: 30 optimizer steps of `vlpt pretrain`, samples/s
# Run from the repository root with the packages the image lacks in .whl/ (deepspeed,
# webdataset, pot, ...); results go to $OUT as <kind>-<gpu>-<model>-bf16-zero<stage>.json. A sweep
# rewrites its JSON after every point, so one cut short by its time limit keeps the points it ran.
set -u
OUT=${OUT:-/tmp/gpu-out}
STAGES=${STAGES:-tests sweep-uniter sweep-albef sweep-uniter-compile}
ZERO_STAGES=${ZERO_STAGES:-0 2}
SWEEP_UNITER=${SWEEP_UNITER:-8192,16384,32768,65536,131072}   # ~148 .. 2370 pairs per GPU
SWEEP_ALBEF=${SWEEP_ALBEF:-8192,16384,32768,65536}            # ~30 .. 242 pairs per GPU
SWEEP_STEPS=${SWEEP_STEPS:-"--steps 8 --warmup 3 --batches-per-task 1"}
PACK_LEN=${PACK_LEN:-128}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
stage() { echo; echo "=== $(date +%T) $*"; }
quiet() { grep -v -e '^\[transformers\]' -e 'UserWarning: barrier' -e 'return func(\*args' -e 'ProcessGroupNCCL'; }
VLPT="python3 -m vlpt"
UNITER_CFG=benchmarks/configs/uniter-base-bf16.yaml
ALBEF_CFG=benchmarks/configs/albef-base-bf16.yaml

stage setup
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false
unset DS_ACCELERATOR
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"
# h100, h200, a100, ...: the second word of the device name, for the file names
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
GPU=${GPU:-gpu}

uniter_data() {  # UNITER-shaped region shards and vocabulary (sweeps draw shards with replacement)
  [ -f /tmp/uniter_shapes/vocab.txt ] || timeout 60 python3 benchmarks/uniter_shape_data.py --out /tmp/uniter_shapes --samples 1024
}
vocab30522() {  # bert-base-uncased's vocabulary size: the demo vocabulary padded
  [ -f /tmp/vocab30522.txt ] || python3 -c "from pathlib import Path; from benchmarks.uniter_shape_data import write_vocab; write_vocab(Path('/tmp/vocab30522.txt'), 30522)"
}
albef_data() {  # the demo pictures of the pretraining stages (the default 2,000 scenes)
  vocab30522
  [ -f demo_pixels/train/manifest.json ] || timeout 90 $VLPT demo-data --pixels --out demo_pixels > /dev/null
}
bench_pixels() {  # a few demo pictures for the sweeps (they draw with replacement)
  vocab30522
  [ -f /tmp/bench_pixels/train/manifest.json ] || timeout 30 $VLPT demo-data --pixels --out /tmp/bench_pixels \
    --scenes 400 --val-scenes 20 > /dev/null
}
sweep() {  # sweep <time limit s> <config> <points> <out name> [overrides...]
  local limit=$1 cfg=$2 points=$3 name=$4; shift 4
  timeout "$limit" $VLPT bench train --config "$cfg" --sweep "$points" $SWEEP_STEPS "$@" \
    --out "$OUT/$name.json" 2>&1 | quiet | tail -20
}

for s in $STAGES; do case $s in
tests)
  stage "pytest -m gpu"
  timeout 70 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/unit --timeout=60 2>&1 | tail -8 ;;
sweep-uniter)
  stage "bench train --sweep: UNITER-base bf16, ZeRO $ZERO_STAGES"
  uniter_data
  for z in $ZERO_STAGES; do
    sweep 105 $UNITER_CFG "$SWEEP_UNITER" "train-sweep-$GPU-uniter-base-bf16-zero$z" --parallel.zero_stage=$z
  done ;;
sweep-albef)
  stage "bench train --sweep: ALBEF-base bf16 256 px, ZeRO $ZERO_STAGES"
  bench_pixels
  for z in $ZERO_STAGES; do
    sweep 75 $ALBEF_CFG "$SWEEP_ALBEF" "train-sweep-$GPU-albef-base-bf16-zero$z" --parallel.zero_stage=$z \
      --data.train=/tmp/bench_pixels/train --data.val=/tmp/bench_pixels/val
  done ;;
sweep-uniter-compile)
  stage "bench train --sweep: UNITER-base bf16 ZeRO-2, train.compile (ours compiled, baseline eager)"
  uniter_data
  sweep 80 $UNITER_CFG 16384,65536 "train-sweep-$GPU-uniter-base-bf16-zero2-compile" \
    --parallel.zero_stage=2 --train.compile=true ;;
sweep-uniter-packed)
  stage "bench train --sweep: UNITER-base bf16 ZeRO-2, data.uniter.pack_len=$PACK_LEN"
  uniter_data
  sweep 60 $UNITER_CFG 16384,65536 "train-sweep-$GPU-uniter-base-bf16-zero2-pack$PACK_LEN" \
    --parallel.zero_stage=2 --data.uniter.pack_len=$PACK_LEN ;;
kernels)
  stage "bench kernels"
  timeout 130 $VLPT bench kernels --reps 10 --warmup 2 --out "$OUT/kernels-$GPU.json" 2>&1 | tail -60 ;;
train)
  stage "bench train: UNITER-base bf16, ZeRO $ZERO_STAGES"
  uniter_data
  for z in $ZERO_STAGES; do
    timeout 100 $VLPT bench train --config $UNITER_CFG --steps 20 --warmup 5 \
      --parallel.zero_stage=$z --profile-steps ${PROFILE_STEPS:-0} --out "$OUT/train-$GPU-uniter-base-bf16-zero$z.json" 2>&1 | quiet | tail -7
  done ;;
albef)
  stage "ALBEF pixel demo, bf16 ZeRO-2"
  albef_data
  timeout 150 $VLPT pretrain --config configs/pretrain/demo-albef.yaml --precision.dtype=bf16 \
    --parallel.zero_stage=2 --data.num_workers=8 --tracking.enabled=false --train.progress=false \
    --train.run_dir=/tmp/albef-demo-gpu 2>&1 | quiet | tail -30
  cp /tmp/albef-demo-gpu/summary.json "$OUT/albef-demo-bf16-summary.json" ;;
albef-base)
  stage "ALBEF-base bf16, 256 px"
  albef_data
  timeout 120 $VLPT pretrain --config $ALBEF_CFG --data.num_workers=12 2>&1 | quiet | tail -14
  cp /tmp/albef-base-gpu/summary.json "$OUT/albef-base-bf16-summary.json" ;;
*) echo "unknown stage $s" ;;
esac; done
stage done
