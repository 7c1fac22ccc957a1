#!/usr/bin/env bash
# Issue 17: Llama 3.1 8B decoding after the one-pass softmax (-33 µs a step in callJ) and the
# blocks-of-8 decode loop (-16 µs x 7/8 of the per-step predicate read-back). 227.4 tok/s at batch 1
# before (2026-12-02f). Prediction: ~229.5-230.5 at batch 1 (4.398 ms -> ~4.35 ms a step).
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 60 python3 bench/decode_attention_check.py --preset llama3.1-8b --batches 1 \
  --ways current,twopass,current@while,current@blocks > $OUT/decode_attention.log 2>>$OUT/err.log
timeout 120 python3 bench/generate_throughput.py --preset llama3.1-8b --variants bf16 --logit_prompts 0 --repeats 3 \
  --batches 1,8 > $OUT/decode_8b.log 2>>$OUT/err.log
tail -n 5 $OUT/decode_attention.log; tail -n 3 $OUT/decode_8b.log; grep -v -i warn $OUT/err.log | tail -n 3
