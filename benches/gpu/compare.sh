#!/usr/bin/env bash
# Our kernels against PyTorch on the same GPU, in one run. Runs on the GPU machine from the
# repository root with the bundle of benches/gpu/bundle.sh unpacked into target/ (no Rust toolchain needed):
#   1. the ptxas report of every kernel for this GPU (registers, spills);
#   2. the CUDA-vs-CPU kernel parity test (failures are listed under the table: those rows are not valid);
#   3. `sgdm bench` (ours, bf16, CUDA events, median of 30 after 5 warm-up calls) and benches/gpu/torch_ops.py
#      (PyTorch on the cases `sgdm bench --list` names, timed the same way), each with the GEMM and copy
#      peaks measured in its own run;
#   4. benches/gpu/compare.py: one table, ratio = PyTorch / ours against each family's target.
# Arguments are passed to `sgdm bench` (e.g. --family conv). Output in $OUT (default ./gpu-out).
set -uo pipefail
source "$(dirname "$0")/env.sh"
sgdm="$bundle/sgdm"
export SGDM_BIN="$sgdm" SGDM_REPO_ROOT="$PWD"
log="$out/compare.txt"
{
  echo "date: $(date -u +%FT%TZ)"
  cat "$bundle/COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
  echo "=== ptxas report (sm_${cap:-90})"
  "$sgdm" kernels --arch "sm_${cap:-90}"
  echo "=== kernel parity before timing"
  # A failing kernel is still timed (one wrong kernel must not hide every other number), but the table
  # says so: its rows are not valid measurements until parity passes.
  if ! "$bundle/tests/cuda_parity" --exact every_kernel_file_matches_the_cpu_reference --test-threads=1 > "$out/compare-parity.txt" 2>&1; then
    grep -E 'FAIL|stopped|panicked' "$out/compare-parity.txt" | head -20 | tee "$out/compare-parity-failures.txt"
    echo "kernel parity FAILED (see compare-parity.txt): rows of the failing kernels are not valid measurements"
  fi
  grep -E '^test result' "$out/compare-parity.txt"
  echo "=== ours"
  "$sgdm" --device cuda bench --json "$out/bench-ours.json" "$@" || exit 1
  echo "=== PyTorch"
  "$sgdm" bench --list "$@" > "$out/bench-cases.json"
  python3 benches/gpu/torch_ops.py --cases "$out/bench-cases.json" --json "$out/bench-torch.json" || exit 1
  echo "=== comparison"
  python3 benches/gpu/compare.py "$out/bench-ours.json" "$out/bench-torch.json" | tee "$out/compare-table.md"
  if [ -s "$out/compare-parity-failures.txt" ]; then
    { echo; echo "WARNING: kernel parity failed before this run; see compare-parity-failures.txt:"; cat "$out/compare-parity-failures.txt"; } | tee -a "$out/compare-table.md"
  fi
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
