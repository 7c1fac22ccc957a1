#!/usr/bin/env bash
# Speed lead from the seventh session: with all seven targets, dropout costs 4.3% of the bf16 step
# (8 x 512), and the profile shows 40 random-bit XOR fusions a step for 8 layers (0.97 ms, against 8
# and 0.14 ms with q,v). With rng_impl rbg the bits come from XLA's RngBitGenerator but keys are
# still split and folded with threefry; unsafe_rbg derives keys cheaply too. Prediction: +0.5-1.5%
# (the XOR share), masks identical in distribution (not in values: a resume-defining setting).
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 300 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 8x512 --targets q,k,v,o,gate,up,down \
  --variants 'rng_impl=rbg;rng_impl=unsafe_rbg;dropout=0' > $OUT/all7_rng.log 2>>$OUT/err.log
tail -n 4 $OUT/all7_rng.log; grep -v -i warn $OUT/err.log | tail -n 3
