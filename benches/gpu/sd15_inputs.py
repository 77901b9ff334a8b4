"""Inputs for the SD 1.5 parity check of benches/gpu/parity.sh: one guided denoising step at 512x512
(64x64 latents, batch 2 = one image with classifier-free guidance, 77 tokens of 768).

  sd15_inputs.py controlnet OUT            sample, timestep, encoder_hidden_states, controlnet_cond (seeded)
  sd15_inputs.py unet CN_INPUTS CN_OUT OUT the UNet's inputs: CN_INPUTS' sample/timestep/context plus the
                                           ControlNet residuals in CN_OUT, under the names the UNet takes
Needs torch and safetensors (both on the GPU machine's python3).
"""
import sys

import torch
from safetensors.torch import load_file, save_file


def controlnet(out):
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "sample": torch.randn(2, 4, 64, 64, generator=g),
            "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(2, 77, 768, generator=g),
            # A structure map as the pipeline feeds it: values in [0, 1].
            "controlnet_cond": torch.rand(2, 3, 512, 512, generator=g),
        },
        out,
    )


def unet(cn_inputs, cn_out, out):
    x, r = load_file(cn_inputs), load_file(cn_out)
    t = {k: x[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    for name, v in r.items():
        if name.startswith("down_block_res_samples."):
            t["down_block_additional_residuals." + name.split(".")[1]] = v
        elif name == "mid_block_res_sample":
            t["mid_block_additional_residual"] = v
    save_file(t, out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "controlnet":
        controlnet(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "unet":
        unet(*sys.argv[2:])
    else:
        sys.exit(__doc__)
