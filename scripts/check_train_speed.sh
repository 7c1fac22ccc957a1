#!/usr/bin/env bash
# GPU check (issue 18): train.py's printed speed against bench/train_throughput.py at the same shape,
# and 65B LoRA on one 141 GB GPU from train.py with random weights (its memory decision included).
#
#   bash scripts/check_train_speed.sh 7b    # the bench at 7B 4 x 256, then train.py on the same rows (~4 min)
#   bash scripts/check_train_speed.sh 65b   # train.py --preset 65b --pretrained_path none, one GPU (~5 min)
#   SEQ=128 STEPS=4 bash scripts/check_train_speed.sh demo   # the same path on a CPU, in seconds
#
# train.py reads samples longer than SEQ tokens, so every row is full (4 x SEQ real tokens, no
# padding, one compiled shape): its "real tokens/s" and MFU compare with the bench's tokens_per_s and mfu.
set -euo pipefail
preset=${1:-7b}
steps=${STEPS:-30}
seq=${SEQ:-256}
work=$(mktemp -d)
python - "$work/long.json" <<'PY'
import json, sys
text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)  # ~720 tokens of the demo tokenizer
json.dump([{"instruction": text, "input": "", "output": "ok"}] * 64, open(sys.argv[1], "w"))
PY
if [ "$preset" = 7b ]; then
  python bench/train_throughput.py --preset 7B --shapes "4x$seq" --steps 20
fi
python train.py --preset "$preset" --pretrained_path none --tokenizer_path jaxlora/demo/tokenizer.model \
  --data_path "$work/long.json" --out_dir "$work/out" --no-packing --no-mask_inputs --batch_size 4 \
  --micro_batch_size 4 --max_seq_length "$seq" --max_steps "$steps" --eval_interval 100000 --save_interval 100000 \
  --eval_iters 1 --val_size 8 --exact_match_samples 0 --sample_instruction "" --max_new_tokens 4 --no_progress \
  --no_plot
