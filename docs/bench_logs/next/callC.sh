#!/usr/bin/env bash
# Issues 17 and 18: ours (fp8 through cuBLASLt, bf16) and PEFT + torch.compile in the same call,
# 7B 4 x 256 and Llama 3.1 8B 8 x 512 (carry .peers). Ours first: JAX holds 75% of the card while alive.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 150 python3 bench/train_throughput.py --preset 7b --shapes 4x256 --variants 'quantize=fp8;quantize=none' > $OUT/ours_7b.log 2>>$OUT/err.log
timeout 70 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 8x512 --quantize fp8 > $OUT/ours_8b.log 2>>$OUT/err.log
timeout 150 python3 .peers/peft_lora_bench.py --preset 7B --shapes 4x256 --compile > $OUT/peft_7b.log 2>>$OUT/err.log
timeout 230 python3 .peers/peft_lora_bench.py --preset llama3.1-8b --shapes 8x512 --compile > $OUT/peft_8b.log 2>>$OUT/err.log
tail -n 3 $OUT/ours_7b.log; tail -n 2 $OUT/ours_8b.log; tail -n 4 $OUT/peft_7b.log $OUT/peft_8b.log
