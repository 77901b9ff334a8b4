#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, everything the GPU machine runs: the GPU machine has no Rust toolchain
# and no network. Output: target/gpu-bundle/ with `sgdm` and the test binaries, stripped, plus smoke.sh, and
# the same packed as target/gpu-bundle.tar.gz (a third of the size, for tools that limit what they carry).
# On the GPU machine, from the repository root:
#   tar xzf target/gpu-bundle.tar.gz -C target && bash target/gpu-bundle/smoke.sh
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
tar czf target/gpu-bundle.tar.gz -C target gpu-bundle
du -sh "$out" target/gpu-bundle.tar.gz
