//! Layers shared by the UNet and the VAE, following diffusers' `models/resnet.py`,
//! `models/attention_processor.py`, `models/upsampling.py` and `models/downsampling.py`.

use super::kernels::{self, Weight};
use super::weights::{TensorSource, View};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

thread_local! {
    static QUANTIZE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static IN_PLACE: std::cell::RefCell<Option<InPlace>> = const { std::cell::RefCell::new(None) };
}

/// Where the layers being built may read their weights in place ([`View`]): the component's
/// tensors, less those a LoRA merge changes (they are copied and merged).
#[derive(Clone)]
pub struct InPlace {
    pub source: Arc<dyn TensorSource>,
    pub merge: Option<Arc<crate::lora::Merge>>,
}

/// While alive, convolutions and linear layers built on this thread take their weights from
/// [`InPlace`] where it lends them (`models::var_builder` returns one with its VarBuilder: the
/// models build their layers through many nested constructors, on the loading thread).
pub struct InPlaceScope(Option<InPlace>);

impl InPlaceScope {
    pub fn new(with: Option<InPlace>) -> Self {
        InPlaceScope(IN_PLACE.with(|c| c.replace(with)))
    }
}

impl Drop for InPlaceScope {
    fn drop(&mut self) {
        let before = self.0.take();
        IN_PLACE.with(|c| *c.borrow_mut() = before);
    }
}

/// Bytes of weights this process has read in place so far (for `-v`).
static IN_PLACE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes of layer weights read in place from their files by the loads so far in this process.
pub fn in_place_bytes() -> u64 {
    IN_PLACE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether weights may be read in place (unless `GHIBLIFY_IN_PLACE=0`, for comparisons).
pub fn in_place_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GHIBLIFY_IN_PLACE").map_or(true, |v| v != "0"))
}

/// `vb`'s tensor `name` read in place when the scope lends it with `shape` (trailing 1s of the
/// stored shape dropped: a linear weight stored as a 1×1 convolution) in the load's dtype, on
/// the CPU.
fn in_place_view(vb: &VarBuilder, name: &str, shape: &[usize]) -> Option<View> {
    if !vb.device().is_cpu() || !in_place_enabled() {
        return None;
    }
    IN_PLACE.with(|c| {
        let c = c.borrow();
        let ip = c.as_ref()?;
        let full = if vb.prefix().is_empty() { name.to_string() } else { format!("{}.{name}", vb.prefix()) };
        if ip.merge.as_ref().is_some_and(|m| m.touches(&full)) {
            return None;
        }
        let v = ip.source.view(&full, vb.dtype())?;
        let stored = v.dims();
        let extra = stored.get(shape.len()..)?;
        if stored[..shape.len()] != *shape || extra.iter().any(|&d| d != 1) {
            return None;
        }
        IN_PLACE_BYTES.fetch_add(v.bytes() as u64, std::sync::atomic::Ordering::Relaxed);
        Some(v.reshaped(shape))
    })
}

/// Builds the layers made inside `f` with int8 weights (`--dtype q8`) when `on`: every
/// convolution and linear layer with at least [`Q8_MIN_INPUTS`] inputs per output and
/// [`Q8_MIN_OUTPUTS`] outputs; norms, biases, embeddings and the tiny last layers stay in the
/// load's dtype. (A scope rather than a parameter: the models build their layers through many
/// nested constructors, and loads run on the calling thread.)
pub fn quantized<T>(on: bool, f: impl FnOnce() -> T) -> T {
    crate::device::with_thread_switch(&QUANTIZE, on, f)
}

/// Inputs per output below which a layer keeps its dtype: a handful of values per channel saves
/// less than its scale costs, and such a layer costs nothing to run.
const Q8_MIN_INPUTS: usize = 16;
/// Outputs below which a layer keeps its dtype (the UNet's and VAE's last convolutions, 4 or 3
/// outputs: the layer every pixel of the result goes through, and it costs nothing).
const Q8_MIN_OUTPUTS: usize = 16;

/// A layer's weight `vb["weight"]` of `shape` as the layer keeps it: quantised inside a
/// [`quantized`] scope when big enough, else read in place inside an [`InPlaceScope`] that lends
/// it, else loaded.
fn layer_weight(vb: &VarBuilder, shape: &[usize]) -> Result<Weight> {
    match in_place_weight(vb, shape) {
        Some(w) => Ok(w),
        None => loaded_weight(vb, vb.get(shape, "weight")?),
    }
}

/// `vb["weight"]` of `shape` read in place, unless it is to be quantised or the scope does not
/// lend it.
fn in_place_weight(vb: &VarBuilder, shape: &[usize]) -> Option<Weight> {
    if quantizes(shape) {
        return None;
    }
    in_place_view(vb, "weight", shape).map(|v| Weight::InPlace(Box::new(v)))
}

/// Whether a weight of `shape` is quantised here (inside a [`quantized`] scope, big enough).
fn quantizes(shape: &[usize]) -> bool {
    let outputs = shape.first().copied().unwrap_or(1);
    let inputs = shape.iter().product::<usize>() / outputs.max(1);
    QUANTIZE.with(|q| q.get()) && inputs >= Q8_MIN_INPUTS && outputs >= Q8_MIN_OUTPUTS
}

/// A loaded weight as the layer keeps it: quantised inside a [`quantized`] scope when big enough.
fn loaded_weight(vb: &VarBuilder, w: Tensor) -> Result<Weight> {
    if quantizes(w.dims()) {
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

    /// `forward(xs) + residual`, the sum inside the convolution's last pass.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        kernels::conv2d_add(xs, &self.weight, self.bias.as_ref(), residual, (self.stride, self.padding), false)
    }

    /// `relu(forward(xs) + residual)`, the sum and the ReLU inside the convolution's last pass.
    pub fn forward_add_relu(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        kernels::conv2d_add(xs, &self.weight, self.bias.as_ref(), residual, (self.stride, self.padding), true)
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
    let weight = layer_weight(&vb, &[cout, cin, k, k])?;
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

/// `torch.nn.Linear`: y = x·Wᵀ + b over the last dimension, any leading dimensions, run by
/// [`kernels::linear`].
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(vb: &VarBuilder, (cout, cin): (usize, usize), bias: bool) -> Result<Self> {
        let weight = layer_weight(vb, &[cout, cin])?;
        let bias = if bias { Some(vb.get(cout, "bias")?) } else { None };
        Ok(Self { weight, bias })
    }

    /// Whether the products multiply in bf16 (the layer's neighbours then do too).
    pub fn bf16_products(&self) -> bool {
        self.weight.bf16_products()
    }

    /// `forward(xs) + residual`, the product accumulated onto the residual ([`kernels::linear_add`]).
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        kernels::linear_add(xs, &self.weight, self.bias.as_ref(), residual)
    }

    /// GEGLU on `forward(xs)` ([`kernels::linear_geglu`]: inside the product where it can be).
    pub fn forward_geglu(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::linear_geglu(xs, &self.weight, self.bias.as_ref())
    }

    /// `forward(xs)` in bf16 where the products write it so ([`kernels::linear_bf16`]): for a
    /// result read only by bf16 products (attention's queries, keys and values).
    pub fn forward_bf16(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::linear_bf16(xs, &self.weight, self.bias.as_ref())
    }

    /// [`Linear::forward_geglu`] for a result read only by `reader`: written in bf16 when that
    /// layer multiplies in bf16 ([`kernels::linear_geglu_bf16`]: the same products, half the bytes).
    pub fn forward_geglu_for(&self, xs: &Tensor, reader: &Linear) -> Result<Tensor> {
        if reader.bf16_products() {
            return kernels::linear_geglu_bf16(xs, &self.weight, self.bias.as_ref());
        }
        self.forward_geglu(xs)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::linear(xs, &self.weight, self.bias.as_ref())
    }
}

pub fn linear(vb: VarBuilder, cin: usize, cout: usize) -> Result<Linear> {
    Linear::new(&vb, (cout, cin), true)
}

pub fn linear_no_bias(vb: VarBuilder, cin: usize, cout: usize) -> Result<Linear> {
    Linear::new(&vb, (cout, cin), false)
}

/// `torch.nn.LayerNorm` over the last dimension, run by [`kernels::layer_norm`].
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

impl LayerNorm {
    /// `forward(xs)` for a result read only by the linear layers `readers`: written in bf16 when
    /// all of them multiply in bf16 ([`kernels::layer_norm_bf16`]: they round it so anyway, and
    /// then read it in place).
    pub fn forward_for(&self, xs: &Tensor, readers: &[&Linear]) -> Result<Tensor> {
        if !readers.is_empty() && readers.iter().all(|l| l.bf16_products()) {
            return kernels::layer_norm_bf16(xs, &self.weight, &self.bias, self.eps);
        }
        self.forward(xs)
    }
}

pub fn layer_norm(vb: VarBuilder, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
}

/// A linear layer whose weight may be stored as a 1×1 convolution (old VAE checkpoints).
pub fn linear_maybe_conv(vb: VarBuilder, cin: usize, cout: usize, bias: bool) -> Result<Linear> {
    let weight = match in_place_weight(&vb, &[cout, cin]) {
        Some(w) => w,
        None => {
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
            loaded_weight(&vb, w)?
        }
    };
    let bias = if bias { Some(vb.get(cout, "bias")?) } else { None };
    Ok(Linear { weight, bias })
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
        let h = self.norm2.forward_silu(&h)?;
        // skip + conv2(h), the sum in the convolution's last pass: no tensor of its own (at the
        // VAE decoder's last stage one full-resolution tensor fewer at the peak), the same value
        // (the addition commutes exactly).
        let out = self.conv2.forward_add(&h, &skip)?;
        drop((h, skip));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::kernels::tests::randn;
    use crate::models::weights::{SourceBackend, Weights};
    use candle_core::{DType, Device, IndexOp};
    use candle_nn::VarBuilder;

    /// A safetensors file of `tensors` (written by candle, laid out as torch's writer does:
    /// the data 8-byte aligned).
    fn write(dir: &std::path::Path, name: &str, tensors: &[(&str, &Tensor)]) -> std::path::PathBuf {
        let p = dir.join(name);
        let map: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.to_string(), (*t).clone())).collect();
        candle_core::safetensors::save(&map.into_iter().collect(), &p).unwrap();
        p
    }

    fn open(paths: &[std::path::PathBuf]) -> Arc<dyn TensorSource> {
        // SAFETY: the test's own files, not changed while mapped.
        Arc::new(unsafe { Weights::open(paths) }.unwrap())
    }

    /// Builds a conv and a linear layer from `source` as `dtype` inside an in-place scope.
    fn build(source: &Arc<dyn TensorSource>, dtype: DType, merge: Option<Arc<crate::lora::Merge>>) -> (Conv2d, Linear) {
        let _scope = InPlaceScope::new(Some(InPlace { source: source.clone(), merge }));
        let vb = VarBuilder::from_backend(Box::new(SourceBackend(source.clone())), dtype, Device::Cpu);
        let conv = conv2d(vb.pp("conv"), 8, 16, 3, 1, 1).unwrap();
        let lin = linear(vb.pp("lin"), 24, 12).unwrap();
        (conv, lin)
    }

    #[test]
    fn weights_read_in_place_compute_what_copies_do() {
        let dir = tempfile::tempdir().unwrap();
        let (cw, cb, lw, lb) = (randn(&[16, 8, 3, 3], 1), randn(&[16], 2), randn(&[12, 24], 3), randn(&[12], 4));
        let f32_file = write(
            dir.path(),
            "f32.safetensors",
            &[("conv.weight", &cw), ("conv.bias", &cb), ("lin.weight", &lw), ("lin.bias", &lb)],
        );
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let bf16_file = write(
            dir.path(),
            "bf16.safetensors",
            &[
                ("conv.weight", &bf16(&cw)),
                ("conv.bias", &bf16(&cb)),
                ("lin.weight", &bf16(&lw)),
                ("lin.bias", &bf16(&lb)),
            ],
        );
        let x = randn(&[2, 8, 9, 7], 5);
        let h = randn(&[3, 5, 24], 6);
        for (file, dtype) in [(&f32_file, DType::F32), (&bf16_file, DType::BF16), (&bf16_file, DType::F32)] {
            let source = open(std::slice::from_ref(file));
            let (conv, lin) = build(&source, dtype, None);
            // Only a weight stored as the load's dtype is read in place; converting copies.
            let in_place = file == &f32_file || dtype == DType::BF16;
            assert_eq!(matches!(conv.weight, Weight::InPlace(_)), in_place, "{dtype:?} from {file:?}");
            assert_eq!(matches!(lin.weight, Weight::InPlace(_)), in_place, "{dtype:?} from {file:?}");
            // The same layers from copies of the same values.
            let copied = Conv2d { weight: Weight::Dense(conv.weight.dense(dtype).unwrap()), ..conv.clone() };
            let copied_lin = Linear { weight: Weight::Dense(lin.weight.dense(dtype).unwrap()), ..lin.clone() };
            for (a, b) in [
                (conv.forward(&x).unwrap(), copied.forward(&x).unwrap()),
                (lin.forward(&h).unwrap(), copied_lin.forward(&h).unwrap()),
            ] {
                assert_eq!(a.dims(), b.dims());
                let d = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d <= 1e-6 * m, "{dtype:?} from {file:?}: in place differs by {d} (max {m})");
            }
        }
        // The f32 linear layer in place against the definition, x · Wᵀ + b.
        let (_, lin) = build(&open(std::slice::from_ref(&f32_file)), DType::F32, None);
        let want = h.broadcast_matmul(&lw.t().unwrap()).unwrap().broadcast_add(&lb).unwrap();
        let got = lin.forward(&h).unwrap();
        let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "linear in place off by {d}");
    }

    #[test]
    fn unaligned_or_mismatched_weights_are_copied_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cw, cb, lw, lb) = (randn(&[16, 8, 3, 3], 1), randn(&[16], 2), randn(&[12, 24], 3), randn(&[12], 4));
        // A one-byte tensor first shifts every f32 tensor after it off 4-byte alignment: a file
        // torch's writer would not make, but a valid one (written by hand below).
        let f32_bytes = |t: &Tensor| -> Vec<u8> {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
        };
        let parts: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = vec![
            ("a.pad", "U8", vec![1], vec![7]),
            ("conv.weight", "F32", cw.dims().to_vec(), f32_bytes(&cw)),
            ("conv.bias", "F32", vec![16], f32_bytes(&cb)),
            ("lin.weight", "F32", vec![12, 24], f32_bytes(&lw)),
            ("lin.bias", "F32", vec![12], f32_bytes(&lb)),
        ];
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dt, shape, bytes) in &parts {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let mut h = serde_json::to_vec(&header).unwrap();
        while !(8 + h.len()).is_multiple_of(8) {
            h.push(b' ');
        }
        let mut file = (h.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&h);
        file.extend_from_slice(&data);
        let p = dir.path().join("odd.safetensors");
        std::fs::write(&p, file).unwrap();
        let source = open(std::slice::from_ref(&p));
        let (conv, lin) = build(&source, DType::F32, None);
        assert!(matches!(conv.weight, Weight::Dense(_)) && matches!(lin.weight, Weight::Dense(_)));
        assert_eq!(
            conv.weight.dense(DType::F32).unwrap().flatten_all().unwrap().i(5).unwrap().to_scalar::<f32>().unwrap(),
            cw.flatten_all().unwrap().i(5).unwrap().to_scalar::<f32>().unwrap()
        );

        // A stored shape that is not the one the model asks for is refused with both shapes, in
        // place or not.
        let good = write(
            dir.path(),
            "good.safetensors",
            &[("conv.weight", &cw), ("conv.bias", &cb), ("lin.weight", &randn(&[12, 25], 3)), ("lin.bias", &lb)],
        );
        let source = open(std::slice::from_ref(&good));
        let _scope = InPlaceScope::new(Some(InPlace { source: source.clone(), merge: None }));
        let vb = VarBuilder::from_backend(Box::new(SourceBackend(source.clone())), DType::F32, Device::Cpu);
        let e = linear(vb.pp("lin"), 24, 12).unwrap_err().to_string();
        assert!(e.contains("lin.weight") && e.contains("[12, 24]") && e.contains("[12, 25]"), "{e}");
    }

    #[test]
    fn scopes_nest_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "w.safetensors",
            &[("conv.weight", &randn(&[16, 8, 3, 3], 1)), ("conv.bias", &randn(&[16], 2))],
        );
        let source = open(std::slice::from_ref(&f));
        let vb = VarBuilder::from_backend(Box::new(SourceBackend(source.clone())), DType::F32, Device::Cpu);
        let conv = || conv2d(vb.pp("conv"), 8, 16, 3, 1, 1).unwrap();
        assert!(matches!(conv().weight, Weight::Dense(_)), "no scope: loaded");
        {
            let _outer = InPlaceScope::new(Some(InPlace { source: source.clone(), merge: None }));
            {
                let _inner = InPlaceScope::new(None);
                assert!(matches!(conv().weight, Weight::Dense(_)), "inner scope lends nothing");
            }
            assert!(matches!(conv().weight, Weight::InPlace(_)), "outer scope restored");
            // Inside a q8 scope the weight is quantised (a copy), not read in place.
            assert!(matches!(quantized(true, conv).weight, Weight::Q8 { .. }));
        }
        assert!(matches!(conv().weight, Weight::Dense(_)), "scope ended");
    }
}
