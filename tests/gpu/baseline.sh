#!/usr/bin/env bash
# Packs another revision's coordinator beside this tree's, so that one device call can measure
# both side by side (tests/gpu/compare.sh):
#   tests/gpu/package.sh                 # this tree's binaries into .gpu/ (it empties .gpu/ first)
#   tests/gpu/baseline.sh REV [NAME]     # REV's coordinator as .gpu/coordinator-NAME.xz
# NAME defaults to REV's short hash. REV is built in a temporary git worktree with --features
# cuda into $BASELINE_TARGET (default /work/tgt-cuda-base: apart from package.sh's target dir,
# whose binaries it would otherwise overwrite; the first build there takes ~5 min, later ones
# ~1 min, the workspace's crates). Needs ../shared/tools/cuda-env.sh, as package.sh does.
set -euo pipefail
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 REV [NAME]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
rev=$(git rev-parse --verify --quiet "$1^{commit}") || { echo "baseline: no commit $1" >&2; exit 2; }
name=${2:-$(git rev-parse --short "$rev")}
case $name in
  *[!A-Za-z0-9._-]*) echo "baseline: NAME may hold letters, digits, '.', '_' and '-' only" >&2; exit 2 ;;
esac
[ -d .gpu ] || { echo "baseline: no .gpu/ here: run tests/gpu/package.sh first" >&2; exit 1; }
# shellcheck disable=SC1091
source "${CUDA_ENV:-$root/../shared/tools/cuda-env.sh}"
export CARGO_TARGET_DIR=${BASELINE_TARGET:-/work/tgt-cuda-base}
# One worktree path for every baseline, inside the target dir: cargo keys its artifacts by the
# sources' paths, so a path of its own each time would rebuild every dependency.
tree=$CARGO_TARGET_DIR/worktree
git worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"
git worktree prune
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"; git worktree prune' EXIT
mkdir -p "$CARGO_TARGET_DIR"
git worktree add --detach "$tree" "$rev" >/dev/null
(cd "$tree" && cargo build --release --features cuda -p omnishard-coordinator)
strip -o ".gpu/coordinator-$name" "$CARGO_TARGET_DIR/release/coordinator"
xz -T0 -6 -f ".gpu/coordinator-$name"
ls -l ".gpu/coordinator-$name.xz"
