//! Single-file Stable Diffusion 1.x / 2.x checkpoints in the original (CompVis/LDM) layout — what
//! civitai and the roots of many hub repos share — loaded onto the same model code as diffusers
//! folders. A port of diffusers' `loaders/single_file_utils.py` (`infer_diffusers_model_type`,
//! `create_unet_diffusers_config_from_ldm`, `create_vae_diffusers_config_from_ldm`,
//! `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
//! `convert_open_clip_checkpoint`), as a name mapping: the file's tensors are read where they are,
//! under diffusers' names, through [`Mapped`]; nothing is converted or copied ahead.
//!
//! The architecture comes from the tensor shapes where the file shows it (channels, blocks, layers,
//! attention per level, transformer depth, context width, linear or convolutional projections,
//! text-encoder depth and width) and from the family where it does not: SD1 has 8 attention heads
//! per block and OpenAI's CLIP ViT-L (quick GELU), SD2 64-channel heads and OpenCLIP ViT-H (GELU,
//! its last layer unused, the fused `in_proj` split into q, k, v); both use 32 normalisation groups
//! and the VAE scaling factor 0.18215; the scheduler and tokenizer configs are the family's
//! (`presets/families/`). Whether an SD2 model predicts v cannot be read from the file
//! (`--prediction v`). Only `model.diffusion_model.*`, `first_stage_model.*` and
//! `cond_stage_model.*` are read: `model_ema.*`, schedule buffers, `position_ids`, `logit_scale`
//! and OpenCLIP's last block are ignored.

use super::weights::TensorSource;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The model families a single file can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Sd1,
    Sd2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "Stable Diffusion 1.x",
            Family::Sd2 => "Stable Diffusion 2.x",
        }
    }
}

/// What the prediction type of an SD2 model is, when the user says (`--prediction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
}

/// Where a diffusers-named tensor is in the file.
#[derive(Debug, Clone)]
enum Target {
    Key(String),
    /// Rows `[start, start + len)` of a tensor (one of q, k, v in OpenCLIP's fused `in_proj`).
    Rows(String, usize, usize),
}

/// A file's tensors seen under one component's diffusers names.
pub struct Mapped {
    raw: Arc<dyn TensorSource>,
    map: HashMap<String, Target>,
}

impl TensorSource for Mapped {
    fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self.map.get(name)? {
            Target::Key(k) => self.raw.shape(k),
            Target::Rows(k, _, len) => self.raw.shape(k).map(|mut s| {
                // A scalar stays a scalar, and the shape check names it.
                if let Some(rows) = s.first_mut() {
                    *rows = *len;
                }
                s
            }),
        }
    }
    fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
    fn load_as(&self, name: &str, dtype: Option<DType>, device: &Device) -> candle_core::Result<Tensor> {
        match self.map.get(name) {
            Some(Target::Key(k)) => self.raw.load_as(k, dtype, device),
            Some(Target::Rows(k, start, len)) => {
                let shape = self.raw.shape(k).unwrap_or_default();
                if shape.first().is_none_or(|rows| *rows < start + len) {
                    candle_core::bail!("'{k}' has shape {shape:?}, rows {start}..{} expected", start + len)
                }
                self.raw.load_as(k, dtype, device)?.narrow(0, *start, *len)?.contiguous()
            }
            None => Err(candle_core::Error::CannotFindTensor { path: name.to_string() }.bt()),
        }
    }
    fn view(&self, name: &str, dtype: DType) -> Option<super::weights::View> {
        match self.map.get(name)? {
            Target::Key(k) => self.raw.view(k, dtype),
            Target::Rows(k, start, len) => self.raw.view(k, dtype)?.rows(*start, *len),
        }
    }
}

impl std::fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SingleFile({}, {})", self.path.display(), self.family.name())
    }
}

/// A single-file checkpoint, inspected: its family, the configs its architecture gives, and its
/// three components' tensors under diffusers' names.
pub struct SingleFile {
    pub path: PathBuf,
    pub family: Family,
    pub unet_config: Value,
    pub vae_config: Value,
    pub text_config: Value,
    pub unet: Arc<Mapped>,
    pub vae: Arc<Mapped>,
    pub text_encoder: Arc<Mapped>,
}

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";

/// The `[dim0, dim1, ...]` shape of a key, or an error naming it.
/// The shape of a weight the architecture is read from: a matrix, a convolution kernel or an
/// embedding table, so at least two dimensions (a hostile file's scalar is refused, not indexed).
fn shape_of(raw: &dyn TensorSource, path: &Path, key: &str) -> Result<Vec<usize>> {
    let s = raw.shape(key).ok_or_else(|| bad(path, format!("missing '{key}'")))?;
    if s.len() < 2 {
        return Err(bad(path, format!("'{key}' has shape {s:?} (a weight of 2 or more dimensions expected)")));
    }
    Ok(s)
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Weights { path: path.to_path_buf(), msg: msg.into() }
}

/// What a file that is not an SD1/SD2 checkpoint looks like, for the refusal.
fn what_it_is(names: &[String]) -> String {
    let any = |p: &str| names.iter().any(|n| n.starts_with(p));
    let contains = |p: &str| names.iter().any(|n| n.contains(p));
    if any("lora_unet_") || any("lora_te") || contains(".lora_down.") || contains(".lora_A.") {
        "a LoRA (pass it with --lora)".into()
    } else if any("conditioner.embedders.") || any("model.diffusion_model.label_emb.") {
        "an SDXL checkpoint (ghiblify runs SD1.x and SD2.x)".into()
    } else if any("encoder.conv_in.") || any("decoder.conv_in.") {
        "a VAE on its own (use --vae with a VAE folder)".into()
    } else if any("down_blocks.") || any("unet.") {
        "diffusers-named weights, not a single-file checkpoint (use --model-dir with the whole folder)".into()
    } else if any("model.diffusion_model.") {
        "a UNet without its VAE or text encoder (not a whole checkpoint)".into()
    } else {
        format!("not a Stable Diffusion checkpoint ({} tensors, none under 'model.diffusion_model.')", names.len())
    }
}

/// Opens a single-file checkpoint — safetensors or a PyTorch zip `.ckpt`, told apart by content —
/// and plans how it loads.
pub fn open(path: &Path) -> Result<SingleFile> {
    let mut head = Vec::with_capacity(9);
    {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        f.take(9).read_to_end(&mut head).map_err(|e| Error::io(path, e))?;
        if head.len() < 9 {
            return Err(bad(path, "too short to be a checkpoint"));
        }
    }
    // SAFETY (both): read-only maps of the weights, as for every model file.
    let raw: Arc<dyn TensorSource> = if head.starts_with(b"PK\x03\x04") {
        Arc::new(unsafe { super::ckpt::Ckpt::open(path) }?)
    } else if head[0] == 0x80 {
        // A bare pickle (pickle's PROTO opcode first): torch.save before 1.6.
        return Err(bad(
            path,
            "a PyTorch checkpoint in the pre-1.6 format, which is not read; convert it to safetensors",
        ));
    } else if head[8] == b'{' {
        // safetensors: an 8-byte header length, then the JSON header.
        Arc::new(unsafe { super::weights::Weights::open(&[path]) }?)
    } else {
        return Err(bad(path, "not a checkpoint (neither safetensors nor a PyTorch zip archive)"));
    };
    SingleFile::inspect(path, raw)
}

impl SingleFile {
    /// A component as the model loader takes it: its config in `dir` (see [`Self::write_configs`]),
    /// its tensors from the file.
    pub fn component(&self, dir: &Path, name: &str) -> super::ComponentFiles {
        let source: Arc<dyn TensorSource> = match name {
            "unet" => self.unet.clone(),
            "vae" => self.vae.clone(),
            _ => self.text_encoder.clone(),
        };
        super::ComponentFiles {
            config: dir.join(name).join("config.json"),
            weights: vec![self.path.clone()],
            source: Some(source),
            merge: None,
        }
    }

    /// Reads the layout of `raw` (the file's tensors) and plans the mapping; refuses, in one line
    /// saying what it looks like, anything that is not a whole SD1/SD2 checkpoint.
    pub fn inspect(path: &Path, raw: Arc<dyn TensorSource>) -> Result<Self> {
        let names = raw.names();
        let has = |k: &str| raw.contains(k);
        let whole = has(&format!("{UNET}input_blocks.0.0.weight"))
            && has(&format!("{VAE}decoder.conv_in.weight"))
            && names.iter().any(|n| n.starts_with("cond_stage_model."));
        if !whole || names.iter().any(|n| n.starts_with("conditioner.embedders.")) {
            return Err(bad(path, format!("this file is {}", what_it_is(&names))));
        }
        let family = if names.iter().any(|n| n.starts_with("cond_stage_model.model.")) {
            Family::Sd2
        } else if names.iter().any(|n| n.starts_with("cond_stage_model.transformer.")) {
            Family::Sd1
        } else {
            return Err(bad(path, "its text encoder ('cond_stage_model.') is neither SD1's CLIP nor SD2's OpenCLIP"));
        };
        let (unet_config, unet) = unet_plan(path, &raw, family)?;
        let (vae_config, vae) = vae_plan(path, &raw)?;
        let (text_config, text_encoder) = match family {
            Family::Sd1 => clip_plan(path, &raw)?,
            Family::Sd2 => open_clip_plan(path, &raw)?,
        };
        Ok(Self {
            path: path.to_path_buf(),
            family,
            unet_config,
            vae_config,
            text_config,
            unet: Arc::new(Mapped { raw: raw.clone(), map: unet }),
            vae: Arc::new(Mapped { raw: raw.clone(), map: vae }),
            text_encoder: Arc::new(Mapped { raw, map: text_encoder }),
        })
    }

    /// Writes the folder the model loader reads configs and the tokenizer from (the weights stay
    /// in the file): `unet/`, `vae/`, `text_encoder/` configs, the family's scheduler and tokenizer.
    pub fn write_configs(&self, dir: &Path, prediction: Option<Prediction>) -> Result<()> {
        let put = |rel: &str, bytes: &[u8]| -> Result<()> {
            let p = dir.join(rel);
            let parent = p.parent().expect("a relative file path has a folder");
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
        };
        let json = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON values serialise");
        put("unet/config.json", &json(&self.unet_config))?;
        put("vae/config.json", &json(&self.vae_config))?;
        put("text_encoder/config.json", &json(&self.text_config))?;
        let (scheduler, tokenizer) = match self.family {
            Family::Sd1 => (SD1_SCHEDULER, SD1_TOKENIZER),
            Family::Sd2 => (SD2_SCHEDULER, SD2_TOKENIZER),
        };
        let mut scheduler: Value = serde_json::from_str(scheduler).expect("family data is valid JSON");
        if let Some(p) = prediction {
            scheduler["prediction_type"] = json!(match p {
                Prediction::Epsilon => "epsilon",
                Prediction::V => "v_prediction",
            });
        }
        put("scheduler/scheduler_config.json", &json(&scheduler))?;
        put("tokenizer/tokenizer_config.json", tokenizer.as_bytes())?;
        put("tokenizer/vocab.json", CLIP_VOCAB)?;
        put("tokenizer/merges.txt", CLIP_MERGES)?;
        Ok(())
    }
}

const SD1_SCHEDULER: &str = include_str!("../../presets/families/sd1/scheduler_config.json");
const SD2_SCHEDULER: &str = include_str!("../../presets/families/sd2/scheduler_config.json");
const SD1_TOKENIZER: &str = include_str!("../../presets/families/sd1/tokenizer_config.json");
const SD2_TOKENIZER: &str = include_str!("../../presets/families/sd2/tokenizer_config.json");
const CLIP_VOCAB: &[u8] = include_bytes!("../../presets/families/clip/vocab.json");
const CLIP_MERGES: &[u8] = include_bytes!("../../presets/families/clip/merges.txt");

/// The diffusers names of an LDM ResNet block's parts.
const RESNET_PARTS: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// Maps every key under `ldm_prefix` to `diffusers_prefix` + its rest, renaming ResNet parts when
/// `resnet` is set (the LDM and diffusers transformer blocks share their inner names).
fn map_under(
    names: &[String],
    map: &mut HashMap<String, Target>,
    ldm_prefix: &str,
    diffusers_prefix: &str,
    resnet: bool,
) {
    for n in names.iter().filter(|n| n.starts_with(ldm_prefix)) {
        let mut rest = n[ldm_prefix.len()..].to_string();
        if resnet {
            for (from, to) in RESNET_PARTS {
                if let Some(r) = rest.strip_prefix(&format!("{from}.")) {
                    rest = format!("{to}.{r}");
                }
            }
        }
        map.insert(format!("{diffusers_prefix}{rest}"), Target::Key(n.clone()));
    }
}

/// Highest `K + 1` such that `prefix{K}.` begins some key.
fn count_indexed(names: &[String], prefix: &str) -> usize {
    names
        .iter()
        .filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

/// The UNet: levels read from `input_blocks` (ResNets, attention, the downsampling `op`), the up
/// path as their mirror (`output_blocks`, one more ResNet per level).
fn unet_plan(path: &Path, raw: &Arc<dyn TensorSource>, family: Family) -> Result<(Value, HashMap<String, Target>)> {
    let names: Vec<String> = raw.names().into_iter().filter(|n| n.starts_with(UNET)).collect();
    let key = |k: &str| format!("{UNET}{k}");
    let conv_in = shape_of(raw.as_ref(), path, &key("input_blocks.0.0.weight"))?;
    if conv_in.len() != 4 {
        return Err(bad(
            path,
            format!("'{}' has shape {conv_in:?}, not a convolution", key("input_blocks.0.0.weight")),
        ));
    }
    let (c0, in_channels) = (conv_in[0], conv_in[1]);
    if in_channels == 9 {
        return Err(bad(path, "this file is an inpainting model (9 input channels); ghiblify runs img2img models (4)"));
    }
    if in_channels != 4 {
        return Err(bad(path, format!("the UNet has {in_channels} input channels; SD1/SD2 img2img models have 4")));
    }
    let inputs = count_indexed(&names, &key("input_blocks."));
    // Per level: (ResNets, attention, output channels, transformer depth).
    let mut levels: Vec<(usize, bool, usize, usize)> = vec![(0, false, c0, 1)];
    let mut map = HashMap::new();
    let mut per_level_inputs: Vec<Vec<usize>> = vec![Vec::new()];
    for n in 1..inputs {
        let b = format!("input_blocks.{n}.");
        if raw.contains(&key(&format!("{b}0.op.weight"))) {
            let i = levels.len() - 1;
            map.insert(
                format!("down_blocks.{i}.downsamplers.0.conv.weight"),
                Target::Key(key(&format!("{b}0.op.weight"))),
            );
            map.insert(format!("down_blocks.{i}.downsamplers.0.conv.bias"), Target::Key(key(&format!("{b}0.op.bias"))));
            levels.push((0, false, 0, 1));
            per_level_inputs.push(Vec::new());
            continue;
        }
        let conv = shape_of(raw.as_ref(), path, &key(&format!("{b}0.in_layers.2.weight")))?;
        let level = levels.last_mut().expect("a level");
        let j = level.0;
        let i = per_level_inputs.len() - 1;
        level.0 += 1;
        level.2 = conv[0];
        map_under(&names, &mut map, &key(&format!("{b}0.")), &format!("down_blocks.{i}.resnets.{j}."), true);
        if raw.contains(&key(&format!("{b}1.proj_in.weight"))) {
            level.1 = true;
            level.3 = count_indexed(&names, &key(&format!("{b}1.transformer_blocks.")));
            map_under(&names, &mut map, &key(&format!("{b}1.")), &format!("down_blocks.{i}.attentions.{j}."), false);
        }
        per_level_inputs.last_mut().expect("a level").push(n);
    }
    if levels.iter().any(|l| l.0 == 0) {
        return Err(bad(path, "its UNet has a level without ResNet blocks (a damaged file?)"));
    }
    let n_levels = levels.len();
    let channels: Vec<usize> = levels.iter().map(|l| l.2).collect();
    let layers: Vec<usize> = levels.iter().map(|l| l.0).collect();
    // The up path mirrors the down path with one more ResNet per level; an upsampler closes every
    // level but the last.
    let mut o = 0;
    for (i, &(down_layers, attn, _, _)) in levels.iter().rev().enumerate() {
        let count = down_layers + 1;
        for j in 0..count {
            let b = format!("output_blocks.{o}.");
            map_under(&names, &mut map, &key(&format!("{b}0.")), &format!("up_blocks.{i}.resnets.{j}."), true);
            let mut next = 1;
            if attn {
                map_under(&names, &mut map, &key(&format!("{b}1.")), &format!("up_blocks.{i}.attentions.{j}."), false);
                next = 2;
            }
            if j + 1 == count && i + 1 < n_levels {
                for p in ["weight", "bias"] {
                    map.insert(
                        format!("up_blocks.{i}.upsamplers.0.conv.{p}"),
                        Target::Key(key(&format!("{b}{next}.conv.{p}"))),
                    );
                }
            }
            o += 1;
        }
    }
    map_under(&names, &mut map, &key("middle_block.0."), "mid_block.resnets.0.", true);
    map_under(&names, &mut map, &key("middle_block.1."), "mid_block.attentions.0.", false);
    map_under(&names, &mut map, &key("middle_block.2."), "mid_block.resnets.1.", true);
    for (ldm, d) in [
        ("input_blocks.0.0.", "conv_in."),
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ] {
        map_under(&names, &mut map, &key(ldm), d, false);
    }
    let temb = shape_of(raw.as_ref(), path, &key("time_embed.0.weight"))?[0];
    let out_channels = shape_of(raw.as_ref(), path, &key("out.2.weight"))?[0];
    // Context width and projection kind from the first attention block.
    let attn_key = names
        .iter()
        .find(|n| n.ends_with("transformer_blocks.0.attn2.to_k.weight"))
        .ok_or_else(|| bad(path, "its UNet has no cross-attention (not an SD1/SD2 model)"))?;
    let context = shape_of(raw.as_ref(), path, attn_key)?[1];
    let linear =
        names.iter().find(|n| n.ends_with(".proj_in.weight")).and_then(|k| raw.shape(k)).is_some_and(|s| s.len() == 2);
    let heads: Vec<usize> = match family {
        // diffusers' SD1 configs say `attention_head_dim: 8`, which its UNet reads as 8 heads.
        Family::Sd1 => vec![8; n_levels],
        // SD2: 64 channels per head (`attention_head_dim: [5, 10, 20, 20]` for 320..1280).
        Family::Sd2 => channels.iter().map(|c| (c / 64).max(1)).collect(),
    };
    let depth: Vec<usize> = levels.iter().map(|l| l.3).collect();
    let down: Vec<&str> = levels.iter().map(|l| if l.1 { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
    let up: Vec<&str> = levels.iter().rev().map(|l| if l.1 { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
    let cfg = json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "attention_head_dim": heads,
        "cross_attention_dim": context,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
        "time_embedding_dim": temb,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
    });
    Ok((cfg, map))
}

/// The KL VAE: `encoder.down.{i}` / `decoder.up.{k}` (up levels numbered from the bottom in LDM,
/// from the top in diffusers), `nin_shortcut` → `conv_shortcut`, the mid attention's 1×1
/// convolutions `q, k, v, proj_out` → `to_q, to_k, to_v, to_out.0` (loaded as linear layers).
fn vae_plan(path: &Path, raw: &Arc<dyn TensorSource>) -> Result<(Value, HashMap<String, Target>)> {
    let names: Vec<String> = raw.names().into_iter().filter(|n| n.starts_with(VAE)).collect();
    let key = |k: &str| format!("{VAE}{k}");
    let levels = count_indexed(&names, &key("encoder.down."));
    if levels == 0 {
        return Err(bad(path, "its VAE has no 'encoder.down' blocks"));
    }
    let layers = count_indexed(&names, &key("encoder.down.0.block."));
    let channels: Vec<usize> = (0..levels)
        .map(|i| shape_of(raw.as_ref(), path, &key(&format!("encoder.down.{i}.block.0.conv1.weight"))).map(|s| s[0]))
        .collect::<Result<_>>()?;
    let conv_in = shape_of(raw.as_ref(), path, &key("encoder.conv_in.weight"))?;
    let conv_out = shape_of(raw.as_ref(), path, &key("decoder.conv_out.weight"))?;
    let latent2 = shape_of(raw.as_ref(), path, &key("encoder.conv_out.weight"))?[0];
    let mut map = HashMap::new();
    let resnet = |map: &mut HashMap<String, Target>, ldm: String, d: String| {
        for n in names.iter().filter(|n| n.starts_with(&ldm)) {
            let rest = &n[ldm.len()..];
            let rest = rest
                .strip_prefix("nin_shortcut.")
                .map(|r| format!("conv_shortcut.{r}"))
                .unwrap_or_else(|| rest.to_string());
            map.insert(format!("{d}{rest}"), Target::Key(n.clone()));
        }
    };
    for i in 0..levels {
        for j in 0..layers {
            resnet(
                &mut map,
                key(&format!("encoder.down.{i}.block.{j}.")),
                format!("encoder.down_blocks.{i}.resnets.{j}."),
            );
        }
        for p in ["weight", "bias"] {
            let k = key(&format!("encoder.down.{i}.downsample.conv.{p}"));
            if raw.contains(&k) {
                map.insert(format!("encoder.down_blocks.{i}.downsamplers.0.conv.{p}"), Target::Key(k));
            }
        }
        // LDM numbers the decoder's levels from the bottom (the widest), diffusers from the top.
        let k = levels - 1 - i;
        for j in 0..=layers {
            resnet(&mut map, key(&format!("decoder.up.{k}.block.{j}.")), format!("decoder.up_blocks.{i}.resnets.{j}."));
        }
        for p in ["weight", "bias"] {
            let kk = key(&format!("decoder.up.{k}.upsample.conv.{p}"));
            if raw.contains(&kk) {
                map.insert(format!("decoder.up_blocks.{i}.upsamplers.0.conv.{p}"), Target::Key(kk));
            }
        }
    }
    let mid_attention = raw.contains(&key("encoder.mid.attn_1.q.weight"));
    for side in ["encoder", "decoder"] {
        resnet(&mut map, key(&format!("{side}.mid.block_1.")), format!("{side}.mid_block.resnets.0."));
        resnet(&mut map, key(&format!("{side}.mid.block_2.")), format!("{side}.mid_block.resnets.1."));
        for (l, d) in [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")] {
            for p in ["weight", "bias"] {
                let k = key(&format!("{side}.mid.attn_1.{l}.{p}"));
                if raw.contains(&k) {
                    map.insert(format!("{side}.mid_block.attentions.0.{d}.{p}"), Target::Key(k));
                }
            }
        }
        for (l, d) in [("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")] {
            for p in ["weight", "bias"] {
                map.insert(format!("{side}.{d}.{p}"), Target::Key(key(&format!("{side}.{l}.{p}"))));
            }
        }
    }
    let quant = raw.contains(&key("quant_conv.weight"));
    for c in ["quant_conv", "post_quant_conv"] {
        for p in ["weight", "bias"] {
            if raw.contains(&key(&format!("{c}.{p}"))) {
                map.insert(format!("{c}.{p}"), Target::Key(key(&format!("{c}.{p}"))));
            }
        }
    }
    let cfg = json!({
        "_class_name": "AutoencoderKL",
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent2 / 2,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "sample_size": 512,
        "use_quant_conv": quant,
        "use_post_quant_conv": quant,
        "mid_block_add_attention": mid_attention,
    });
    Ok((cfg, map))
}

/// SD1's text encoder, OpenAI CLIP under `cond_stage_model.transformer.` (with or without
/// `text_model.`): the names are transformers' own.
fn clip_plan(path: &Path, raw: &Arc<dyn TensorSource>) -> Result<(Value, HashMap<String, Target>)> {
    let base = if raw.contains("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight") {
        "cond_stage_model.transformer.text_model."
    } else {
        "cond_stage_model.transformer."
    };
    let names: Vec<String> = raw.names().into_iter().filter(|n| n.starts_with(base)).collect();
    let tok = shape_of(raw.as_ref(), path, &format!("{base}embeddings.token_embedding.weight"))?;
    let pos = shape_of(raw.as_ref(), path, &format!("{base}embeddings.position_embedding.weight"))?;
    let layers = count_indexed(&names, &format!("{base}encoder.layers."));
    let inter = shape_of(raw.as_ref(), path, &format!("{base}encoder.layers.0.mlp.fc1.weight"))?[0];
    let mut map = HashMap::new();
    for n in &names {
        let rest = &n[base.len()..];
        if rest.starts_with("embeddings.position_ids") {
            continue;
        }
        map.insert(format!("text_model.{rest}"), Target::Key(n.clone()));
    }
    Ok((text_config(&tok, &pos, inter, layers, "quick_gelu"), map))
}

/// A text encoder's config from its embedding shapes: both families use 64-channel heads.
fn text_config(tok: &[usize], pos: &[usize], inter: usize, layers: usize, act: &str) -> Value {
    let h = tok[1];
    json!({
        "vocab_size": tok[0],
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": (h / 64).max(1),
        "max_position_embeddings": pos[0],
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    })
}

/// SD2's text encoder, OpenCLIP ViT-H under `cond_stage_model.model.`: resblocks → encoder layers,
/// the fused `attn.in_proj_{weight,bias}` split into q, k, v, and the last block left out (SD2
/// conditions on the penultimate layer, followed by the final layer norm).
fn open_clip_plan(path: &Path, raw: &Arc<dyn TensorSource>) -> Result<(Value, HashMap<String, Target>)> {
    let base = "cond_stage_model.model.";
    let names: Vec<String> = raw.names().into_iter().filter(|n| n.starts_with(base)).collect();
    let tok = shape_of(raw.as_ref(), path, &format!("{base}token_embedding.weight"))?;
    let pos = shape_of(raw.as_ref(), path, &format!("{base}positional_embedding"))?;
    let blocks = count_indexed(&names, &format!("{base}transformer.resblocks."));
    if blocks < 2 {
        return Err(bad(path, format!("its OpenCLIP text encoder has {blocks} blocks (at least 2 expected)")));
    }
    let h = tok[1];
    let inter = shape_of(raw.as_ref(), path, &format!("{base}transformer.resblocks.0.mlp.c_fc.weight"))?[0];
    let mut map = HashMap::new();
    let k = |rest: &str| Target::Key(format!("{base}{rest}"));
    map.insert("text_model.embeddings.token_embedding.weight".into(), k("token_embedding.weight"));
    map.insert("text_model.embeddings.position_embedding.weight".into(), k("positional_embedding"));
    map.insert("text_model.final_layer_norm.weight".into(), k("ln_final.weight"));
    map.insert("text_model.final_layer_norm.bias".into(), k("ln_final.bias"));
    let layers = blocks - 1;
    for i in 0..layers {
        let r = format!("transformer.resblocks.{i}.");
        let d = format!("text_model.encoder.layers.{i}.");
        for (l, t) in [
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
            ("attn.out_proj", "self_attn.out_proj"),
        ] {
            for p in ["weight", "bias"] {
                map.insert(format!("{d}{t}.{p}"), k(&format!("{r}{l}.{p}")));
            }
        }
        let fused = shape_of(raw.as_ref(), path, &format!("{base}{r}attn.in_proj_weight"))?;
        if fused[0] != 3 * h {
            return Err(bad(
                path,
                format!("'{base}{r}attn.in_proj_weight' has shape {fused:?}, expected [{}, {h}]", 3 * h),
            ));
        }
        for (n, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            for p in ["weight", "bias"] {
                map.insert(
                    format!("{d}self_attn.{part}.{p}"),
                    Target::Rows(format!("{base}{r}attn.in_proj_{p}"), n * h, h),
                );
            }
        }
    }
    Ok((text_config(&tok, &pos, inter, layers, "gelu"), map))
}

/// Every tensor a loaded model reads from the file, for tests: diffusers name → (component, key).
pub fn mapping_summary(sf: &SingleFile) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (part, m) in [("unet", &sf.unet), ("vae", &sf.vae), ("text_encoder", &sf.text_encoder)] {
        for (d, t) in &m.map {
            let src = match t {
                Target::Key(k) => k.clone(),
                Target::Rows(k, s, l) => format!("{k}[{s}..{}]", s + l),
            };
            out.insert(format!("{part}/{d}"), src);
        }
    }
    out
}
