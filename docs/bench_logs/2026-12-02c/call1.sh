#!/usr/bin/env bash
# Call 1: why FP8 is not faster per GEMM (which kernel XLA picks, with and without Triton GEMMs,
# against PyTorch's cuBLASLt FP8), and where a 7B 4 x 256 step's time goes in bf16 and in fp8.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
python3 -c "import jax,torch;print(jax.__version__, torch.__version__)" >> $OUT/gpu.txt
G="bench/fp8_gemm_check.py --iters 20"
timeout 150 python3 $G --tokens 1024,4096 > $OUT/gemm.log 2>$OUT/gemm.err
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 70 python3 $G --tokens 4096 --kinds bf16,fp8,fp8-kmajor,jaxlora > $OUT/gemm_no_triton.log 2>>$OUT/gemm.err
timeout 40 python3 $G --tokens 1024,4096 --torch > $OUT/gemm_torch.log 2>>$OUT/gemm.err
timeout 270 python3 bench/train_throughput.py --preset 7b --shapes 4x256 --steps 10 --variants 'quantize=none;quantize=fp8' \
  --profile /tmp/p --profile_steps 2 > $OUT/profile_7b_4x256.log 2>$OUT/profile.err
grep -E "^ +[0-9]+ " $OUT/gemm.log $OUT/gemm_no_triton.log $OUT/gemm_torch.log | grep -E "4096 (q/v fwd|down dgrad)" | cut -c1-150
grep -E "^(4x256|kind|matmul|attention|other|copy)" $OUT/profile_7b_4x256.log | head -20; tail -n 3 $OUT/profile_7b_4x256.log
