#!/usr/bin/env bash
# Downloads, here, the Python wheels the GPU machine lacks (it has PyTorch and safetensors but not diffusers,
# which benches/gpu/torch_step.py needs) into .whl/ (ignored by git), for carrying to the GPU machine.
# There: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
ls -la .whl
