#!/usr/bin/env bash
# The GPU benchmark of BENCHMARKS.md, in one device call (carry .gpu; build it with package.sh):
#   tests/gpu/bench.sh [--quick] [--layers N] [--node-devices cuda,cpu] [--no-peer] [--cuda-ipc auto|off]
#                      [--shm-lane auto|off] [--gpu-routing auto|off]
# Prints the card, then `coordinator bench --device cuda` on the full 48-layer Qwen3-30B-A3B
# shape with dummy bf16 weights: (a) in-process on the GPU, (b) GPU coordinator + 2 expert nodes
# on the same GPU over loopback gRPC, (c) GPU coordinator + 2 expert nodes on the CPU cores; on a
# machine with several GPUs also the scaling stage (issue 15): expert nodes on GPUs 1, 2, … of
# their own, micro-batch overlap off and on, batch 128 included; then the peer, Hugging Face
# transformers (the machine's own) on the same shape and GPU with its grouped_mm experts, and
# the ratios side by side.
set -uo pipefail
# shellcheck source=setup.sh
source "$(dirname "$0")/setup.sh"
layers=48
quick=()
node_devices=cuda,cpu
peer=1
cuda_ipc=auto
shm_lane=auto
gpu_routing=auto
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=(--quick) ;;
    --layers) layers=$2; shift ;;
    --node-devices) node_devices=$2; shift ;;
    --no-peer) peer=0 ;;
    --cuda-ipc) cuda_ipc=$2; shift ;;
    --shm-lane) shm_lane=$2; shift ;;
    --gpu-routing) gpu_routing=$2; shift ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
echo "card: $card; $gpus GPU(s); $(nproc) CPU cores"
scaling=()
[ "$gpus" -gt 1 ] && scaling=(--scaling-gpus "$(seq -s, 1 $((gpus - 1)))")
RUST_LOG=warn "$work/release/coordinator" bench --device cuda --load-format dummy \
  --preset qwen3-30b-a3b --layers "$layers" --dtype bf16 --nodes 2 --node-devices "$node_devices" \
  --cuda-ipc "$cuda_ipc" --shm-lane "$shm_lane" --gpu-routing "$gpu_routing" "${scaling[@]}" "${quick[@]}" 2> >(tee "$out/bench.log" >&2) | tee "$out/ours.txt"
[ "$peer" = 1 ] || exit 0
PYTHONUNBUFFERED=1 python3 "$root/tests/gpu/hf_bench.py" --layers "$layers" "${quick[@]}" | tee "$out/hf.txt"
python3 - "$out/ours.txt" "$out/hf.txt" "$card" <<'PY'
import json, sys
ours = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
hf = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print(f"\n{sys.argv[3]}: tokens/s, ratio to transformers {hf['transformers']} ({hf['experts']}) on the same GPU")
print(f"{'configuration':<44} {'b1':>16} {'b32':>16} {'prefill 512':>18}")
row = lambda r: (r["decode_tok_s_b1"], r["decode_tok_s_b32"], r["prefill_tok_s_512"])
peer = (hf["decode_tok_s_b1"], hf["decode_tok_s_b32"], hf["prefill_tok_s_512"])
for r in ours["rows"] + [dict(configuration="transformers", decode_tok_s_b1=peer[0], decode_tok_s_b32=peer[1], prefill_tok_s_512=peer[2])]:
    cells = [f"{v:8.1f} ({v / p:5.2f}x)" for v, p in zip(row(r), peer)]
    print(f"{r['configuration']:<44} {cells[0]:>16} {cells[1]:>16} {cells[2]:>18}")
PY
