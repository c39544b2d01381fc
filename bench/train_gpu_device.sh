#!/usr/bin/env bash
# Issue 19 on the lent GPU host, from the wheels carried in the git-ignored .whl19/ (28.9 MB:
# bitsandbytes 0.50.2 cut to its CUDA 13 and CPU libraries, transformers 4.57.6, peft 0.21.2,
# liger-kernel 0.6.5, unsloth 2026.10.9 without studio/, unsloth_zoo, trl 0.24.0, datasets 3.6.0
# and their small dependencies). Copy this file to .whl19/go.sh and call, with carry [".whl19"]:
#   bash .whl19/go.sh tests [SECONDS] [K]        the train stage's GPU tests (graphs, dropout kernel,
#                                                offload, the trainer's cuda_graphs runs)
#   bash .whl19/go.sh bench ENGINES REPEAT SHAPES [SECONDS]
#                                                bench/train_throughput.py, every row saved as it comes
# e.g. one call: bash .whl19/go.sh tests 270; bash .whl19/go.sh bench unsloth,ours-graphs,ours-graphs-offload 1 llama1b 250
[ -d /tmp/site19/unsloth ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site19 .whl19/*.whl || exit 1
export PYTHONPATH=/tmp/site19:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch, triton, transformers, peft, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)" | tee -a $OUT/device.txt
case $1 in
tests)
  APPLIANCE_BENCH_OUT=$OUT timeout ${2:-300} python3 -m pytest -q -s -rs -p no:cacheprovider \
    tests/gpu/test_graphs_gpu.py tests/unit/test_dropkernel.py tests/gpu/test_offload_gpu.py \
    tests/gpu/test_train_gpu.py -k "${3:-cuda_graphs or graphs_gpu or dropkernel or offload}" 2>&1 \
    | tee $OUT/gpu-tests.txt | grep -v "^  warnings\|Warning" | tail -40 ;;
bench)
  timeout ${5:-500} python3 bench/train_throughput.py --engines $2 --repeat $3 --shapes $4 \
    --out $OUT/tt.json --out-rows $OUT/tt-rows.json 2>&1 | tail -30 ;;
esac
