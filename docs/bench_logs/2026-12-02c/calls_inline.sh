#!/usr/bin/env bash
# Calls 2 and 5 of this session, as given to the device tool (after call 1 showed cuBLASLt's FP8 GEMMs fast).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# call 2
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 420 python3 bench/train_throughput.py --preset 7b \
  --shapes 4x256,8x512,2x2048 --steps 10 --variants 'quantize=fp8;quantize=none' > $OUT/notriton_7b.log 2>$OUT/notriton_7b.err
# call 3 was: export XLA_FLAGS=--xla_gpu_enable_triton_gemm=false; bash docs/bench_logs/2026-12-02c/call2.sh
# call 4 was: bash docs/bench_logs/2026-12-02c/call3.sh
# call 5
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 260 python3 bench/train_throughput.py --preset llama3.1-8b \
  --shapes 4x256,8x512,2x2048 --steps 10 --quantize fp8 > $OUT/notriton_8b_fp8.log 2>$OUT/notriton_8b.err
timeout 100 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 2x2048 --steps 10 > $OUT/ours_8b_bf16_2048.log
