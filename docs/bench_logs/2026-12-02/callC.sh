#!/usr/bin/env bash
# Call C: 65B QLoRA under memory caps (48 GB nf4-dq, 80 GB int8; concurrently: memory figures, not speed), packed attention.
export PYTHONPATH=$PWD:$PYTHONPATH
XLA_PYTHON_CLIENT_MEM_FRACTION=0.318 timeout 300 python3 bench/train_throughput.py --preset 65b --shapes 4x256 --quantize nf4-dq --remat full --steps 5 --warmup 2 > $OUT/ours_65b_nf4dq_48g.log 2>$OUT/ours_65b_nf4dq_48g.err &
XLA_PYTHON_CLIENT_MEM_FRACTION=0.530 timeout 300 python3 bench/train_throughput.py --preset 65b --shapes 4x256 --quantize int8 --remat full --steps 5 --warmup 2 > $OUT/ours_65b_int8_80g.log 2>$OUT/ours_65b_int8_80g.err &
XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 timeout 150 python3 bench/train_throughput.py --preset 7b --shapes 4x256 --quantize nf4-dq > $OUT/ours_7b_nf4dq_peak.log 2>$OUT/ours_7b_nf4dq_peak.err &
wait
XLA_PYTHON_CLIENT_MEM_FRACTION=0.318 timeout 200 python3 bench/train_throughput.py --preset llama3.1-70b --shapes 4x256 --quantize nf4-dq --remat full --steps 5 --warmup 2 > $OUT/ours_70b_nf4dq_48g.log 2>$OUT/ours_70b_nf4dq_48g.err
timeout 90 python3 bench/check_packed_attention.py --batches 2 --kv_heads 32 --max_segments 64 --iters 10 > $OUT/check_packed_attention.log 2>$OUT/check_packed_attention.err
tail -n 3 $OUT/*.log
