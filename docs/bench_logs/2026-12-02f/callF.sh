#!/usr/bin/env bash
# Issue 17: Llama 3.1 8B, ours (fp8 with both kernel layouts; bf16 at 8 x 512) and PEFT + torch.compile
# in the same call (carry .peers). 2026-12-02: fp8 one layout 22,898 / 24,821 / 23,169, bf16 18,152 at
# 8 x 512, PEFT + compile 16,703 at 8 x 512 (its compile ~107 s a shape). Prediction: both layouts
# +10% at 4 x 256, +4% at the others.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 200 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 4x256,8x512,2x2048 --quantize fp8 > $OUT/ours_8b.log 2>>$OUT/err.log
timeout 60 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 8x512 > $OUT/ours_8b_bf16.log 2>>$OUT/err.log
timeout 300 python3 .peers/peft_lora_bench.py --preset llama3.1-8b --shapes 8x512,4x256 --compile > $OUT/peft_8b.log 2>>$OUT/err.log
tail -n 4 $OUT/ours_8b.log; tail -n 2 $OUT/ours_8b_bf16.log; tail -n 4 $OUT/peft_8b.log
