#!/usr/bin/env bash
# Where a batch-1 decode step's time goes, on the device machine (carry .gpu; see package.sh):
#   tests/gpu/profile.sh [--layers N]
# 1. `coordinator bench --quick` on an N-layer model (default 8): the wall time per decoded token;
# 2. the same under Nsight Compute, timing every kernel of three decode steps with the caches
#    left warm (--cache-control none: what the kernel costs inside the running step) and the
#    clocks as they are. Kernel time per step against wall time per step is the launch and
#    synchronization overhead; the per-kernel table says which kernels to work on.
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
  --layers "$layers" --dtype bf16 --nodes 1 --node-devices cuda --quick)
RUST_LOG=warn "${bench[@]}" 2>&1 | grep -E "in-process|^bench: \[1" | tee "$out/profile-wall.txt"
# Launches of one b1 step: ~12 per layer plus ~10; skip the load, the 16-token prompt and the
# warm-up steps, then time about three steps.
per_step=$((12 * layers + 10))
skip=$((3 * per_step + 200))
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
RUST_LOG=warn "$ncu" --clock-control none --cache-control none --launch-skip "$skip" \
  --launch-count $((3 * per_step)) --metrics gpu__time_duration.sum --csv \
  --print-summary per-kernel "${bench[@]}" >"$out/profile-ncu.csv" 2>"$out/profile-ncu.err"
python3 - "$out/profile-ncu.csv" <<'PY'
import csv, io, sys
text = open(sys.argv[1]).read()
start = text.find('"Process ID"')
if start < 0:
    sys.exit("profile.sh: no per-kernel summary in the ncu output (see profile-ncu.err)")
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
kernels, total = [], 0.0
for r in csv.DictReader(io.StringIO(text[start:])):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    avg = float(r["Average"].replace(",", "")) * scale.get(r["Metric Unit"], 1e-3)
    n = int(r["Invocations"].replace(",", ""))
    kernels.append((avg * n, n, avg, r["Kernel Name"][:70], r["Grid Size"]))
    total += avg * n
# One sampling launch per decode step: the number of steps the profiled launches cover.
steps = sum(n for _, n, _, name, _ in kernels if name.startswith("sample_argmax_partial")) or 3
kernels.sort(reverse=True)
print(f"kernel time per step ({steps} steps profiled): {total / steps:.0f} us")
for t, n, avg, name, grid in kernels:
    print("%9.1f us/step %5d x %7.2f us  %s %s" % (t / steps, n, avg, name, grid))
PY
