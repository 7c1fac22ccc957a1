#!/usr/bin/env bash
# Call 1: FP8 frozen GEMMs (the GEMM alone, then the 7B step against bf16 at three shapes), and
# train.py's printed speed against the bench at 7B 4 x 256 (scripts/check_train_speed.sh 7b).
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
python3 -c "import jax,torch;print(jax.__version__, torch.__version__)" >> $OUT/gpu.txt
timeout 80 python3 bench/fp8_gemm_check.py --tokens 4096,8192 --iters 30 > $OUT/fp8_gemm.log 2>$OUT/fp8_gemm.err
timeout 290 python3 bench/train_throughput.py --preset 7b --shapes 8x512,2x2048,4x256 --variants 'quantize=none;quantize=fp8' > $OUT/ours_7b_fp8.log 2>$OUT/ours_7b_fp8.err
timeout 150 bash scripts/check_train_speed.sh 7b > $OUT/check_7b.log 2>&1
tail -n 12 $OUT/fp8_gemm.log; tail -n 8 $OUT/ours_7b_fp8.log; grep -E "tok/s|MFU|tokens" $OUT/check_7b.log | tail -n 6
