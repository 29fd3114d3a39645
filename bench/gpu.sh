#!/usr/bin/env bash
# The benchmarks on a CUDA machine with the GPU options (bf16 autocast, channels-last, torch.compile),
# at GPU-sized batches. Prints each table; JSON goes to bench/results/*_gpu.json.
#
#   bash bench/gpu.sh                  # from anywhere; uses .venv/bin/python when it exists
#   PYTHON=python3 bash bench/gpu.sh   # another interpreter (needs the `bench` extra)
#
# About 15-25 minutes on one H100-class GPU, most of it torch.compile and the two training runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")'
export HF_HUB_OFFLINE=1

echo "== 1. training step and inference vs peers =="
"$PYTHON" bench/train_step.py --device cuda --amp bf16 --channels-last --compile --fast-peers \
    --sizes 8x512 16x512 --warmup 3 --repeats 10 --json bench/results/train_step_gpu.json

echo
echo "== 2. inference throughput: pipeline vs direct batches =="
"$PYTHON" bench/inference.py --device cuda --amp bf16 --images 256 --size-px 512 --batch-size 16 \
    --warmup 2 --repeats 5 --json bench/results/inference_gpu.json

echo
echo "== 3. streaming memory at 1x and 10x the dataset =="
"$PYTHON" bench/stream_memory.py --device cuda --config base.yaml --chip-size-px 256 --chips 800 \
    --factors 1 10 --iters 200 --batch-size 16 --num-workers 4 --mixed-precision bf16 \
    --opts SOLVER.CHANNELS_LAST true \
    --json bench/results/stream_memory_gpu.json

echo
echo "== 4. large-area inference end to end (R-101, 256-px windows, bf16; the reference: 78.6 chips/s on an A4000) =="
"$PYTHON" bench/predict_raster.py --device cuda --backbone resnet101s --dtype bf16 --batch-size 32 \
    --num-workers 4 --size-px 4096 --repeats 3
