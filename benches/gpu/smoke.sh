#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with the bundle built by benches/gpu/bundle.sh:
# device info, the kernel compile report, then every test binary twice (the first run compiles kernels
# into an empty cache, the second loads cubins from it). Writes everything to $OUT (default ./gpu-out).
set -uo pipefail
source "$(dirname "$0")/env.sh"
export SGDM_BIN="$bundle/sgdm"
# Fixtures are read from the repository root this script runs in (the test binaries were built elsewhere).
export SGDM_REPO_ROOT="$PWD"
rm -rf "$SGDM_CACHE_DIR"
log="$out/smoke.txt"
{
  echo "date: $(date -u +%FT%TZ)"
  cat "$bundle/COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$bundle/sgdm" info
  "$bundle/sgdm" kernels
  for pass in first second; do
    echo "=== test binaries, $pass pass (kernel cache: $(ls "$SGDM_CACHE_DIR/kernels" 2>/dev/null | wc -l) cubins)"
    for t in "$bundle"/tests/*; do
      echo "--- $(basename "$t")"
      "$t" --test-threads=1 --nocapture 2>&1 | grep -v '^$'
    done
  done
} 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6 } /SKIPPED: / { s += 1 }
     END { printf "smoke: %d passed, %d failed, %d skipped (both passes)\n", p, f, s }' "$log" | tee -a "$log"
