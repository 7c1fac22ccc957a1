#!/usr/bin/env bash
# Call 2: real tokens/s on Alpaca's length profile (issue 18): ours bucketed (lit-llama's recipe) and
# packed, bf16 and fp8, then PEFT (eager, then + torch.compile) padded to each micro-batch's longest.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
A="bench/train_throughput.py --preset 7b --alpaca 2048"
timeout 150 python3 $A > $OUT/alpaca_ours_bf16.log 2>$OUT/alpaca.err
timeout 110 python3 $A --alpaca_runs packed --alpaca_packed_rows 2 --quantize fp8 > $OUT/alpaca_ours_fp8_rows2.log 2>>$OUT/alpaca.err
P="bench/peft_alpaca_peer.py --preset 7b --alpaca 2048 --pad_multiple 1"
timeout 90 python3 $P > $OUT/alpaca_peft_eager.log 2>$OUT/alpaca_peft.err
timeout 230 python3 $P --compile > $OUT/alpaca_peft_compile.log 2>>$OUT/alpaca_peft.err
grep -h real_tokens $OUT/alpaca_*.log | cut -c1-260; grep -h "x$" $OUT/alpaca_ours_bf16.log
