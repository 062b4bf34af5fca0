//! The KL autoencoder of latent diffusion (Rombach et al. 2022), a port of diffusers'
//! `models/autoencoders/autoencoder_kl.py` and `vae.py` (Encoder, Decoder,
//! DiagonalGaussianDistribution) with `UNetMidBlock2D`'s single-head attention.
//!
//! We own it because img2img needs the posterior's mean and log-variance to draw the sample
//! with *our* seeded noise (candle's `DiagonalGaussianDistribution` keeps them private and draws
//! from its own unseedable RNG).

use super::kernels::{attention, swap_last_two};
use super::nn::{
    conv2d, group_norm, linear_maybe_conv, Conv2d, Downsample2D, GroupNorm, Linear, ResnetBlock2D, ResnetConfig,
    Upsample2D,
};
use super::{read_json, weights_err, ComponentFiles};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// `vae/config.json`; defaults are diffusers' `AutoencoderKL` constructor defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// `_class_name`: only "AutoencoderKL" here.
    #[serde(rename = "_class_name", default = "kl")]
    pub class_name: String,
    /// `in_channels`, default 3.
    #[serde(default = "d3")]
    pub in_channels: usize,
    /// `out_channels`, default 3.
    #[serde(default = "d3")]
    pub out_channels: usize,
    /// `down_block_types`, default one DownEncoderBlock2D.
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// `up_block_types`, default one UpDecoderBlock2D.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// `block_out_channels`, default (64,).
    #[serde(default = "d64")]
    pub block_out_channels: Vec<usize>,
    /// `layers_per_block`, default 1.
    #[serde(default = "d1")]
    pub layers_per_block: usize,
    /// `act_fn`, default "silu".
    #[serde(default = "silu")]
    pub act_fn: String,
    /// `latent_channels`, default 4.
    #[serde(default = "d4")]
    pub latent_channels: usize,
    /// `norm_num_groups`, default 32.
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    /// `scaling_factor`, default 0.18215 (SDXL's VAE says 0.13025: always read it from here).
    #[serde(default = "dscale")]
    pub scaling_factor: f64,
    /// `shift_factor`, default null.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// `use_quant_conv`, default true.
    #[serde(default = "dtrue")]
    pub use_quant_conv: bool,
    /// `use_post_quant_conv`, default true.
    #[serde(default = "dtrue")]
    pub use_post_quant_conv: bool,
    /// `mid_block_add_attention`, default true.
    #[serde(default = "dtrue")]
    pub mid_block_add_attention: bool,
    /// `sample_size`, default 32: diffusers' tile size in pixels when tiling (512 for SD1.5's VAE).
    #[serde(default = "d32")]
    pub sample_size: usize,
}

fn kl() -> String {
    "AutoencoderKL".into()
}
fn d1() -> usize {
    1
}
fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d32() -> usize {
    32
}
fn d64() -> Vec<usize> {
    vec![64]
}
fn dscale() -> f64 {
    0.18215
}
fn dtrue() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}

impl VaeConfig {
    /// Image pixels per latent pixel (8 for every SD VAE).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    fn validate(&self, path: &std::path::Path) -> Result<()> {
        if self.class_name != "AutoencoderKL" {
            return Err(Error::config(
                path,
                format!("'_class_name' = {:?} is not supported (expected \"AutoencoderKL\")", self.class_name),
            ));
        }
        use super::{check_channels, in_range, positive};
        check_channels(path, "block_out_channels", &self.block_out_channels)?;
        let n = self.block_out_channels.len();
        in_range(path, "in_channels", self.in_channels, 1, 16)?;
        in_range(path, "out_channels", self.out_channels, 1, 16)?;
        in_range(path, "latent_channels", self.latent_channels, 1, 64)?;
        in_range(path, "layers_per_block", self.layers_per_block, 1, 16)?;
        in_range(path, "norm_num_groups", self.norm_num_groups, 1, 1024)?;
        positive(path, "scaling_factor", self.scaling_factor, 1e3)?;
        // The tile size of tiled encoding and decoding (at least one latent pixel per tile).
        in_range(path, "sample_size", self.sample_size, 8 << n.saturating_sub(1), 8192)?;
        let bad_down = self.down_block_types.iter().find(|t| t.as_str() != "DownEncoderBlock2D");
        let bad_up = self.up_block_types.iter().find(|t| t.as_str() != "UpDecoderBlock2D");
        if let Some(t) = bad_down.or(bad_up) {
            return Err(Error::config(path, format!("block type {t:?} is not supported")));
        }
        if (!self.down_block_types.is_empty() && self.down_block_types.len() != n)
            || (!self.up_block_types.is_empty() && self.up_block_types.len() != n)
        {
            return Err(Error::config(
                path,
                format!("'down_block_types'/'up_block_types' must have {n} entries like 'block_out_channels'"),
            ));
        }
        if self.act_fn != "silu" {
            return Err(Error::config(path, format!("'act_fn' = {:?} is not supported", self.act_fn)));
        }
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            return Err(Error::config(path, "'shift_factor' is not supported (an SD3/Flux VAE?)"));
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % self.norm_num_groups != 0) {
            return Err(Error::config(
                path,
                format!("'norm_num_groups' {} does not divide {c} channels", self.norm_num_groups),
            ));
        }
        Ok(())
    }
}

/// diffusers' `Attention` as the VAE mid block uses it: group norm, one head, residual. Accepts
/// both the current key names (`to_q`, `to_out.0`) and the old ones (`query`, `proj_attn`)
/// that many hub checkpoints still carry, stored as linear or 1×1-conv weights.
#[derive(Debug)]
struct VaeAttention {
    group_norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl VaeAttention {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> candle_core::Result<Self> {
        let old = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if old { ["query", "key", "value", "proj_attn"] } else { ["to_q", "to_k", "to_v", "to_out.0"] };
        Ok(Self {
            group_norm: group_norm(vb.pp("group_norm"), groups, c, 1e-6)?,
            q: linear_maybe_conv(vb.pp(names[0]), c, c, true)?,
            k: linear_maybe_conv(vb.pp(names[1]), c, c, true)?,
            v: linear_maybe_conv(vb.pp(names[2]), c, c, true)?,
            out: linear_maybe_conv(vb.pp(names[3]), c, c, true)?,
        })
    }
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let t = swap_last_two(&self.group_norm.forward(xs)?.reshape((b, c, h * w))?)?;
        let o = attention(&self.q.forward(&t)?, &self.k.forward(&t)?, &self.v.forward(&t)?, 1, self.q.bf16_products())?;
        let o = swap_last_two(&self.out.forward(&o)?)?.reshape((b, c, h, w))?;
        o + xs
    }
}

#[derive(Debug)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize, add_attention: bool) -> candle_core::Result<Self> {
        let cfg = ResnetConfig { groups, eps: 1e-6, temb_channels: None, output_scale_factor: 1.0 };
        Ok(Self {
            resnet0: ResnetBlock2D::new(vb.pp("resnets.0"), c, c, &cfg)?,
            attention: if add_attention { Some(VaeAttention::new(vb.pp("attentions.0"), c, groups)?) } else { None },
            resnet1: ResnetBlock2D::new(vb.pp("resnets.1"), c, c, &cfg)?,
        })
    }
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.resnet0.forward(xs, None)?;
        if let Some(a) = &self.attention {
            xs = a.forward(&xs)?;
        }
        self.resnet1.forward(&xs, None)
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// The posterior q(z|x) = N(mean, exp(logvar)) of one encoded image.
#[derive(Debug, Clone)]
pub struct Posterior {
    pub mean: Tensor,
    pub std: Tensor,
}

impl Posterior {
    /// `mean + std · eps`, eps drawn by the caller (diffusers' `latent_dist.sample(generator)`).
    pub fn sample(&self, eps: &Tensor) -> candle_core::Result<Tensor> {
        self.mean.add(&self.std.mul(&eps.to_dtype(self.std.dtype())?.to_device(self.std.device())?)?)
    }
}

#[derive(Debug)]
pub struct Vae {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl Vae {
    pub fn load(files: &ComponentFiles, dtype: DType, device: &Device) -> Result<Self> {
        let config: VaeConfig = read_json(&files.config)?;
        config.validate(&files.config)?;
        let (vb, _in_place) = super::var_builder(files, dtype, device)?;
        Self::build(config, vb).map_err(weights_err(files))
    }

    /// Builds from a parsed config and any VarBuilder (random weights in benches).
    pub fn from_config(config: VaeConfig, vb: VarBuilder, path: &std::path::Path) -> Result<Self> {
        config.validate(path)?;
        Self::build(config, vb).map_err(|e| Error::config(path, crate::error::candle_message(&e)))
    }

    fn build(config: VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let g = config.norm_num_groups;
        let lc = config.latent_channels;
        let cfg = ResnetConfig { groups: g, eps: 1e-6, temb_channels: None, output_scale_factor: 1.0 };

        let e = vb.pp("encoder");
        let mut blocks = Vec::with_capacity(n);
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let b = e.pp("down_blocks").pp(i);
            let resnets = (0..config.layers_per_block)
                .map(|j| ResnetBlock2D::new(b.pp("resnets").pp(j), if j == 0 { cin } else { cout }, cout, &cfg))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let ds = if i + 1 < n { Some(Downsample2D::new(b.pp("downsamplers.0"), cout, 0)?) } else { None };
            blocks.push((resnets, ds));
            cin = cout;
        }
        let encoder = Encoder {
            conv_in: conv2d(e.pp("conv_in"), config.in_channels, ch[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::new(e.pp("mid_block"), ch[n - 1], g, config.mid_block_add_attention)?,
            norm_out: group_norm(e.pp("conv_norm_out"), g, ch[n - 1], 1e-6)?,
            conv_out: conv2d(e.pp("conv_out"), ch[n - 1], 2 * lc, 3, 1, 1)?,
        };

        let d = vb.pp("decoder");
        let mut blocks = Vec::with_capacity(n);
        let mut prev = ch[n - 1];
        for i in 0..n {
            let cout = ch[n - 1 - i];
            let b = d.pp("up_blocks").pp(i);
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| ResnetBlock2D::new(b.pp("resnets").pp(j), if j == 0 { prev } else { cout }, cout, &cfg))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let us = if i + 1 < n { Some(Upsample2D::new(b.pp("upsamplers.0"), cout)?) } else { None };
            blocks.push((resnets, us));
            prev = cout;
        }
        let decoder = Decoder {
            conv_in: conv2d(d.pp("conv_in"), lc, ch[n - 1], 3, 1, 1)?,
            mid: MidBlock::new(d.pp("mid_block"), ch[n - 1], g, config.mid_block_add_attention)?,
            blocks,
            norm_out: group_norm(d.pp("conv_norm_out"), g, ch[0], 1e-6)?,
            conv_out: conv2d(d.pp("conv_out"), ch[0], config.out_channels, 3, 1, 1)?,
        };
        let quant_conv =
            if config.use_quant_conv { Some(conv2d(vb.pp("quant_conv"), 2 * lc, 2 * lc, 1, 1, 0)?) } else { None };
        let post_quant_conv =
            if config.use_post_quant_conv { Some(conv2d(vb.pp("post_quant_conv"), lc, lc, 1, 1, 0)?) } else { None };
        Ok(Self { config, encoder, decoder, quant_conv, post_quant_conv })
    }

    /// Encodes images in [-1, 1], (B, 3, H, W), to the latent posterior (unscaled).
    pub fn encode(&self, xs: &Tensor) -> candle_core::Result<Posterior> {
        crate::device::on_cpu_pool(xs.device(), || self.posterior(&self.moments(xs)?))
    }

    /// Encodes in tiles (diffusers' `enable_tiling()`) when the image is larger than one tile.
    pub fn encode_tiled(&self, xs: &Tensor) -> candle_core::Result<Posterior> {
        let (_, _, h, w) = xs.dims4()?;
        let tile = self.config.sample_size;
        if h <= tile && w <= tile {
            return self.encode(xs);
        }
        let latent_tile = tile / self.config.scale_factor();
        let overlap = (tile as f64 * (1.0 - OVERLAP)) as usize;
        let blend = (latent_tile as f64 * OVERLAP) as usize;
        crate::device::on_cpu_pool(xs.device(), || {
            let moments = tiled(xs, tile, overlap, blend, latent_tile - blend, |t| self.moments(t))?;
            self.posterior(&moments)
        })
    }

    /// Decodes in tiles (diffusers' `tiled_decode`) when the latents are larger than one tile.
    pub fn decode_tiled(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        let tile = self.config.sample_size;
        let latent_tile = tile / self.config.scale_factor();
        if h <= latent_tile && w <= latent_tile {
            return self.decode(z);
        }
        let overlap = (latent_tile as f64 * (1.0 - OVERLAP)) as usize;
        let blend = (tile as f64 * OVERLAP) as usize;
        crate::device::on_cpu_pool(z.device(), || {
            tiled(z, latent_tile, overlap, blend, tile - blend, |t| self.decode(t))
        })
    }

    fn posterior(&self, h: &Tensor) -> candle_core::Result<Posterior> {
        let lc = self.config.latent_channels;
        let mean = h.narrow(1, 0, lc)?;
        let logvar = h.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(Posterior { mean, std })
    }

    /// The encoder's output after `quant_conv`: mean and log-variance stacked on channels.
    fn moments(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(xs)?;
        for (resnets, ds) in &e.blocks {
            for r in resnets {
                h = r.forward_owned(h, None)?;
            }
            if let Some(ds) = ds {
                h = ds.forward(&h)?;
            }
        }
        h = e.mid.forward(&h)?;
        h = e.conv_out.forward(&e.norm_out.forward_silu(&h)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        Ok(h)
    }

    /// Decodes unscaled latents to images in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        crate::device::on_cpu_pool(z.device(), || self.decode_here(z))
    }

    /// [`Self::decode`] on the calling thread.
    fn decode_here(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        let d = &self.decoder;
        let mut h = d.conv_in.forward(&z)?;
        h = d.mid.forward(&h)?;
        for (resnets, us) in &d.blocks {
            for r in resnets {
                h = r.forward_owned(h, None)?;
            }
            if let Some(us) = us {
                h = us.forward(&h, None)?;
            }
        }
        d.conv_out.forward(&d.norm_out.forward_silu(&h)?)
    }
}

/// diffusers' `tile_overlap_factor`.
const OVERLAP: f64 = 0.25;

/// diffusers' tiling (`AutoencoderKL._tiled_encode` / `tiled_decode`): `f` runs on `tile`-sized
/// windows every `stride` pixels; each output tile is blended into its upper and left neighbours
/// (already blended, as diffusers' in-place blends leave them) over `blend` pixels with linear
/// ramps, cropped to `keep`, and the crops are concatenated. Only one tile's activations are alive
/// at a time, so peak memory follows the tile size, not the image size.
fn tiled(
    x: &Tensor,
    tile: usize,
    stride: usize,
    blend: usize,
    keep: usize,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row: Vec<Tensor> = Vec::new();
        for j in (0..w).step_by(stride) {
            let t = x.narrow(2, i, tile.min(h - i))?.narrow(3, j, tile.min(w - j))?;
            let mut out = f(&t)?;
            if let Some(above) = rows.last().map(|r: &Vec<Tensor>| &r[row.len()]) {
                out = blend_along(above, &out, blend, 2)?;
            }
            if let Some(left) = row.last() {
                out = blend_along(left, &out, blend, 3)?;
            }
            row.push(out);
        }
        rows.push(row);
    }
    let mut out_rows = Vec::with_capacity(rows.len());
    for row in &rows {
        let crops = row
            .iter()
            .map(|t| {
                let (_, _, th, tw) = t.dims4()?;
                t.narrow(2, 0, keep.min(th))?.narrow(3, 0, keep.min(tw))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        out_rows.push(Tensor::cat(&crops, 3)?);
    }
    Tensor::cat(&out_rows, 2)
}

/// The first `extent` rows (dim 2) or columns (dim 3) of `b` become
/// `a_end · (1 - y/extent) + b · (y/extent)`, as diffusers' `blend_v` / `blend_h`.
fn blend_along(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> candle_core::Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let a_end = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let b_start = b.narrow(dim, 0, extent)?;
    let mut shape = vec![1usize; 4];
    shape[dim] = extent;
    // diffusers computes y / extent in Python floats, then multiplies the f32 tensors.
    let ramp: Vec<f32> = (0..extent).map(|y| (y as f64 / extent as f64) as f32).collect();
    let up = Tensor::from_vec(ramp, shape.as_slice(), b.device())?.to_dtype(b.dtype())?;
    let down: Vec<f32> = (0..extent).map(|y| (1.0 - y as f64 / extent as f64) as f32).collect();
    let down = Tensor::from_vec(down, shape.as_slice(), b.device())?.to_dtype(b.dtype())?;
    let mixed = (a_end.broadcast_mul(&down)? + b_start.broadcast_mul(&up)?)?;
    let rest = b.narrow(dim, extent, b.dim(dim)? - extent)?;
    Tensor::cat(&[&mixed, &rest], dim)
}
