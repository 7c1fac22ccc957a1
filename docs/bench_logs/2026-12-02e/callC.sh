#!/usr/bin/env bash
# Issue 18: 7B, ours and PEFT + torch.compile in the same call, all three shapes (carry .peers).
# Ours first (JAX holds 75% of the card while alive): fp8 (both kernel layouts, the bench's and
# train.py's default on an H200) and, at 4 x 256, bf16. Expected (2026-12-02 fourth session):
# fp8 28,841 / ~29,800 / 27,654; PEFT + compile ~16,820 / 19,020 / 16,244 -> 1.5-1.7x.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 200 python3 bench/train_throughput.py --preset 7b --shapes 4x256,8x512,2x2048 --quantize fp8 > $OUT/ours_7b.log 2>>$OUT/err.log
timeout 60 python3 bench/train_throughput.py --preset 7b --shapes 4x256 > $OUT/ours_7b_bf16.log 2>>$OUT/err.log
timeout 330 python3 .peers/peft_lora_bench.py --preset 7B --shapes 4x256,8x512,2x2048 --compile > $OUT/peft_7b.log 2>>$OUT/err.log
tail -n 4 $OUT/ours_7b.log; tail -n 2 $OUT/ours_7b_bf16.log; tail -n 5 $OUT/peft_7b.log
