//! Random weights for any architecture (benches of the full-size models: compute does not depend
//! on weight values, and no real checkpoint can be downloaded in CI). A candle `SimpleBackend`
//! that answers every named tensor with N(0, 0.02²) of the shape the model asks for — no VarMap, so
//! no autograd graph keeps activations alive.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, _name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        // Current key names only (no legacy VAE attention names, no `text_model.` prefix).
        !["query.", "key.", "value.", "proj_attn.", "text_model."].iter().any(|old| name.contains(old))
    }
}

/// A VarBuilder that makes random weights of whatever shapes the model requests.
pub fn random_var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}

/// runwayml/stable-diffusion-v1-5 `unet/config.json`: diffusers' defaults plus these two keys
/// (for the full-size benches and probes).
pub const SD15_UNET_CONFIG: &str = r#"{"sample_size": 64, "cross_attention_dim": 768}"#;

/// runwayml/stable-diffusion-v1-5 `vae/config.json` (the keys that differ from the defaults).
pub const SD15_VAE_CONFIG: &str = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512,
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;
