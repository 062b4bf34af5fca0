//! Layers shared by the UNet and the VAE, following diffusers' `models/resnet.py`,
//! `models/attention_processor.py`, `models/upsampling.py` and `models/downsampling.py`.

use super::kernels::{self, Weight};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

thread_local! {
    static QUANTIZE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Builds the layers made inside `f` with int8 weights (`--dtype q8`) when `on`: every
/// convolution and linear layer with at least [`Q8_MIN_INPUTS`] inputs per output and
/// [`Q8_MIN_OUTPUTS`] outputs; norms, biases, embeddings and the tiny last layers stay in the
/// load's dtype. (A scope rather than a parameter: the models build their layers through many
/// nested constructors, and loads run on the calling thread.)
pub fn quantized<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let before = QUANTIZE.with(|q| q.replace(on));
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            QUANTIZE.with(|q| q.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Inputs per output below which a layer keeps its dtype: a handful of values per channel saves
/// less than its scale costs, and such a layer costs nothing to run.
const Q8_MIN_INPUTS: usize = 16;
/// Outputs below which a layer keeps its dtype (the UNet's and VAE's last convolutions, 4 or 3
/// outputs: the layer every pixel of the result goes through, and it costs nothing).
const Q8_MIN_OUTPUTS: usize = 16;

/// A loaded weight as the layer keeps it: quantised inside a [`quantized`] scope when big enough.
fn layer_weight(vb: &VarBuilder, w: Tensor) -> Result<Weight> {
    let outputs = w.dim(0)?;
    let inputs = w.elem_count() / outputs.max(1);
    if QUANTIZE.with(|q| q.get()) && inputs >= Q8_MIN_INPUTS && outputs >= Q8_MIN_OUTPUTS {
        Weight::quantize(&w).map_err(|e| candle_core::Error::Msg(format!("{}.weight: {e}", vb.prefix())))
    } else {
        Ok(Weight::Dense(w))
    }
}

/// `torch.nn.Conv2d` (square kernel, stride and zero padding), run by [`kernels::conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Weight,
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
    /// `relu(forward(xs))`, the ReLU inside the convolution's last pass.
    pub fn forward_relu(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::conv2d_relu(xs, &self.weight, self.bias.as_ref(), self.stride, self.padding)
    }

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
    let weight = layer_weight(&vb, vb.get((cout, cin, k, k), "weight")?)?;
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

/// `torch.nn.Linear`: y = x·Wᵀ + b over the last dimension, any leading dimensions, run by
/// [`kernels::linear`].
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(vb: &VarBuilder, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self { weight: layer_weight(vb, weight)?, bias })
    }

    /// Whether the products multiply in bf16 (the layer's neighbours then do too).
    pub fn bf16_products(&self) -> bool {
        self.weight.bf16_products()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::linear(xs, &self.weight, self.bias.as_ref())
    }
}

pub fn linear(vb: VarBuilder, cin: usize, cout: usize) -> Result<Linear> {
    Linear::new(&vb, vb.get((cout, cin), "weight")?, Some(vb.get(cout, "bias")?))
}

pub fn linear_no_bias(vb: VarBuilder, cin: usize, cout: usize) -> Result<Linear> {
    Linear::new(&vb, vb.get((cout, cin), "weight")?, None)
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
    Linear::new(&vb, w, b)
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
