#!/usr/bin/env bash
# Call D: 65B under memory caps again, with prevent_cse (call C's attempt ran out of memory).
export PYTHONPATH=$PWD; for m in "nf4-dq 0.318 48g" "int8 0.530 80g"; do set -- $m; XLA_PYTHON_CLIENT_MEM_FRACTION=$2 timeout 400 python3 bench/train_throughput.py --preset 65b --shapes 4x256 --quantize $1 --remat full --prevent_cse 1 --steps 4 --warmup 1 > $OUT/ours_65b_$1_$3_cse.log 2>$OUT/ours_65b_$1_$3_cse.err & done; wait
