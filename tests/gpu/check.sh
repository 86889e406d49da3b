#!/usr/bin/env bash
# The GPU checks, on the device machine (never in CI): every CUDA kernel against the CPU path on
# random inputs with odd shapes, the model on the fixtures within the bf16 tolerance, cached
# decoding against recomputation, and GPU expert nodes against the single GPU process bit for bit
# (tests/tests/gpu.rs). Build and pack first with tests/gpu/package.sh; then, in one device call
# carrying .gpu:   tests/gpu/check.sh
set -uo pipefail
# shellcheck source=setup.sh
source "$(dirname "$0")/setup.sh"
export OMNISHARD_TESTS_DIR=$root/tests
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$work/release/deps/gpu-tests" --test-threads 1 --nocapture "$@"
