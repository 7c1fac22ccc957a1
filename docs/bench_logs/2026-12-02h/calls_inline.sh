#!/usr/bin/env bash
# The eighth session's two calls written inline (after callO showed Triton GEMMs on helping fp8).
# callQ: fp8 both layouts with XLA's Triton GEMMs on, all seven targets at 8x512 / 2x2048, q,v at 4x256 / 8x512.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1; T=q,k,v,o,gate,up,down
XLA_FLAGS=--xla_gpu_enable_triton_gemm=true timeout 300 python3 bench/train_throughput.py --preset llama3.1-8b \
  --shapes 8x512,2x2048 --targets $T --quantize fp8 --steps 10 > $OUT/fp8_all7_triton_on_big.log 2>>$OUT/err.log
XLA_FLAGS=--xla_gpu_enable_triton_gemm=true timeout 230 python3 bench/train_throughput.py --preset llama3.1-8b \
  --shapes 4x256,8x512 --quantize fp8 --steps 10 > $OUT/fp8_qv_triton_on.log 2>>$OUT/err.log
# callP2 (after callP): the default key derivation against rbg in one process, bf16, all seven, 8x512.
timeout 300 python3 bench/train_throughput.py --preset llama3.1-8b --shapes 8x512 --targets $T \
  --variants 'rng_impl=threefry2x32;rng_impl=rbg' > $OUT/all7_rng2.log 2>>$OUT/err.log
