//! The tiny autoencoder TAESD (madebyollin/taesd, MIT): a port of diffusers'
//! `models/autoencoders/autoencoder_tiny.py` (`AutoencoderTiny`) and `vae.py` (`EncoderTiny`,
//! `DecoderTiny`, with `AutoencoderTinyBlock` from `unets/unet_2d_blocks.py`).
//!
//! Plain 3×3 convolutions and ReLUs, 64 channels, no attention and no normalisation: ~1.2 M
//! parameters per half against the KL VAE's 34/49 M. The encoder gives latents directly (no
//! posterior, so img2img draws no posterior noise with it), already in the UNet's latent scale.

use super::nn::{conv2d, conv2d_with, Conv2d};
use super::{read_json, weights_err, ComponentFiles};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// `config.json` of an `AutoencoderTiny`; defaults are diffusers' constructor defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct TinyConfig {
    #[serde(default = "d3")]
    pub in_channels: usize,
    #[serde(default = "d3")]
    pub out_channels: usize,
    #[serde(default = "d64x4")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "d64x4")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "relu")]
    pub act_fn: String,
    #[serde(default = "nearest")]
    pub upsample_fn: String,
    #[serde(default = "d4")]
    pub latent_channels: usize,
    #[serde(default = "d2")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "enc_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    #[serde(default = "dec_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "one")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: f64,
    /// Registered by diffusers as the decoder's channels; the pipeline's `vae_scale_factor` is
    /// `2^(len - 1)` of it.
    #[serde(default)]
    pub block_out_channels: Option<Vec<usize>>,
}

fn d2() -> usize {
    2
}
fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d64x4() -> Vec<usize> {
    vec![64; 4]
}
fn relu() -> String {
    "relu".into()
}
fn nearest() -> String {
    "nearest".into()
}
fn enc_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn dec_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn one() -> f64 {
    1.0
}

impl TinyConfig {
    pub fn scale_factor(&self) -> usize {
        let n = self.block_out_channels.as_ref().unwrap_or(&self.decoder_block_out_channels).len();
        1 << n.saturating_sub(1)
    }

    fn validate(&self, path: &std::path::Path) -> Result<()> {
        use super::{check_channels, in_range, positive};
        let bad = |m: String| Err(Error::config(path, m));
        check_channels(path, "encoder_block_out_channels", &self.encoder_block_out_channels)?;
        check_channels(path, "decoder_block_out_channels", &self.decoder_block_out_channels)?;
        if let Some(b) = &self.block_out_channels {
            check_channels(path, "block_out_channels", b)?;
        }
        for &k in self.num_encoder_blocks.iter().chain(&self.num_decoder_blocks) {
            in_range(path, "num_encoder_blocks / num_decoder_blocks", k, 0, 16)?;
        }
        in_range(path, "in_channels", self.in_channels, 1, 16)?;
        in_range(path, "out_channels", self.out_channels, 1, 16)?;
        in_range(path, "latent_channels", self.latent_channels, 1, 64)?;
        positive(path, "scaling_factor", self.scaling_factor, 1e3)?;
        if self.encoder_block_out_channels.len() != self.num_encoder_blocks.len()
            || self.encoder_block_out_channels.is_empty()
        {
            return bad(
                "'encoder_block_out_channels' and 'num_encoder_blocks' must have the same, non-zero length".into()
            );
        }
        if self.decoder_block_out_channels.len() != self.num_decoder_blocks.len()
            || self.decoder_block_out_channels.is_empty()
        {
            return bad(
                "'decoder_block_out_channels' and 'num_decoder_blocks' must have the same, non-zero length".into()
            );
        }
        if self.act_fn != "relu" {
            return bad(format!("'act_fn' = {:?} is not supported (TAESD uses \"relu\")", self.act_fn));
        }
        if self.upsample_fn != "nearest" {
            return bad(format!("'upsample_fn' = {:?} is not supported (TAESD uses \"nearest\")", self.upsample_fn));
        }
        if self.shift_factor != 0.0 {
            return bad("'shift_factor' is not supported (an SD3/Flux tiny VAE?)".into());
        }
        if self.upsampling_scaling_factor != 2 {
            return bad(format!(
                "'upsampling_scaling_factor' {} is not supported (2 expected)",
                self.upsampling_scaling_factor
            ));
        }
        Ok(())
    }
}

/// conv → ReLU → conv → ReLU → conv, plus a 1×1 skip when the width changes, then ReLU.
#[derive(Debug)]
struct Block {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
}

impl Block {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> candle_core::Result<Self> {
        let c = vb.pp("conv");
        let convs = [
            conv2d(c.pp("0"), cin, cout, 3, 1, 1)?,
            conv2d(c.pp("2"), cout, cout, 3, 1, 1)?,
            conv2d(c.pp("4"), cout, cout, 3, 1, 1)?,
        ];
        let skip = if cin != cout { Some(conv2d_with(vb.pp("skip"), cin, cout, 1, 1, 0, false)?) } else { None };
        Ok(Self { convs, skip })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The ReLUs and the residual join ride in the convolutions' last pass (at 512² each
        // separate pass over 64 channels cost ~15 ms single-threaded, the join in its own
        // parallel pass ~5 % of a TAESD pass).
        let h = self.convs[0].forward_relu(x)?;
        let h = self.convs[1].forward_relu(&h)?;
        match &self.skip {
            Some(c) => self.convs[2].forward_add_relu(&h, &c.forward(x)?),
            None => self.convs[2].forward_add_relu(&h, x),
        }
    }
}

#[derive(Debug)]
enum Layer {
    Conv(Conv2d),
    Relu,
    Block(Block),
    Upsample,
}

fn run(layers: &[Layer], mut x: Tensor) -> candle_core::Result<Tensor> {
    let mut i = 0;
    while i < layers.len() {
        // Pairs run as one operation: a convolution with the ReLU after it, an upsampling with
        // the convolution after it (read through the indices, never materialised).
        let next = layers.get(i + 1);
        x = match (&layers[i], next) {
            (Layer::Conv(c), Some(Layer::Relu)) => {
                i += 1;
                c.forward_relu(&x)?
            }
            (Layer::Upsample, Some(Layer::Conv(c))) => {
                i += 1;
                c.forward_upsampled(&x)?
            }
            (Layer::Conv(c), _) => c.forward(&x)?,
            (Layer::Relu, _) => x.relu()?,
            (Layer::Block(b), _) => b.forward(&x)?,
            (Layer::Upsample, _) => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)?
            }
        };
        i += 1;
    }
    Ok(x)
}

/// diffusers' `AutoencoderTiny`: `encoder.layers.N…`, `decoder.layers.N…` (nn.Sequential indices).
#[derive(Debug)]
pub struct TinyVae {
    pub config: TinyConfig,
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
}

impl TinyVae {
    pub fn load(files: &ComponentFiles, dtype: DType, device: &Device) -> Result<Self> {
        let config: TinyConfig = read_json(&files.config)?;
        config.validate(&files.config)?;
        let (vb, _in_place) = super::var_builder(files, dtype, device)?;
        Self::build(config, vb).map_err(weights_err(files))
    }

    /// Builds from a parsed config and any VarBuilder (random weights in benches).
    pub fn from_config(config: TinyConfig, vb: VarBuilder, path: &std::path::Path) -> Result<Self> {
        config.validate(path)?;
        Self::build(config, vb).map_err(|e| Error::config(path, crate::error::candle_message(&e)))
    }

    fn build(config: TinyConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let e = vb.pp("encoder").pp("layers");
        let mut encoder = Vec::new();
        let ch = &config.encoder_block_out_channels;
        for (i, &n) in config.num_encoder_blocks.iter().enumerate() {
            let idx = encoder.len();
            encoder.push(Layer::Conv(if i == 0 {
                conv2d(e.pp(idx), config.in_channels, ch[0], 3, 1, 1)?
            } else {
                conv2d_with(e.pp(idx), ch[i], ch[i], 3, 2, 1, false)?
            }));
            for _ in 0..n {
                let idx = encoder.len();
                encoder.push(Layer::Block(Block::new(e.pp(idx), ch[i], ch[i])?));
            }
        }
        let idx = encoder.len();
        encoder.push(Layer::Conv(conv2d(e.pp(idx), ch[ch.len() - 1], config.latent_channels, 3, 1, 1)?));

        let d = vb.pp("decoder").pp("layers");
        let ch = &config.decoder_block_out_channels;
        let mut decoder = vec![Layer::Conv(conv2d(d.pp(0), config.latent_channels, ch[0], 3, 1, 1)?), Layer::Relu];
        let last = config.num_decoder_blocks.len() - 1;
        for (i, &n) in config.num_decoder_blocks.iter().enumerate() {
            for _ in 0..n {
                let idx = decoder.len();
                decoder.push(Layer::Block(Block::new(d.pp(idx), ch[i], ch[i])?));
            }
            if i != last {
                decoder.push(Layer::Upsample);
            }
            let idx = decoder.len();
            let cout = if i == last { config.out_channels } else { ch[i] };
            let conv = if i == last {
                conv2d(d.pp(idx), ch[i], cout, 3, 1, 1)?
            } else {
                conv2d_with(d.pp(idx), ch[i], cout, 3, 1, 1, false)?
            };
            decoder.push(Layer::Conv(conv));
        }
        Ok(Self { config, encoder, decoder })
    }

    /// Images in [-1, 1] → latents (`EncoderTiny` works on [0, 1]).
    pub fn encode(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::device::on_cpu_pool(x.device(), || run(&self.encoder, ((x + 1.0)? / 2.0)?))
    }

    /// Latents → images in about [-1, 1]; the input is soft-clamped to ±3 first (tanh).
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        crate::device::on_cpu_pool(z.device(), || {
            let z = ((z / 3.0)?.tanh()? * 3.0)?;
            let x = run(&self.decoder, z)?;
            (x * 2.0)? - 1.0
        })
    }
}
