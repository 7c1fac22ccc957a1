#!/usr/bin/env bash
# Does XLA hoist the per-step relayout of the e4m3 kernels out of the micro-batch loop? cuBLASLt's FP8
# GEMM on Hopper takes both operands with the contracted axis innermost, so each forward product of an
# (in, out) kernel transposes it first (~17 us per 16 MB: ~6.8 ms of a 40 ms 7B fp8 step at 4 x 256,
# from 2026-12-02c's gemm_no_triton.log). With lit-llama's 32 micro-batches a step, loop-invariant
# code motion could pay it once a step. Prediction: if hoisted, fp8 at --accum 8 runs >= 10% more
# tokens/s than at --accum 1 and bf16 < 3% more; if not, both < 3% -> store both orientations.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
# and --fp8_both_layouts (no transposes at all; one byte a weight more), at one and at 8 micro-batches.
timeout 250 python3 bench/train_throughput.py --preset 7b --shapes 4x256 --accum 8 --steps 6 \
  --variants 'quantize=fp8;quantize=fp8,fp8_both_layouts=1;quantize=none' > $OUT/ours_7b_accum8.log 2>>$OUT/err.log
timeout 200 python3 bench/train_throughput.py --preset 7b --shapes 4x256,8x512 \
  --variants 'quantize=fp8;quantize=fp8,fp8_both_layouts=1' > $OUT/ours_7b_both.log 2>>$OUT/err.log
tail -n 4 $OUT/ours_7b_accum8.log; tail -n 5 $OUT/ours_7b_both.log
