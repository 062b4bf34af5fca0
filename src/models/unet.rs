//! The conditional UNet of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
//! with Latent Diffusion Models"), a port of diffusers' `models/unets/unet_2d_condition.py`,
//! `unet_2d_blocks.py` (CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, *UpBlock2D)
//! and `transformers/transformer_2d.py` + `attention.py` (BasicTransformerBlock, GEGLU).
//!
//! Every architectural number comes from `unet/config.json`; options diffusers supports that the
//! SD 1.x/2.x family never uses (class embeddings, SDXL's added conditions, …) are rejected by
//! name instead of being silently ignored.

use super::kernels::{self, attention};
use super::nn::{
    conv2d, group_norm, layer_norm, linear, linear_no_bias, Conv2d, Downsample2D, GroupNorm, LayerNorm, Linear,
    ResnetBlock2D, ResnetConfig, Upsample2D,
};
use super::{read_json, weights_err, ComponentFiles, OneOrMany};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

/// `unet/config.json`; each field's default is diffusers' constructor default.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    /// `sample_size` (latent side the model was trained at; ×8 gives the native image size).
    pub sample_size: Option<OneOrMany<usize>>,
    /// `in_channels`, default 4.
    #[serde(default = "d4")]
    pub in_channels: usize,
    /// `out_channels`, default 4.
    #[serde(default = "d4")]
    pub out_channels: usize,
    /// `center_input_sample`, default false.
    #[serde(default)]
    pub center_input_sample: bool,
    /// `flip_sin_to_cos`, default true.
    #[serde(default = "dtrue")]
    pub flip_sin_to_cos: bool,
    /// `freq_shift`, default 0.
    #[serde(default)]
    pub freq_shift: f64,
    /// `down_block_types`, default 3 × CrossAttnDownBlock2D + DownBlock2D.
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    /// `mid_block_type`, default UNetMidBlock2DCrossAttn.
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    /// `up_block_types`, default UpBlock2D + 3 × CrossAttnUpBlock2D.
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    /// `only_cross_attention`, default false.
    #[serde(default = "default_false_oom")]
    pub only_cross_attention: OneOrMany<bool>,
    /// `block_out_channels`, default (320, 640, 1280, 1280).
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<usize>,
    /// `layers_per_block`, default 2 (int or per block).
    #[serde(default = "default_layers")]
    pub layers_per_block: OneOrMany<usize>,
    /// `downsample_padding`, default 1.
    #[serde(default = "d1")]
    pub downsample_padding: usize,
    /// `mid_block_scale_factor`, default 1.0.
    #[serde(default = "d1f")]
    pub mid_block_scale_factor: f64,
    /// `act_fn`, default "silu".
    #[serde(default = "silu")]
    pub act_fn: String,
    /// `norm_num_groups`, default 32.
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    /// `norm_eps`, default 1e-5.
    #[serde(default = "d1e5")]
    pub norm_eps: f64,
    /// `cross_attention_dim`, default 1280 (int or per block).
    #[serde(default = "default_xdim")]
    pub cross_attention_dim: OneOrMany<usize>,
    /// `transformer_layers_per_block`, default 1.
    #[serde(default = "default_one_oom")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    /// `reverse_transformer_layers_per_block`, default null (reverse of the above).
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    /// `attention_head_dim`, default 8: despite its name diffusers uses it as the *number of heads*
    /// when `num_attention_heads` is null (a naming bug kept for compatibility).
    #[serde(default = "default_heads")]
    pub attention_head_dim: OneOrMany<usize>,
    /// `num_attention_heads`, default null.
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    /// `dual_cross_attention`, default false.
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// `use_linear_projection`, default false (true in SD2.x).
    #[serde(default)]
    pub use_linear_projection: bool,
    /// `upcast_attention`, default false (true in SD2.1: softmax in f32, which we always do).
    #[serde(default)]
    pub upcast_attention: bool,
    /// `resnet_time_scale_shift`, default "default".
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    /// `resnet_skip_time_act`, default false.
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// `resnet_out_scale_factor`, default 1.0.
    #[serde(default = "d1f")]
    pub resnet_out_scale_factor: f64,
    /// `time_embedding_type`, default "positional".
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    /// `time_embedding_dim`, default null (4 × block_out_channels[0]).
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// `time_embedding_act_fn`, default null.
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// `timestep_post_act`, default null.
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// `time_cond_proj_dim`, default null (set by LCM-distilled UNets).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// `conv_in_kernel`, default 3.
    #[serde(default = "d3")]
    pub conv_in_kernel: usize,
    /// `conv_out_kernel`, default 3.
    #[serde(default = "d3")]
    pub conv_out_kernel: usize,
    /// `class_embed_type`, default null.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// `num_class_embeds`, default null.
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// `addition_embed_type`, default null ("text_time" in SDXL).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// `encoder_hid_dim`, default null.
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// `attention_type`, default "default".
    #[serde(default = "default_str")]
    pub attention_type: String,
    /// `cross_attention_norm`, default null.
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    /// `mid_block_only_cross_attention`, default null.
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
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
fn d1f() -> f64 {
    1.0
}
fn d1e5() -> f64 {
    1e-5
}
fn dtrue() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn positional() -> String {
    "positional".into()
}
fn default_str() -> String {
    "default".into()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_false_oom() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn default_one_oom() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn default_layers() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn default_heads() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn default_xdim() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn default_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_down() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn default_up() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}

/// The per-block numbers diffusers derives from the config.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    cross_attn: Vec<bool>,
    pub(crate) layers: Vec<usize>,
    heads: Vec<usize>,
    xdim: Vec<usize>,
    tlayers: Vec<usize>,
    rev_tlayers: Vec<usize>,
}

impl UNetConfig {
    fn unsupported(path: &Path, key: &str, value: impl std::fmt::Debug, hint: &str) -> Error {
        Error::config(path, format!("'{key}' = {value:?} is not supported{hint}"))
    }

    /// Validates what we can run and derives the per-block plan, naming the key on any mismatch.
    pub(crate) fn plan(&self, path: &Path) -> Result<Plan> {
        use super::{check_channels, in_range, positive};
        check_channels(path, "block_out_channels", &self.block_out_channels)?;
        let n = self.block_out_channels.len();
        in_range(path, "in_channels", self.in_channels, 1, 64)?;
        in_range(path, "out_channels", self.out_channels, 1, 64)?;
        in_range(path, "norm_num_groups", self.norm_num_groups, 1, 1024)?;
        positive(path, "norm_eps", self.norm_eps, 1.0)?;
        positive(path, "mid_block_scale_factor", self.mid_block_scale_factor, 1e3)?;
        positive(path, "resnet_out_scale_factor", self.resnet_out_scale_factor, 1e3)?;
        if !self.freq_shift.is_finite() || self.freq_shift.abs() > 1e3 {
            return Err(Error::config(path, format!("'freq_shift' = {} is out of range", self.freq_shift)));
        }
        in_range(path, "conv_in_kernel", self.conv_in_kernel, 1, 7)?;
        in_range(path, "conv_out_kernel", self.conv_out_kernel, 1, 7)?;
        in_range(path, "downsample_padding", self.downsample_padding, 0, 3)?;
        if let Some(d) = self.time_embedding_dim {
            in_range(path, "time_embedding_dim", d, 1, 16384)?;
        }
        if let Some(s) = self.native_latent_size() {
            in_range(path, "sample_size", s, 1, 1024)?;
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::config(
                path,
                format!(
                    "'down_block_types' ({}) and 'up_block_types' ({}) must both have one entry per 'block_out_channels' ({n})",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            ));
        }
        let sdxl = " (an SDXL or other non-SD1/SD2 model?)";
        if let Some(v) = &self.addition_embed_type {
            return Err(Self::unsupported(path, "addition_embed_type", v, sdxl));
        }
        if let Some(v) = &self.class_embed_type {
            return Err(Self::unsupported(path, "class_embed_type", v, ""));
        }
        if let Some(v) = self.num_class_embeds {
            return Err(Self::unsupported(path, "num_class_embeds", v, ""));
        }
        if let Some(v) = self.encoder_hid_dim {
            return Err(Self::unsupported(path, "encoder_hid_dim", v, ""));
        }
        if let Some(v) = self.time_cond_proj_dim {
            return Err(Self::unsupported(path, "time_cond_proj_dim", v, " (an LCM-distilled UNet)"));
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(Self::unsupported(path, "mid_block_type", &self.mid_block_type, ""));
        }
        let checks: [(&str, bool, String); 10] = [
            ("act_fn", self.act_fn == "silu", self.act_fn.clone()),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
                self.resnet_time_scale_shift.clone(),
            ),
            ("time_embedding_type", self.time_embedding_type == "positional", self.time_embedding_type.clone()),
            ("attention_type", self.attention_type == "default", self.attention_type.clone()),
            ("dual_cross_attention", !self.dual_cross_attention, "true".into()),
            ("resnet_skip_time_act", !self.resnet_skip_time_act, "true".into()),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_none(),
                format!("{:?}", self.time_embedding_act_fn),
            ),
            ("timestep_post_act", self.timestep_post_act.is_none(), format!("{:?}", self.timestep_post_act)),
            ("cross_attention_norm", self.cross_attention_norm.is_none(), format!("{:?}", self.cross_attention_norm)),
            ("mid_block_only_cross_attention", self.mid_block_only_cross_attention != Some(true), "true".into()),
        ];
        for (key, ok, value) in checks {
            if !ok {
                return Err(Error::config(path, format!("'{key}' = {value} is not supported")));
            }
        }
        if self.only_cross_attention.per_block(n, path, "only_cross_attention")?.iter().any(|&b| b) {
            return Err(Self::unsupported(path, "only_cross_attention", &self.only_cross_attention, ""));
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err(Error::config(path, "'conv_in_kernel' and 'conv_out_kernel' must be odd"));
        }
        let mut cross_attn = Vec::with_capacity(n);
        for (i, t) in self.down_block_types.iter().enumerate() {
            let ca = match t.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(Error::config(path, format!("'down_block_types'[{i}] = {other:?} is not supported")))
                }
            };
            // We build the up path as the mirror of the down path, as every SD checkpoint has it.
            let up = &self.up_block_types[n - 1 - i];
            let want = if ca { "CrossAttnUpBlock2D" } else { "UpBlock2D" };
            if up != want {
                return Err(Error::config(
                    path,
                    format!("'up_block_types'[{}] = {up:?} does not mirror 'down_block_types'[{i}] = {t:?} (expected {want:?})", n - 1 - i),
                ));
            }
            cross_attn.push(ca);
        }
        let heads = match &self.num_attention_heads {
            Some(h) => h.per_block(n, path, "num_attention_heads")?,
            None => self.attention_head_dim.per_block(n, path, "attention_head_dim")?,
        };
        for (i, (&h, &c)) in heads.iter().zip(&self.block_out_channels).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(Error::config(
                    path,
                    format!("block {i}: {c} channels do not split into {h} attention heads"),
                ));
            }
        }
        let tlayers = self.transformer_layers_per_block.per_block(n, path, "transformer_layers_per_block")?;
        for &t in &tlayers {
            in_range(path, "transformer_layers_per_block", t, 1, 32)?;
        }
        let rev_tlayers = match &self.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => {
                return Err(Error::config(
                    path,
                    format!("'reverse_transformer_layers_per_block' has {} entries, expected {n}", v.len()),
                ))
            }
            None => tlayers.iter().rev().cloned().collect(),
        };
        for &t in &rev_tlayers {
            in_range(path, "reverse_transformer_layers_per_block", t, 1, 32)?;
        }
        let layers = self.layers_per_block.per_block(n, path, "layers_per_block")?;
        for &l in &layers {
            in_range(path, "layers_per_block", l, 1, 16)?;
        }
        let xdim = self.cross_attention_dim.per_block(n, path, "cross_attention_dim")?;
        for &x in &xdim {
            in_range(path, "cross_attention_dim", x, 1, 16384)?;
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(Error::config(
                    path,
                    format!("'norm_num_groups' {} does not divide {c} channels", self.norm_num_groups),
                ));
            }
        }
        Ok(Plan { cross_attn, layers, heads, xdim, tlayers, rev_tlayers })
    }

    /// The text-embedding width the UNet attends to (for checking it against the text encoder).
    pub fn context_dim(&self) -> usize {
        match &self.cross_attention_dim {
            OneOrMany::One(d) => *d,
            OneOrMany::Many(v) => v.last().copied().unwrap_or(0),
        }
    }

    /// The latent side the model was trained at (`sample_size`).
    pub fn native_latent_size(&self) -> Option<usize> {
        match &self.sample_size {
            Some(OneOrMany::One(s)) => Some(*s),
            Some(OneOrMany::Many(v)) => v.iter().copied().max(),
            None => None,
        }
    }
}

/// diffusers `BasicTransformerBlock` (self-attention, cross-attention, GEGLU feed-forward).
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

#[derive(Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    /// A cross-attention's keys and values of the last context it saw ([`Attention::keys_values`]).
    context_kv: std::sync::Mutex<Option<ContextKv>>,
}

/// Keys and values projected from a context tensor (its id), in bf16 or not (the path that made
/// them).
#[derive(Debug)]
struct ContextKv {
    context: candle_core::TensorId,
    bf16: bool,
    k: Tensor,
    v: Tensor,
}

impl Attention {
    fn new(vb: VarBuilder, dim: usize, context: usize, heads: usize) -> candle_core::Result<Self> {
        Ok(Self {
            to_q: linear_no_bias(vb.pp("to_q"), dim, dim)?,
            to_k: linear_no_bias(vb.pp("to_k"), context, dim)?,
            to_v: linear_no_bias(vb.pp("to_v"), context, dim)?,
            to_out: linear(vb.pp("to_out.0"), dim, dim)?,
            heads,
            context_kv: std::sync::Mutex::new(None),
        })
    }

    /// Keys and values of `context` by `project` (bf16 or not). A cross-attention (context other
    /// than the queries' input) keeps them for its next call: a run passes the same text
    /// embeddings to every UNet call, and their projections (the 77 tokens times 16 layers' keys
    /// and values) took ~1.5 % of a batch-1 bf16 call. Keyed by the tensor's id (unique to each
    /// tensor; nothing here writes into a context in place, so a caller who does, through
    /// `slice_set` or a `Var`, passes a new tensor to have it projected again), so another context
    /// is projected afresh. The lock is not held while projecting: a pool thread waiting inside
    /// the products may run another call's pass, which would take it again.
    fn keys_values(
        &self,
        xs: &Tensor,
        context: &Tensor,
        bf16: bool,
        project: impl Fn(&Linear, &Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if context.id() == xs.id() {
            return Ok((project(&self.to_k, context)?, project(&self.to_v, context)?));
        }
        let kept = || self.context_kv.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let hit = {
            let kept = kept();
            kept.as_ref()
                .filter(|kv| kv.context == context.id() && kv.bf16 == bf16)
                .map(|kv| (kv.k.clone(), kv.v.clone()))
        };
        if let Some(kv) = hit {
            return Ok(kv);
        }
        let (k, v) = (project(&self.to_k, context)?, project(&self.to_v, context)?);
        *kept() = Some(ContextKv { context: context.id(), bf16, k: k.clone(), v: v.clone() });
        Ok((k, v))
    }

    /// The attention's output plus `residual`, summed inside its last linear layer.
    fn forward_add(&self, xs: &Tensor, context: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        if [&self.to_q, &self.to_k, &self.to_v, &self.to_out].iter().all(|l| l.bf16_products()) {
            // All bf16 products: queries, keys, values and the attention's output are read by
            // bf16 products alone, so they are written in bf16 (the same products, half the bytes).
            let q = self.to_q.forward_bf16(xs)?;
            let (k, v) = self.keys_values(xs, context, true, Linear::forward_bf16)?;
            return self.to_out.forward_add(&kernels::attention_bf16(&q, &k, &v, self.heads)?, residual);
        }
        let q = self.to_q.forward(xs)?;
        let (k, v) = self.keys_values(xs, context, false, |l, x| l.forward(x))?;
        self.to_out.forward_add(&attention(&q, &k, &v, self.heads, self.to_q.bf16_products())?, residual)
    }
}

impl TransformerBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, context: usize) -> candle_core::Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            norm1: layer_norm(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads)?,
            norm2: layer_norm(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), dim, context, heads)?,
            norm3: layer_norm(vb.pp("norm3"), dim, 1e-5)?,
            ff_proj: linear(vb.pp("ff.net.0.proj"), dim, inner * 2)?,
            ff_out: linear(vb.pp("ff.net.2"), inner, dim)?,
        })
    }
    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        // The norms' and the GEGLU's results go to linear layers alone: in bf16 where those
        // multiply in bf16 (`forward_for`), the residual stream in f32.
        let a1 = &self.attn1;
        let h = self.norm1.forward_for(xs, &[&a1.to_q, &a1.to_k, &a1.to_v])?;
        let xs = a1.forward_add(&h, &h, xs)?;
        let h = self.norm2.forward_for(&xs, &[&self.attn2.to_q])?;
        let xs = self.attn2.forward_add(&h, context, &xs)?;
        // GEGLU with the exact (erf) GELU, as torch's F.gelu: candle's `gelu` is the tanh form.
        let g = self.ff_proj.forward_geglu_for(&self.norm3.forward_for(&xs, &[&self.ff_proj])?, &self.ff_out)?;
        self.ff_out.forward_add(&g, &xs)
    }
}

#[derive(Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers `Transformer2DModel` with continuous input.
#[derive(Debug)]
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        layers: usize,
        context: usize,
        groups: usize,
        linear: bool,
    ) -> candle_core::Result<Self> {
        let norm = group_norm(vb.pp("norm"), groups, channels, 1e-6)?;
        let (proj_in, proj_out) = if linear {
            (
                Proj::Linear(super::nn::linear(vb.pp("proj_in"), channels, channels)?),
                Proj::Linear(super::nn::linear(vb.pp("proj_out"), channels, channels)?),
            )
        } else {
            (
                Proj::Conv(conv2d(vb.pp("proj_in"), channels, channels, 1, 1, 0)?),
                Proj::Conv(conv2d(vb.pp("proj_out"), channels, channels, 1, 1, 0)?),
            )
        };
        let blocks = (0..layers)
            .map(|i| TransformerBlock::new(vb.pp("transformer_blocks").pp(i), channels, heads, context))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { norm, proj_in, blocks, proj_out })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| super::kernels::swap_last_two(&t.reshape((b, c, h * w))?);
        let mut xs = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(&conv.forward(&xs)?)?,
            Proj::Linear(lin) => lin.forward(&to_tokens(&xs)?)?,
        };
        for block in &self.blocks {
            xs = block.forward(&xs, context)?;
        }
        let to_image = |t: &Tensor| super::kernels::swap_last_two(t)?.reshape((b, c, h, w));
        match &self.proj_out {
            Proj::Conv(conv) => conv.forward_add(&to_image(&xs)?, residual),
            Proj::Linear(lin) => to_image(&lin.forward(&xs)?)? + residual,
        }
    }
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

/// The first half of the UNet — input convolution, time embedding, down blocks, mid block — which a
/// ControlNet repeats with its own weights (`super::controlnet`).
#[derive(Debug)]
pub(crate) struct Encoder {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid: MidBlock,
    /// `block_out_channels[0]`, `freq_shift`, `flip_sin_to_cos`: the timestep embedding's shape.
    time_dim: usize,
    freq_shift: f64,
    flip_sin_to_cos: bool,
}

/// What ControlNets add to the UNet (diffusers' `down_block_additional_residuals` and
/// `mid_block_additional_residual`): one tensor per skip connection, in the order the down path
/// makes them, and one for the mid block's output. Spatially (1, 1) when the ControlNet pools.
#[derive(Debug, Clone)]
pub struct Residuals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl Residuals {
    /// The sum of two ControlNets' residuals (diffusers' `MultiControlNetModel`).
    pub fn add(&self, other: &Residuals) -> candle_core::Result<Residuals> {
        let down = self.down.iter().zip(&other.down).map(|(a, b)| a.broadcast_add(b)).collect::<Result<_, _>>()?;
        Ok(Residuals { down, mid: self.mid.broadcast_add(&other.mid)? })
    }
}

impl Encoder {
    /// Builds the blocks under `vb`, with diffusers' names.
    pub(crate) fn build(config: &UNetConfig, plan: &Plan, vb: &VarBuilder) -> candle_core::Result<Self> {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let groups = config.norm_num_groups;
        let temb = config.time_embedding_dim.unwrap_or(ch[0] * 4);
        let rcfg = |scale: f64| ResnetConfig {
            groups,
            eps: config.norm_eps,
            temb_channels: Some(temb),
            output_scale_factor: scale,
        };
        let block_cfg = rcfg(config.resnet_out_scale_factor);
        let lin = config.use_linear_projection;

        let conv_in =
            conv2d(vb.pp("conv_in"), config.in_channels, ch[0], config.conv_in_kernel, 1, config.conv_in_kernel / 2)?;
        let time_linear_1 = linear(vb.pp("time_embedding.linear_1"), ch[0], temb)?;
        let time_linear_2 = linear(vb.pp("time_embedding.linear_2"), temb, temb)?;

        let mut down = Vec::with_capacity(n);
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..plan.layers[i] {
                let c = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(j), c, cout, &block_cfg)?);
                if plan.cross_attn[i] {
                    attentions.push(Transformer2D::new(
                        vb.pp("attentions").pp(j),
                        cout,
                        plan.heads[i],
                        plan.tlayers[i],
                        plan.xdim[i],
                        groups,
                        lin,
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(vb.pp("downsamplers.0"), cout, config.downsample_padding)?)
            } else {
                None
            };
            down.push(DownBlock { resnets, attentions, downsampler });
            cin = cout;
        }

        let last = ch[n - 1];
        let vbm = vb.pp("mid_block");
        let mid_cfg = rcfg(config.mid_block_scale_factor);
        let mid = MidBlock {
            resnets: vec![
                ResnetBlock2D::new(vbm.pp("resnets.0"), last, last, &mid_cfg)?,
                ResnetBlock2D::new(vbm.pp("resnets.1"), last, last, &mid_cfg)?,
            ],
            attentions: vec![Transformer2D::new(
                vbm.pp("attentions.0"),
                last,
                plan.heads[n - 1],
                plan.tlayers[n - 1],
                plan.xdim[n - 1],
                groups,
                lin,
            )?],
        };
        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            down,
            mid,
            time_dim: ch[0],
            freq_shift: config.freq_shift,
            flip_sin_to_cos: config.flip_sin_to_cos,
        })
    }

    /// diffusers `get_timestep_embedding` then `TimestepEmbedding`; the sinusoid is computed in f32
    /// exactly as torch does it (the argument t·freq reaches ~1000, where f64 vs f32 rounding would
    /// already differ by 1e-4).
    pub(crate) fn time_embedding(
        &self,
        t: f64,
        batch: usize,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        let dim = self.time_dim;
        let half = dim / 2;
        let ln = -(10000f64.ln() as f32);
        let denom = half as f32 - self.freq_shift as f32;
        let t = t as f32;
        let mut row = vec![0f32; dim];
        for i in 0..half {
            let freq = ((ln * i as f32) / denom).exp();
            let arg = t * freq;
            let (s, c) = (arg.sin(), arg.cos());
            if self.flip_sin_to_cos {
                row[i] = c;
                row[half + i] = s;
            } else {
                row[i] = s;
                row[half + i] = c;
            }
        }
        let data: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
        let emb = Tensor::from_vec(data, (batch, dim), device)?.to_dtype(dtype)?;
        self.time_linear_2.forward(&candle_nn::ops::silu(&self.time_linear_1.forward(&emb)?)?)
    }

    pub(crate) fn conv_in(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.conv_in.forward(xs)
    }

    /// The down and mid blocks from the input convolution's output: the mid block's output and
    /// every skip connection (the input convolution's output first).
    pub(crate) fn down_mid(
        &self,
        xs: Tensor,
        emb: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
                skips.push(xs.clone());
            }
            if let Some(ds) = &block.downsampler {
                xs = ds.forward(&xs)?;
                skips.push(xs.clone());
            }
        }
        xs = self.mid.resnets[0].forward(&xs, Some(emb))?;
        xs = self.mid.attentions[0].forward(&xs, context)?;
        xs = self.mid.resnets[1].forward(&xs, Some(emb))?;
        Ok((xs, skips))
    }

    /// How many skip connections the down path makes (and so how many residuals a ControlNet
    /// gives).
    pub(crate) fn skips(&self) -> usize {
        1 + self.down.iter().map(|b| b.resnets.len() + usize::from(b.downsampler.is_some())).sum::<usize>()
    }
}

/// The UNet, built from `unet/config.json` and its safetensors weights.
#[derive(Debug)]
pub struct UNet {
    pub config: UNetConfig,
    enc: Encoder,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    pub fn load(files: &ComponentFiles, dtype: DType, device: &Device) -> Result<Self> {
        let config: UNetConfig = read_json(&files.config)?;
        let plan = config.plan(&files.config)?;
        let (vb, _in_place) = super::var_builder(files, dtype, device)?;
        Self::build(config, &plan, vb).map_err(weights_err(files))
    }

    /// Builds from a parsed config and any VarBuilder (random weights in benches); `path` names the
    /// config in errors.
    pub fn from_config(config: UNetConfig, vb: VarBuilder, path: &Path) -> Result<Self> {
        let plan = config.plan(path)?;
        Ok(Self::build(config, &plan, vb)?)
    }

    fn build(config: UNetConfig, plan: &Plan, vb: VarBuilder) -> candle_core::Result<Self> {
        let enc = Encoder::build(&config, plan, &vb)?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let groups = config.norm_num_groups;
        let temb = config.time_embedding_dim.unwrap_or(ch[0] * 4);
        let block_cfg = ResnetConfig {
            groups,
            eps: config.norm_eps,
            temb_channels: Some(temb),
            output_scale_factor: config.resnet_out_scale_factor,
        };
        let lin = config.use_linear_projection;

        let mut up = Vec::with_capacity(n);
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut prev = rev[0];
        for i in 0..n {
            let vb = vb.pp("up_blocks").pp(i);
            let cout = rev[i];
            let cin = rev[(i + 1).min(n - 1)];
            let d = n - 1 - i; // the mirrored down block
            let layers = plan.layers[d] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { cin } else { cout };
                let rin = if j == 0 { prev } else { cout };
                resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(j), rin + skip, cout, &block_cfg)?);
                if plan.cross_attn[d] {
                    attentions.push(Transformer2D::new(
                        vb.pp("attentions").pp(j),
                        cout,
                        plan.heads[d],
                        plan.rev_tlayers[i],
                        plan.xdim[d],
                        groups,
                        lin,
                    )?);
                }
            }
            let upsampler = if i + 1 < n { Some(Upsample2D::new(vb.pp("upsamplers.0"), cout)?) } else { None };
            up.push(UpBlock { resnets, attentions, upsampler });
            prev = cout;
        }
        let conv_norm_out = group_norm(vb.pp("conv_norm_out"), groups, ch[0], config.norm_eps)?;
        let conv_out = conv2d(
            vb.pp("conv_out"),
            ch[0],
            config.out_channels,
            config.conv_out_kernel,
            1,
            config.conv_out_kernel / 2,
        )?;
        Ok(Self { config, enc, up, conv_norm_out, conv_out })
    }

    /// How many residuals a ControlNet for this UNet must give (one per skip connection).
    pub fn skips(&self) -> usize {
        self.enc.skips()
    }

    /// One UNet evaluation: `xs` (B, C, h, w) latents, `t` the timestep, `context` (B, 77, D).
    pub fn forward(&self, xs: &Tensor, t: f64, context: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(xs, t, context, None)
    }

    /// One evaluation with ControlNet residuals added to the skip connections and to the mid
    /// block's output, as diffusers' `UNet2DConditionModel.forward` adds
    /// `down_block_additional_residuals` and `mid_block_additional_residual`.
    pub fn forward_with(
        &self,
        xs: &Tensor,
        t: f64,
        context: &Tensor,
        control: Option<&Residuals>,
    ) -> candle_core::Result<Tensor> {
        crate::device::on_cpu_pool(xs.device(), || self.forward_here(xs, t, context, control))
    }

    /// [`Self::forward_with`] on the calling thread.
    fn forward_here(
        &self,
        xs: &Tensor,
        t: f64,
        context: &Tensor,
        control: Option<&Residuals>,
    ) -> candle_core::Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let n = self.enc.down.len();
        let factor = 1usize << (n - 1);
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let emb = self.enc.time_embedding(t, b, xs.device(), xs.dtype())?;
        let xs = if self.config.center_input_sample { ((xs * 2.0)? - 1.0)? } else { xs.clone() };
        let (mut xs, mut skips) = self.enc.down_mid(self.enc.conv_in(&xs)?, &emb, context)?;
        if let Some(c) = control {
            if c.down.len() != skips.len() {
                candle_core::bail!("{} ControlNet residuals for {} skip connections", c.down.len(), skips.len())
            }
            for (s, r) in skips.iter_mut().zip(&c.down) {
                *s = s.broadcast_add(r)?;
            }
            xs = xs.broadcast_add(&c.mid)?;
        }

        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
            }
            if let Some(us) = &block.upsampler {
                let size = if forward_upsample_size {
                    skips.last().map(|s| (s.dim(2).unwrap_or(0), s.dim(3).unwrap_or(0)))
                } else {
                    None
                };
                xs = us.forward(&xs, size)?;
            }
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// A cross-attention keeps the keys and values of the context it last saw, by the tensor's id:
    /// the same context gives the same output from the kept projections, another context (other
    /// values, or the same values in another tensor) is projected afresh, and a self-attention
    /// (context = input) keeps nothing. Both the f32 path and, where the CPU multiplies bf16, the
    /// bf16 one (bf16 weights).
    #[test]
    fn cross_attention_keeps_the_projections_of_its_context() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let att = Attention::new(crate::models::random::random_var_builder(dtype, &dev), 32, 16, 2).unwrap();
            let xs = Tensor::randn(0f32, 1.0, (1, 8, 32), &dev).unwrap();
            let zero = xs.zeros_like().unwrap();
            let (c1, c2) = (
                Tensor::randn(0f32, 1.0, (1, 5, 16), &dev).unwrap(),
                Tensor::randn(0f32, 1.0, (1, 5, 16), &dev).unwrap(),
            );
            let kept = || att.context_kv.lock().unwrap().as_ref().map(|kv| kv.context);
            let run = |c: &Tensor| bits(&att.forward_add(&xs, c, &zero).unwrap());

            let o1 = run(&c1);
            assert_eq!(kept(), Some(c1.id()), "{dtype:?}");
            assert_eq!(run(&c1), o1, "{dtype:?}: the kept projections give the same output");

            let o2 = run(&c2);
            assert_eq!(kept(), Some(c2.id()), "{dtype:?}");
            assert_ne!(o2, o1, "{dtype:?}");
            *att.context_kv.lock().unwrap() = None;
            assert_eq!(run(&c2), o2, "{dtype:?}: another context is projected afresh");

            let copy = c2.copy().unwrap();
            assert_eq!(run(&copy), o2, "{dtype:?}");
            assert_eq!(kept(), Some(copy.id()), "{dtype:?}: a copy is another tensor");

            let own = Attention::new(crate::models::random::random_var_builder(dtype, &dev), 32, 32, 2).unwrap();
            own.forward_add(&xs, &xs, &zero).unwrap();
            assert!(own.context_kv.lock().unwrap().is_none(), "{dtype:?}: a self-attention keeps nothing");
        }
    }
}
