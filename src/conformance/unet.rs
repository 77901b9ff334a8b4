//! `sgdm forward` for UNet2DConditionModel and ControlNetModel.

use anyhow::{bail, Result};

use super::{param_grads, Named, Outputs, Source};
use crate::models::unet::{ControlNet, UNet, UNetConditioning, UNetConfig};
use crate::nn::Grads;
use crate::runtime::Device;
use crate::tensor::{DType, Tensor};

/// The tensors `name.0`, `name.1`, ... in order, as many as there are.
fn numbered<'a>(inputs: &'a Named, name: &str) -> Vec<&'a Tensor> {
    (0..).map_while(|i| inputs.get_opt(&format!("{name}.{i}"))).collect()
}

/// `sgdm forward` for UNet2DConditionModel, as tests/fixtures/models/make_fixtures.py calls it: inputs
/// `sample`, `timestep` [B] (or [1]), `encoder_hidden_states` and optionally a ControlNet's
/// `down_block_additional_residuals.{i}` with `mid_block_additional_residual`; output `sample`. With its
/// upstream gradient, also `grad.` of every float input and every parameter.
pub fn run_unet(c: &Source, inputs: &Named, grads: Option<&Named>, device: &Device, dtype: DType) -> Result<Outputs> {
    let model = UNet::new(UNetConfig::from_json(&c.config_path(), c.config())?)?;
    let p = c.params(&model.params, device, dtype, &[])?;
    inputs.ensure_only(&["sample", "timestep", "encoder_hidden_states", "down_block_additional_residuals", "mid_block_additional_residual"])?;
    let sample = inputs.get("sample")?;
    let down = numbered(inputs, "down_block_additional_residuals");
    let residuals = match (down.is_empty(), inputs.get_opt("mid_block_additional_residual")) {
        (true, None) => None,
        (false, Some(mid)) => Some((down, mid)),
        _ => bail!("{}: the down block residuals and the mid block residual come together (a ControlNet's) or not at all", inputs.source),
    };
    let cond = UNetConditioning { timestep: inputs.get("timestep")?, encoder_hidden_states: inputs.get("encoder_hidden_states")?, residuals };
    // Without upstream gradients nothing will read the activations: discard them block by block.
    let alloc = &mut *crate::nn::standalone(device, grads.is_some());
    let acts = model.forward(&p, sample, &cond, alloc)?;
    let mut out = Vec::new();
    if let Some(gn) = grads {
        gn.ensure_only(&["sample"])?;
        let dy = gn.get_shaped("sample", acts.output.shape())?;
        let mut g = Grads::zeros(&model.params, alloc, dtype)?;
        let d = model.backward(&p, &mut g, sample, &cond, &acts, dy, alloc)?;
        out.push(("grad.sample".to_string(), d.sample));
        out.push(("grad.encoder_hidden_states".to_string(), d.encoder_hidden_states));
        if let Some((down, mid)) = d.residuals {
            out.extend(down.into_iter().enumerate().map(|(i, t)| (format!("grad.down_block_additional_residuals.{i}"), t)));
            out.push(("grad.mid_block_additional_residual".to_string(), mid));
        }
        out.extend(param_grads(&model.params, g));
    }
    out.push(("sample".to_string(), acts.output));
    Ok(out)
}

/// `sgdm forward` for ControlNetModel, as tests/fixtures/models/make_fixtures.py calls it: inputs `sample`,
/// `timestep`, `encoder_hidden_states`, `controlnet_cond` and `conditioning_scale` [1] (1 when absent);
/// outputs `down_block_res_samples.{i}` and `mid_block_res_sample`. With their upstream gradients, also
/// `grad.sample`, `grad.encoder_hidden_states`, `grad.controlnet_cond` and `grad.<parameter>`.
pub fn run_controlnet(c: &Source, inputs: &Named, grads: Option<&Named>, device: &Device, dtype: DType) -> Result<Outputs> {
    let model = ControlNet::new(UNetConfig::from_json(&c.config_path(), c.config())?)?;
    let p = c.params(&model.params, device, dtype, &[])?;
    inputs.ensure_only(&["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"])?;
    let (sample, context, cond) = (inputs.get("sample")?, inputs.get("encoder_hidden_states")?, inputs.get("controlnet_cond")?);
    let conditioning_scale = match inputs.get_opt("conditioning_scale") {
        Some(t) => match t.to_f32_vec()?[..] {
            [s] => s,
            _ => bail!("{}: conditioning_scale {:?} must hold one value", inputs.source, t.shape()),
        },
        None => 1.0,
    };
    // Without upstream gradients nothing will read the activations: discard them block by block.
    let alloc = &mut *crate::nn::standalone(device, grads.is_some());
    let acts = model.forward(&p, sample, inputs.get("timestep")?, context, cond, conditioning_scale, alloc)?;
    let mut out = Vec::new();
    if let Some(gn) = grads {
        gn.ensure_only(&["down_block_res_samples", "mid_block_res_sample"])?;
        let ddown = acts
            .down
            .iter()
            .enumerate()
            .map(|(i, y)| gn.get_shaped(&format!("down_block_res_samples.{i}"), y.shape()))
            .collect::<Result<Vec<_>>>()?;
        let dmid = gn.get_shaped("mid_block_res_sample", acts.mid.shape())?;
        let mut g = Grads::zeros(&model.params, alloc, dtype)?;
        let d = model.backward(&p, &mut g, sample, context, cond, &acts, &ddown, dmid, alloc)?;
        out.push(("grad.sample".to_string(), d.sample));
        out.push(("grad.encoder_hidden_states".to_string(), d.encoder_hidden_states));
        out.push(("grad.controlnet_cond".to_string(), d.controlnet_cond));
        out.extend(param_grads(&model.params, g));
    }
    out.extend(acts.down.into_iter().enumerate().map(|(i, t)| (format!("down_block_res_samples.{i}"), t)));
    out.push(("mid_block_res_sample".to_string(), acts.mid));
    Ok(out)
}
