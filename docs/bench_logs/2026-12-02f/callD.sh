#!/usr/bin/env bash
# Issue 17: Llama 3.1 8B decoding at batch 1 and 8 (gate|up fused, generate.py's layout) and
# transformers' compiled static-cache generate in the same call (carry .peers), then one profiled
# decode call at batch 1: where the last 1.2% to 230 tok/s hides; then batch 1 with CUDA graphs
# (command buffers) off and with WHILE/CONDITIONAL added: are the ~350 small launches a step graphed?
# 2026-12-02e: fused 227.2 / 1,794.8 (apart 224.0 / 1,757.1), HF static 147.7 at batch 1 (separate
# call). Ours first: JAX holds 75% of the card while alive. peak_gib: 28.0 (apart) / 35.0 (fused)
# before prepare freed consumed arrays; expected now ~18.5 (the weights + the largest stacked leaf).
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
G="python3 bench/generate_throughput.py --preset llama3.1-8b --variants bf16 --logit_prompts 0 --repeats 3"
timeout 90 $G --batches 1,8 > $OUT/decode_8b.log 2>>$OUT/err.log
timeout 250 python3 .peers/hf_generate_bench.py --preset llama3.1-8b --batches 1,8 --prompt_len 256 --static \
  > $OUT/decode_8b_hf_static.log 2>>$OUT/err.log
timeout 110 $G --batches 1 --repeats 1 --profile $OUT/decode_profile > $OUT/decode_8b_profile.log 2>>$OUT/err.log
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 50 $G --batches 1 --repeats 2 > $OUT/decode_8b_nographs.log 2>>$OUT/err.log
XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL timeout 50 $G --batches 1 --repeats 2 \
  > $OUT/decode_8b_graphwhile.log 2>>$OUT/err.log
tail -n 4 $OUT/decode_8b.log; cut -c1-300 $OUT/decode_8b_hf_static.log; tail -n 25 $OUT/decode_8b_profile.log
tail -n 2 $OUT/decode_8b_nographs.log; tail -n 2 $OUT/decode_8b_graphwhile.log; tail -n 5 $OUT/err.log
