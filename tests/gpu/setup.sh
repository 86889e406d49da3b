# Sourced by check.sh, bench.sh, profile.sh and stalls.sh on the device machine: unpacks .gpu/ into $work
# (see unpack.sh), puts the CUDA libraries on the loader's path, and sets $root, $work and $out
# (the device tool's $OUT, else /tmp).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=${WORK:-/tmp/omnishard-gpu}
"$root/tests/gpu/unpack.sh" "$work" || exit 1
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp}
