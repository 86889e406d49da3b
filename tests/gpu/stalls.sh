#!/usr/bin/env bash
# Why a kernel takes the time it does, on the device machine (carry .gpu; see package.sh):
#   tests/gpu/stalls.sh [KERNEL_REGEX [GRIDS]]
# Runs `coordinator bench --quick --nodes 0` on a 2-layer model under Nsight Compute with its
# throughput, occupancy and scheduler sections and the warp stall reasons (cycles a warp waits
# per issued instruction, by reason), for the kernels whose names match KERNEL_REGEX (default the
# prefill's MoE tiles and attention), then prints, for the last launch of each kernel with one of
# GRIDS ('|'-separated, as ncu writes them; default the 512-token prefill's grids), its duration,
# DRAM throughput, L2 hit rate, issue rate, occupancy and every stall reason of 0.3 cycles or
# more. ncu locks the clocks and flushes the caches between its replays, so durations run longer
# than in profile.sh. ~90 s. The CSV is left in $OUT/stalls.csv.
set -uo pipefail
# shellcheck source=setup.sh
source "$(dirname "$0")/setup.sh"
kernels=${1:-prefill_attention|moe_gate_up_mma|moe_down_mma}
grids=${2:-(8, 32, 1)|(12, 192, 1)|(32, 192, 1)}
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
RUST_LOG=warn "$ncu" --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
  --section Occupancy --section SchedulerStats --section ComputeWorkloadAnalysis \
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
  -k "regex:$kernels" --csv --page details \
  "$work/release/coordinator" bench --device cuda --load-format dummy --preset qwen3-30b-a3b \
  --layers 2 --dtype bf16 --nodes 0 --quick >"$out/stalls.csv" 2>"$out/stalls.err"
python3 - "$out/stalls.csv" "$grids" <<'PY'
import csv, io, sys
text = open(sys.argv[1]).read()
start = text.find('"ID"')
if start < 0:
    sys.exit("stalls.sh: no kernel rows in the ncu output (see stalls.err)")
grids = sys.argv[2].split("|")
rows = [r for r in csv.DictReader(io.StringIO(text[start:])) if r["Grid Size"] in grids]
if not rows:
    sys.exit(f"stalls.sh: no launch with a grid among {grids}")
last = {}
for r in rows:
    last[r["Kernel Name"].split("(")[0]] = r["ID"]
keep = ("Duration", "DRAM Throughput", "L2 Hit", "Issued Warp", "Cycles Per Issued",
        "Achieved Occupancy", "Compute (SM)", "Registers", "Block Limit")
stall = "smsp__average_warps_issue_stalled_"
for kernel, id_ in last.items():
    print("\n==", kernel)
    for r in rows:
        if r["ID"] != id_:
            continue
        name = r["Metric Name"]
        if name.startswith(stall):
            if float(r["Metric Value"].replace(",", "") or 0) < 0.3:
                continue
            name = "stall " + name[len(stall):].replace("_per_issue_active.ratio", "")
        elif not any(w in name for w in keep):
            continue
        print("%-55s %12s %s" % (name[:55], r["Metric Value"], r["Metric Unit"]))
PY
