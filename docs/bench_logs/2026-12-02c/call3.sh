#!/usr/bin/env bash
# Call 3: 65B from train.py on one H200 (issue 18), then Llama 3.1 8B bf16 with the even loss chunks.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 330 bash scripts/check_train_speed.sh 65b > $OUT/check_65b.log 2>&1
timeout 150 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 4x256,8x512 > $OUT/ours_8b_bf16.log 2>$OUT/ours_8b.err
grep -E "tok/s|MFU|memory|GiB|allocator|fraction" $OUT/check_65b.log | tail -n 12; tail -n 4 $OUT/ours_8b_bf16.log
