#!/usr/bin/env bash
# Multi-GPU benchmarks for docs/benchmarks.md, on one host of 4 GPUs (the GPU machine):
#   bash bench/scale_out.sh small   # 7B on 1, 2 and 4 GPUs at a fixed per-GPU micro-batch; 13B on 2
#   bash bench/scale_out.sh large   # 30B and 65B on 4 GPUs: the default layouts, 65B 2x2 and at 8 rows
#   bash bench/scale_out.sh two     # a 2-GPU host: 7B on 1 and 2 GPUs, 30B on 2 (fsdp=2 and tensor=2)
#   bash bench/scale_out.sh 65b2    # 65B on 2 GPUs of >= 141 GB (H200): fsdp=2
#   bash bench/scale_out.sh 65b80   # 65B on 2 H200s capped to 80 GB each: half of data=2 x tensor=2 on 4 H100s
# Each run is train.py's own step (bench/train_throughput.py builds it with jaxlora.train.build.build_run)
# on random bf16 weights, lit-llama's recipe settings, 4 x 256 tokens per GPU per micro-batch.
# JSON lines go to $OUT/scale_<part>.jsonl, logs to $OUT/scale_<part>.log; a table is printed last.
set -u
part=${1:-small}
out=${OUT:-/tmp/jaxlora-bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/scale_$part.log"
rows="$out/scale_$part.jsonl"
: > "$rows"

bench() {  # GPUS ARGS...
  local gpus=$1; shift
  echo "== CUDA_VISIBLE_DEVICES=$gpus $*" | tee -a "$log"
  CUDA_VISIBLE_DEVICES=$gpus timeout 420 python3 bench/train_throughput.py --steps 8 --warmup 2 "$@" 2>>"$log" \
    | tee -a "$log" | grep '^{' >> "$rows"
}

case $part in
  small)
    bench 0 --preset 7B --shapes 4x256
    bench 0,1 --preset 7B --shapes 4x256
    bench 0,1,2,3 --preset 7B --shapes 4x256
    bench 0,1 --preset 13B --shapes 4x256
    ;;
  large)
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    bench 0,1,2,3 --preset 30B --shapes 4x256                  # default on 80 GB: data=2 x tensor=2
    bench 0,1,2,3 --preset 65B --shapes 4x256                  # default on 80 GB: tensor=4
    bench 0,1,2,3 --preset 65B --shapes 4x256 --mesh data=2,tensor=2  # 52% MFU per replica on capped H200s
    bench 0,1,2,3 --preset 65B --shapes 8x256 --remat full     # more rows per GPU (OOM at tensor=2, 2026-11-28)
    ;;
  two)
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    bench 0 --preset 7B --shapes 4x256
    bench 0,1 --preset 7B --shapes 4x256
    bench 0,1 --preset 30B --shapes 4x256
    bench 0,1 --preset 30B --shapes 4x256 --mesh tensor=2
    ;;
  65b2)
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
    bench 0,1 --preset 65B --shapes 4x256
    bench 0,1 --preset 65B --shapes 4x256 --mesh tensor=2
    ;;
  65b80)  # 2 H200s capped to an H100's usable memory: one data replica of data=2 x tensor=2 on 4 H100s
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.515   # 0.515 x 141 GB = 72.6 GB = 0.92 x an H100's 79 GB
    bench 0,1 --preset 65B --shapes 4x256 --mesh tensor=2 --remat full
    bench 0,1 --preset 65B --shapes 8x256 --mesh tensor=2 --remat full
    ;;
  *) echo "usage: $0 small|large|two|65b2|65b80"; exit 2 ;;
esac

python3 - "$rows" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"\n{'preset':>6} {'mesh':<24} {'GPUs':>4} {'tok/s':>9} {'/GPU':>8} {'MFU':>6} {'peak GiB':>8} {'compile s':>9}")
for r in rows:
    if "error" in r:
        print(f"{r.get('preset', '?'):>6} ERROR {r['error'][:150]}")
        continue
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    print(f"{r['preset']:>6} {mesh:<24} {r['devices']:>4} {r['tokens_per_s']:>9} {r['tokens_per_s_per_device']:>8} "
          f"{r['mfu']:>6} {r['peak_gib']:>8} {r['compile_s']:>9}")
EOF
