#!/usr/bin/env bash
# Where the GPU's time goes in batch-1, batch-32 and batch-128 decode and a 512-token prefill, on the
# device machine (carry .gpu; see package.sh):
#   tests/gpu/profile.sh [--layers N]
# 1. `coordinator bench --quick --nodes 0` on an N-layer model (default 8), in process only: the
#    wall time of each measurement (batch 1 also after a 4,096-token prompt);
# 2. the same under Nsight Compute, timing every kernel with the caches left warm
#    (--cache-control none: what the kernel costs inside the running step) and the clocks as
#    they are. The launches are cut into forward passes at the sampling kernel that ends each
#    decode step (one launch for the step's samples: its grid says the batch); what follows the
#    last of them is the bench's prefill rounds. Printed per phase: kernel time per forward pass and the
#    per-kernel table. Kernel time against wall time is the launch and synchronization overhead.
set -uo pipefail
# shellcheck source=setup.sh
source "$(dirname "$0")/setup.sh"
layers=8
while [ $# -gt 0 ]; do
  case $1 in
    --layers) layers=$2; shift ;;
    *) echo "profile.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
bench=("$work/release/coordinator" bench --device cuda --load-format dummy --preset qwen3-30b-a3b
  --layers "$layers" --dtype bf16 --nodes 0 --quick)
RUST_LOG=warn "${bench[@]}" 2>&1 | grep -E "in-process|^bench: \[1" | tee "$out/profile-wall.txt"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
RUST_LOG=warn "$ncu" --clock-control none --cache-control none \
  --metrics gpu__time_duration.sum --csv "${bench[@]}" >"$out/profile-ncu.csv" 2>"$out/profile-ncu.err"
python3 - "$out/profile-ncu.csv" <<'PY'
import csv, io, sys
from collections import defaultdict
text = open(sys.argv[1]).read()
start = text.find('"ID"')
if start < 0:
    sys.exit("profile.sh: no kernel rows in the ncu output (see profile-ncu.err)")
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
launches = []
for r in csv.DictReader(io.StringIO(text[start:])):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    us = float(r["Metric Value"].replace(",", "")) * scale.get(r["Metric Unit"], 1e-3)
    launches.append((r["Kernel Name"].split("(")[0][:60], r["Grid Size"], us))
# A forward pass ends with its step's one `sample_row` launch (a step's samples are drawn in one
# launch), whose grid's y is the batch.
# A batch past the sampling kernel's 32 rows a launch is drawn in several launches, one after
# another: a "pass" of sampling launches only belongs to the one before it.
passes, current = [], []
for launch in launches:
    current.append(launch)
    if launch[0].startswith("sample_row"):
        rows = int(launch[1].strip("()").split(",")[1])
        if passes and all(name.startswith("sample") for name, _, _ in current):
            batch, before = passes[-1]
            passes[-1] = (batch + rows, before + current)
        else:
            passes.append((rows, current))
        current = []
prefill_rounds = 2  # --quick
def report(title, group):
    if not group:
        print(f"\n{title}: none found")
        return
    per = defaultdict(lambda: [0.0, 0, ""])
    for launches_of in group:
        for name, grid, us in launches_of:
            e = per[name]
            e[0] += us; e[1] += 1; e[2] = grid
    total = sum(e[0] for e in per.values()) / len(group)
    print(f"\n{title}: {len(group)} passes, kernel time per pass {total:.0f} us, "
          f"{sum(e[1] for e in per.values()) / len(group):.0f} launches per pass")
    for name, (us, n, grid) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        print("%9.1f us/pass %5.1f x %8.2f us  %s %s" % (us / len(group), n / len(group), us / n, name, grid))
# The bench's order: batch-1 steps, batch-32 and batch-128 steps, the prefill rounds (no sample),
# then batch-1 after a long prompt (its prefill and first sample one pass). Reported: the last
# three batch-1 steps before batch 32 and after it, the last two batch-32 and batch-128 steps;
# the prefill rounds are the repeated launch sequence at the start of the pass after batch 128
# (or the tail, in a bench without the long prompt).
first32 = next((i for i, (b, _) in enumerate(passes) if b == 32), len(passes))
last32 = max((i for i, (b, _) in enumerate(passes) if b in (32, 128)), default=len(passes) - 1)
report("batch-1 decode step", [p for b, p in passes[:first32] if b == 1][-3:])
report("batch-32 decode step", [p for b, p in passes if b == 32][-2:])
report("batch-128 decode step", [p for b, p in passes if b == 128][-2:])
report("batch-1 decode step after the long prompt", [p for b, p in passes[last32 + 2:] if b == 1][-3:])
after = passes[last32 + 1][1] if last32 + 1 < len(passes) else current
# Kernels and grids: the long prompt's prefill runs the same kernels on larger grids. The longest
# repeat is a whole round (a layer's launches repeat too, a shorter period).
shapes = [l[:2] for l in after]
per_round = next((n for n in range(len(shapes) // 2, 0, -1) if shapes[:n] == shapes[n:2 * n]), len(shapes) // prefill_rounds)
report("prefill of 512 tokens", [after[k * per_round:(k + 1) * per_round] for k in range(prefill_rounds)] if after else [])
PY
