#!/usr/bin/env bash
# Issue 17, decoding's last 1.2% (227.2 tok/s at batch 1, goal 230: ~50 µs a step). The attention
# output's pad to 8 rows is a kernel of its own, 32 a step (~45 µs): does the o product run as fast
# on its one row unpadded (cuBLAS GEMV)? Prediction: current+oproj_unpadded 30-45 µs a step below
# current+oproj if the GEMV reads 32 MB a layer at the padded GEMM's ~3.8 TB/s; slower if not.
# If it wins: pad every frozen product but the attention output's (jaxlora/model/quantize.py
# rows_padded_dot's min_rows, from the o projection's MergedLoRADense), and confirm with the whole
# decode below in a later call.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 90 python3 bench/decode_attention_check.py --preset llama3.1-8b --batches 1 \
  --ways current,current+oproj,current+oproj_unpadded > $OUT/decode_oproj.log 2>>$OUT/err.log
timeout 110 python3 bench/generate_throughput.py --preset llama3.1-8b --variants bf16 --logit_prompts 0 --repeats 3 \
  --batches 1,8 > $OUT/decode_8b.log 2>>$OUT/err.log
tail -n 4 $OUT/decode_oproj.log; tail -n 3 $OUT/decode_8b.log; grep -v -i warn $OUT/err.log | tail -n 3
