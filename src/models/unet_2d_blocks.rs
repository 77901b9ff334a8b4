//! diffusers' `unet_2d_blocks.py`: the UNet's and the ControlNet's down, up and mid blocks (`DownBlock2D`,
//! `CrossAttnDownBlock2D`, `UpBlock2D`, `CrossAttnUpBlock2D`, `UNetMidBlock2DCrossAttn`).

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::models::layers::{self, sum};
use crate::models::resnet::{ResnetActivations, ResnetBlock};
use crate::models::transformer_2d::{Transformer2d, Transformer2dActivations};
use crate::nn::{Allocator, Conv2d, Grads, ParamStore};
use crate::ops;
use crate::ops::shape::{upsample_nearest2x, upsample_nearest2x_backward};
use crate::tensor::Tensor;

/// A down block: resnets, optional transformers after each, and an optional stride-2 downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<Transformer2d>,
    pub downsampler: Option<Conv2d>,
}

/// An up block: `layers_per_block + 1` resnets fed with skip connections, optional transformers, and an
/// optional nearest-2x upsampler followed by a 3x3 conv.
#[derive(Debug, Clone)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<Transformer2d>,
    pub upsampler: Option<Conv2d>,
}

/// The mid block `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<Transformer2d>,
}

/// The gradients of the time embedding and of the cross-attention context, each summed over every resnet or
/// transformer of a UNet that read it.
#[derive(Default)]
pub struct SharedGrads {
    pub dtemb: Option<Tensor>,
    pub dcontext: Option<Tensor>,
}

fn accumulate(slot: &mut Option<Tensor>, d: Option<Tensor>, alloc: &mut dyn Allocator) -> Result<()> {
    if let Some(d) = d {
        *slot = Some(match slot.take() {
            Some(total) => sum(&total, &d, alloc)?,
            None => d,
        });
    }
    Ok(())
}

/// A UNet layer's output: a resnet's, or the transformer's that follows it in cross-attention blocks.
enum LayerOutput {
    Resnet(Tensor),
    /// The resnet's output is the transformer's input; the transformer's activations hold the layer's output.
    Attention {
        resnet_output: Tensor,
        attention: Box<Transformer2dActivations>,
    },
}

/// What one UNet layer (a resnet and its transformer, if any) keeps for the backward.
pub struct UNetLayerActivations {
    resnet: ResnetActivations,
    output: LayerOutput,
}

impl UNetLayerActivations {
    fn discard_output(&mut self) {
        match &mut self.output {
            LayerOutput::Resnet(y) => y.discard(),
            LayerOutput::Attention { attention, .. } => attention.output.discard(),
        }
    }

    pub fn output(&self) -> &Tensor {
        match &self.output {
            LayerOutput::Resnet(y) => y,
            LayerOutput::Attention { attention, .. } => &attention.output,
        }
    }
}

fn unet_layer_forward(
    resnet: &ResnetBlock,
    attention: Option<&Transformer2d>,
    p: &ParamStore,
    x: &Tensor,
    temb: &Tensor,
    context: &Tensor,
    alloc: &mut dyn Allocator,
) -> Result<UNetLayerActivations> {
    let (h, resnet_acts) = resnet.forward(p, x, Some(temb), alloc)?;
    let output = match attention {
        Some(t) => {
            let attention = Box::new(t.forward(p, &h, context, alloc)?);
            let mut resnet_output = h;
            if !alloc.keeps_activations() {
                resnet_output.discard();
            }
            LayerOutput::Attention { attention, resnet_output }
        }
        None => LayerOutput::Resnet(h),
    };
    Ok(UNetLayerActivations { resnet: resnet_acts, output })
}

fn unet_layer_backward(
    resnet: &ResnetBlock,
    attention: Option<&Transformer2d>,
    p: &ParamStore,
    g: &mut Grads,
    x: &Tensor,
    temb: &Tensor,
    context: &Tensor,
    acts: &UNetLayerActivations,
    dy: &Tensor,
    shared: &mut SharedGrads,
    alloc: &mut dyn Allocator,
) -> Result<Tensor> {
    let dattention = match (attention, &acts.output) {
        (Some(t), LayerOutput::Attention { resnet_output, attention }) => {
            let d = t.backward(p, g, attention, resnet_output, context, dy, alloc)?;
            accumulate(&mut shared.dcontext, Some(d.dcontext), alloc)?;
            Some(d.dx)
        }
        (None, LayerOutput::Resnet(_)) => None,
        _ => bail!("UNet layer backward: the transformer does not match the forward's"),
    };
    let (dx, dtemb) = resnet.backward(p, g, x, Some(temb), &acts.resnet, dattention.as_ref().unwrap_or(dy), alloc)?;
    accumulate(&mut shared.dtemb, dtemb, alloc)?;
    Ok(dx)
}

/// What [`DownBlock::backward`] reads; also holds the block's skip connections.
pub struct UNetDownActivations {
    layers: Vec<UNetLayerActivations>,
    downsampled: Option<Tensor>,
}

impl UNetDownActivations {
    /// The block's skip connections in order: every layer's output, then the downsampler's. The last one is
    /// the block's output.
    pub fn skips(&self) -> Vec<&Tensor> {
        self.layers.iter().map(UNetLayerActivations::output).chain(self.downsampled.as_ref()).collect()
    }

    pub fn output(&self) -> &Tensor {
        self.downsampled.as_ref().unwrap_or_else(|| self.layers.last().expect("a block has resnets").output())
    }
}

impl DownBlock {
    /// `DownBlock2D` / `CrossAttnDownBlock2D`: each resnet (with `temb` [N, temb_channels]), then its
    /// transformer over `context` [N, L, cross_attention_dim] in cross-attention blocks; then the downsampler.
    pub fn forward(&self, p: &ParamStore, x: &Tensor, temb: &Tensor, context: &Tensor, alloc: &mut dyn Allocator) -> Result<UNetDownActivations> {
        ensure!(
            self.attentions.is_empty() || self.attentions.len() == self.resnets.len(),
            "down block: {} transformers for {} resnets",
            self.attentions.len(),
            self.resnets.len()
        );
        let mut layers: Vec<UNetLayerActivations> = Vec::new();
        for (l, resnet) in self.resnets.iter().enumerate() {
            let input = layers.last().map_or(x, UNetLayerActivations::output);
            let acts = unet_layer_forward(resnet, self.attentions.get(l), p, input, temb, context, alloc).with_context(|| format!("layer {l}"))?;
            layers.push(acts);
        }
        let last = layers.last().ok_or_else(|| anyhow!("a block needs at least one resnet"))?.output();
        let downsampled = self.downsampler.as_ref().map(|conv| layers::conv(p, conv, last, alloc).context("downsamplers.0")).transpose()?;
        Ok(UNetDownActivations { layers, downsampled })
    }

    /// Backward of [`DownBlock::forward`] from `dskips`, the gradient reaching each skip connection from
    /// outside the block (for the last one, the skip's and the next block's together): returns dx, adds
    /// every parameter gradient and the time embedding's and context's gradients to `shared`.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        acts: &UNetDownActivations,
        dskips: &[&Tensor],
        shared: &mut SharedGrads,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        let n = acts.layers.len();
        ensure!(dskips.len() == acts.skips().len(), "down block backward: {} skip gradients for {} skips", dskips.len(), acts.skips().len());
        // The gradient from inside the block into the current layer's output; the skip's is added to it.
        let mut carried = match &self.downsampler {
            Some(conv) => Some(layers::conv_back(p, g, conv, acts.layers[n - 1].output(), dskips[n], alloc).context("downsamplers.0 backward")?),
            None => None,
        };
        for (l, resnet) in self.resnets.iter().enumerate().rev() {
            let total;
            let dy = match carried.take() {
                Some(c) => {
                    total = sum(&c, dskips[l], alloc)?;
                    &total
                }
                None => dskips[l],
            };
            let input = if l == 0 { x } else { acts.layers[l - 1].output() };
            let attention = self.attentions.get(l);
            let dx = unet_layer_backward(resnet, attention, p, g, input, temb, context, &acts.layers[l], dy, shared, alloc)
                .with_context(|| format!("layer {l} backward"))?;
            carried = Some(dx);
        }
        carried.ok_or_else(|| anyhow!("a block needs at least one resnet"))
    }
}

/// What [`UpBlock::backward`] reads.
pub struct UNetUpActivations {
    /// Each resnet's input: the hidden state and its skip connection concatenated on channels.
    inputs: Vec<Tensor>,
    layers: Vec<UNetLayerActivations>,
    /// The upsampler's nearest-2x map (its conv's input) and the conv's output.
    upsampled: Option<(Tensor, Tensor)>,
}

impl UNetUpActivations {
    pub fn output(&self) -> &Tensor {
        match &self.upsampled {
            Some((_, y)) => y,
            None => self.layers.last().expect("a block has resnets").output(),
        }
    }
}

impl UpBlock {
    /// `UpBlock2D` / `CrossAttnUpBlock2D`: each resnet takes `cat([hidden, skip], dim=1)` with the next of
    /// `skips` (in the order consumed: the most recent skip first), then its transformer in cross-attention
    /// blocks; then nearest 2x and the upsampler conv.
    pub fn forward(
        &self,
        p: &ParamStore,
        x: &Tensor,
        skips: &[&Tensor],
        temb: &Tensor,
        context: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<UNetUpActivations> {
        ensure!(skips.len() == self.resnets.len(), "up block: {} skips for {} resnets", skips.len(), self.resnets.len());
        ensure!(
            self.attentions.is_empty() || self.attentions.len() == self.resnets.len(),
            "up block: {} transformers for {} resnets",
            self.attentions.len(),
            self.resnets.len()
        );
        let mut inputs = Vec::new();
        let mut layers: Vec<UNetLayerActivations> = Vec::new();
        for (l, (resnet, skip)) in self.resnets.iter().zip(skips).enumerate() {
            let hidden = layers.last().map_or(x, UNetLayerActivations::output);
            let (h, s) = (hidden.shape(), skip.shape());
            ensure!(
                h.len() == 4 && s.len() == 4 && h[0] == s[0] && h[2..] == s[2..] && h[1] + s[1] == resnet.norm1.channels,
                "up block layer {l}: hidden {h:?} and skip {s:?} do not concatenate into the resnet's {} channels",
                resnet.norm1.channels
            );
            let mut input = alloc.alloc(&[h[0], h[1] + s[1], h[2], h[3]], hidden.dtype())?;
            ops::shape::concat_channels(hidden, skip, &mut input)?;
            let acts = unet_layer_forward(resnet, self.attentions.get(l), p, &input, temb, context, alloc).with_context(|| format!("layer {l}"))?;
            inputs.push(input);
            if !alloc.keeps_activations() {
                // The concatenation and the previous layer's output were this layer's inputs only.
                inputs.iter_mut().for_each(Tensor::discard);
                if let Some(previous) = layers.last_mut() {
                    previous.discard_output();
                }
            }
            layers.push(acts);
        }
        let upsampled = match &self.upsampler {
            Some(conv) => {
                let h = layers.last().expect("checked against the skips").output();
                let s = h.shape();
                let mut up = alloc.alloc(&[s[0], s[1], 2 * s[2], 2 * s[3]], h.dtype())?;
                upsample_nearest2x(h, &mut up)?;
                let y = layers::conv(p, conv, &up, alloc).context("upsamplers.0")?;
                let mut up = up;
                if !alloc.keeps_activations() {
                    up.discard();
                    layers.last_mut().expect("checked against the skips").discard_output();
                }
                Some((up, y))
            }
            None => None,
        };
        Ok(UNetUpActivations { inputs, layers, upsampled })
    }

    /// Backward of [`UpBlock::forward`] with the same `x`: returns dx and the skips' gradients (in the
    /// order consumed), adds every parameter gradient and the time embedding's and context's to `shared`.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        acts: &UNetUpActivations,
        dy: &Tensor,
        shared: &mut SharedGrads,
        alloc: &mut dyn Allocator,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut d = match (&self.upsampler, &acts.upsampled) {
            (Some(conv), Some((up, _))) => {
                let dup = layers::conv_back(p, g, conv, up, dy, alloc).context("upsamplers.0 backward")?;
                let s = dup.shape();
                let mut dh = alloc.alloc(&[s[0], s[1], s[2] / 2, s[3] / 2], dup.dtype())?;
                upsample_nearest2x_backward(&dup, &mut dh)?;
                Some(dh)
            }
            (None, None) => None,
            _ => bail!("up block backward: the upsampler does not match the forward's"),
        };
        let mut dskips = Vec::new();
        for (l, resnet) in self.resnets.iter().enumerate().rev() {
            let upstream = d.as_ref().unwrap_or(dy);
            let attention = self.attentions.get(l);
            let dinput = unet_layer_backward(resnet, attention, p, g, &acts.inputs[l], temb, context, &acts.layers[l], upstream, shared, alloc)
                .with_context(|| format!("layer {l} backward"))?;
            let hidden = if l == 0 { x } else { acts.layers[l - 1].output() };
            let s = dinput.shape();
            let mut dhidden = alloc.alloc(hidden.shape(), dinput.dtype())?;
            let mut dskip = alloc.alloc(&[s[0], s[1] - hidden.shape()[1], s[2], s[3]], dinput.dtype())?;
            ops::shape::split_channels(&dinput, &mut dhidden, &mut dskip)?;
            d = Some(dhidden);
            dskips.push(dskip);
        }
        dskips.reverse();
        Ok((d.ok_or_else(|| anyhow!("a block needs at least one resnet"))?, dskips))
    }
}

/// What [`MidBlock::backward`] reads.
pub struct UNetMidActivations {
    resnet0: ResnetActivations,
    /// resnet 0's output, the transformer's input; the transformer's output is resnet 1's input.
    hidden: Tensor,
    attention: Transformer2dActivations,
    resnet1: ResnetActivations,
    pub output: Tensor,
}

impl MidBlock {
    fn unet_parts(&self) -> Result<(&ResnetBlock, &Transformer2d, &ResnetBlock)> {
        match (&self.resnets[..], &self.attentions[..]) {
            ([r0, r1], [t]) => Ok((r0, t, r1)),
            _ => bail!("mid block: UNetMidBlock2DCrossAttn needs two resnets and one transformer"),
        }
    }

    /// `UNetMidBlock2DCrossAttn`: resnet, transformer over `context`, resnet.
    pub fn forward(&self, p: &ParamStore, x: &Tensor, temb: &Tensor, context: &Tensor, alloc: &mut dyn Allocator) -> Result<UNetMidActivations> {
        let (r0, t, r1) = self.unet_parts()?;
        let (hidden, resnet0) = r0.forward(p, x, Some(temb), alloc).context("resnets.0")?;
        let attention = t.forward(p, &hidden, context, alloc).context("attentions.0")?;
        let (output, resnet1) = r1.forward(p, &attention.output, Some(temb), alloc).context("resnets.1")?;
        let (mut hidden, mut attention) = (hidden, attention);
        if !alloc.keeps_activations() {
            hidden.discard();
            attention.output.discard();
        }
        Ok(UNetMidActivations { resnet0, hidden, attention, resnet1, output })
    }

    /// Backward of [`MidBlock::forward`]: returns dx, adds every parameter gradient and the time
    /// embedding's and context's gradients to `shared`.
    pub fn backward(
        &self,
        p: &ParamStore,
        g: &mut Grads,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        acts: &UNetMidActivations,
        dy: &Tensor,
        shared: &mut SharedGrads,
        alloc: &mut dyn Allocator,
    ) -> Result<Tensor> {
        let (r0, t, r1) = self.unet_parts()?;
        let (dattention, dtemb) = r1.backward(p, g, &acts.attention.output, Some(temb), &acts.resnet1, dy, alloc).context("resnets.1 backward")?;
        accumulate(&mut shared.dtemb, dtemb, alloc)?;
        let d = t.backward(p, g, &acts.attention, &acts.hidden, context, &dattention, alloc).context("attentions.0 backward")?;
        accumulate(&mut shared.dcontext, Some(d.dcontext), alloc)?;
        let (dx, dtemb) = r0.backward(p, g, x, Some(temb), &acts.resnet0, &d.dx, alloc).context("resnets.0 backward")?;
        accumulate(&mut shared.dtemb, dtemb, alloc)?;
        Ok(dx)
    }
}
