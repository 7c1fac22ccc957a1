#!/usr/bin/env bash
# Issue 17: the PEFT + torch.compile peers callF/callE left out: all seven targets at 8 x 512 (ours,
# callE: fp8 20,495 tok/s, bf16 15,128) and q,v at 4 x 256 (callF's 300 s ran out before it; ours fp8
# 25,385). 2026-12-01 PEFT eager: all linear 10,228 at 8 x 512, q,v 7,080 at 4 x 256.
# Prediction: compile gives all-linear ~12,500-13,500 (ours fp8 ~1.5-1.6x), q,v 4x256 ~14,000.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 200 python3 .peers/peft_lora_bench.py --preset llama3.1-8b --shapes 8x512 --targets all --compile > $OUT/peft_8b_all.log 2>>$OUT/err.log
timeout 160 python3 .peers/peft_lora_bench.py --preset llama3.1-8b --shapes 4x256 --compile > $OUT/peft_8b_4x256.log 2>>$OUT/err.log
cat $OUT/peft_8b_all.log $OUT/peft_8b_4x256.log; grep -v -i warn $OUT/err.log | tail -n 3
