//! diffusers' `resnet.py`: `ResnetBlock2D` and the down- and upsampler convolutions.

use anyhow::{bail, ensure, Result};

use crate::models::layers;
use crate::nn::{join, Allocator, Conv2d, Grads, Linear, Norm, ParamStore, ParamTree};
use crate::ops::conv::Conv2dSpec;
use crate::ops::elementwise::{add, silu_backward, silu_forward};
use crate::ops::linear::{matmul, MatmulSpec};
use crate::tensor::Tensor;

/// `ResnetBlock2D`: GroupNorm, SiLU, 3x3 conv, (+ projected time embedding), GroupNorm, SiLU, 3x3 conv,
/// plus a 1x1 shortcut where the channel count changes. Output scale 1.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    pub norm1: Norm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: Norm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(tree: &mut ParamTree, prefix: &str, input: usize, output: usize, temb: Option<usize>, groups: usize, eps: f64) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: Norm::group(tree, &join(prefix, "norm1"), groups, input, eps)?,
            conv1: Conv2d::k3(tree, &join(prefix, "conv1"), input, output, 1),
            time_emb_proj: temb.map(|t| Linear::new(tree, &join(prefix, "time_emb_proj"), t, output, true)),
            norm2: Norm::group(tree, &join(prefix, "norm2"), groups, output, eps)?,
            conv2: Conv2d::k3(tree, &join(prefix, "conv2"), output, output, 1),
            conv_shortcut: (input != output).then(|| Conv2d::k1(tree, &join(prefix, "conv_shortcut"), input, output)),
        })
    }
}

/// The time-embedding branch of a resnet: `silu(temb)` (the projection's input) and the ones the projected
/// [N, C] embedding is multiplied with to broadcast it over the N x H·W positions in one accumulating GEMM.
pub struct TimeActivations {
    silu: Tensor,
    ones: Tensor,
}

/// What [`ResnetBlock::backward`] reads: the GroupNorm activations and the first conv's output (with the time
/// embedding added), which is the second GroupNorm's input.
pub struct ResnetActivations {
    norm1: layers::GroupNormActivations,
    conv1: Tensor,
    time: Option<TimeActivations>,
    norm2: layers::GroupNormActivations,
}

impl ResnetActivations {
    fn discard(&mut self) {
        self.norm1.discard();
        self.conv1.discard();
        if let Some(t) = &mut self.time {
            t.silu.discard();
            t.ones.discard();
        }
        self.norm2.discard();
    }
}

impl ResnetBlock {
    /// `x` [N, C_in, H, W] and, when the block has `time_emb_proj`, `temb` [N, temb_channels]; returns
    /// [N, C_out, H, W] = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb))))).
    pub fn forward(&self, p: &ParamStore, x: &Tensor, temb: Option<&Tensor>, alloc: &mut dyn Allocator) -> Result<(Tensor, ResnetActivations)> {
        let norm1 = layers::group_norm(p, &self.norm1, true, x, alloc)?;
        let mut conv1 = layers::conv(p, &self.conv1, &norm1.y, alloc)?;
        let time = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let shape = conv1.shape().to_vec();
                let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
                ensure!(temb.shape() == [n, proj.input], "ResnetBlock2D: temb {:?} must be [{n}, {}]", temb.shape(), proj.input);
                let mut silu = alloc.alloc(temb.shape(), temb.dtype())?;
                silu_forward(temb, &mut silu)?;
                let projected = layers::linear(p, proj, &silu, alloc)?.reshape(&[n, c, 1])?;
                let mut ones = alloc.alloc(&[n, 1, hw], conv1.dtype())?;
                crate::ops::elementwise::fill(&mut ones, 1.0)?;
                let mut h = conv1.reshape(&[n, c, hw])?;
                matmul(&projected, &ones, &mut h, MatmulSpec { accumulate: true, ..MatmulSpec::default() })?;
                conv1 = h.reshape(&shape)?;
                Some(TimeActivations { silu, ones })
            }
            (None, None) => None,
            (Some(_), None) => bail!("ResnetBlock2D: the block projects a time embedding but none was given"),
            (None, Some(_)) => bail!("ResnetBlock2D: a time embedding was given to a block without time_emb_proj"),
        };
        let norm2 = layers::group_norm(p, &self.norm2, true, &conv1, alloc)?;
        let conv2 = layers::conv(p, &self.conv2, &norm2.y, alloc)?;
        let mut y = alloc.alloc(conv2.shape(), conv2.dtype())?;
        match &self.conv_shortcut {
            Some(sc) => add(&layers::conv(p, sc, x, alloc)?, &conv2, &mut y)?,
            None => add(x, &conv2, &mut y)?,
        }
        let mut acts = ResnetActivations { norm1, conv1, time, norm2 };
        if !alloc.keeps_activations() {
            acts.discard();
        }
        Ok((y, acts))
    }

    /// Backward of [`ResnetBlock::forward`] from `dy`: returns dx and, with a time embedding, dtemb; adds
    /// every parameter gradient.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        temb: Option<&Tensor>,
        acts: &ResnetActivations,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dnorm2 = layers::conv_back(p, g, &self.conv2, &acts.norm2.y, dy, alloc)?;
        let dconv1 = layers::group_norm_back(p, g, &self.norm2, true, &acts.conv1, &acts.norm2, &dnorm2, alloc)?;
        let (dconv1, dtemb) = match (&self.time_emb_proj, temb, &acts.time) {
            (Some(proj), Some(temb), Some(time)) => {
                let shape = dconv1.shape().to_vec();
                let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
                let dconv1 = dconv1.reshape(&[n, c, hw])?;
                let mut dprojected = alloc.alloc(&[n, c, 1], dconv1.dtype())?;
                matmul(&dconv1, &time.ones, &mut dprojected, MatmulSpec { trans_b: true, ..MatmulSpec::default() })?;
                let dprojected = dprojected.reshape(&[n, c])?;
                let mut dsilu = alloc.alloc(time.silu.shape(), time.silu.dtype())?;
                layers::linear_back(p, g, proj, &time.silu, &dprojected, Some(&mut dsilu))?;
                let mut dtemb = alloc.alloc(temb.shape(), temb.dtype())?;
                silu_backward(temb, &dsilu, &mut dtemb)?;
                (dconv1.reshape(&shape)?, Some(dtemb))
            }
            (None, None, None) => (dconv1, None),
            _ => bail!("ResnetBlock2D backward: the time embedding does not match the forward's"),
        };
        let dnorm1 = layers::conv_back(p, g, &self.conv1, &acts.norm1.y, &dconv1, alloc)?;
        let dmain = layers::group_norm_back(p, g, &self.norm1, true, x, &acts.norm1, &dnorm1, alloc)?;
        let mut dx = alloc.alloc(x.shape(), x.dtype())?;
        match &self.conv_shortcut {
            Some(sc) => add(&dmain, &layers::conv_back(p, g, sc, x, dy, alloc)?, &mut dx)?,
            None => add(&dmain, dy, &mut dx)?,
        }
        Ok((dx, dtemb))
    }
}

/// Downsampler conv: the UNet pads 1 on every side; the VAE pads (0, 1, 0, 1) explicitly and convolves with
/// padding 0.
pub fn downsampler(tree: &mut ParamTree, prefix: &str, channels: usize, vae: bool) -> Conv2d {
    let spec = if vae { Conv2dSpec::VAE_DOWNSAMPLE } else { Conv2dSpec::new(2, 1) };
    Conv2d::new(tree, &join(prefix, "downsamplers.0.conv"), channels, channels, 3, spec, true)
}

pub fn upsampler(tree: &mut ParamTree, prefix: &str, channels: usize) -> Conv2d {
    Conv2d::k3(tree, &join(prefix, "upsamplers.0.conv"), channels, channels, 1)
}
