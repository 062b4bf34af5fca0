//! Layers shared by the UNet and the VAE, following diffusers' `models/resnet.py`,
//! `models/attention_processor.py`, `models/upsampling.py` and `models/downsampling.py`.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};

pub fn conv2d(vb: VarBuilder, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    candle_nn::conv2d(cin, cout, k, cfg, vb)
}

pub fn group_norm(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
}

/// A linear layer whose weight may be stored as a 1×1 convolution (old VAE checkpoints).
pub fn linear_maybe_conv(vb: VarBuilder, cin: usize, cout: usize, bias: bool) -> Result<Linear> {
    // The (out, in) shape first (also what random-weight backends need), else the stored one.
    let w = match vb.get((cout, cin), "weight") {
        Ok(w) => w,
        Err(_) if vb.contains_tensor("weight") => {
            let w = vb.get_unchecked("weight")?;
            match w.rank() {
                4 => w.squeeze(3)?.squeeze(2)?,
                _ => w,
            }
        }
        Err(e) => return Err(e),
    };
    if w.dims() != [cout, cin] {
        candle_core::bail!("{} has shape {:?}, expected [{cout}, {cin}]", vb.prefix(), w.dims());
    }
    let b = if bias { Some(vb.get(cout, "bias")?) } else { None };
    Ok(Linear::new(w, b))
}

/// Scaled dot-product attention over (B, L, H·d) projections, softmax in f32.
///
/// Queries are processed in chunks so the score matrix stays below ~128 MB: at 512² the first UNet
/// level has 4096 tokens, and a full (2·8, 4096, 4096) f32 score tensor would be 1 GB.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, lq, c) = q.dims3()?;
    let lk = k.dim(1)?;
    let d = c / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let split = |t: &Tensor, l: usize| t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous();
    let q = split(q, lq)?;
    let k = split(k, lk)?;
    let v = split(v, lk)?;
    let kt = k.t()?.contiguous()?;
    let budget = 32 * 1024 * 1024; // f32 elements per chunk of scores
    let chunk = (budget / (b * heads * lk).max(1)).clamp(1, lq);
    let mut outs = Vec::with_capacity(lq.div_ceil(chunk));
    for start in (0..lq).step_by(chunk) {
        let len = chunk.min(lq - start);
        let qc = q.narrow(2, start, len)?;
        let scores = (qc.matmul(&kt)? * scale)?;
        let in_dtype = scores.dtype();
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(in_dtype)?;
        outs.push(probs.matmul(&v)?);
    }
    let out = if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(&outs, 2)? };
    out.transpose(1, 2)?.reshape((b, lq, c))
}

/// diffusers `ResnetBlock2D` (pre-norm, "default" time-scale-shift, optional 1×1 shortcut).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

pub struct ResnetConfig {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cin: usize, cout: usize, cfg: &ResnetConfig) -> Result<Self> {
        let norm1 = group_norm(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?;
        let conv1 = conv2d(vb.pp("conv1"), cin, cout, 3, 1, 1)?;
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(candle_nn::linear(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let norm2 = group_norm(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?;
        let conv2 = conv2d(vb.pp("conv2"), cout, cout, 3, 1, 1)?;
        let conv_shortcut = if cin != cout { Some(conv2d(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None };
        Ok(Self { norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut, output_scale_factor: cfg.output_scale_factor })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&candle_nn::ops::silu(&self.norm1.forward(xs)?)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&candle_nn::ops::silu(t)?)?.unsqueeze(2)?.unsqueeze(3)?;
                h.broadcast_add(&t)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&candle_nn::ops::silu(&self.norm2.forward(&h)?)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers `Downsample2D` with a convolution: stride 2, and with padding 0 the asymmetric
/// (0, 1, 0, 1) zero pad the VAE encoder uses.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self { conv: conv2d(vb.pp("conv"), channels, channels, 3, 2, padding)?, padding })
    }
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let xs = xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// diffusers `Upsample2D`: nearest ×2 (or to the skip connection's size) then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: conv2d(vb.pp("conv"), channels, channels, 3, 1, 1)? })
    }
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        let xs = xs.upsample_nearest2d(oh, ow)?;
        self.conv.forward(&xs)
    }
}
