#!/usr/bin/env bash
# Issue 17: Llama 3.1 8B with LoRA on all seven targets (bf16 and fp8, even loss chunks; 2026-12-02
# bf16 with the old chunks: 15,475 tok/s, 47.6%), and where an 8B decode step's time goes at batch 1
# (bf16 214-223 tok/s against the goal of 230; never profiled at 8B).
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 330 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 8x512 --targets q,k,v,o,gate,up,down \
  --variants 'quantize=fp8;quantize=none' > $OUT/ours_8b_all.log 2>>$OUT/err.log
timeout 150 python3 bench/generate_throughput.py --preset llama3.1-8b --batches 1 --variants bf16 --logit_prompts 0 \
  --repeats 1 --profile /tmp/gen_profile > $OUT/decode_8b_profile.log 2>>$OUT/err.log
# the decode step with every GEMM through cuBLAS (at 7B with 1-row products it was slower: 224.8 vs 236)
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 100 python3 bench/generate_throughput.py --preset llama3.1-8b \
  --batches 1 --variants bf16 --logit_prompts 0 --repeats 2 > $OUT/decode_8b_cublas.log 2>>$OUT/err.log
tail -n 3 $OUT/ours_8b_all.log; tail -n 3 $OUT/decode_8b_cublas.log; grep -A8 "^kind" $OUT/decode_8b_profile.log | head -20
