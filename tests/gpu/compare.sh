#!/usr/bin/env bash
# Side-by-side runs of every coordinator packed in .gpu/ (this tree's from package.sh, others
# from baseline.sh), on the device machine, in one call carrying .gpu:
#   tests/gpu/compare.sh [--rounds N] [--only NAME,NAME] [-- BENCH ARGS]
# Each round runs every binary once, in the same order (a process of its own each time), with
# `coordinator bench --device cuda --load-format dummy --preset qwen3-30b-a3b --layers 48 --dtype
# bf16 --nodes 0` and then BENCH ARGS; then a table of every run and each binary's median. A run
# of the full model in process takes ~90 s: mind the device tool's 10 minutes a call (two binaries,
# two rounds: ~6 min). NAME is the part after `coordinator-` (`coordinator` itself is `this`).
set -uo pipefail
# shellcheck source=setup.sh
source "$(dirname "$0")/setup.sh"
rounds=2
only=
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=${2:-}; shift ;;
    --only) only=${2:-}; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "compare.sh: unknown argument $1 (bench arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
case $rounds in
  '' | *[!0-9]* | 0) echo "compare.sh: --rounds takes a whole number of rounds, 1 or more" >&2; exit 2 ;;
esac
names=()
for exe in "$work"/release/coordinator "$work"/release/coordinator-*; do
  [ -x "$exe" ] || continue
  name=$(basename "$exe")
  name=${name#coordinator-}
  [ "$name" = coordinator ] && name=this
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then continue; fi
  names+=("$name")
done
for want in ${only//,/ }; do
  [[ " ${names[*]} " == *" $want "* ]] || { echo "compare.sh: --only names $want, which is not packed in .gpu (baseline.sh REV $want)" >&2; exit 2; }
done
[ ${#names[@]} -gt 0 ] || { echo "compare.sh: no coordinator to run (package.sh, baseline.sh)" >&2; exit 1; }
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); $(nproc) CPU cores; binaries: ${names[*]}"
results=$out/compare.jsonl
: >"$results"
for round in $(seq 1 "$rounds"); do
  for name in "${names[@]}"; do
    exe=$work/release/coordinator
    [ "$name" = this ] || exe=$work/release/coordinator-$name
    echo "== round $round: $name"
    line=$(RUST_LOG=warn "$exe" bench --device cuda --load-format dummy --preset qwen3-30b-a3b \
      --layers 48 --dtype bf16 --nodes 0 "${extra[@]}" 2> >(grep -E "in-process|rror|fail|panick" >&2) | tail -1)
    if [ "${line:0:1}" = "{" ]; then
      echo "{\"binary\":\"$name\",\"round\":$round,\"report\":$line}" >>"$results"
    else
      echo "compare.sh: $name printed no report in round $round" >&2
    fi
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
keys = [("decode_tok_s_b1", "b1"), ("decode_tok_s_b32", "b32"), ("decode_tok_s_b128", "b128"),
        ("prefill_tok_s_512", "prefill 512")]
def cells(r):
    row = r["report"]["rows"][0]
    vals = {label: row.get(k) for k, label in keys}
    vals["b1 long"] = r["report"].get("in_process_decode_tok_s_b1_long_prompt")
    return vals
labels = [label for _, label in keys] + ["b1 long"]
print("\n%-14s %5s " % ("binary", "round") + " ".join("%12s" % l for l in labels))
by = {}
for r in runs:
    v = cells(r)
    by.setdefault(r["binary"], []).append(v)
    print("%-14s %5d " % (r["binary"], r["round"]) + " ".join("%12s" % ("-" if v[l] is None else "%.1f" % v[l]) for l in labels))
print("\nmedian of each binary")
for name, vs in by.items():
    med = lambda l: statistics.median([v[l] for v in vs if v[l] is not None]) if any(v[l] is not None for v in vs) else None
    print("%-20s " % name + " ".join("%12s" % ("-" if med(l) is None else "%.1f" % med(l)) for l in labels))
PY
