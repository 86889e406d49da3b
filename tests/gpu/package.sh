#!/usr/bin/env bash
# Builds the CUDA binaries here (no GPU needed) and packs them, stripped and xz-compressed, into
# .gpu/ at the repository root (git-ignored), for `check.sh` and `bench.sh` on the device machine:
#   tests/gpu/package.sh            # then: device run with carry [".gpu"]
# Needs ../shared/tools/cuda-env.sh (nvcc 13.0 and link stubs); builds into $CARGO_TARGET_DIR
# (default /work/tgt-cuda: keep CUDA builds apart from the CPU ones, a cold build takes ~15 min).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# shellcheck disable=SC1091
source "${CUDA_ENV:-$root/../shared/tools/cuda-env.sh}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/tgt-cuda}
cargo build --release --features cuda -p omnishard-coordinator -p omnishard-expert
test_exe=$(cargo test --release --features cuda -p omnishard-tests --test gpu --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
[ -n "$test_exe" ] || { echo "package: no gpu test executable was built" >&2; exit 1; }
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -rf .gpu && mkdir -p .gpu
for exe in "$CARGO_TARGET_DIR/release/coordinator" "$CARGO_TARGET_DIR/release/expert-node" "$test_exe"; do
  name=$(basename "$exe")
  case $name in gpu-*) name=gpu-tests ;; esac
  strip -o ".gpu/$name" "$exe"
  xz -T0 -6 ".gpu/$name"
done
ls -l .gpu
