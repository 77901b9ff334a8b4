//! diffusers' `attention_processor.py` `Attention` (multi-head attention over token sequences) and
//! `attention.py` `BasicTransformerBlock`.

use anyhow::Result;

use crate::models::layers::{self, sum, LayerNormActivations};
use crate::nn::{join, Allocator, Grads, Linear, Norm, ParamStore, ParamTree};
use crate::ops;
use crate::tensor::{DType, Tensor};

/// `Attention`: multi-head attention with `to_q`, `to_k`, `to_v` and `to_out.0`. In transformer blocks the
/// q/k/v projections have no bias; in the VAE's mid block ([`crate::models::autoencoder_kl::VaeAttention`])
/// they do.
#[derive(Debug, Clone)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `query_dim` in and out, keys and values from `kv_dim` features (`query_dim` for self-attention).
    pub fn new(tree: &mut ParamTree, prefix: &str, query_dim: usize, kv_dim: usize, heads: usize, head_dim: usize, qkv_bias: bool) -> Attention {
        let inner = heads * head_dim;
        Attention {
            to_q: Linear::new(tree, &join(prefix, "to_q"), query_dim, inner, qkv_bias),
            to_k: Linear::new(tree, &join(prefix, "to_k"), kv_dim, inner, qkv_bias),
            to_v: Linear::new(tree, &join(prefix, "to_v"), kv_dim, inner, qkv_bias),
            to_out: Linear::new(tree, &join(prefix, "to_out.0"), inner, query_dim, true),
            heads,
            head_dim,
        }
    }
}

/// `BasicTransformerBlock`: LayerNorm + self-attention, LayerNorm + cross-attention, LayerNorm + GEGLU
/// feed-forward (`ff.net.0.proj` [8C, C] split into value and gate halves, `ff.net.2` [C, 4C]).
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    pub norm1: Norm,
    pub attn1: Attention,
    pub norm2: Norm,
    pub attn2: Attention,
    pub norm3: Norm,
    pub ff_proj: Linear,
    pub ff_out: Linear,
}

/// What one transformer-variant [`Attention`]'s backward needs, and its output.
pub struct AttentionActivations {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// The fused attention's output (`to_out.0`'s input) and its per-row log-sum-exp [B, heads, Lq] (f32).
    pub attended: Tensor,
    pub lse: Tensor,
    pub output: Tensor,
}

impl Attention {
    fn spec(&self) -> ops::attention::AttentionSpec {
        ops::attention::AttentionSpec::new(self.heads)
    }

    /// Multi-head attention over token sequences: queries from `x` [B, Lq, query_dim], keys and values from
    /// `context` [B, Lk, kv_dim] (cross-attention) or from `x` itself (`None`: self-attention).
    pub fn sequence_forward(
        &self,
        params: &ParamStore,
        x: &Tensor,
        context: Option<&Tensor>,
        alloc: &mut dyn Allocator,
    ) -> Result<AttentionActivations> {
        let kv_input = context.unwrap_or(x);
        let q = layers::linear(params, &self.to_q, x, alloc)?;
        let k = layers::linear(params, &self.to_k, kv_input, alloc)?;
        let v = layers::linear(params, &self.to_v, kv_input, alloc)?;
        let mut attended = alloc.alloc(q.shape(), q.dtype())?;
        let mut lse = alloc.alloc(&[q.shape()[0], self.heads, q.shape()[1]], DType::F32)?;
        ops::attention::attention_forward(self.spec(), ops::attention::Qkv { q: &q, k: &k, v: &v }, &mut attended, &mut lse)?;
        let output = layers::linear(params, &self.to_out, &attended, alloc)?;
        Ok(AttentionActivations { q, k, v, attended, lse, output })
    }

    /// Backward of [`Attention::sequence_forward`] with the same `x` and `context`: adds to the parameter
    /// gradients and returns (dx, dcontext). For self-attention dx includes the key and value paths and
    /// dcontext is `None`.
    pub fn sequence_backward(
        &self,
        params: &ParamStore,
        grads: &mut Grads,
        acts: &AttentionActivations,
        x: &Tensor,
        context: Option<&Tensor>,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let kv_input = context.unwrap_or(x);
        let dattended = layers::linear_back_input(params, grads, &self.to_out, &acts.attended, dy, alloc)?;
        let mut dq = alloc.alloc(acts.q.shape(), acts.q.dtype())?;
        let mut dk = alloc.alloc(acts.k.shape(), acts.k.dtype())?;
        let mut dv = alloc.alloc(acts.v.shape(), acts.v.dtype())?;
        let mut delta = alloc.alloc(acts.lse.shape(), DType::F32)?;
        ops::attention::attention_backward(
            self.spec(),
            ops::attention::Qkv { q: &acts.q, k: &acts.k, v: &acts.v },
            &acts.attended,
            &acts.lse,
            &dattended,
            &mut delta,
            ops::attention::QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv },
        )?;
        let dx = layers::linear_back_input(params, grads, &self.to_q, x, &dq, alloc)?;
        let dkv_k = layers::linear_back_input(params, grads, &self.to_k, kv_input, &dk, alloc)?;
        let dkv_v = layers::linear_back_input(params, grads, &self.to_v, kv_input, &dv, alloc)?;
        let dkv = sum(&dkv_k, &dkv_v, alloc)?;
        match context {
            Some(_) => Ok((dx, Some(dkv))),
            None => Ok((sum(&dx, &dkv, alloc)?, None)),
        }
    }
}

/// What one [`TransformerBlock`]'s backward needs, and its output (tokens [B, L, C]).
pub struct TransformerBlockActivations {
    pub norm1: LayerNormActivations,
    pub attn1: AttentionActivations,
    /// The tokens after the self-attention residual (norm2's input) and after the cross-attention residual
    /// (norm3's input).
    pub after_attn1: Tensor,
    pub norm2: LayerNormActivations,
    pub attn2: AttentionActivations,
    pub after_attn2: Tensor,
    pub norm3: LayerNormActivations,
    /// `ff.net.0.proj`'s output [.., 8C] and the GEGLU of it [.., 4C].
    pub ff_hidden: Tensor,
    pub ff_gated: Tensor,
    pub output: Tensor,
}

impl TransformerBlock {
    /// `x` [B, L, C] tokens, `context` [B, Lc, cross_attention_dim].
    pub fn forward(&self, params: &ParamStore, x: &Tensor, context: &Tensor, alloc: &mut dyn Allocator) -> Result<TransformerBlockActivations> {
        let norm1 = layers::layer_norm(params, &self.norm1, x, alloc)?;
        let attn1 = self.attn1.sequence_forward(params, &norm1.output, None, alloc)?;
        let after_attn1 = sum(&attn1.output, x, alloc)?;
        let norm2 = layers::layer_norm(params, &self.norm2, &after_attn1, alloc)?;
        let attn2 = self.attn2.sequence_forward(params, &norm2.output, Some(context), alloc)?;
        let after_attn2 = sum(&attn2.output, &after_attn1, alloc)?;
        let norm3 = layers::layer_norm(params, &self.norm3, &after_attn2, alloc)?;
        let ff_hidden = layers::linear(params, &self.ff_proj, &norm3.output, alloc)?;
        let mut gated_shape = ff_hidden.shape().to_vec();
        *gated_shape.last_mut().unwrap() /= 2;
        let mut ff_gated = alloc.alloc(&gated_shape, ff_hidden.dtype())?;
        ops::elementwise::geglu_forward(&ff_hidden, &mut ff_gated)?;
        let ff_out = layers::linear(params, &self.ff_out, &ff_gated, alloc)?;
        let output = sum(&ff_out, &after_attn2, alloc)?;
        Ok(TransformerBlockActivations { norm1, attn1, after_attn1, norm2, attn2, after_attn2, norm3, ff_hidden, ff_gated, output })
    }

    /// Backward of [`TransformerBlock::forward`] with the same `x` and `context`: adds to the parameter
    /// gradients and returns (dx, dcontext).
    pub fn backward(
        &self,
        params: &ParamStore,
        grads: &mut Grads,
        acts: &TransformerBlockActivations,
        x: &Tensor,
        context: &Tensor,
        dy: &Tensor,
        alloc: &mut dyn Allocator,
    ) -> Result<(Tensor, Tensor)> {
        let dgated = layers::linear_back_input(params, grads, &self.ff_out, &acts.ff_gated, dy, alloc)?;
        let mut dhidden = alloc.alloc(acts.ff_hidden.shape(), acts.ff_hidden.dtype())?;
        ops::elementwise::geglu_backward(&acts.ff_hidden, &dgated, &mut dhidden)?;
        let dnorm3 = layers::linear_back_input(params, grads, &self.ff_proj, &acts.norm3.output, &dhidden, alloc)?;
        let dnorm3_in = layers::layer_norm_back(params, grads, &self.norm3, &acts.after_attn2, &acts.norm3, &dnorm3, alloc)?;
        let dafter_attn2 = sum(dy, &dnorm3_in, alloc)?;

        let (dnorm2, dcontext) = self.attn2.sequence_backward(params, grads, &acts.attn2, &acts.norm2.output, Some(context), &dafter_attn2, alloc)?;
        let dnorm2_in = layers::layer_norm_back(params, grads, &self.norm2, &acts.after_attn1, &acts.norm2, &dnorm2, alloc)?;
        let dafter_attn1 = sum(&dafter_attn2, &dnorm2_in, alloc)?;

        let (dnorm1, _) = self.attn1.sequence_backward(params, grads, &acts.attn1, &acts.norm1.output, None, &dafter_attn1, alloc)?;
        let dnorm1_in = layers::layer_norm_back(params, grads, &self.norm1, x, &acts.norm1, &dnorm1, alloc)?;
        let dx = sum(&dafter_attn1, &dnorm1_in, alloc)?;
        Ok((dx, dcontext.expect("cross-attention returns a context gradient")))
    }
}
