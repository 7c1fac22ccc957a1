#!/usr/bin/env bash
# Issue 17: the last rows its "Must show" lacks: PEFT + torch.compile at 2 x 2048, Llama 3.1 8B, q,v
# then all seven targets (carry .peers; each its own process, so a cut-off second leaves the first).
# Ours at 2 x 2048 (2026-12-02 f/g): q,v fp8 23,478 (75.1%), bf16 17,259 (55.2%); all seven fp8
# 19,345 (61.9%), bf16 14,998 (48.0%). PEFT + compile measured: q,v 16,727 at 8 x 512; all seven
# 14,368 at 8 x 512 (compile ~4 min a shape). Prediction: q,v ~16,000, all seven ~13,500-14,500.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 240 python3 .peers/peft_lora_bench.py --preset llama3.1-8b --shapes 2x2048 --compile \
  --steps 5 --warmup 2 > $OUT/peft_8b_qv_2048.log 2>>$OUT/err.log
timeout 330 python3 .peers/peft_lora_bench.py --preset llama3.1-8b --shapes 2x2048 --targets all --compile \
  --steps 5 --warmup 2 > $OUT/peft_8b_all_2048.log 2>>$OUT/err.log
cat $OUT/peft_8b_qv_2048.log $OUT/peft_8b_all_2048.log; grep -v -i warn $OUT/err.log | tail -n 5
