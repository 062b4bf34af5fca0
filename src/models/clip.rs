//! The CLIP text encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural
//! Language Supervision"), a port of transformers' `models/clip/modeling_clip.py`
//! (`CLIPTextTransformer`): causal self-attention, pre-norm layers, final layer norm; the
//! pipeline uses `last_hidden_state`, as diffusers' `encode_prompt` does with `clip_skip=None`.
//!
//! Owned because candle-transformers' version keeps its config private and its causal mask does
//! not broadcast at batch 2.

use super::nn::{LayerNorm, Linear};
use super::{read_json, weights_err, ComponentFiles};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

/// `text_encoder/config.json` (a `CLIPTextConfig`, or a `CLIPConfig` with `text_config`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    /// `vocab_size`, default 49408.
    #[serde(default = "vocab")]
    pub vocab_size: usize,
    /// `hidden_size`, default 512.
    #[serde(default = "d512")]
    pub hidden_size: usize,
    /// `intermediate_size`, default 2048.
    #[serde(default = "d2048")]
    pub intermediate_size: usize,
    /// `num_hidden_layers`, default 12.
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    /// `num_attention_heads`, default 8.
    #[serde(default = "d8")]
    pub num_attention_heads: usize,
    /// `max_position_embeddings`, default 77.
    #[serde(default = "d77")]
    pub max_position_embeddings: usize,
    /// `hidden_act`, default "quick_gelu" (SD2's OpenCLIP encoder uses "gelu").
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    /// `layer_norm_eps`, default 1e-5.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn vocab() -> usize {
    49408
}
fn d512() -> usize {
    512
}
fn d2048() -> usize {
    2048
}
fn d12() -> usize {
    12
}
fn d8() -> usize {
    8
}
fn d77() -> usize {
    77
}
fn eps() -> f64 {
    1e-5
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl ClipConfig {
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let v: serde_json::Value = read_json(path)?;
        let v = v.get("text_config").cloned().unwrap_or(v);
        serde_json::from_value(v).map_err(|e| Error::config(path, format!("malformed config: {e}")))
    }

    fn activation(&self, path: &std::path::Path) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            other => Err(Error::config(path, format!("'hidden_act' = {other:?} is not supported"))),
        }
    }
}

#[derive(Debug)]
struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug)]
pub struct ClipTextEncoder {
    pub config: ClipConfig,
    act: Activation,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
}

impl ClipTextEncoder {
    pub fn load(files: &ComponentFiles, dtype: DType, device: &Device) -> Result<Self> {
        let config = ClipConfig::read(&files.config)?;
        let act = config.activation(&files.config)?;
        let path = &files.config;
        super::in_range(path, "vocab_size", config.vocab_size, 1, 1 << 20)?;
        super::in_range(path, "hidden_size", config.hidden_size, 1, 8192)?;
        super::in_range(path, "intermediate_size", config.intermediate_size, 1, 65536)?;
        super::in_range(path, "num_hidden_layers", config.num_hidden_layers, 1, 64)?;
        super::in_range(path, "max_position_embeddings", config.max_position_embeddings, 1, 4096)?;
        super::positive(path, "layer_norm_eps", config.layer_norm_eps, 1.0)?;
        if config.num_attention_heads == 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(Error::config(
                &files.config,
                format!(
                    "'hidden_size' {} does not split into 'num_attention_heads' {}",
                    config.hidden_size, config.num_attention_heads
                ),
            ));
        }
        let (vb, _in_place) = super::var_builder(files, dtype, device)?;
        // Real SD repos prefix keys with `text_model.`; transformers 5 saves them without it.
        let vb =
            if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        Self::build(config, act, vb).map_err(weights_err(files))
    }

    fn build(config: ClipConfig, act: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let token_embedding = candle_nn::embedding(config.vocab_size, h, vb.pp("embeddings.token_embedding"))?;
        let position_embedding = vb.get((config.max_position_embeddings, h), "embeddings.position_embedding.weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp("encoder.layers").pp(i);
                let a = l.pp("self_attn");
                Ok(Layer {
                    ln1: super::nn::layer_norm(l.pp("layer_norm1"), h, eps)?,
                    q: super::nn::linear(a.pp("q_proj"), h, h)?,
                    k: super::nn::linear(a.pp("k_proj"), h, h)?,
                    v: super::nn::linear(a.pp("v_proj"), h, h)?,
                    out: super::nn::linear(a.pp("out_proj"), h, h)?,
                    ln2: super::nn::layer_norm(l.pp("layer_norm2"), h, eps)?,
                    fc1: super::nn::linear(l.pp("mlp.fc1"), h, config.intermediate_size)?,
                    fc2: super::nn::linear(l.pp("mlp.fc2"), config.intermediate_size, h)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_ln = super::nn::layer_norm(vb.pp("final_layer_norm"), h, eps)?;
        Ok(Self { config, act, token_embedding, position_embedding, layers, final_ln })
    }

    /// Token ids (B, L) → last hidden state (B, L, hidden). Works at any batch size.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        crate::device::on_cpu_pool(ids.device(), || self.forward_here(ids))
    }

    /// [`Self::forward`] on the calling thread.
    fn forward_here(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if l > self.config.max_position_embeddings {
            candle_core::bail!("{l} tokens exceed max_position_embeddings {}", self.config.max_position_embeddings);
        }
        let heads = self.config.num_attention_heads;
        let hd = self.config.hidden_size / heads;
        let compute = super::compute_dtype(ids.device(), self.position_embedding.dtype());
        let tokens = self.token_embedding.forward(ids)?.to_dtype(compute)?;
        let mut xs = tokens.broadcast_add(&self.position_embedding.narrow(0, 0, l)?.to_dtype(compute)?)?;
        let dtype = xs.dtype();
        // Causal mask, added to the scores (transformers fills with the dtype's min; -inf after
        // softmax is the same zero).
        let mask: Vec<f32> =
            (0..l).flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (1, 1, l, l), ids.device())?;
        let scale = 1.0 / (hd as f64).sqrt();
        for layer in &self.layers {
            let residual = xs.clone();
            let h = layer.ln1.forward(&xs)?;
            let split = |t: Tensor| t.reshape((b, l, heads, hd))?.transpose(1, 2)?.contiguous();
            let q = split(layer.q.forward(&h)?)?;
            let k = split(layer.k.forward(&h)?)?;
            let v = split(layer.v.forward(&h)?)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
            let o = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, self.config.hidden_size))?;
            xs = (layer.out.forward(&o)? + residual)?;
            let residual = xs.clone();
            let h = layer.fc1.forward(&layer.ln2.forward(&xs)?)?;
            let h = match self.act {
                Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
                Activation::Gelu => h.gelu_erf()?,
                Activation::GeluTanh => h.gelu()?,
            };
            xs = (layer.fc2.forward(&h)? + residual)?;
        }
        self.final_ln.forward(&xs)
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
}
