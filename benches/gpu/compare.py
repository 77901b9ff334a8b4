"""Joins `sgdm bench --json` and torch_ops.py's JSON into the performance-target table (markdown on stdout): per case
and pass, our median, PyTorch's best variant's median, ratio = PyTorch / ours, the target, and our achieved
TFLOP/s (FLOP-bound families) or GB/s (GroupNorm + SiLU) against our peaks measured in the same run.

  compare.py OURS.json TORCH.json
"""
import json
import sys

TARGETS = {"conv": 1.0, "attention": 1.2, "groupnorm_silu": 2.0, "lstm": 1.0, "infonce": 2.0}
# GroupNorm + SiLU must also reach this share of the measured copy bandwidth.
GROUPNORM_COPY_SHARE = 0.8

if len(sys.argv) != 3:
    sys.exit(__doc__)
ours, theirs = (json.load(open(p)) for p in sys.argv[1:])
best = {}
for r in theirs["rows"]:
    key = (r["id"], r["pass"])
    if key not in best or r["ms"] < best[key]["ms"]:
        best[key] = r

print(f"ours: {ours['device']} {ours['dtype']}, commit {ours['commit']}, median of {ours['runs']} after {ours['warmup']} warm-up calls; "
      f"peaks GEMM {ours['peak_gemm_flops'] / 1e12:.1f} TFLOP/s, copy {ours['peak_copy_bytes_per_s'] / 1e9:.0f} GB/s")
print(f"PyTorch {theirs['torch']} on {theirs['device']} {theirs['dtype']}; its peaks GEMM {theirs['peak_gemm_flops'] / 1e12:.1f} TFLOP/s, "
      f"copy {theirs['peak_copy_bytes_per_s'] / 1e9:.0f} GB/s")
print()
print("| case | pass | ours ms | PyTorch ms (variant) | ratio | target | meets | ours achieved |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
met = missed = missing = 0
for r in ours["rows"]:
    # A variant row ("forward_simt") is compared with PyTorch's row for its pass.
    t = best.get((r["id"], r["pass"].removesuffix("_simt")))
    target = TARGETS[r["family"]]
    if r["flops"] > 0:
        achieved = f"{r['flops'] / (r['ms'] * 1e-3) / 1e12:.3g} TFLOP/s ({100 * r['flops'] / (r['ms'] * 1e-3) / ours['peak_gemm_flops']:.0f}% of GEMM)"
    else:
        share = r["bytes"] / (r["ms"] * 1e-3) / ours["peak_copy_bytes_per_s"]
        achieved = f"{r['bytes'] / (r['ms'] * 1e-3) / 1e9:.3g} GB/s ({100 * share:.0f}% of copy)"
    if t is None:
        missing += 1
        print(f"| {r['id']} | {r['pass']} | {r['ms']:.4f} | missing | - | {target} | - | {achieved} |")
        continue
    ratio = t["ms"] / r["ms"]
    ok = ratio >= target and (r["family"] != "groupnorm_silu" or share >= GROUPNORM_COPY_SHARE)
    met, missed = met + ok, missed + (not ok)
    print(f"| {r['id']} | {r['pass']} | {r['ms']:.4f} | {t['ms']:.4f} ({t['variant']}) | {ratio:.2f} | {target} | {'yes' if ok else 'NO'} | {achieved} |")
print()
print(f"rows meeting their target: {met} of {met + missed}" + (f" ({missing} without a PyTorch row)" if missing else ""))
