#!/usr/bin/env bash
# Issue 17: Llama 3.1 8B with LoRA on all seven targets, 8 x 512, bf16 and fp8 (both layouts), even
# loss chunks (2026-12-02 bf16 with the old chunks: 15,475 tok/s, 47.6%, 46.1 GiB; the issue asks 55%).
# bf16 without remat too: dots_no_batch recomputes the elementwise work around seven LoRA products a
# block, and 8B all-seven used 46 of the 104 GiB JAX may take. Prediction: fp8 ~60%, remat none +4%.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 560 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 8x512 --targets q,k,v,o,gate,up,down \
  --variants 'quantize=fp8;quantize=none;quantize=none,remat=none;quantize=fp8,fuse_mlp=1' > $OUT/ours_8b_all.log 2>>$OUT/err.log
tail -n 4 $OUT/ours_8b_all.log; tail -n 3 $OUT/err.log
