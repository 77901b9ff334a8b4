#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, after smoke.sh's bundle is unpacked: the end-to-end
# numbers. `sgdm profile` of a denoising step (default model at batch 16, SD 1.5 at 512x512 at
# batches 1 and 4), `sgdm reconstruct` images/s at batch 16 on the default test split with the shipped
# weights on CUDA (bf16) next to the same run on the CPU (f32, first 32 items), `sgdm eval` of both, and
# the PyTorch/diffusers SD 1.5 step at the same shapes when diffusers is importable
# (benches/gpu/torch_step.py). Writes everything to $OUT (default ./gpu-out).
set -uo pipefail
source "$(dirname "$0")/env.sh"
sgdm="$bundle/sgdm"
# diffusers for the PyTorch baseline, when its wheels were carried (benches/gpu/wheels.sh).
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
log="$out/pipeline.txt"
{
  echo "date: $(date -u +%FT%TZ)"
  cat "$bundle/COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$sgdm" --device cuda profile --model default --weights weights --batch 16 --steps 5
  "$sgdm" --device cuda profile --model default --weights weights --batch 16 --steps 5 --json > "$out/profile-default-b16.json"
  for b in 1 4; do
    "$sgdm" --device cuda profile --model sd15 --batch $b --steps 3
    "$sgdm" --device cuda profile --model sd15 --batch $b --steps 3 --json > "$out/profile-sd15-b$b.json"
  done
  "$sgdm" synth --out "$out/data" --force > /dev/null
  "$sgdm" --device cuda reconstruct --weights weights --eeg "$out/data/eeg/test.npy" --images "$out/data/images/test" \
      --out "$out/recon-cuda" --batch 16
  "$sgdm" --device cuda eval --recon "$out/recon-cuda" --out "$out/eval-cuda"
  "$sgdm" --device cpu reconstruct --weights weights --eeg "$out/data/eeg/test.npy" --images "$out/data/images/test" \
      --out "$out/recon-cpu" --batch 16 --limit 32
  python3 "$PWD/benches/gpu/torch_step.py" --batch 1 4 2>&1 || echo "torch baseline: failed"
} 2>&1 | tee "$log"
