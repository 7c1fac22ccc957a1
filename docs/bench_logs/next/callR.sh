#!/usr/bin/env bash
# After the eighth session's change (fp8 with kernels in both layouts keeps XLA's default GEMMs;
# one layout still sends every GEMM to cuBLAS): the rows it did not re-time.
# 1) 7B fp8, both layouts, XLA's defaults (train.py's choice now) at 4x256 / 8x512 / 2x2048: before,
#    cuBLAS-only, 28,856 / 29,504 / 27,253 (fifth session). Prediction: +2-3% (8B q,v gained 2.5-2.9%).
# 2) one layout: is cuBLAS-only still right? 8B q,v 4x256, fp8_both_layouts=0, Triton on vs off in
#    two processes. Prediction (third session's GEMM table): Triton on slower by 10-25%.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 240 python3 bench/train_throughput.py --preset 7b --shapes 4x256,8x512,2x2048 --quantize fp8 --steps 10 \
  > $OUT/fp8_7b_xla_defaults.log 2>>$OUT/err.log
timeout 120 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 4x256 --quantize fp8 --steps 10 \
  --variants fp8_both_layouts=0 > $OUT/fp8_8b_one_layout_cublas.log 2>>$OUT/err.log
XLA_FLAGS=--xla_gpu_enable_triton_gemm=true timeout 120 python3 bench/train_throughput.py --preset llama3.1-8b \
  --shapes 4x256 --quantize fp8 --steps 10 --variants fp8_both_layouts=0 > $OUT/fp8_8b_one_layout_triton.log 2>>$OUT/err.log
tail -n 4 $OUT/fp8_7b_xla_defaults.log; tail -n 1 $OUT/fp8_8b_one_layout_cublas.log $OUT/fp8_8b_one_layout_triton.log
grep -v -i warn $OUT/err.log | tail -n 3
