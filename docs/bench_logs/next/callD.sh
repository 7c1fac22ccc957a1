#!/usr/bin/env bash
# Issue 17: Llama 3.1 8B with LoRA on all seven targets (bf16 and fp8, even loss chunks; 2026-12-02
# bf16 with the old chunks: 15,475 tok/s, 47.6%), and 8B decoding at batch 1 and 8 with gate and up
# fused into one kernel (generate.py's layout since 2026-12-02d) against apart (bf16 214-223 tok/s
# at batch 1 against the goal of 230). Prediction: fused +1.5-3% at batch 1 (one GEMV launch and one
# tail a block fewer), less at batch 8.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
G="python3 bench/generate_throughput.py --preset llama3.1-8b --batches 1,8 --variants bf16 --logit_prompts 0 --repeats 3"
timeout 110 $G --fused_mlp 0 > $OUT/decode_8b_apart.log 2>>$OUT/err.log
timeout 110 $G --fused_mlp 1 > $OUT/decode_8b_fused.log 2>>$OUT/err.log
timeout 330 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 8x512 --targets q,k,v,o,gate,up,down \
  --variants 'quantize=fp8;quantize=none' > $OUT/ours_8b_all.log 2>>$OUT/err.log
tail -n 5 $OUT/decode_8b_apart.log $OUT/decode_8b_fused.log; tail -n 3 $OUT/ours_8b_all.log
