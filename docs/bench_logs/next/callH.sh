#!/usr/bin/env bash
# Issue 18: --fuse_mlp (gate and up as one (C, 2, H) kernel: one GEMM twice as wide forward, one for
# their input gradient) against apart, 7B, bf16 and fp8 (both layouts), one process per depth.
# Prediction from the GEMM table (1,024-token products run ~15% below 4,096-token ones): +3% at
# 4 x 256, ~+1% at 8 x 512; fp8 a little more (its GEMMs lose more at few tokens).
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 200 python3 bench/train_throughput.py --preset 7b --n_layer 8 --shapes 4x256,8x512 --steps 10 \
  --variants 'quantize=none;quantize=none,fuse_mlp=1;quantize=fp8;quantize=fp8,fuse_mlp=1' > $OUT/fuse_8layers.log 2>>$OUT/err.log
timeout 250 python3 bench/train_throughput.py --preset 7b --shapes 4x256 \
  --variants 'quantize=none,fuse_mlp=1;quantize=fp8,fuse_mlp=1' > $OUT/fuse_7b.log 2>>$OUT/err.log
tail -n 6 $OUT/fuse_8layers.log; tail -n 3 $OUT/fuse_7b.log
