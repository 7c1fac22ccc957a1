#!/usr/bin/env bash
# Issue 17: Llama 3.1 70B LoRA r=8 q,v on one H200 with --quantize fp8 (one kernel layout: the
# estimate is 84.8 GiB at 4 x 256 with dots_no_batch; both layouts would not leave the 5% margin).
# 2026-12-02 (second session): nf4-dq, remat full, 861 tok/s (24.3%), 42.0 GiB, compile 211 s,
# build 112 s. Prediction: fp8 ~2,400-2,800 tok/s (65-75% MFU in bf16 FLOPs), ~85 GiB peak.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 560 python3 bench/train_throughput.py --preset llama3.1-70b --shapes 4x256 \
  --quantize fp8 --variants 'fp8_both_layouts=0' --steps 5 --warmup 2 > $OUT/ours_70b_fp8.log 2>>$OUT/err.log
tail -n 3 $OUT/ours_70b_fp8.log; tail -n 5 $OUT/err.log
