#!/usr/bin/env bash
# Call B: decoding Llama 3.1 8B (jaxlora vs HF static); QLoRA 7B speed beside the PyTorch QLoRA peer (PEFT + bitsandbytes).
export PYTHONPATH=$PWD:$PYTHONPATH
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
timeout 100 python3 bench/generate_throughput.py --preset llama3.1-8b --batches 1,8 --variants bf16,int8 > $OUT/ours_8b_decode.log 2>$OUT/ours_8b_decode.err
timeout 130 python3 .peers/hf_generate_bench.py --preset llama3.1-8b --batches 1,8 --static > $OUT/hf_8b_decode_static.log 2>$OUT/hf_8b_decode_static.err
timeout 80 python3 bench/train_throughput.py --preset 7b --shapes 8x512 --quantize nf4-dq > $OUT/ours_7b_nf4dq.log 2>$OUT/ours_7b_nf4dq.err
PYTHONPATH=/tmp/site:$PYTHONPATH timeout 140 python3 bench/peft_qlora_peer.py --preset 7B --shapes 4x256,8x512 --quant nf4-dq > $OUT/peer_qlora_7b_nf4dq.log 2>$OUT/peer_qlora_7b_nf4dq.err
tail -n 3 $OUT/*.log
