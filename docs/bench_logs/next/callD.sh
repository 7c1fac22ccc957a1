#!/usr/bin/env bash
# Issue 17: Llama 3.1 8B decoding at batch 1 and 8 with gate and up fused into one kernel
# (generate.py's layout since 2026-12-02d) and apart, and transformers' compiled static-cache
# generate in the same call (carry .peers). 2026-12-02: bf16 214-223 tok/s at batch 1 (goal 230),
# HF static 124.3. Prediction: fused +1.5-3% at batch 1 (one GEMV launch and one tail a block
# fewer), less at batch 8. Ours first: JAX holds 75% of the card while alive.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
G="python3 bench/generate_throughput.py --preset llama3.1-8b --batches 1,8 --variants bf16 --logit_prompts 0 --repeats 3"
timeout 110 $G --fused_mlp 0 > $OUT/decode_8b_apart.log 2>>$OUT/err.log
timeout 110 $G --fused_mlp 1 > $OUT/decode_8b_fused.log 2>>$OUT/err.log
timeout 250 python3 .peers/hf_generate_bench.py --preset llama3.1-8b --batches 1,8 --prompt_len 256 --static \
  > $OUT/decode_8b_hf_static.log 2>>$OUT/err.log
tail -n 4 $OUT/decode_8b_apart.log $OUT/decode_8b_fused.log; cat $OUT/decode_8b_hf_static.log | cut -c1-300
