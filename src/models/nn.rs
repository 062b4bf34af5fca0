//! Layers shared by the UNet and the VAE, following diffusers' `models/resnet.py`,
//! `models/attention_processor.py`, `models/upsampling.py` and `models/downsampling.py`.

use super::kernels;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `torch.nn.Conv2d` (square kernel, stride and zero padding), run by [`kernels::conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// The convolution of the input upsampled ×2 (nearest), without materialising it.
    pub fn forward_upsampled(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::upsample2x_conv2d(xs, &self.weight, self.bias.as_ref(), self.stride, self.padding)
    }
}

impl Conv2d {
    /// The convolution of the input zero-padded by one row below and one column right (the VAE
    /// encoder's downsampling), without the padded copy. Padding is the asymmetric pad's alone.
    pub fn forward_pad_end(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::pad_end_conv2d(xs, &self.weight, self.bias.as_ref(), self.stride)
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::conv2d(xs, &self.weight, self.bias.as_ref(), self.stride, self.padding)
    }
}

pub fn conv2d(vb: VarBuilder, cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Conv2d> {
    conv2d_with(vb, cin, cout, k, stride, padding, true)
}

pub fn conv2d_with(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bias: bool,
) -> Result<Conv2d> {
    let weight = vb.get((cout, cin, k, k), "weight")?;
    let bias = if bias { Some(vb.get(cout, "bias")?) } else { None };
    Ok(Conv2d { weight, bias, stride, padding })
}

/// `torch.nn.GroupNorm` with affine parameters, run by [`kernels::group_norm`]; `forward_silu`
/// fuses the SiLU that follows it in every ResNet block.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, false)
    }
}

pub fn group_norm(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("{}: {channels} channels do not split into {groups} groups", vb.prefix());
    }
    Ok(GroupNorm { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, groups, eps })
}

/// Weights kept in a narrower storage dtype than the activations (f16 storage, f32 compute on the
/// CPU) are widened for each use: half the resident memory for a copy that is small next to the
/// matrix product it feeds.
fn widened(w: &Tensor, like: &Tensor) -> Result<Tensor> {
    if w.dtype() == like.dtype() {
        Ok(w.clone())
    } else {
        w.to_dtype(like.dtype())
    }
}

/// `torch.nn.Linear`: y = x·Wᵀ + b over the last dimension, any leading dimensions.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Whether the weight is stored as bf16 (the layer's neighbours then compute in bf16 too).
    pub fn is_bf16(&self) -> bool {
        self.weight.dtype() == candle_core::DType::BF16
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(y) = kernels::linear_bf16(xs, &self.weight, self.bias.as_ref())? {
            return Ok(y);
        }
        let w = widened(&self.weight, xs)?;
        let (n, k) = w.dims2()?;
        let lead = &xs.dims()[..xs.rank() - 1];
        // One (rows × k)·(k × n) product over all leading dimensions, on the transposed view.
        let rows = lead.iter().product::<usize>();
        let y = xs.contiguous()?.reshape((rows, k))?.matmul(&w.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&widened(b, xs)?)?,
            None => y,
        };
        let mut shape = lead.to_vec();
        shape.push(n);
        y.reshape(shape)
    }
}

pub fn linear(vb: VarBuilder, cin: usize, cout: usize) -> Result<Linear> {
    Ok(Linear::new(vb.get((cout, cin), "weight")?, Some(vb.get(cout, "bias")?)))
}

pub fn linear_no_bias(vb: VarBuilder, cin: usize, cout: usize) -> Result<Linear> {
    Ok(Linear::new(vb.get((cout, cin), "weight")?, None))
}

/// `torch.nn.LayerNorm` over the last dimension (candle's fused kernel), weights widened.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        candle_nn::ops::layer_norm(&xs, &widened(&self.weight, &xs)?, &widened(&self.bias, &xs)?, self.eps as f32)
    }
}

pub fn layer_norm(vb: VarBuilder, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
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
            Some(t) => Some(linear(vb.pp("time_emb_proj"), t, cout)?),
            None => None,
        };
        let norm2 = group_norm(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?;
        let conv2 = conv2d(vb.pp("conv2"), cout, cout, 3, 1, 1)?;
        let conv_shortcut = if cin != cout { Some(conv2d(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        self.forward_owned(xs.clone(), temb)
    }

    /// As `forward`, taking the input so that, with a 1×1 shortcut, it is freed as soon as the
    /// shortcut has read it: at the VAE decoder's last stage (256 → 128 channels at full
    /// resolution) that lowers the peak by one full-resolution tensor.
    pub fn forward_owned(&self, xs: Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let n1 = self.norm1.forward_silu(&xs)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(&xs)?,
            None => xs,
        };
        let h = self.conv1.forward(&n1)?;
        drop(n1);
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&candle_nn::ops::silu(t)?)?.unsqueeze(2)?.unsqueeze(3)?;
                h.broadcast_add(&t)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
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
            self.conv.forward_pad_end(xs)
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
        if (oh, ow) == (2 * h, 2 * w) {
            return self.conv.forward_upsampled(xs);
        }
        let xs = xs.upsample_nearest2d(oh, ow)?;
        self.conv.forward(&xs)
    }
}
