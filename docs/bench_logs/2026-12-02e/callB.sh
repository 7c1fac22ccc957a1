#!/usr/bin/env bash
# Issue 18: PEFT + torch.compile padded to each micro-batch's longest sample (what lit-llama and
# PEFT users run), on the same samples and order as callA's runs.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 560 python3 bench/peft_alpaca_peer.py --preset 7b --alpaca 2048 --pad_multiple 1 --steps 5 --warmup 2 --compile \
  > $OUT/alpaca_peft_compile.log 2>$OUT/err.log
cat $OUT/alpaca_peft_compile.log | cut -c1-400
