//! ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
//! Models"), a port of diffusers' `models/controlnets/controlnet.py` (`ControlNetModel`,
//! `ControlNetConditioningEmbedding`) and of the residual sum of `multicontrolnet.py`.
//!
//! A ControlNet is a trainable copy of the UNet's first half: the same input convolution, time
//! embedding, down and mid blocks (built here by the UNet's own [`Encoder`]), plus a small
//! convolutional encoder of the control image added to the input convolution's output, and one
//! 1×1 "zero" convolution per skip connection and for the mid block, whose outputs — scaled by the
//! conditioning scale — are added to the UNet's skips and mid-block output
//! ([`UNet::forward_with`](super::unet::UNet::forward_with)).
//!
//! `config.json` is read like the UNet's (diffusers' defaults, unsupported options refused by name)
//! plus the ControlNet's own keys; guess mode is not supported (the pipeline never asks for it).

use super::nn::{conv2d, Conv2d};
use super::unet::{Encoder, Residuals, UNetConfig};
use super::{read_json, weights_err, ComponentFiles};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

/// A ControlNet's `config.json`: the UNet keys its blocks are built from, and its own.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    #[serde(flatten)]
    pub unet: UNetConfig,
    /// `conditioning_channels`, default 3.
    #[serde(default = "d3")]
    pub conditioning_channels: usize,
    /// `controlnet_conditioning_channel_order`, default "rgb" ("bgr" flips the control image).
    #[serde(default = "rgb")]
    pub controlnet_conditioning_channel_order: String,
    /// `conditioning_embedding_out_channels`, default (16, 32, 96, 256): one stride-2 stage per
    /// entry after the first, so the control image is 2^(len-1) times the latent size.
    #[serde(default = "default_cond_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// `global_pool_conditions`, default false (true in the "shuffle" ControlNet: the residuals
    /// are averaged over the picture).
    #[serde(default)]
    pub global_pool_conditions: bool,
}

fn d3() -> usize {
    3
}
fn rgb() -> String {
    "rgb".into()
}
fn default_cond_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

impl ControlNetConfig {
    /// Checks the ControlNet's own keys and, as the UNet's config does, the blocks.
    fn check(&mut self, path: &Path) -> Result<super::unet::Plan> {
        // ControlNets have no up path; the UNet's check wants one that mirrors the down path.
        self.unet.up_block_types = self
            .unet
            .down_block_types
            .iter()
            .rev()
            .map(|t| if t == "CrossAttnDownBlock2D" { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string())
            .collect();
        let plan = self.unet.plan(path)?;
        super::in_range(path, "conditioning_channels", self.conditioning_channels, 1, 16)?;
        let order = self.controlnet_conditioning_channel_order.as_str();
        if order != "rgb" && order != "bgr" {
            return Err(Error::config(
                path,
                format!("'controlnet_conditioning_channel_order' = {order:?} is not supported (rgb or bgr)"),
            ));
        }
        let c = &self.conditioning_embedding_out_channels;
        if c.is_empty() || c.len() > 6 {
            return Err(Error::config(
                path,
                format!("'conditioning_embedding_out_channels' has {} entries (1 to 6 expected)", c.len()),
            ));
        }
        for &ch in c {
            super::in_range(path, "conditioning_embedding_out_channels", ch, 1, 4096)?;
        }
        Ok(plan)
    }

    /// How many times larger than the latents the control image is.
    pub fn image_factor(&self) -> usize {
        1 << (self.conditioning_embedding_out_channels.len() - 1)
    }
}

/// diffusers `ControlNetConditioningEmbedding`: conv 3×3, then per stage a 3×3 and a stride-2 3×3
/// convolution, SiLU after each, and a final 3×3 convolution to the UNet's first width.
#[derive(Debug)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, cin: usize, channels: &[usize], cout: usize) -> candle_core::Result<Self> {
        let conv_in = conv2d(vb.pp("conv_in"), cin, channels[0], 3, 1, 1)?;
        let mut blocks = Vec::new();
        for (i, w) in channels.windows(2).enumerate() {
            blocks.push(conv2d(vb.pp("blocks").pp(2 * i), w[0], w[0], 3, 1, 1)?);
            blocks.push(conv2d(vb.pp("blocks").pp(2 * i + 1), w[0], w[1], 3, 2, 1)?);
        }
        let conv_out = conv2d(vb.pp("conv_out"), channels[channels.len() - 1], cout, 3, 1, 1)?;
        Ok(Self { conv_in, blocks, conv_out })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = candle_nn::ops::silu(&self.conv_in.forward(xs)?)?;
        for b in &self.blocks {
            xs = candle_nn::ops::silu(&b.forward(&xs)?)?;
        }
        self.conv_out.forward(&xs)
    }
}

/// A ControlNet, built from its `config.json` and safetensors weights.
#[derive(Debug)]
pub struct ControlNet {
    pub config: ControlNetConfig,
    enc: Encoder,
    cond: ConditioningEmbedding,
    /// One 1×1 convolution per skip connection (`controlnet_down_blocks.{i}`).
    down_out: Vec<Conv2d>,
    mid_out: Conv2d,
}

impl ControlNet {
    pub fn load(files: &ComponentFiles, dtype: DType, device: &Device) -> Result<Self> {
        let mut config: ControlNetConfig = read_json(&files.config)?;
        let plan = config.check(&files.config)?;
        let (vb, _in_place) = super::var_builder(files, dtype, device)?;
        Self::build(config, &plan, vb).map_err(weights_err(files))
    }

    /// Builds from a parsed config and any VarBuilder (random weights in benches); `path` names the
    /// config in errors.
    pub fn from_config(mut config: ControlNetConfig, vb: VarBuilder, path: &Path) -> Result<Self> {
        let plan = config.check(path)?;
        Ok(Self::build(config, &plan, vb)?)
    }

    fn build(config: ControlNetConfig, plan: &super::unet::Plan, vb: VarBuilder) -> candle_core::Result<Self> {
        let enc = Encoder::build(&config.unet, plan, &vb)?;
        let ch = &config.unet.block_out_channels;
        let cond = ConditioningEmbedding::new(
            vb.pp("controlnet_cond_embedding"),
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
            ch[0],
        )?;
        // The skip connections' widths, in the order the down path makes them.
        let mut widths = vec![ch[0]];
        for (i, &c) in ch.iter().enumerate() {
            widths.extend(std::iter::repeat_n(c, plan.layers[i]));
            if i + 1 < ch.len() {
                widths.push(c);
            }
        }
        let down_out = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| conv2d(vb.pp("controlnet_down_blocks").pp(i), c, c, 1, 1, 0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let last = ch[ch.len() - 1];
        let mid_out = conv2d(vb.pp("controlnet_mid_block"), last, last, 1, 1, 0)?;
        Ok(Self { config, enc, cond, down_out, mid_out })
    }

    /// Whether this ControlNet can steer `unet`: the same block widths and depths, latent channels
    /// and text width; otherwise what differs, for a one-line refusal.
    pub fn mismatch(&self, unet: &UNetConfig) -> Option<String> {
        let c = &self.config.unet;
        if c.block_out_channels != unet.block_out_channels {
            return Some(format!(
                "its blocks are {:?} wide, the model's UNet {:?}",
                c.block_out_channels, unet.block_out_channels
            ));
        }
        if c.in_channels != unet.in_channels {
            return Some(format!("it takes {} latent channels, the model {}", c.in_channels, unet.in_channels));
        }
        if c.context_dim() != unet.context_dim() {
            return Some(format!(
                "it attends to {}-wide text embeddings, the model to {}",
                c.context_dim(),
                unet.context_dim()
            ));
        }
        let n = unet.block_out_channels.len();
        let layers = |u: &UNetConfig| u.layers_per_block.per_block(n, Path::new(""), "layers_per_block").ok();
        if layers(c) != layers(unet) {
            return Some(format!("its blocks have {:?} layers, the model's {:?}", layers(c), layers(unet)));
        }
        None
    }

    /// The residuals for one UNet evaluation: `xs` (B, C, h, w) the UNet's input, `cond`
    /// (B, 3, h·f, w·f) the control image in [0, 1] (f = [`ControlNetConfig::image_factor`]),
    /// every residual multiplied by `scale`.
    pub fn forward(
        &self,
        xs: &Tensor,
        t: f64,
        context: &Tensor,
        cond: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Residuals> {
        crate::device::on_cpu_pool(xs.device(), || self.forward_here(xs, t, context, cond, scale))
    }

    /// [`Self::forward`] on the calling thread.
    fn forward_here(
        &self,
        xs: &Tensor,
        t: f64,
        context: &Tensor,
        cond: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Residuals> {
        let (b, _, h, w) = xs.dims4()?;
        let f = self.config.image_factor();
        let (cb, cc, ch, cw) = cond.dims4()?;
        if cb != b || cc != self.config.conditioning_channels || ch != h * f || cw != w * f {
            candle_core::bail!(
                "control image of shape {:?} for latents {:?} (expected [{b}, {}, {}, {}])",
                cond.dims(),
                xs.dims(),
                self.config.conditioning_channels,
                h * f,
                w * f
            )
        }
        let cond = if self.config.controlnet_conditioning_channel_order == "bgr" {
            let idx = Tensor::from_vec((0..cc as u32).rev().collect::<Vec<_>>(), cc, cond.device())?;
            cond.index_select(&idx, 1)?
        } else {
            cond.clone()
        };
        let emb = self.enc.time_embedding(t, b, xs.device(), xs.dtype())?;
        let sample = (self.enc.conv_in(xs)? + self.cond.forward(&cond.to_dtype(xs.dtype())?)?)?;
        let (mid, skips) = self.enc.down_mid(sample, &emb, context)?;
        let pool = self.config.global_pool_conditions;
        let finish = |r: Tensor| -> candle_core::Result<Tensor> {
            let r = (r * scale)?;
            if pool {
                r.mean_keepdim(3)?.mean_keepdim(2)
            } else {
                Ok(r)
            }
        };
        let down = skips
            .iter()
            .zip(&self.down_out)
            .map(|(s, conv)| finish(conv.forward(s)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Residuals { down, mid: finish(self.mid_out.forward(&mid)?)? })
    }
}
