#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, everything the GPU machine runs: the GPU machine has no Rust toolchain
# and no network. Output: target/gpu-bundle/ with `sgdm` and the test binaries, stripped, plus the scripts,
# and the same packed as target/gpu-bundle.tar.xz (~10 MB instead of 85: tools limit what they carry).
# On the GPU machine, from the repository root (Python's lzma, so no xz binary is needed):
#   python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' target/gpu-bundle.tar.xz target
#   bash target/gpu-bundle/parity.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=target/gpu-bundle
rm -rf "$out" && mkdir -p "$out/tests"
cargo build --release --quiet
cp target/release/sgdm "$out/"
cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        kind = m["target"]["kind"][0]
        name = m["target"]["name"] if kind in ("test", "bench") else "unit-" + m["target"]["name"] + "-" + kind
        shutil.copy(m["executable"], os.path.join(sys.argv[1], name))
' "$out/tests"
strip --strip-all "$out/sgdm" "$out"/tests/*
cp benches/gpu/smoke.sh benches/gpu/pipeline.sh benches/gpu/parity.sh benches/gpu/compare.sh benches/gpu/env.sh "$out/"
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty)" > "$out/COMMIT"
rm -f target/gpu-bundle.tar.gz
tar cJf target/gpu-bundle.tar.xz -C target gpu-bundle
du -sh "$out" target/gpu-bundle.tar.xz
