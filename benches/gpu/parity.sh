#!/usr/bin/env bash
# CUDA correctness in one command. Runs on the GPU machine, from the repository root, with the
# bundle of benches/gpu/bundle.sh unpacked into target/ (no Rust toolchain, no network needed):
#   1. every kernel file's ops, CUDA (f32 and bf16) against the CPU f32 reference on fresh random data,
#      forward and backward, twice: into an empty kernel cache (NVRTC compiles) and from it (cubins load);
#   2. every model `sgdm forward` runs, on the tiny PyTorch fixtures of tests/fixtures/models, CUDA bf16 and
#      f32, forward and backward, against PyTorch's float64 results (`sgdm forward --compare`);
#   3. the SD 1.5 ControlNet and UNet (tests/fixtures/sd15 configs, seeded random weights, 64x64 latents,
#      batch 2: one guided step) on CUDA bf16 and f32 against the same step on the CPU in f32;
#   4. compute-sanitizer memcheck and racecheck over the kernel parity run, where the tool runs.
# Prints one table (also $OUT/parity-table.md): check, max abs and relative L2 error, bound, pass/FAIL.
# Everything else (logs, sanitizer reports) goes to $OUT (default ./gpu-out). Exit status: 0 when every row
# passes and the sanitizers report no errors.
set -uo pipefail
source "$(dirname "$0")/env.sh"
sgdm="$bundle/sgdm"
export SGDM_BIN="$sgdm" SGDM_REPO_ROOT="$PWD"
table="$out/parity-table.md"
log="$out/parity.txt"
: > "$log"
rows=()   # "check | max abs | rel L2 | bound | verdict"
failed=0
row() { rows+=("$1"); case "$1" in *FAIL*|*stopped*|*error*) failed=$((failed + 1)) ;; esac; }

{
  echo "date: $(date -u +%FT%TZ)"
  cat "$bundle/COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$sgdm" info
} 2>&1 | tee -a "$log"

# 1. Kernel parity, cold then warm cache.
rm -rf "$SGDM_CACHE_DIR"
for pass in cold warm; do
  echo "=== kernel parity, $pass kernel cache" | tee -a "$log"
  "$bundle/tests/cuda_parity" --exact every_kernel_file_matches_the_cpu_reference --test-threads=1 --nocapture > "$out/parity-kernels-$pass.txt" 2>&1
  status=$?
  cat "$out/parity-kernels-$pass.txt" >> "$log"
  grep -E '^kernel modules:|SKIPPED: ' "$out/parity-kernels-$pass.txt" | tee -a "$log"
  [ $status -eq 0 ] || { echo "kernel parity ($pass): exit $status" | tee -a "$log"; }
done
# One table row per PARITY line of the cold run: "PARITY <what> max abs A  rel L2 R  bound B  verdict".
while IFS= read -r line; do
  row "$(sed -E 's/^PARITY (.*[^ ]) +max abs ([^ ]+) +rel L2 ([^ ]+) +bound ([^ ]+) +(pass|FAIL)$/kernel: \1 | \2 | \3 | \4 | \5/;
                 s/^PARITY ([^ ]+) +stopped: (.*)$/kernel: \1 | - | - | - | stopped: \2/' <<< "$line")"
done < <(grep '^PARITY ' "$out/parity-kernels-cold.txt")
grep -q 'SKIPPED: ' "$out/parity-kernels-cold.txt" && row "kernel parity | - | - | - | FAIL: skipped (no usable GPU?)"
row "kernel cache, first run | - | - | - | $(grep '^kernel modules:' "$out/parity-kernels-cold.txt" || echo 'FAIL: no report')"
cache_line=$(grep '^kernel modules:' "$out/parity-kernels-warm.txt")
case "$cache_line" in
  *" 0 compiled now"*) row "kernel cache, second run | - | - | - | pass: $cache_line" ;;
  *) row "kernel cache, second run | - | - | - | FAIL: ${cache_line:-no report}" ;;
esac

# 2. The PyTorch fixtures through `sgdm forward --compare` (bounds: conformance::Bounds for the dtype).
compare_rows() {  # $1 label, $2 output of sgdm forward --compare
  local worst_out worst_grad verdict
  # The largest relative L2 error among outputs and among grad.* rows ("-" when the run printed none).
  local worst='{ for (i = 1; i <= NF; i++) if ($i == "L2") v = $(i + 1); if (!seen || v + 0 > m) m = v + 0; seen = 1 }
               END { if (seen) printf "%.3e", m; else printf "-" }'
  worst_out=$(awk "/^  / && \$1 !~ /^grad\\./ && /rel L2/ $worst" <<< "$2")
  worst_grad=$(awk "/^  grad\\./ && /rel L2/ $worst" <<< "$2")
  if grep -q 'within bounds' <<< "$2"; then verdict=pass; else verdict="FAIL: $(grep -E 'FAIL|^Error|error' <<< "$2" | head -3 | tr '\n' ' ')"; fi
  row "$1 | - | outputs $worst_out, grads $worst_grad | $3 | $verdict"
}
for dir in tests/fixtures/models/*/; do
  case=$(basename "$dir")
  [ -f "$dir/expected.safetensors" ] || continue
  for dtype in bf16 f32; do
    [ "$dtype" = bf16 ] && bounds="5e-2 / 1.5e-1" || bounds="1e-4 / 1e-3"
    result=$("$sgdm" --device cuda forward "$dir" --inputs "$dir/inputs.safetensors" --grad-outputs "$dir/grad_outputs.safetensors" \
      --output "$out/fixture-$case-$dtype.safetensors" --dtype "$dtype" --compare "$dir/expected.safetensors" 2>&1)
    { echo "=== $case cuda $dtype"; echo "$result"; } >> "$log"
    compare_rows "model: $case, cuda $dtype vs PyTorch f64" "$result" "$bounds"
  done
done
rm -f "$out"/fixture-*.safetensors

# 3. SD 1.5 ControlNet + UNet, one step, CUDA against the CPU.
sd="$out/sd15"
mkdir -p "$sd/controlnet" "$sd/unet"
cp tests/fixtures/sd15/controlnet.json "$sd/controlnet/config.json"
cp tests/fixtures/sd15/unet.json "$sd/unet/config.json"
if python3 benches/gpu/sd15_inputs.py controlnet "$sd/cn-in.safetensors" >> "$log" 2>&1; then
  echo "=== SD 1.5 on the CPU (f32 reference)" | tee -a "$log"
  "$sgdm" --device cpu forward "$sd/controlnet" --inputs "$sd/cn-in.safetensors" --output "$sd/cn-cpu.safetensors" --random-weights 5 >> "$log" 2>&1 &&
    python3 benches/gpu/sd15_inputs.py unet "$sd/cn-in.safetensors" "$sd/cn-cpu.safetensors" "$sd/unet-in.safetensors" >> "$log" 2>&1 &&
    "$sgdm" --device cpu forward "$sd/unet" --inputs "$sd/unet-in.safetensors" --output "$sd/unet-cpu.safetensors" --random-weights 5 >> "$log" 2>&1
  for dtype in bf16 f32; do
    # f32 on CUDA against f32 on the CPU: the same math summed in another order through ~100 layers.
    [ "$dtype" = bf16 ] && bound=5e-2 || bound=1e-3
    for model in controlnet unet; do
      [ $model = controlnet ] && { in="$sd/cn-in.safetensors"; ref="$sd/cn-cpu.safetensors"; } || { in="$sd/unet-in.safetensors"; ref="$sd/unet-cpu.safetensors"; }
      result=$("$sgdm" --device cuda forward "$sd/$model" --inputs "$in" --output "$sd/$model-cuda.safetensors" --random-weights 5 \
        --dtype "$dtype" --compare "$ref" --output-bound "$bound" 2>&1)
      { echo "=== SD 1.5 $model cuda $dtype"; echo "$result"; } >> "$log"
      compare_rows "SD 1.5 $model (64x64, batch 2), cuda $dtype vs cpu f32" "$result" "$bound"
    done
  done
  rm -f "$sd"/*.safetensors
else
  row "SD 1.5 step | - | - | - | FAIL: could not write its inputs (torch and safetensors needed; see parity.txt)"
fi

# 4. compute-sanitizer over the kernel parity run (cubins from the warm cache; -lineinfo is not needed to
# count errors). Racecheck is slow: it runs the same binary, whose shapes are small.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$sanitizer" ]; then
  for tool in memcheck racecheck; do
    "$sanitizer" --tool "$tool" --error-exitcode 99 "$bundle/tests/cuda_parity" --test-threads=1 --exact every_kernel_file_matches_the_cpu_reference \
      > "$out/sanitizer-$tool.txt" 2>&1
    status=$?
    summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer-$tool.txt" | tail -1)
    if [ $status -eq 0 ]; then row "compute-sanitizer $tool | - | - | 0 errors | pass: $summary"
    else row "compute-sanitizer $tool | - | - | 0 errors | FAIL (exit $status): $summary"; fi
  done
else
  row "compute-sanitizer | - | - | - | not run: compute-sanitizer not found"
fi

{
  echo "# CUDA parity: $(cat "$bundle/COMMIT"), $(date -u +%F)"
  echo
  echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1)"
  echo
  echo "| check | max abs | rel L2 | bound | verdict |"
  echo "| --- | --- | --- | --- | --- |"
  for r in "${rows[@]}"; do echo "| $r |"; done
  echo
  echo "rows: ${#rows[@]}, failing: $failed"
} > "$table"
cat "$table" | tee -a "$log"
[ "$failed" -eq 0 ]
