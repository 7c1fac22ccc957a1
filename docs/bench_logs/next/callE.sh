#!/usr/bin/env bash
# Issue 17: Llama 3.1 8B with LoRA on all seven targets, 8 x 512, bf16 and fp8 (both layouts), even
# loss chunks (2026-12-02 bf16 with the old chunks: 15,475 tok/s, 47.6%; the issue asks 55%).
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 450 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 8x512 --targets q,k,v,o,gate,up,down \
  --variants 'quantize=fp8;quantize=none;quantize=fp8,fuse_mlp=1' > $OUT/ours_8b_all.log 2>>$OUT/err.log
tail -n 4 $OUT/ours_8b_all.log; tail -n 3 $OUT/err.log
