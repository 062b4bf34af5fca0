//! Command-line arguments → validated settings (ripgrep's LowArgs → HiArgs): every check on
//! user input lives here and fails with a one-line message naming the flag and the value.

use crate::cli::{Args, DTypeArg, DeviceArg, FormatArg};
use crate::error::{Error, Result};
use crate::hub::PresetDefaults;
use crate::image_io::OutputFormat;
use crate::printer::Verbosity;
use crate::samplers::SamplerKind;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Dir(PathBuf),
    Hub {
        repo_id: String,
        revision: Option<String>,
        /// A preset's exact file list; `None`: picked from the repo's listing.
        files: Option<Vec<String>>,
        /// The `--model` value (or the default preset's name), for messages.
        cli: String,
        /// A preset's licence.
        license: Option<String>,
        /// A preset's LoRAs (`--lora` specs).
        preset_loras: Vec<String>,
    },
}

/// One photo to one file, or a batch into a folder.
#[derive(Debug, Clone)]
pub enum Mode {
    Single {
        input: PathBuf,
        output: PathBuf,
    },
    Batch(Batch),
    /// `--download-only`: fetch the model into the cache.
    DownloadOnly,
    /// `--list-models`.
    ListModels,
}

#[derive(Debug, Clone)]
pub struct Batch {
    pub inputs: Vec<PathBuf>,
    pub out_dir: PathBuf,
    pub format: OutputFormat,
    pub recursive: bool,
    pub overwrite: bool,
    pub shard: Option<(usize, usize)>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub report: Option<PathBuf>,
    pub metadata: bool,
    pub prompt: String,
    pub negative_prompt: String,
    pub strength: f64,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub seed_was_given: bool,
    pub sampler: SamplerKind,
    pub karras: bool,
    pub size: Option<u32>,
    pub model: ModelSource,
    pub device: DeviceArg,
    pub dtype: Option<DType>,
    /// `--threads`: CPU worker threads (None: rayon's default, all cores or RAYON_NUM_THREADS).
    pub threads: Option<usize>,
    pub trace: Option<PathBuf>,
    pub verbosity: Verbosity,
    pub offline: bool,
    /// LoRAs to merge: the preset's, then `--fast`'s, then `--lora`'s.
    pub loras: Vec<crate::lora::LoraSpec>,
    /// `--vae`: another autoencoder.
    pub vae: Option<VaeSource>,
    pub vae_tiling: crate::cli::TilingArg,
    /// `--fast` was given.
    pub fast: bool,
    /// `--preview FILE`: the picture so far after each step.
    pub preview: Option<PathBuf>,
}

/// Where a replacement VAE comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaeSource {
    Dir(PathBuf),
    Hub { repo_id: String, revision: Option<String> },
}

/// The TAESD weights `--vae taesd` fetches.
pub const TAESD_REPO: &str = "madebyollin/taesd";

/// Working sizes (long side, pixels) above which `--vae-tiling auto` tiles the KL VAE.
pub const AUTO_TILING_ABOVE: u32 = 1024;

impl Settings {
    /// Whether this working size is encoded/decoded in tiles.
    pub fn vae_tiling_for(&self, w: u32, h: u32) -> bool {
        match self.vae_tiling {
            crate::cli::TilingArg::On => true,
            crate::cli::TilingArg::Off => false,
            crate::cli::TilingArg::Auto => w.max(h) > AUTO_TILING_ABOVE,
        }
    }
}

fn vae_source(v: &str) -> Result<VaeSource> {
    if v == "taesd" {
        return Ok(VaeSource::Hub { repo_id: TAESD_REPO.into(), revision: None });
    }
    let p = Path::new(v);
    if p.is_dir() {
        return Ok(VaeSource::Dir(p.to_path_buf()));
    }
    let (repo, rev) = match v.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
        _ => (v, None),
    };
    if repo.split('/').count() == 2 && !repo.split('/').any(str::is_empty) && !p.exists() {
        return Ok(VaeSource::Hub { repo_id: repo.to_string(), revision: rev });
    }
    Err(arg(format!("--vae '{v}': not a folder, a hub repo id (owner/name), 'taesd' or 'model'")))
}

/// The LCM-LoRA for SD1.5 that `--fast` merges, and the settings it is distilled for.
pub const FAST_LORA: &str = "latent-consistency/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors";

fn arg(msg: String) -> Error {
    Error::Argument(msg)
}

/// The canonical form of a path that may not exist yet (its folder must).
fn canonical_target(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(p.file_name()?))
}

/// `--model-dir DIR`, `--model NAME|REPO_ID[@REVISION]`, or the default preset; with the
/// generation defaults that go with it (a preset's own, else the default preset's).
fn model_source(model_dir: Option<PathBuf>, model: Option<String>) -> Result<(ModelSource, PresetDefaults)> {
    let fallback = crate::hub::default_preset().defaults;
    let from_preset = |p: crate::hub::Preset, revision: Option<String>| {
        let source = ModelSource::Hub {
            repo_id: p.repo.clone(),
            revision: revision.or(p.revision.clone()),
            files: Some(p.files.clone()),
            cli: p.name.clone(),
            license: Some(p.license.clone()),
            preset_loras: p.loras.clone(),
        };
        (source, p.defaults)
    };
    match (model_dir, model) {
        (Some(d), _) => {
            if !d.is_dir() {
                return Err(arg(format!("--model-dir '{}': no such folder", d.display())));
            }
            Ok((ModelSource::Dir(d), fallback))
        }
        (None, Some(m)) => {
            let (name, rev) = match m.split_once('@') {
                Some((r, v)) if !v.is_empty() => (r.to_string(), Some(v.to_string())),
                Some(_) => return Err(arg(format!("--model '{m}': empty revision after '@'"))),
                None => (m.clone(), None),
            };
            if !name.contains('/') {
                let p = crate::hub::preset(&name).ok_or_else(|| {
                    let names: Vec<String> = crate::hub::presets().into_iter().map(|p| p.name).collect();
                    arg(format!(
                        "--model '{m}': no such preset (presets: {}; or give a hub repo id 'owner/name')",
                        names.join(", ")
                    ))
                })?;
                return Ok(from_preset(p, rev));
            }
            if name.split('/').count() != 2 || name.split('/').any(str::is_empty) {
                return Err(arg(format!(
                    "--model '{m}': expected a preset name or a hub repo id like 'owner/name[@revision]'"
                )));
            }
            // A preset's repo named by id still gets the preset's exact files and licence.
            if let Some(p) = crate::hub::presets().into_iter().find(|p| p.repo == name) {
                let (mut source, d) = from_preset(p, rev);
                if let ModelSource::Hub { cli, .. } = &mut source {
                    *cli = m.clone();
                }
                return Ok((source, d));
            }
            Ok((
                ModelSource::Hub {
                    repo_id: name,
                    revision: rev,
                    files: None,
                    cli: m,
                    license: None,
                    preset_loras: Vec::new(),
                },
                fallback,
            ))
        }
        (None, None) => Ok(from_preset(crate::hub::default_preset(), None)),
    }
}

/// Whether two paths (the second may not exist yet) name the same file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (canonical_target(a), canonical_target(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

impl Settings {
    pub fn from_args(a: Args) -> Result<Self> {
        let (model, defaults) = model_source(a.model_dir.clone(), a.model.clone())?;
        let mode = if a.list_models {
            Mode::ListModels
        } else if a.download_only {
            if matches!(model, ModelSource::Dir(_)) {
                return Err(arg("--download-only fetches hub models; --model-dir is already local".into()));
            }
            Mode::DownloadOnly
        } else {
            Self::convert_mode(&a)?
        };
        Self::finish(a, mode, model, defaults)
    }

    fn convert_mode(a: &Args) -> Result<Mode> {
        let output = a.output.clone().ok_or_else(|| arg("-o is required".into()))?;
        let single = a.inputs.len() == 1
            && a.inputs[0].as_os_str() != "-"
            && !a.inputs[0].is_dir()
            && !output.is_dir()
            && OutputFormat::from_path(&output).is_some();
        let mode = if single {
            let input = a.inputs[0].clone();
            if !input.exists() {
                return Err(arg(format!("input '{}': no such file", input.display())));
            }
            if !input.is_file() {
                return Err(arg(format!("input '{}': not a file", input.display())));
            }
            let out_dir = match output.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !out_dir.is_dir() {
                return Err(arg(format!("-o '{}': folder '{}' does not exist", output.display(), out_dir.display())));
            }
            if same_file(&output, &input) {
                return Err(arg(format!("-o '{}' is the input file; refusing to overwrite it", output.display())));
            }
            if let Some(t) = &a.trace {
                if same_file(t, &input) {
                    return Err(arg(format!("--trace '{}' is the input file", t.display())));
                }
            }
            Mode::Single { input, output: output.clone() }
        } else {
            if a.inputs.len() == 1 && !a.inputs[0].exists() && a.inputs[0].as_os_str() != "-" {
                return Err(arg(format!("input '{}': no such file", a.inputs[0].display())));
            }
            if a.inputs.len() == 1 && a.inputs[0].is_file() && !output.is_dir() {
                return Err(arg(format!(
                    "-o '{}': unknown output extension (use .png, .jpg, .jpeg or .webp, or an existing folder)",
                    output.display()
                )));
            }
            if output.exists() && !output.is_dir() {
                return Err(arg(format!(
                    "-o '{}': several inputs need an output folder, and this is a file",
                    output.display()
                )));
            }
            if a.trace.is_some() {
                return Err(arg("--trace works with one input file and one output file".into()));
            }
            for i in &a.inputs {
                if i.as_os_str() != "-" && !i.exists() {
                    return Err(arg(format!("input '{}': no such file or folder", i.display())));
                }
            }
            Mode::Batch(Batch {
                inputs: a.inputs.clone(),
                out_dir: output.clone(),
                format: match a.format {
                    FormatArg::Png => OutputFormat::Png,
                    FormatArg::Jpg => OutputFormat::Jpeg,
                    FormatArg::Webp => OutputFormat::WebP,
                },
                recursive: !a.no_recursive,
                overwrite: a.overwrite,
                shard: a.shard.as_deref().map(crate::batch::parse_shard).transpose()?,
            })
        };
        Ok(mode)
    }

    fn finish(a: Args, mode: Mode, model: ModelSource, mut d: PresetDefaults) -> Result<Self> {
        if let Some(p) = &a.preview {
            if OutputFormat::from_path(p) != Some(OutputFormat::Png) {
                return Err(arg(format!("--preview '{}': the preview is written as PNG; name it .png", p.display())));
            }
            if a.inputs.iter().any(|i| same_file(i, p)) {
                return Err(arg(format!("--preview '{}' is an input file", p.display())));
            }
        }
        let mut loras = Vec::new();
        if let ModelSource::Hub { preset_loras, .. } = &model {
            for l in preset_loras {
                loras.push(crate::lora::LoraSpec::parse(l)?);
            }
        }
        if a.fast {
            // LCM-LoRA's recommended settings (its model card): 4-8 steps, guidance 1-2.
            d.sampler = "lcm".into();
            d.steps = 8;
            d.guidance = 1.0;
            d.karras = false;
            loras.push(crate::lora::LoraSpec::parse(FAST_LORA)?);
        }
        for l in &a.lora {
            loras.push(crate::lora::LoraSpec::parse(l)?);
        }
        if let Some(r) = &a.report {
            if a.inputs.iter().any(|i| same_file(i, r)) {
                return Err(arg(format!("--report '{}' is an input file", r.display())));
            }
        }
        let strength = a.strength.unwrap_or(d.strength);
        if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
            return Err(arg(format!("--strength must be within [0.0, 1.0], got {strength}")));
        }
        let steps = a.steps.unwrap_or(d.steps);
        if steps == 0 {
            return Err(arg("--steps must be at least 1, got 0".into()));
        }
        let guidance = a.guidance.unwrap_or(d.guidance);
        if !guidance.is_finite() || guidance < 0.0 {
            return Err(arg(format!("--guidance must be a finite number >= 0, got {guidance}")));
        }
        let kind = match a.sampler {
            Some(s) => SamplerKind::from(s),
            None => d.sampler.parse::<SamplerKind>()?,
        };
        let karras = a.karras || (a.sampler.is_none() && d.karras);
        if karras && !kind.supports_karras() {
            return Err(arg(format!(
                "--karras: the {} sampler has no Karras sigmas (use euler, heun, dpmpp-2m, dpmpp-2m-sde or unipc)",
                kind.name()
            )));
        }
        if let Some(s) = a.size {
            if !(64..=8192).contains(&s) {
                return Err(arg(format!("--size must be within [64, 8192], got {s}")));
            }
        }
        let dtype = a.dtype.map(|d| match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        });
        let (seed, seed_was_given) = match a.seed {
            Some(s) => (s, true),
            None => (rand::random::<u32>() as u64, false),
        };
        let verbosity = if a.quiet {
            Verbosity::Quiet
        } else if a.verbose {
            Verbosity::Verbose
        } else {
            Verbosity::Normal
        };
        Ok(Self {
            mode,
            report: a.report,
            metadata: !a.no_metadata,
            prompt: a.prompt.unwrap_or(d.prompt),
            negative_prompt: a.negative_prompt.unwrap_or(d.negative_prompt),
            strength,
            steps,
            guidance,
            seed,
            seed_was_given,
            sampler: kind,
            karras,
            size: a.size,
            model,
            device: a.device,
            dtype,
            threads: a.threads.map(usize::from),
            trace: a.trace,
            verbosity,
            offline: a.offline,
            loras,
            // --fast takes TAESD unless --vae says otherwise (`--vae model` keeps the model's own).
            vae: match a.vae.as_deref() {
                Some("model") => None,
                Some(v) => Some(vae_source(v)?),
                None if a.fast => Some(VaeSource::Hub { repo_id: TAESD_REPO.into(), revision: None }),
                None => None,
            },
            vae_tiling: a.vae_tiling,
            fast: a.fast,
            preview: a.preview,
        })
    }

    /// The compute device: `auto` takes CUDA, then Metal, when compiled in and present.
    pub fn resolve_device(&self) -> Result<Device> {
        let unavailable = |name: &str, feature: &str| {
            arg(format!("--device {name}: this build has no {name} support (rebuild with --features {feature})"))
        };
        match self.device {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(unavailable("cuda", "cuda"));
                }
                Device::new_cuda(0).map_err(|e| arg(format!("--device cuda: {e}")))
            }
            DeviceArg::Metal => {
                if !candle_core::utils::metal_is_available() {
                    return Err(unavailable("metal", "metal"));
                }
                Device::new_metal(0).map_err(|e| arg(format!("--device metal: {e}")))
            }
            DeviceArg::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                if candle_core::utils::metal_is_available() {
                    if let Ok(d) = Device::new_metal(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }

    /// The weights' dtype: f32 by default on the CPU, f16 on GPUs. On the CPU f16/bf16 is a storage
    /// format (half the memory); the arithmetic stays f32 (see `StableDiffusion::load_with`).
    pub fn resolve_dtype(&self, device: &Device) -> Result<DType> {
        match (self.dtype, device.is_cpu()) {
            (Some(d), _) => Ok(d),
            (None, true) => Ok(DType::F32),
            (None, false) => Ok(DType::F16),
        }
    }
}
