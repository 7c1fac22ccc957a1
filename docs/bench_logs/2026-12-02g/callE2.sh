#!/usr/bin/env bash
# Issue 17: Llama 3.1 8B with LoRA on all seven targets at the two shapes callE left out (4 x 256,
# 2 x 2048), fp8 (both layouts) and bf16, each precision in its own process (bf16 keeps XLA's Triton
# GEMMs; an fp8 process turns them off). 8 x 512 (callE, 2026-12-02f): fp8 20,495 (63.1%), bf16 15,128
# (46.5%). Prediction: fp8 ~60-63% at both, bf16 ~45-47%.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
T=q,k,v,o,gate,up,down
timeout 280 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 4x256,2x2048 --targets $T --quantize fp8 \
  > $OUT/ours_8b_all_fp8.log 2>>$OUT/err.log
timeout 280 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 4x256,2x2048 --targets $T \
  > $OUT/ours_8b_all_bf16.log 2>>$OUT/err.log
tail -n 3 $OUT/ours_8b_all_fp8.log; tail -n 3 $OUT/ours_8b_all_bf16.log; grep -v -i warn $OUT/err.log | tail -n 3
