#!/usr/bin/env bash
# Issue 17: PEFT + torch.compile with LoRA on all seven targets, Llama 3.1 8B, 8 x 512 then 4 x 256 (carry
# .peers; the peer prints each shape's row when it is done, so a cut-off second shape still leaves the first).
# 2026-12-02 (sixth session) its compile ran past 200 s and left no row. Ours (callE): fp8 20,495
# tok/s, bf16 15,128. PEFT eager all linear: 10,228 (2026-12-01). Prediction: ~12,500-13,500.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 560 python3 .peers/peft_lora_bench.py --preset llama3.1-8b --shapes 8x512,4x256 --targets all --compile \
  --steps 5 --warmup 2 > $OUT/peft_8b_all.log 2>>$OUT/err.log
cat $OUT/peft_8b_all.log; grep -v -i warn $OUT/err.log | tail -n 5
