//! LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; LoCon
//! from LyCORIS for convolutions) merged into the weights as they load:
//! `W' = W + Σ scale · (alpha / rank) · up · down`, reshaped for convolutions.
//!
//! The merge is peft's `tuners/lora/layer.py` (`get_delta_weight`, then `merge`), which diffusers'
//! `fuse_lora` runs; key conventions follow diffusers' `loaders/lora_conversion_utils.py`
//! (`_convert_non_diffusers_lora_to_diffusers`, `_maybe_map_sgm_blocks_to_diffusers`) and
//! `loaders/lora_pipeline.py`: kohya/A1111 (`lora_unet_…`, `lora_te_…`, `.lora_down/.lora_up/.alpha`,
//! diffusers or original-LDM UNet names), diffusers/PEFT (`unet.….lora_A/B[.default].weight`,
//! `text_encoder.…`, alphas in `.alpha` keys or the `lora_adapter_metadata` JSON), and the older
//! diffusers forms (`.lora.down/.lora.up`, `processor.to_q_lora.down`). The merge happens in a
//! candle `SimpleBackend` wrapped around the memory-mapped weights, so the model code is the same
//! with or without LoRAs and no second copy of the weights is held.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// `--lora PATH[:SCALE]` or `--lora REPO_ID/FILE.safetensors[:SCALE]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub source: LoraSource,
    pub scale: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LoraSource {
    File(PathBuf),
    Hub {
        repo: String,
        file: String,
        revision: Option<String>,
        /// The revision is a commit ghiblify pins (fast mode's LCM-LoRA): if the hub lacks it,
        /// `main` is used with a warning.
        pinned: bool,
    },
}

/// `TARGET[:SCALE]` as `--lora` and `--control`/`--controlnet` take it: the suffix is a scale when
/// it parses as a number (so paths with colons still work), else the scale is 1.
pub fn split_scale(spec: &str) -> (&str, f64) {
    match spec.rsplit_once(':') {
        Some((t, s)) if !t.is_empty() => match s.parse::<f64>() {
            Ok(scale) => (t, scale),
            Err(_) => (spec, 1.0),
        },
        _ => (spec, 1.0),
    }
}

impl LoraSpec {
    /// A local path wins; otherwise `owner/name/path/to/file.safetensors` is a hub file. A
    /// `:SCALE` suffix is taken when it parses as a number (so paths with colons still work).
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: String| Error::setting("lora", format!("'{spec}': {why}"));
        // A file whose own name has a colon (`style:v2.safetensors`) is taken whole.
        if Path::new(spec).is_file() {
            return Ok(Self { source: LoraSource::File(PathBuf::from(spec)), scale: 1.0 });
        }
        let (target, scale) = split_scale(spec);
        if !scale.is_finite() || scale.abs() > 16.0 {
            return Err(bad(format!("scale must be a number within [-16, 16], got {scale}")));
        }
        let path = Path::new(target);
        if path.exists() {
            if !path.is_file() {
                return Err(bad("not a file".into()));
            }
            return Ok(Self { source: LoraSource::File(path.to_path_buf()), scale });
        }
        // `OWNER/NAME/PATH/FILE.safetensors[@REVISION]`.
        let (target, revision) = match target.split_once('@') {
            Some((t, r)) => (t, Some(r.to_string())),
            None => (target, None),
        };
        let parts: Vec<&str> = target.splitn(3, '/').collect();
        if parts.len() == 3 && target.ends_with(".safetensors") && !target.starts_with('.') && !target.starts_with('/')
        {
            let repo = format!("{}/{}", parts[0], parts[1]);
            crate::repo::check_repo_id(&repo).map_err(&bad)?;
            crate::repo::check_file_path(parts[2]).map_err(&bad)?;
            if let Some(r) = &revision {
                crate::repo::check_revision(r).map_err(&bad)?;
            }
            return Ok(Self {
                source: LoraSource::Hub { repo, file: parts[2].to_string(), revision, pinned: false },
                scale,
            });
        }
        Err(bad("no such file (a hub LoRA is REPO_OWNER/REPO_NAME/FILE.safetensors[@REVISION])".into()))
    }

    /// The name shown in reports: the file name without extension (for diffusers' generic
    /// `pytorch_lora_weights` on the hub, the repo's name).
    pub fn name(&self) -> String {
        let stem = |f: &str| {
            Path::new(f).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| f.to_string())
        };
        match &self.source {
            LoraSource::File(p) => stem(&p.to_string_lossy()),
            LoraSource::Hub { repo, file, .. } => match stem(file).as_str() {
                "pytorch_lora_weights" => repo.rsplit('/').next().unwrap_or(repo).to_string(),
                s => s.to_string(),
            },
        }
    }
}

/// A LoRA file to merge, with the name reports give it.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub name: String,
    pub path: PathBuf,
    pub scale: f64,
}

/// Reads and plans every LoRA against the UNet's and the text encoder's weight layouts and hands
/// each component its share of the merge; `None` without LoRAs.
pub fn prepare(
    loras: &[LoraFile],
    unet: &mut crate::models::ComponentFiles,
    text_encoder: &mut crate::models::ComponentFiles,
) -> Result<Option<LoraSet>> {
    if loras.is_empty() {
        return Ok(None);
    }
    let unet_layout = Layout::of(unet.open()?.as_ref());
    let te_layout = Layout::of(text_encoder.open()?.as_ref());
    let planned =
        loras.iter().map(|l| plan(&l.name, &l.path, l.scale, &unet_layout, &te_layout)).collect::<Result<Vec<_>>>()?;
    let set = LoraSet::new(planned);
    unet.merge = set.merge_for(Part::Unet);
    text_encoder.merge = set.merge_for(Part::TextEncoder);
    Ok(Some(set))
}

/// Which model part a LoRA module targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Unet,
    TextEncoder,
}

/// One low-rank update of one model weight, kept in f32 on the CPU until the weight is loaded.
struct Update {
    down: Tensor,
    up: Tensor,
    /// scale · alpha / rank.
    factor: f64,
}

/// The updates for one component, handed to its weight loader; records which were applied.
#[derive(Default)]
pub struct Merge {
    updates: HashMap<String, Vec<Update>>,
    used: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Merge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Merge({} weights)", self.updates.len())
    }
}

impl Merge {
    fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }

    /// Whether a LoRA changes the model weight `name` (which must then be copied to merge into).
    pub fn touches(&self, name: &str) -> bool {
        self.updates.contains_key(name)
    }

    /// The model weights a LoRA touched that the model never loaded.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = self.updates.keys().filter(|k| !used.contains(*k)).cloned().collect();
        v.sort();
        v
    }

    /// `w + Σ factor · up·down`, in f32, reshaped to `w`'s shape.
    fn apply(&self, name: &str, w: Tensor) -> candle_core::Result<Tensor> {
        let Some(list) = self.updates.get(name) else { return Ok(w) };
        self.used.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        let dtype = w.dtype();
        // Widened and narrowed again on all threads (candle's to_dtype runs on one).
        let mut acc = crate::models::kernels::to_dtype(&w, DType::F32)?;
        for u in list {
            let down = u.down.to_device(acc.device())?;
            let up = u.up.to_device(acc.device())?;
            let rank = down.dim(0)?;
            let down2 = down.reshape((rank, ()))?;
            let up2 = up.reshape((up.dim(0)?, rank))?;
            if acc.device().is_cpu() && acc.is_contiguous() {
                // One product added into the weight's own buffer: the three weight-sized
                // temporaries of `acc + (up·down) · factor` cost a --fast load ~4 s of page
                // zeroing (LCM-LoRA touches 272 layers, most of the UNet). The buffer is this
                // load's own: a weight a LoRA touches is never read in place (`Merge::touches`,
                // `nn::InPlace`) but copied out of its file (models/weights.rs), and a dtype
                // conversion above made a fresh one.
                let (up2, down2) = (up2.to_dtype(DType::F32)?.contiguous()?, down2.to_dtype(DType::F32)?.contiguous()?);
                acc.inplace_op3(&up2, &down2, &AddProduct(u.factor as f32))?;
            } else {
                let delta = (up2.matmul(&down2)? * u.factor)?.reshape(acc.shape())?;
                acc = (acc + delta)?;
            }
        }
        crate::models::kernels::to_dtype(&acc, dtype)
    }
}

/// `acc[m × n] += factor · up[m × r] · down[r × n]` on the CPU, in place (acc any shape of m · n
/// values, m = up's rows), one parallel f32 product.
struct AddProduct(f32);

impl candle_core::InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "ghiblify-lora-add-product"
    }

    fn cpu_fwd(
        &self,
        acc: &mut candle_core::CpuStorage,
        acc_l: &candle_core::Layout,
        up: &candle_core::CpuStorage,
        up_l: &candle_core::Layout,
        down: &candle_core::CpuStorage,
        down_l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use crate::models::kernels::f32_slice;
        let (up, down) = (f32_slice(up, up_l, "LoRA up")?, f32_slice(down, down_l, "LoRA down")?);
        let (candle_core::CpuStorage::F32(acc), Some((a0, a1))) = (acc, acc_l.contiguous_offsets()) else {
            candle_core::bail!("LoRA merge: expected a contiguous f32 weight");
        };
        let ((m, r), (r2, n)) = (up_l.shape().dims2()?, down_l.shape().dims2()?);
        if r != r2 || a1 - a0 != m * n || up.len() != m * r || down.len() != r * n {
            candle_core::bail!("LoRA merge: {m}×{r} · {r2}×{n} does not fit {} values", a1 - a0);
        }
        // SAFETY: the three slices hold m·n, m·r and r·n values (checked above); acc is the
        // destination only.
        unsafe {
            crate::models::kernels::sgemm(
                (m, n, r),
                acc[a0..a1].as_mut_ptr(),
                n as isize,
                true,
                (up.as_ptr(), 1, r as isize),
                (down.as_ptr(), 1, n as isize),
                self.0,
                crate::models::kernels::rayon_par(),
            )
        }
        Ok(())
    }
}

/// A safetensors backend that adds the LoRA updates to the weights it hands out.
pub struct MergingBackend {
    pub inner: Arc<dyn crate::models::weights::TensorSource>,
    pub merge: Arc<Merge>,
}

impl SimpleBackend for MergingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        crate::models::weights::expect_shape(name, self.get_unchecked(name, dtype, dev)?, &s)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        // Loaded as the model's dtype, then merged in f32: an f16 file run in f32 is not rounded
        // to f16 after the merge (as diffusers fuses into the upcast weights).
        let t = self.inner.load_as(name, Some(dtype), dev)?;
        self.merge.apply(name, t)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
}

/// What one LoRA file did, for the report line.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub name: String,
    pub modules: usize,
    pub unet: usize,
    pub text_encoder: usize,
    /// LoRA modules that name no layer of this model.
    pub unmatched: Vec<String>,
}

impl Report {
    pub fn line(&self) -> String {
        format!(
            "lora '{}': applied {} of {} tensors (unet {}, text encoder {})",
            self.name,
            self.unet + self.text_encoder,
            self.modules,
            self.unet,
            self.text_encoder
        )
    }
}

/// The weight names and shapes of one model component, read from the safetensors headers.
pub struct Layout {
    pub shapes: HashMap<String, Vec<usize>>,
}

impl Layout {
    /// The shapes of any tensor source (a single-file checkpoint under diffusers' names too).
    pub fn of(source: &dyn crate::models::weights::TensorSource) -> Self {
        Self { shapes: source.names().into_iter().filter_map(|n| source.shape(&n).map(|s| (n, s))).collect() }
    }

    pub fn read(files: &[PathBuf]) -> Result<Self> {
        let mut shapes = HashMap::new();
        for f in files {
            let file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
            // SAFETY: read-only map of a weights file, as in `models::var_builder`.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(f, e))?;
            let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::Weights { path: f.clone(), msg: format!("not a valid safetensors file: {e}") })?;
            for (name, info) in meta.tensors() {
                shapes.insert(name, info.shape.clone());
            }
        }
        Ok(Self { shapes })
    }
}

/// The raw pieces of one LoRA module as found in the file.
#[derive(Default)]
struct Module {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<f64>,
}

/// How a key names its module: the part it targets (when the key says) and the module id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ModuleId {
    /// kohya: `lora_unet_<id>`, `lora_te_<id>`, `lora_te2_<id>` (underscored path).
    Kohya { prefix: String, id: String },
    /// diffusers/PEFT: dotted module path, with its `unet.`/`text_encoder.` prefix if any.
    Dotted(String),
}

impl std::fmt::Display for ModuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleId::Kohya { prefix, id } => write!(f, "{prefix}{id}"),
            ModuleId::Dotted(p) => f.write_str(p),
        }
    }
}

enum Piece {
    Down,
    Up,
    Alpha,
}

/// Splits a key into its module and which piece it is; `None` for keys that are not LoRA pieces.
fn split_key(key: &str) -> Option<(ModuleId, Piece)> {
    for prefix in ["lora_unet_", "lora_te1_", "lora_te2_", "lora_te_"] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (id, piece) = if let Some(id) = rest.strip_suffix(".lora_down.weight") {
                (id, Piece::Down)
            } else if let Some(id) = rest.strip_suffix(".lora_up.weight") {
                (id, Piece::Up)
            } else if let Some(id) = rest.strip_suffix(".alpha") {
                (id, Piece::Alpha)
            } else {
                return None;
            };
            return Some((ModuleId::Kohya { prefix: prefix.to_string(), id: id.to_string() }, piece));
        }
    }
    const FORMS: &[(&str, u8)] = &[
        (".lora_A.weight", 0),
        (".lora_A.default.weight", 0),
        (".lora_B.weight", 1),
        (".lora_B.default.weight", 1),
        (".lora.down.weight", 0),
        (".lora.up.weight", 1),
        ("_lora.down.weight", 0),
        ("_lora.up.weight", 1),
        (".lora_down.weight", 0),
        (".lora_up.weight", 1),
        (".alpha", 2),
    ];
    for (suffix, which) in FORMS {
        if let Some(module) = key.strip_suffix(suffix) {
            // Attention-processor form: `…attn1.processor.to_q_lora` → `…attn1.to_q`.
            let module = match module.split_once(".processor.") {
                Some((head, tail)) => {
                    let tail = tail.strip_suffix("_lora").unwrap_or(tail);
                    let tail = if tail == "to_out" { "to_out.0" } else { tail };
                    format!("{head}.{tail}")
                }
                None => module.to_string(),
            };
            let piece = match which {
                0 => Piece::Down,
                1 => Piece::Up,
                _ => Piece::Alpha,
            };
            return Some((ModuleId::Dotted(module), piece));
        }
    }
    None
}

/// LoRA flavours we do not merge, by a key that shows them.
fn unsupported(keys: &[String]) -> Option<String> {
    const KINDS: &[(&str, &str)] = &[
        ("hada_w1", "LoHa (hada_ keys)"),
        ("lokr_w1", "LoKr (lokr_ keys)"),
        ("lokr_w2", "LoKr (lokr_ keys)"),
        ("dora_scale", "DoRA (dora_scale keys)"),
        ("lora_magnitude_vector", "DoRA (lora_magnitude_vector keys)"),
        ("lora_mid", "LoCon with Tucker decomposition (lora_mid keys)"),
        ("oft_blocks", "OFT (oft_ keys)"),
        ("oft_diag", "OFT (oft_ keys)"),
        ("lora_B.bias", "LoRA with bias (lora_B.bias keys)"),
    ];
    let found = KINDS
        .iter()
        .find_map(|(needle, what)| keys.iter().find(|k| k.contains(needle)).map(|k| (*what, k)))
        .or_else(|| {
            keys.iter()
                .find(|k| k.ends_with(".diff") || k.ends_with(".diff_b"))
                .map(|k| ("full weight differences (.diff keys)", k))
        });
    found.map(|(what, k)| format!("{what}, e.g. '{k}', is not supported; ghiblify merges LoRA and LoCon adapters"))
}

/// diffusers names of a UNet, derived from its weights: blocks, layers, attentions, samplers.
struct UnetLayout {
    /// Per down block: (resnet count, has attentions, has downsampler).
    down: Vec<(usize, bool, bool)>,
    /// Per up block: (resnet count, has attentions, has upsampler).
    up: Vec<(usize, bool, bool)>,
}

impl UnetLayout {
    fn from(shapes: &HashMap<String, Vec<usize>>) -> Self {
        let count = |prefix: &str| {
            (0..).take_while(|j| shapes.contains_key(&format!("{prefix}.resnets.{j}.conv1.weight"))).count()
        };
        let blocks = |kind: &str, sampler: &str| {
            (0..)
                .map(|i| format!("{kind}.{i}"))
                .take_while(|p| shapes.contains_key(&format!("{p}.resnets.0.conv1.weight")))
                .map(|p| {
                    let attn = shapes.keys().any(|k| k.starts_with(&format!("{p}.attentions.0.")));
                    let sampler = shapes.contains_key(&format!("{p}.{sampler}.0.conv.weight"));
                    (count(&p), attn, sampler)
                })
                .collect()
        };
        Self { down: blocks("down_blocks", "downsamplers"), up: blocks("up_blocks", "upsamplers") }
    }

    /// An original-LDM UNet module id (underscored, as kohya writes it) → the diffusers one.
    fn ldm_to_diffusers(&self, id: &str) -> Option<String> {
        let resnet = |rest: &str| -> String {
            const MAP: &[(&str, &str)] = &[
                ("in_layers_0", "norm1"),
                ("in_layers_2", "conv1"),
                ("emb_layers_1", "time_emb_proj"),
                ("out_layers_0", "norm2"),
                ("out_layers_3", "conv2"),
                ("skip_connection", "conv_shortcut"),
            ];
            MAP.iter().find(|(a, _)| *a == rest).map(|(_, b)| b.to_string()).unwrap_or_else(|| rest.to_string())
        };
        let nums = |s: &str| -> Option<(usize, usize, String)> {
            let mut it = s.splitn(3, '_');
            let a = it.next()?.parse().ok()?;
            let b = it.next()?.parse().ok()?;
            Some((a, b, it.next().unwrap_or("").to_string()))
        };
        let simple: &[(&str, &str)] = &[
            ("time_embed_0", "time_embedding_linear_1"),
            ("time_embed_2", "time_embedding_linear_2"),
            ("out_0", "conv_norm_out"),
            ("out_2", "conv_out"),
        ];
        if let Some((_, d)) = simple.iter().find(|(l, _)| *l == id) {
            return Some(d.to_string());
        }
        if let Some(rest) = id.strip_prefix("input_blocks_") {
            let (idx, sub, rest) = nums(rest)?;
            if idx == 0 {
                return Some("conv_in".into());
            }
            let mut n = 1;
            for (i, &(layers, _attn, down)) in self.down.iter().enumerate() {
                if idx < n + layers {
                    let j = idx - n;
                    return Some(match sub {
                        0 => format!("down_blocks_{i}_resnets_{j}_{}", resnet(&rest)),
                        _ => format!("down_blocks_{i}_attentions_{j}_{rest}"),
                    });
                }
                n += layers;
                if down {
                    if idx == n {
                        return Some(format!("down_blocks_{i}_downsamplers_0_conv"));
                    }
                    n += 1;
                }
            }
            return None;
        }
        if let Some(rest) = id.strip_prefix("middle_block_") {
            let (idx, rest) = rest.split_once('_').map(|(a, b)| (a.parse::<usize>().ok(), b.to_string()))?;
            return Some(match idx? {
                0 => format!("mid_block_resnets_0_{}", resnet(&rest)),
                1 => format!("mid_block_attentions_0_{rest}"),
                2 => format!("mid_block_resnets_1_{}", resnet(&rest)),
                _ => return None,
            });
        }
        if let Some(rest) = id.strip_prefix("output_blocks_") {
            let (idx, sub, rest) = nums(rest)?;
            let mut n = 0;
            for (i, &(layers, attn, upsampler)) in self.up.iter().enumerate() {
                if idx < n + layers {
                    let j = idx - n;
                    return Some(match (sub, attn) {
                        (0, _) => format!("up_blocks_{i}_resnets_{j}_{}", resnet(&rest)),
                        (1, true) => format!("up_blocks_{i}_attentions_{j}_{rest}"),
                        _ if upsampler && j + 1 == layers => format!("up_blocks_{i}_upsamplers_0_conv"),
                        _ => return None,
                    });
                }
                n += layers;
            }
        }
        None
    }
}

/// A LoRA file read and matched against a model.
pub struct Planned {
    pub report: Report,
    updates: Vec<(Part, String, Update)>,
}

/// Reads `path` and matches its modules to the model's weights; checks every shape.
pub fn plan(name: &str, path: &Path, scale: f64, unet: &Layout, text: &Layout) -> Result<Planned> {
    let err = |msg: String| Error::Weights { path: path.to_path_buf(), msg: format!("lora '{name}': {msg}") };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file ({e})")))?;
    let keys: Vec<String> = st.names().into_iter().map(String::from).collect();
    if let Some(why) = unsupported(&keys) {
        return Err(err(why));
    }
    let meta = safetensors::SafeTensors::read_metadata(&bytes)
        .ok()
        .and_then(|(_, m)| m.metadata().clone())
        .unwrap_or_default();
    let peft: Option<serde_json::Value> = meta.get("lora_adapter_metadata").and_then(|s| serde_json::from_str(s).ok());
    if let Some(p) = &peft {
        if ["unet.use_dora", "text_encoder.use_dora"].iter().any(|k| p.get(*k).and_then(|v| v.as_bool()) == Some(true))
        {
            return Err(err(
                "DoRA (use_dora in its metadata) is not supported; ghiblify merges LoRA and LoCon adapters".into(),
            ));
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| err(crate::error::candle_message(&e)))?;
    let mut modules: BTreeMap<ModuleId, Module> = BTreeMap::new();
    let mut unknown = Vec::new();
    for key in &keys {
        let Some((id, piece)) = split_key(key) else {
            unknown.push(key.clone());
            continue;
        };
        let t = tensors[key].to_dtype(DType::F32).map_err(|e| err(crate::error::candle_message(&e)))?;
        let m = modules.entry(id).or_default();
        match piece {
            Piece::Down => m.down = Some((key.clone(), t)),
            Piece::Up => m.up = Some((key.clone(), t)),
            Piece::Alpha => {
                m.alpha = Some(
                    t.flatten_all()
                        .and_then(|t| t.get(0))
                        .and_then(|t| t.to_scalar::<f32>())
                        .map_err(|e| err(format!("'{key}': {}", crate::error::candle_message(&e))))?
                        as f64,
                )
            }
        }
    }
    let unet_layout = UnetLayout::from(&unet.shapes);
    let kohya_index = |layout: &Layout, strip_text_model: bool| -> HashMap<String, String> {
        layout
            .shapes
            .keys()
            .filter_map(|k| k.strip_suffix(".weight").map(|m| (m, k)))
            .map(|(m, k)| {
                let m = if strip_text_model { m.strip_prefix("text_model.").unwrap_or(m) } else { m };
                (m.replace('.', "_"), k.clone())
            })
            .collect()
    };
    let unet_index = kohya_index(unet, false);
    let text_index = kohya_index(text, true);
    let mut report = Report { name: name.to_string(), ..Default::default() };
    let mut updates = Vec::new();
    let mut sdxl_hint = false;
    for (id, m) in &modules {
        let (Some((down_key, down)), Some((up_key, up))) = (&m.down, &m.up) else {
            if m.down.is_some() || m.up.is_some() {
                return Err(err(format!(
                    "module '{id}' has a lora down or up weight but not both (truncated or damaged file?)"
                )));
            }
            continue; // an alpha alone
        };
        report.modules += 1;
        let target: Option<(Part, String)> = match id {
            ModuleId::Kohya { prefix, id } => match prefix.as_str() {
                "lora_unet_" => {
                    let id = if id.starts_with("input_blocks_")
                        || id.starts_with("middle_block_")
                        || id.starts_with("output_blocks_")
                        || id.starts_with("time_embed_")
                        || id == "out_0"
                        || id == "out_2"
                    {
                        unet_layout.ldm_to_diffusers(id).unwrap_or_else(|| id.clone())
                    } else {
                        id.clone()
                    };
                    unet_index.get(&id).map(|w| (Part::Unet, w.clone()))
                }
                "lora_te2_" => {
                    sdxl_hint = true;
                    None
                }
                _ => {
                    let id = id.strip_prefix("text_model_").unwrap_or(id);
                    text_index.get(id).map(|w| (Part::TextEncoder, w.clone()))
                }
            },
            ModuleId::Dotted(path) => {
                let (part, module) = if let Some(m) = path.strip_prefix("unet.") {
                    (Some(Part::Unet), m)
                } else if let Some(m) = path.strip_prefix("text_encoder.") {
                    (Some(Part::TextEncoder), m)
                } else if path.starts_with("text_encoder_2.") {
                    sdxl_hint = true;
                    (None, path.as_str())
                } else {
                    (None, path.as_str())
                };
                let in_unet = |m: &str| {
                    unet.shapes.contains_key(&format!("{m}.weight")).then(|| (Part::Unet, format!("{m}.weight")))
                };
                let in_text = |m: &str| {
                    let m = m.strip_prefix("text_model.").unwrap_or(m);
                    [format!("text_model.{m}.weight"), format!("{m}.weight")]
                        .into_iter()
                        .find(|w| text.shapes.contains_key(w))
                        .map(|w| (Part::TextEncoder, w))
                };
                match part {
                    Some(Part::Unet) => in_unet(module),
                    Some(Part::TextEncoder) => in_text(module),
                    None => in_unet(module).or_else(|| in_text(module)),
                }
            }
        };
        let Some((part, weight)) = target else {
            report.unmatched.push(id.to_string());
            continue;
        };
        let layout = if part == Part::Unet { unet } else { text };
        let wshape = &layout.shapes[&weight];
        let (ds, us) = (down.dims().to_vec(), up.dims().to_vec());
        if ds.len() < 2 || us.len() < 2 {
            return Err(err(format!("'{down_key}' {ds:?} and '{up_key}' {us:?} are not matrices (a damaged file?)")));
        }
        let rank = ds[0];
        if rank == 0 {
            return Err(err(format!("'{down_key}' has rank 0 {ds:?}: an empty adapter (a damaged file?)")));
        }
        let shapes_fit = ds.len() >= 2
            && us.len() >= 2
            && us[1] == rank
            && us[0] == wshape[0]
            && us.iter().skip(2).all(|&d| d == 1)
            && ds[1..].iter().product::<usize>() == wshape[1..].iter().product::<usize>()
            && (ds.len() == 2 || wshape.len() == 2 || ds[2..] == wshape[2..]);
        if !shapes_fit {
            return Err(err(format!(
                "'{down_key}' {ds:?} and '{up_key}' {us:?} do not fit the model's '{weight}' {wshape:?}"
            )));
        }
        let alpha = m.alpha.or_else(|| peft_alpha(peft.as_ref(), part, id)).unwrap_or(rank as f64);
        let factor = scale * alpha / rank as f64;
        if !factor.is_finite() {
            return Err(err(format!("module '{id}' has alpha {alpha}: not a usable number")));
        }
        // Non-finite weights would turn every picture black: refuse them by name.
        for (key, t) in [(down_key, down), (up_key, up)] {
            let finite = t.abs().and_then(|a| a.sum_all()).and_then(|m| m.to_scalar::<f32>()).map(f32::is_finite);
            if !finite.unwrap_or(false) {
                return Err(err(format!("'{key}' holds NaN or infinite values")));
            }
        }
        match part {
            Part::Unet => report.unet += 1,
            Part::TextEncoder => report.text_encoder += 1,
        }
        updates.push((part, weight, Update { down: down.clone(), up: up.clone(), factor }));
    }
    report.unmatched.extend(unknown);
    if report.modules == 0 {
        return Err(err("it has no LoRA weights (no lora_down/lora_up or lora_A/lora_B keys)".into()));
    }
    if updates.is_empty() {
        let hint = if sdxl_hint || looks_sdxl(&modules) {
            "it looks like an SDXL LoRA (second text encoder / 2048-wide cross-attention keys); this model is SD1.x/2.x"
        } else {
            "its keys name none of this model's layers; is it for another model family?"
        };
        let example = report.unmatched.first().cloned().unwrap_or_default();
        return Err(err(format!("applied 0 of {} tensors: {hint} (e.g. '{example}')", report.modules)));
    }
    Ok(Planned { report, updates })
}

/// SDXL UNets have ten transformer layers in their deepest blocks and 2048-wide cross-attention.
fn looks_sdxl(modules: &BTreeMap<ModuleId, Module>) -> bool {
    modules.iter().any(|(id, m)| {
        let s = id.to_string();
        s.contains("transformer_blocks_9")
            || s.contains("transformer_blocks.9")
            || (s.contains("attn2")
                && s.contains("to_k")
                && m.down.as_ref().is_some_and(|(_, t)| t.dims().get(1) == Some(&2048)))
    })
}

/// lora_alpha from diffusers' `lora_adapter_metadata` (`unet.lora_alpha`, `unet.alpha_pattern`).
fn peft_alpha(meta: Option<&serde_json::Value>, part: Part, id: &ModuleId) -> Option<f64> {
    let meta = meta?;
    let prefix = match part {
        Part::Unet => "unet",
        Part::TextEncoder => "text_encoder",
    };
    let module = id.to_string();
    let module = module.strip_prefix(&format!("{prefix}.")).unwrap_or(&module).to_string();
    if let Some(pattern) = meta.get(format!("{prefix}.alpha_pattern")).and_then(|v| v.as_object()) {
        // peft matches a pattern key against the end of the module path.
        if let Some(v) = pattern
            .iter()
            .find(|(k, _)| module == **k || module.ends_with(&format!(".{k}")))
            .and_then(|(_, v)| v.as_f64())
        {
            return Some(v);
        }
    }
    meta.get(format!("{prefix}.lora_alpha")).and_then(|v| v.as_f64())
}

/// Every LoRA of a run, matched and ready to merge into the UNet and text encoder.
pub struct LoraSet {
    pub reports: Vec<Report>,
    pub unet: Arc<Merge>,
    pub text_encoder: Arc<Merge>,
}

impl LoraSet {
    pub fn new(planned: Vec<Planned>) -> Self {
        let mut unet = Merge::default();
        let mut text = Merge::default();
        let mut reports = Vec::new();
        for p in planned {
            reports.push(p.report);
            for (part, weight, u) in p.updates {
                let m = if part == Part::Unet { &mut unet } else { &mut text };
                m.updates.entry(weight).or_default().push(u);
            }
        }
        Self { reports, unet: Arc::new(unet), text_encoder: Arc::new(text) }
    }

    pub fn merge_for(&self, part: Part) -> Option<Arc<Merge>> {
        let m = match part {
            Part::Unet => &self.unet,
            Part::TextEncoder => &self.text_encoder,
        };
        (!m.is_empty()).then(|| m.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_paths_scales_and_hub_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("style.safetensors");
        std::fs::write(&f, b"x").unwrap();
        let s = LoraSpec::parse(&format!("{}:0.7", f.display())).unwrap();
        assert_eq!(s, LoraSpec { source: LoraSource::File(f.clone()), scale: 0.7 });
        assert_eq!(LoraSpec::parse(f.to_str().unwrap()).unwrap().scale, 1.0);
        assert_eq!(s.name(), "style");
        let h = LoraSpec::parse("latent-consistency/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors:0.5").unwrap();
        assert_eq!(
            h.source,
            LoraSource::Hub {
                repo: "latent-consistency/lcm-lora-sdv1-5".into(),
                file: "pytorch_lora_weights.safetensors".into(),
                revision: None,
                pinned: false,
            }
        );
        assert_eq!(h.scale, 0.5);
        assert!(LoraSpec::parse("missing.safetensors").unwrap_err().to_string().contains("'missing.safetensors'"));
        assert!(LoraSpec::parse(&format!("{}:99", f.display())).unwrap_err().to_string().contains("scale"));
    }

    #[test]
    fn key_forms_split_into_module_and_piece() {
        let dotted = |k: &str| match split_key(k) {
            Some((ModuleId::Dotted(m), _)) => m,
            other => panic!("{k}: {:?}", other.map(|o| o.0)),
        };
        assert_eq!(
            dotted("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"),
            "unet.down_blocks.0.attentions.0.proj_in"
        );
        assert_eq!(
            dotted("unet.mid_block.attentions.0.proj_in.lora_B.default.weight"),
            "unet.mid_block.attentions.0.proj_in"
        );
        assert_eq!(
            dotted("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight"),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
        );
        assert_eq!(
            dotted("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.up.weight"),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        );
        assert!(matches!(
            split_key("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"),
            Some((ModuleId::Kohya { .. }, Piece::Alpha))
        ));
        assert!(split_key("lora_unet_x.hada_w1_a").is_none());
    }

    #[test]
    fn ldm_names_map_to_diffusers_for_the_sd15_layout() {
        let mut shapes = HashMap::new();
        for i in 0..4 {
            for j in 0..2 {
                shapes.insert(format!("down_blocks.{i}.resnets.{j}.conv1.weight"), vec![1]);
                if i < 3 {
                    shapes.insert(format!("down_blocks.{i}.attentions.{j}.proj_in.weight"), vec![1]);
                }
            }
            if i < 3 {
                shapes.insert(format!("down_blocks.{i}.downsamplers.0.conv.weight"), vec![1]);
            }
            for j in 0..3 {
                shapes.insert(format!("up_blocks.{i}.resnets.{j}.conv1.weight"), vec![1]);
                if i > 0 {
                    shapes.insert(format!("up_blocks.{i}.attentions.{j}.proj_in.weight"), vec![1]);
                }
            }
            if i < 3 {
                shapes.insert(format!("up_blocks.{i}.upsamplers.0.conv.weight"), vec![1]);
            }
        }
        let l = UnetLayout::from(&shapes);
        let m = |s: &str| l.ldm_to_diffusers(s).unwrap();
        // The SD1.5 table (diffusers' convert_original_stable_diffusion_to_diffusers).
        assert_eq!(
            m("input_blocks_1_1_transformer_blocks_0_attn2_to_k"),
            "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        );
        assert_eq!(m("input_blocks_3_0_op"), "down_blocks_0_downsamplers_0_conv");
        assert_eq!(m("input_blocks_8_1_proj_in"), "down_blocks_2_attentions_1_proj_in");
        assert_eq!(m("input_blocks_11_0_in_layers_2"), "down_blocks_3_resnets_1_conv1");
        assert_eq!(m("middle_block_1_proj_out"), "mid_block_attentions_0_proj_out");
        assert_eq!(m("middle_block_2_emb_layers_1"), "mid_block_resnets_1_time_emb_proj");
        assert_eq!(m("output_blocks_2_1_conv"), "up_blocks_0_upsamplers_0_conv");
        assert_eq!(m("output_blocks_5_2_conv"), "up_blocks_1_upsamplers_0_conv");
        assert_eq!(m("output_blocks_5_1_proj_in"), "up_blocks_1_attentions_2_proj_in");
        assert_eq!(m("output_blocks_11_0_skip_connection"), "up_blocks_3_resnets_2_conv_shortcut");
        assert_eq!(m("time_embed_2"), "time_embedding_linear_2");
    }
}
