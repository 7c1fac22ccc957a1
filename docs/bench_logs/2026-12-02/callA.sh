#!/usr/bin/env bash
# Call A: Llama 3.1 8B training, jaxlora (lit recipe) and PEFT + torch.compile, same call.
# PEFT's Inductor compile (minutes at 8B) is warmed in the background while jaxlora runs (one step,
# cache only, figures discarded); the timed PEFT runs come after jaxlora's, alone on the GPU.
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
python3 -c "import jax,torch;print(jax.__version__, torch.__version__)" >> $OUT/gpu.txt
P="python3 .peers/peft_lora_bench.py --preset llama3.1-8b --shapes 8x512 --compile"
( timeout 230 $P --steps 1 --warmup 0 > $OUT/peft_warm_qv.log 2>&1; timeout 160 $P --targets all --steps 1 --warmup 0 > $OUT/peft_warm_all.log 2>&1 ) &
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
timeout 50 python3 bench/fp8_gemm_check.py --tokens 4096,8192 --iters 30 > $OUT/fp8_gemm.log 2>$OUT/fp8_gemm.err
timeout 130 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 8x512,2x2048 --targets all > $OUT/ours_8b_all.log 2>$OUT/ours_8b_all.err
timeout 70 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 8x512 --targets q,v > $OUT/ours_8b_qv.log 2>$OUT/ours_8b_qv.err
timeout 110 python3 bench/train_throughput.py --preset 7b --shapes 8x512,2x2048 --quantize fp8 > $OUT/ours_7b_fp8.log 2>$OUT/ours_7b_fp8.err
wait
timeout 100 $P > $OUT/peft_8b_qv_compile.log 2>$OUT/peft_8b_qv_compile.err
timeout 100 $P --targets all > $OUT/peft_8b_all_compile.log 2>$OUT/peft_8b_all_compile.err
tail -n 4 $OUT/*.log
