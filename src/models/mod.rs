//! Model components in the diffusers folder layout, each built from its own `config.json`.
//!
//! We own these components (instead of using candle-transformers' SD module) because the shipped
//! ones differ from diffusers where it matters for parity (tanh-approximated GELU in GEGLU, CLIP
//! at batch 1 only, private VAE posterior, per-version hard-coded configs), and so that their hot
//! operations can run our CPU kernels (`kernels.rs`, behind the layer types of `nn.rs`): the rest
//! of the crate only sees these small wrapper types.

pub mod ckpt;
pub mod clip;
pub mod controlnet;
pub mod gemm_bf16;
pub mod kernels;
pub mod nn;
pub mod random;
pub mod single_file;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

use crate::error::{Error, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A config value that diffusers accepts either as one number for all blocks or as a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The per-block values for `n` blocks; a list of the wrong length is a config error.
    pub fn per_block(&self, n: usize, path: &Path, key: &str) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => {
                Err(Error::config(path, format!("'{key}' has {} entries but there are {n} blocks", v.len())))
            }
        }
    }
}

/// The model's autoencoder: the KL VAE of latent diffusion, or the tiny TAESD (`--vae`), picked
/// by the `_class_name` of its config.json.
#[derive(Debug)]
pub enum Autoencoder {
    Kl(Box<vae::Vae>),
    Tiny(Box<taesd::TinyVae>),
}

impl Autoencoder {
    pub fn load(files: &ComponentFiles, dtype: DType, device: &Device) -> Result<Self> {
        #[derive(Deserialize)]
        struct Class {
            #[serde(rename = "_class_name", default)]
            class: Option<String>,
        }
        let c: Class = read_json(&files.config)?;
        match c.class.as_deref() {
            Some("AutoencoderTiny") => Ok(Self::Tiny(Box::new(taesd::TinyVae::load(files, dtype, device)?))),
            Some("AutoencoderKL") | None => Ok(Self::Kl(Box::new(vae::Vae::load(files, dtype, device)?))),
            Some(other) => Err(Error::config(
                &files.config,
                format!("'_class_name' = {other:?} is not supported (AutoencoderKL or AutoencoderTiny)"),
            )),
        }
    }

    /// A standalone VAE folder (`config.json` and weights at its root, as VAE repos ship).
    pub fn load_folder(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Self::load(&component_files(parent, &name, "config.json", "diffusion_pytorch_model", dtype)?, dtype, device)
    }

    /// Image pixels per latent pixel.
    pub fn scale_factor(&self) -> usize {
        match self {
            Self::Kl(v) => v.config.scale_factor(),
            Self::Tiny(t) => t.config.scale_factor(),
        }
    }

    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(v) => v.config.latent_channels,
            Self::Tiny(t) => t.config.latent_channels,
        }
    }

    pub fn scaling_factor(&self) -> f64 {
        match self {
            Self::Kl(v) => v.config.scaling_factor,
            Self::Tiny(t) => t.config.scaling_factor,
        }
    }

    /// "AutoencoderKL" / "AutoencoderTiny", for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kl(_) => "AutoencoderKL",
            Self::Tiny(_) => "AutoencoderTiny",
        }
    }

    /// Latents (unscaled) → images in about [-1, 1]; `tiled` splits a KL decode into tiles.
    pub fn decode(&self, z: &candle_core::Tensor, tiled: bool) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Self::Kl(v) if tiled => v.decode_tiled(z),
            Self::Kl(v) => v.decode(z),
            Self::Tiny(t) => t.decode(z),
        }
    }
}

/// A config number within `[lo, hi]`: bounds that hold every real model this project runs and keep
/// a hostile value from dividing by zero, panicking or asking for terabytes (named in the error
/// with its key, value and file).
pub(crate) fn in_range<T: PartialOrd + Copy + std::fmt::Display>(
    path: &Path,
    key: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<()> {
    if v < lo || v > hi {
        return Err(Error::config(path, format!("'{key}' = {v} is out of range (expected {lo} to {hi})")));
    }
    Ok(())
}

/// A config number that must be finite and within `(0, hi]` (epsilons, scale factors).
pub(crate) fn positive(path: &Path, key: &str, v: f64, hi: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0 && v <= hi) {
        return Err(Error::config(
            path,
            format!("'{key}' = {v} is out of range (expected a number above 0, at most {hi})"),
        ));
    }
    Ok(())
}

/// The channel widths of a model's blocks: 1 to 8 blocks of 1 to 8192 channels.
pub(crate) fn check_channels(path: &Path, key: &str, channels: &[usize]) -> Result<()> {
    if channels.is_empty() || channels.len() > 8 {
        return Err(Error::config(path, format!("'{key}' has {} entries (expected 1 to 8)", channels.len())));
    }
    for &c in channels {
        in_range(path, key, c, 1, 8192)?;
    }
    Ok(())
}

/// Reads a JSON config into `T` (whose serde defaults mirror diffusers' constructor defaults).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, format!("malformed config: {e}")))
}

/// Where one component's config and weights live inside a model folder.
#[derive(Clone)]
pub struct ComponentFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    /// Tensors that come from somewhere other than `weights`: a single-file checkpoint seen under
    /// diffusers' names (`single_file`).
    pub source: Option<std::sync::Arc<dyn weights::TensorSource>>,
    /// LoRA updates merged into the weights as they load (`crate::lora`).
    pub merge: Option<std::sync::Arc<crate::lora::Merge>>,
}

impl std::fmt::Debug for ComponentFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentFiles").field("config", &self.config).field("weights", &self.weights).finish()
    }
}

impl ComponentFiles {
    /// The component's tensors: its own source, or its safetensors files memory-mapped.
    pub fn open(&self) -> Result<std::sync::Arc<dyn weights::TensorSource>> {
        match &self.source {
            Some(s) => Ok(s.clone()),
            // SAFETY: the files are mapped read-only; like every mmap user we rely on nobody
            // truncating the weights while we run.
            None => Ok(std::sync::Arc::new(unsafe { weights::Weights::open(&self.weights) }?)),
        }
    }

    /// The file that names these weights in messages.
    pub fn weights_path(&self) -> PathBuf {
        self.weights.first().cloned().unwrap_or_else(|| self.config.clone())
    }
}

/// The safetensors file names a component's weights may have, preferred first: with half
/// precision the `*.fp16.safetensors` variant (half the download and memory), else the
/// full-precision file; either may be sharded (`NAME.index.json` listing its shards). The hub's
/// file picker and the folder loader both follow this order.
pub fn weight_variants(stem: &str, half: bool) -> [String; 2] {
    let full = format!("{stem}.safetensors");
    let fp16 = format!("{stem}.fp16.safetensors");
    if half {
        [fp16, full]
    } else {
        [full, fp16]
    }
}

/// Resolves `DIR/<component>/{config_name, weights}`. With f16/bf16 the `*.fp16.safetensors`
/// variant is preferred (half the download and memory); otherwise the full-precision file, falling
/// back to the other if only one exists. Sharded weights (`*.safetensors.index.json`) are followed.
pub fn component_files(
    dir: &Path,
    component: &str,
    config_name: &str,
    weight_stem: &str,
    dtype: DType,
) -> Result<ComponentFiles> {
    let cdir = dir.join(component);
    if !cdir.is_dir() {
        return Err(Error::Model { dir: dir.to_path_buf(), what: format!("missing component folder '{component}/'") });
    }
    let config = cdir.join(config_name);
    if !config.is_file() {
        return Err(Error::Model { dir: dir.to_path_buf(), what: format!("missing '{component}/{config_name}'") });
    }
    let order = weight_variants(weight_stem, matches!(dtype, DType::F16 | DType::BF16));
    for name in &order {
        let p = cdir.join(name);
        if p.is_file() {
            return Ok(ComponentFiles { config, weights: vec![p], source: None, merge: None });
        }
        let index = cdir.join(format!("{name}.index.json"));
        if index.is_file() {
            return Ok(ComponentFiles { config, weights: shards(&index)?, source: None, merge: None });
        }
    }
    let has_bin = ["bin", "fp16.bin"].iter().any(|ext| {
        cdir.join(format!("{weight_stem}.{ext}")).is_file() || cdir.join(format!("pytorch_model.{ext}")).is_file()
    });
    let hint = if has_bin { " (only PyTorch .bin weights are present: convert them to safetensors)" } else { "" };
    Err(Error::Model { dir: dir.to_path_buf(), what: format!("missing '{component}/{weight_stem}.safetensors'{hint}") })
}

fn shards(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let idx: Index = read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = idx.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            return Err(Error::config(index, format!("shard '{}' is missing", f.display())));
        }
    }
    Ok(files)
}

/// The dtype the activations are kept in for weights stored as `storage`: on the CPU always f32
/// (f16/bf16 there halve the memory; the layers widen such weights as they use them, except bf16
/// weights on a CPU with AVX512_BF16, which the matrix products multiply in bf16 with f32 sums:
/// `kernels::bf16_arithmetic`), on GPUs the storage dtype.
pub fn compute_dtype(device: &Device, storage: DType) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        storage
    }
}

/// A VarBuilder over the component's tensors ([`ComponentFiles::open`]), with any LoRA merged as
/// each weight loads; tensors are converted to `dtype` as they are fetched. The scope that comes
/// with it lets the layers built while it lives read their weights in place
/// ([`nn::InPlaceScope`]): keep it until the model is built.
pub fn var_builder(
    files: &ComponentFiles,
    dtype: DType,
    device: &Device,
) -> Result<(VarBuilder<'static>, nn::InPlaceScope)> {
    let source = files.open()?;
    let scope = nn::InPlaceScope::new(Some(nn::InPlace { source: source.clone(), merge: files.merge.clone() }));
    let vb = match &files.merge {
        None => VarBuilder::from_backend(Box::new(weights::SourceBackend(source)), dtype, device.clone()),
        Some(merge) => {
            let backend = crate::lora::MergingBackend { inner: source, merge: merge.clone() };
            VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
        }
    };
    Ok((vb, scope))
}

/// Wraps a candle error raised while building a component from its weights.
pub fn weights_err(files: &ComponentFiles) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| {
        // A single file's configs are written to a temporary folder from its own shapes: name the
        // component, not that folder.
        let against = match files.source {
            Some(_) => {
                let component = files.config.parent().and_then(Path::file_name).unwrap_or_default();
                format!("the {} its shapes describe", component.to_string_lossy())
            }
            None => files.config.display().to_string(),
        };
        let msg = crate::error::candle_message(&e);
        // A weight --dtype q8 cannot quantise is a fault of the values, not of the shapes.
        let msg =
            if msg.contains(kernels::NOT_QUANTISABLE) { msg } else { format!("weights do not match {against}: {msg}") };
        Error::Weights { path: files.weights_path(), msg }
    }
}
