#!/usr/bin/env bash
# One-command GPU suite for one H100/H200-class GPU (about 8 minutes): throughput, MFU and
# peak memory of the trainer's own step (benchmarks/bench_train.py) for 125m and 1b at seq
# 2048 and 4096 on every backend, compile and activation checkpointing on/off; then the
# CUDA-only checks (benchmarks/gpu_checks.py: flash kernel, flex document mask = dense mask,
# no host syncs, exact resume).
#
#   bash benchmarks/gpu_suite.sh 2>&1 | tee gpu_suite.log
#
# Put the printed table, with the date and the device, in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export KILN_BENCH_STEPS=${KILN_BENCH_STEPS:-10} KILN_BENCH_WARMUP=${KILN_BENCH_WARMUP:-3} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
date -u
run() {  # launcher args... -- bench overrides...
  local port=$((20000 + RANDOM % 20000))
  case $1 in
    python) shift; python3 benchmarks/bench_train.py train=gpu "$@" ;;
    torchrun) shift; torchrun --nproc_per_node 1 --master_port $port benchmarks/bench_train.py train=gpu "$@" ;;
    deepspeed) shift; deepspeed --num_gpus 1 --master_port $port benchmarks/bench_train.py train=gpu "$@" ;;
  esac 2>&1 | grep '^\[bench_train\]' || echo "[bench_train] FAILED: $*"
}
for model in 125m 1b; do
  for seq in 2048 4096; do
    micro=$(( seq == 2048 ? 8 : 4 ))
    common=("model=$model" "data.seq_len=$seq" "model.max_seq_len=$seq" "train.micro_batch_size=$micro" "train.grad_accum_steps=1")
    run python "${common[@]}" train.compile=false train.activation_checkpointing=false
    run python "${common[@]}" train.compile=true train.activation_checkpointing=false
    run python "${common[@]}" train.compile=true train.activation_checkpointing=true
    run torchrun "${common[@]}" backend=fsdp train.compile=true
    run deepspeed "${common[@]}" backend=deepspeed backend.zero_stage=2 train.compile=true
    run deepspeed "${common[@]}" backend=deepspeed backend.zero_stage=3 train.compile=true
  done
done
python3 benchmarks/gpu_checks.py
