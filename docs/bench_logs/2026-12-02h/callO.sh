#!/usr/bin/env bash
# Speed lead from the seventh session: fp8 with all seven targets loses its MFU at 4 x 256 (55.2%
# against 63.1% at 8 x 512) where q,v does not (77.6 / 77.1%), and bf16 all seven does not either
# (47.2 / 46.5%). An fp8 process sends every GEMM to cuBLAS (Triton GEMMs off), so the adapters'
# ~35 skinny products a layer become cuBLAS calls with their elementwise work in kernels of their
# own: more launches. Is the 4 x 256 fp8 all-seven step bound by the host's launches? Prediction:
# the profile's device busy time ~45-50 ms of a ~57 ms step span (a launch-bound step), against
# >= 99% busy at 8 x 512. Then the same step with Triton GEMMs on for everything but the FP8
# products (if XLA can keep cuBLAS for FP8 dots alone; else the plain Triton-on run shows the price).
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
T=q,k,v,o,gate,up,down
timeout 200 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 4x256 --targets $T --quantize fp8 --steps 10 \
  --profile $OUT/prof_fp8_all7 > $OUT/prof_fp8_all7_4x256.log 2>>$OUT/err.log
XLA_FLAGS=--xla_gpu_enable_triton_gemm=true timeout 200 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 4x256 \
  --targets $T --quantize fp8 --steps 10 > $OUT/fp8_all7_triton_on.log 2>>$OUT/err.log
grep -B 2 -A 14 "device busy" $OUT/prof_fp8_all7_4x256.log; tail -n 2 $OUT/fp8_all7_triton_on.log; grep -v -i warn $OUT/err.log | tail -n 3
