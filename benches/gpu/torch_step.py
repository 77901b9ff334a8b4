"""The PyTorch/diffusers baseline of `sgdm profile --model sd15`: one guided denoising step (ControlNet +
UNet on 2 x batch rows, 64x64 latents, 77 tokens, a 512x512 condition) with random weights in bf16, timed
with CUDA events after warm-up. Run on the GPU machine from the repository root; prints one line per batch.
"""
import argparse
import json
import pathlib

import torch

root = pathlib.Path(__file__).resolve().parents[2]
parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, nargs="+", default=[1])
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()
try:
    from diffusers import ControlNetModel, UNet2DConditionModel
except ImportError as e:
    raise SystemExit(f"torch baseline: diffusers is not importable here ({e}); skipped")

def config(name):
    c = json.loads((root / "tests/fixtures/sd15" / name).read_text())
    return {k: v for k, v in c.items() if not k.startswith("_")}

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
unet = UNet2DConditionModel.from_config(config("unet.json")).to(dev, dt).eval()
cn = ControlNetModel.from_config(config("controlnet.json")).to(dev, dt).eval()
for b in args.batch:
    rows = 2 * b
    x = torch.randn(rows, 4, 64, 64, device=dev, dtype=dt)
    t = torch.full((rows,), 500, device=dev)
    ctx = torch.randn(rows, 77, 768, device=dev, dtype=dt)
    cond = torch.randn(rows, 3, 512, 512, device=dev, dtype=dt)

    @torch.no_grad()
    def step():
        down, mid = cn(x, t, ctx, controlnet_cond=cond, return_dict=False)
        return unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    for _ in range(2):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    print(f"torch {torch.__version__} bf16 sd15 step, batch {b} ({rows} rows): {start.elapsed_time(end) / args.steps:.2f} ms")
