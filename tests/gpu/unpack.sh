#!/usr/bin/env bash
# On the device machine: unpacks .gpu/ (see package.sh) into $1 laid out as a cargo target dir
# (release/coordinator, release/expert-node, release/deps/gpu-tests), so the test helpers find
# the expert-node binary beside the test executable, and sets up the CUDA libraries' path.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dest=$1
mkdir -p "$dest/release/deps"
for f in "$root"/.gpu/*.xz; do
  name=$(basename "$f" .xz)
  case $name in gpu-tests) out=$dest/release/deps/$name ;; *) out=$dest/release/$name ;; esac
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$out"
  chmod +x "$out"
done
