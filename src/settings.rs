//! Validated settings, built from small parts, each with its own constructor from the raw values of
//! the command line (ripgrep's LowArgs → HiArgs): what to convert ([`Mode`]), how
//! ([`Img2ImgParams`], the pipeline's own type), with which model ([`ModelChoice`]) and what else to
//! write ([`Outputs`]). Every check on user input lives here or in the part it builds, and fails
//! with a one-line message naming the value; no command-line parser type appears in any of them.

use crate::device::DevicePreference;
use crate::error::{Error, Result};
use crate::image_io::OutputFormat;
use crate::lora::LoraSpec;
use crate::pipeline::{Img2ImgParams, VaeTiling};
use crate::presets::{self, Preset, PresetDefaults};
use crate::printer::Verbosity;
use crate::repo::RepoRef;
use crate::samplers::SamplerKind;
use candle_core::DType;
use std::path::{Path, PathBuf};

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Dir(PathBuf),
    /// A single-file checkpoint (`--model-file`): `.safetensors` or `.ckpt` in the LDM layout.
    File(PathBuf),
    /// A single-file checkpoint in a hub repo (`--model OWNER/REPO/FILE.ckpt`, or a preset's).
    HubFile {
        repo: RepoRef,
        file: String,
        /// The `--model` value, for messages.
        cli: String,
        license: Option<String>,
        /// The revision is a preset's pin: if the hub lacks it, `main` with a warning.
        pinned: bool,
    },
    Hub {
        repo: RepoRef,
        /// A preset's exact file list; `None`: picked from the repo's listing.
        files: Option<Vec<String>>,
        /// The `--model` value (or the default preset's name), for messages.
        cli: String,
        /// A preset's licence.
        license: Option<String>,
        /// The revision is the preset's pin (not one the user gave): if the hub lacks that
        /// commit, `main` is used with a warning.
        pinned: bool,
    },
}

/// Where a replacement VAE comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaeSource {
    Dir(PathBuf),
    Hub(RepoRef),
}

/// The TAESD weights `--vae taesd` fetches.
pub const TAESD_REPO: &str = "madebyollin/taesd";

/// The LCM-LoRA for SD1.5 that fast mode merges, pinned to the commit it was verified at (if the
/// hub lacks it, `main` with a warning).
pub const FAST_LORA: &str =
    "latent-consistency/lcm-lora-sdv1-5/pytorch_lora_weights.safetensors@cf2fced511dbe7e26c8d1d397e728fbab875db4b";

/// Fast mode's LoRA spec, its revision marked as ghiblify's pin.
pub fn fast_lora() -> Result<LoraSpec> {
    let mut spec = LoraSpec::parse(FAST_LORA)?;
    if let crate::lora::LoraSource::Hub { pinned, .. } = &mut spec.source {
        *pinned = true;
    }
    Ok(spec)
}

impl VaeSource {
    pub fn taesd() -> Self {
        VaeSource::Hub(RepoRef { id: TAESD_REPO.into(), revision: None })
    }

    /// A folder, a hub repo `owner/name[@revision]`, or `taesd`.
    pub fn parse(v: &str) -> Result<Self> {
        if v == "taesd" {
            return Ok(Self::taesd());
        }
        let p = Path::new(v);
        if p.is_dir() {
            return Ok(VaeSource::Dir(p.to_path_buf()));
        }
        if RepoRef::looks_like(v) && !p.exists() {
            return RepoRef::parse(v).map(VaeSource::Hub).map_err(|why| Error::setting("vae", format!("'{v}': {why}")));
        }
        Err(Error::setting("vae", format!("'{v}' is not a folder, a hub repo id (owner/name), 'taesd' or 'model'")))
    }

    /// The name the provenance gives it: the repo id, or the folder's name (never a local path).
    pub fn name(&self) -> String {
        match self {
            VaeSource::Dir(d) => d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            VaeSource::Hub(r) => r.id.clone(),
        }
    }
}

/// The model, where it runs, and what is merged into or swapped in it.
#[derive(Debug, Clone)]
pub struct ModelChoice {
    pub source: ModelSource,
    pub device: DevicePreference,
    /// The weights' dtype (`None`: f32 on the CPU, f16 on GPUs).
    pub dtype: Option<DType>,
    /// `--dtype q8`: the UNet's, text encoder's and ControlNets' convolutions and linear layers
    /// quantised to int8 per output channel as they load (the rest in `dtype`).
    pub quantize: bool,
    /// LoRAs to merge: the preset's, then fast mode's, then the user's.
    pub loras: Vec<LoraSpec>,
    /// Another autoencoder.
    pub vae: Option<VaeSource>,
    /// Use only the local cache.
    pub offline: bool,
    /// `--prediction`: what a single-file model predicts (its file cannot say).
    pub prediction: Option<crate::models::single_file::Prediction>,
}

impl ModelChoice {
    /// `--model-dir DIR`, `--model NAME|REPO_ID[@REVISION]`, or the default preset; with the
    /// generation defaults that go with it (a preset's own, else the default preset's).
    pub fn new(
        model_dir: Option<PathBuf>,
        model_file: Option<PathBuf>,
        model: Option<&str>,
        device: DevicePreference,
        dtype: Option<DType>,
        offline: bool,
    ) -> Result<(Self, PresetDefaults)> {
        let (source, defaults, preset_loras) = match model_file {
            Some(f) => {
                if !f.is_file() {
                    return Err(Error::setting("model_file", format!("'{}': no such file", f.display())));
                }
                (ModelSource::File(f), presets::default_preset().defaults, Vec::new())
            }
            None => model_source(model_dir, model)?,
        };
        let loras = preset_loras.iter().map(|l| LoraSpec::parse(l)).collect::<Result<_>>()?;
        Ok((Self { source, device, dtype, quantize: false, loras, vae: None, offline, prediction: None }, defaults))
    }

    /// Whether the model is one file in the LDM layout (`--prediction` applies).
    pub fn is_single_file(&self) -> bool {
        matches!(self.source, ModelSource::File(_) | ModelSource::HubFile { .. })
    }

    /// The name outputs and messages give the model: the repo id (with `@revision` when pinned) or
    /// the folder.
    pub fn name(&self) -> String {
        match &self.source {
            ModelSource::Dir(d) | ModelSource::File(d) => d.display().to_string(),
            ModelSource::Hub { repo, .. } => repo.to_string(),
            ModelSource::HubFile { repo, file, .. } => {
                format!("{}/{file}{}", repo.id, repo.revision.as_ref().map(|r| format!("@{r}")).unwrap_or_default())
            }
        }
    }

    /// The name pictures and reports carry: the repo id, or only the folder's own name — a local
    /// path (`/home/<user>/...`) in every shared picture would be a privacy leak.
    pub fn public_name(&self) -> String {
        match &self.source {
            ModelSource::Dir(d) | ModelSource::File(d) => {
                let d = d.canonicalize().unwrap_or_else(|_| d.clone());
                d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "local model".into())
            }
            ModelSource::Hub { repo, .. } => repo.to_string(),
            ModelSource::HubFile { .. } => self.name(),
        }
    }
}

/// A preset by its name reads its single file when it has one; by its repo id, the folders.
fn from_preset(
    p: Preset,
    revision: Option<String>,
    cli: String,
    by_name: bool,
) -> (ModelSource, PresetDefaults, Vec<String>) {
    let pinned = revision.is_none() && p.revision.is_some();
    let repo = RepoRef { id: p.repo.clone(), revision: revision.or(p.revision.clone()) };
    let license = Some(p.license.clone());
    let source = match p.single_file {
        Some(file) if by_name => ModelSource::HubFile { repo, file, cli, license, pinned },
        _ => ModelSource::Hub { repo, files: Some(p.files.clone()), cli, license, pinned },
    };
    (source, p.defaults, p.loras)
}

fn model_source(model_dir: Option<PathBuf>, model: Option<&str>) -> Result<(ModelSource, PresetDefaults, Vec<String>)> {
    let fallback = presets::default_preset().defaults;
    match (model_dir, model) {
        (Some(d), _) => {
            if !d.is_dir() {
                return Err(Error::setting("model_dir", format!("'{}': no such folder", d.display())));
            }
            Ok((ModelSource::Dir(d), fallback, Vec::new()))
        }
        (None, Some(m)) => {
            let bad = |why: String| Error::setting("model", format!("'{m}': {why}"));
            let (name, rev) = match m.split_once('@') {
                Some((_, "")) => return Err(bad("empty revision after '@'".into())),
                Some((r, v)) => (r, Some(v.to_string())),
                None => (m, None),
            };
            if let Some(r) = &rev {
                crate::repo::check_revision(r).map_err(bad)?;
            }
            if let Some(single) = hub_file(m)? {
                return Ok((single, fallback, Vec::new()));
            }
            if !name.contains('/') {
                let p = presets::preset(name).ok_or_else(|| {
                    let names: Vec<String> = presets::presets().into_iter().map(|p| p.name).collect();
                    bad(format!("no such preset (presets: {}; or give a hub repo id 'owner/name')", names.join(", ")))
                })?;
                return Ok(from_preset(p, rev, m.to_string(), true));
            }
            let repo = RepoRef::parse(m)
                .map_err(|why| bad(format!("{why}; expected a preset name or 'owner/name[@revision]'")))?;
            // A preset's repo named by id still gets the preset's exact files and licence.
            if let Some(p) = presets::presets().into_iter().find(|p| p.repo == repo.id) {
                return Ok(from_preset(p, repo.revision, m.to_string(), false));
            }
            Ok((
                ModelSource::Hub { repo, files: None, cli: m.to_string(), license: None, pinned: false },
                fallback,
                Vec::new(),
            ))
        }
        (None, None) => {
            let p = presets::default_preset();
            let name = p.name.clone();
            Ok(from_preset(p, None, name, true))
        }
    }
}

/// `OWNER/REPO/PATH/FILE.safetensors|.ckpt[@REVISION]`: a single-file checkpoint in a hub repo.
fn hub_file(m: &str) -> Result<Option<ModelSource>> {
    let (target, rev) = match m.split_once('@') {
        Some((t, r)) => (t, Some(r.to_string())),
        None => (m, None),
    };
    let parts: Vec<&str> = target.splitn(3, '/').collect();
    if parts.len() != 3 || !(target.ends_with(".safetensors") || target.ends_with(".ckpt")) {
        return Ok(None);
    }
    let bad = |why: String| Error::setting("model", format!("'{m}': {why}"));
    let repo = RepoRef::parse(&format!(
        "{}/{}{}",
        parts[0],
        parts[1],
        rev.as_ref().map(|r| format!("@{r}")).unwrap_or_default()
    ))
    .map_err(bad)?;
    crate::repo::check_file_path(parts[2]).map_err(bad)?;
    // A preset's repo keeps its licence.
    let license = presets::presets().into_iter().find(|p| p.repo == repo.id).map(|p| p.license);
    Ok(Some(ModelSource::HubFile { repo, file: parts[2].to_string(), cli: m.to_string(), license, pinned: false }))
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

/// How a batch runs (ignored for one photo).
#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub format: OutputFormat,
    pub recursive: bool,
    pub overwrite: bool,
    pub shard: Option<String>,
}

impl Mode {
    /// One input file and an output with an image extension is a single conversion; several inputs,
    /// a folder or `-` (paths on stdin) is a batch into the output folder.
    pub fn convert(inputs: &[PathBuf], output: Option<&Path>, batch: BatchOptions) -> Result<Mode> {
        let output = output.ok_or_else(|| Error::usage("-o is required"))?.to_path_buf();
        let single = inputs.len() == 1
            && inputs[0].as_os_str() != "-"
            && !inputs[0].is_dir()
            && !output.is_dir()
            && OutputFormat::from_path(&output).is_some();
        if single {
            let input = inputs[0].clone();
            if !input.exists() {
                return Err(Error::usage(format!("input '{}': no such file", input.display())));
            }
            if !input.is_file() {
                return Err(Error::usage(format!("input '{}': not a file", input.display())));
            }
            let out_dir = match output.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !out_dir.is_dir() {
                return Err(Error::usage(format!(
                    "-o '{}': folder '{}' does not exist",
                    output.display(),
                    out_dir.display()
                )));
            }
            return Ok(Mode::Single { input, output });
        }
        if inputs.len() == 1 && !inputs[0].exists() && inputs[0].as_os_str() != "-" {
            return Err(Error::usage(format!("input '{}': no such file", inputs[0].display())));
        }
        if inputs.len() == 1 && inputs[0].is_file() && !output.is_dir() {
            return Err(Error::usage(format!(
                "-o '{}': unknown output extension (use .png, .jpg, .jpeg or .webp, or an existing folder)",
                output.display()
            )));
        }
        if !output.exists() && OutputFormat::from_path(&output).is_some() {
            // `ghiblify photos/ -o e.png` would make a folder called e.png.
            return Err(Error::usage(format!(
                "-o '{}': these inputs need an output folder, and this names a picture; give a folder (it is created if needed)",
                output.display()
            )));
        }
        if output.exists() && !output.is_dir() {
            return Err(Error::usage(format!(
                "-o '{}': several inputs need an output folder, and this is a file",
                output.display()
            )));
        }
        for i in inputs {
            if i.as_os_str() != "-" && !i.exists() {
                return Err(Error::usage(format!("input '{}': no such file or folder", i.display())));
            }
        }
        Ok(Mode::Batch(Batch {
            inputs: inputs.to_vec(),
            out_dir: output,
            format: batch.format,
            recursive: batch.recursive,
            overwrite: batch.overwrite,
            shard: batch.shard.as_deref().map(crate::batch::parse_shard).transpose()?,
        }))
    }

    /// The files given on the command line (for the checks on other outputs).
    pub fn inputs(&self) -> Vec<&Path> {
        match self {
            Mode::Single { input, .. } => vec![input.as_path()],
            Mode::Batch(b) => b.inputs.iter().map(PathBuf::as_path).collect(),
            Mode::DownloadOnly | Mode::ListModels => Vec::new(),
        }
    }
}

/// How pictures are signed with C2PA Content Credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum C2pa {
    #[default]
    Off,
    /// The per-user key and certificate, made on first use.
    PerUser,
    /// `--c2pa-cert`, `--c2pa-key`.
    Files { cert: PathBuf, key: PathBuf },
}

/// What a run writes besides its pictures, and what the pictures carry.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    /// Provenance metadata in every picture.
    pub metadata: bool,
    /// The invisible watermark in every picture large enough for its decoder.
    pub watermark: bool,
    /// C2PA Content Credentials.
    pub c2pa: C2pa,
    /// `--report FILE.jsonl`.
    pub report: Option<PathBuf>,
    /// `--trace FILE`: the run's intermediates (one input only).
    pub trace: Option<PathBuf>,
    /// `--preview FILE.png`: the picture so far after each step.
    pub preview: Option<PathBuf>,
}

impl Outputs {
    pub fn new(
        mode: &Mode,
        metadata: bool,
        report: Option<PathBuf>,
        trace: Option<PathBuf>,
        preview: Option<PathBuf>,
    ) -> Result<Self> {
        // Whether these overwrite an input or each other is the run's guard's to check
        // (`crate::guard`), once the inputs inside folders are known.
        if trace.is_some() && matches!(mode, Mode::Batch(_)) {
            return Err(Error::usage("--trace works with one input file and one output file"));
        }
        if let Some(p) = &preview {
            if OutputFormat::from_path(p) != Some(OutputFormat::Png) {
                return Err(Error::usage(format!(
                    "--preview '{}': the preview is written as PNG; name it .png",
                    p.display()
                )));
            }
        }
        Ok(Self { metadata, report, trace, preview, watermark: false, c2pa: C2pa::Off })
    }
}

/// Everything a run needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    /// What each picture computes (prompt, strength, steps, sampler, ...).
    pub generation: Img2ImgParams,
    pub seed: u64,
    pub seed_was_given: bool,
    /// `--size`: the long side of the working size (`None`: the model's native size).
    pub size: Option<u32>,
    pub model: ModelChoice,
    pub outputs: Outputs,
    /// CPU worker threads (`None`: rayon's default, all cores or RAYON_NUM_THREADS).
    pub threads: Option<usize>,
    pub verbosity: Verbosity,
    /// Fast mode (LCM-LoRA, the lcm sampler, TAESD).
    pub fast: bool,
    /// `--noise-from`: a trace file whose recorded draws replace the seeded noise.
    pub noise_from: Option<PathBuf>,
    /// ControlNets and their window (`--control`, `--controlnet`).
    pub controls: crate::control::Controls,
}

/// `--noise-from`: one input only, and an existing file.
pub fn check_noise_from(mode: &Mode, path: Option<PathBuf>) -> Result<Option<PathBuf>> {
    let Some(p) = path else { return Ok(None) };
    if !matches!(mode, Mode::Single { .. }) {
        return Err(Error::usage("--noise-from works with one input file and one output file"));
    }
    if !p.is_file() {
        return Err(Error::usage(format!("--noise-from '{}': no such file", p.display())));
    }
    Ok(Some(p))
}

/// The generation values as given (each `None` takes the preset's default).
#[derive(Debug, Clone, Default)]
pub struct GenerationArgs {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub strength: Option<f64>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub sampler: Option<SamplerKind>,
    pub karras: bool,
    pub vae_tiling: VaeTiling,
}

impl GenerationArgs {
    /// The pipeline's parameters: each value given, else the preset's default, checked.
    pub fn resolve(self, d: &PresetDefaults) -> Result<Img2ImgParams> {
        let strength = self.strength.unwrap_or(d.strength);
        if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
            return Err(Error::setting("strength", format!("must be within [0.0, 1.0], got {strength:?}")));
        }
        let steps = self.steps.unwrap_or(d.steps);
        if steps == 0 {
            return Err(Error::setting("steps", "must be at least 1, got 0"));
        }
        if (steps as f64 * strength) as usize == 0 {
            return Err(Error::usage(format!(
                "--strength {strength} with --steps {steps} leaves no denoising step (int(steps x strength) = 0); \
                 raise --strength or --steps"
            )));
        }
        let guidance = self.guidance.unwrap_or(d.guidance);
        if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
            return Err(Error::setting("guidance", format!("must be within [0, 100], got {guidance:?}")));
        }
        let sampler = match self.sampler {
            Some(s) => s,
            None => d.sampler.parse::<SamplerKind>()?,
        };
        let karras = self.karras || (self.sampler.is_none() && d.karras);
        if karras && !sampler.supports_karras() {
            let with: Vec<&str> = SamplerKind::all().filter(|k| k.supports_karras()).map(|k| k.name()).collect();
            return Err(Error::setting(
                "karras",
                format!("is not available for the {sampler} sampler (use one of {})", with.join(", ")),
            ));
        }
        Ok(Img2ImgParams {
            prompt: self.prompt.unwrap_or_else(|| d.prompt.clone()),
            negative_prompt: self.negative_prompt.unwrap_or_else(|| d.negative_prompt.clone()),
            strength,
            steps,
            guidance,
            sampler,
            karras,
            vae_tiling: self.vae_tiling,
        })
    }
}

/// Fast mode's changes to a preset's defaults: LCM-LoRA's recommended settings (its model card:
/// 4-8 steps, guidance 1-2) with the lcm sampler.
pub fn fast_defaults(mut d: PresetDefaults) -> PresetDefaults {
    d.sampler = "lcm".into();
    d.steps = 8;
    d.guidance = 1.0;
    d.karras = false;
    d
}

/// `--size`: within [64, 8192].
pub fn check_size(size: Option<u32>) -> Result<Option<u32>> {
    match size {
        Some(s) if !(64..=8192).contains(&s) => {
            Err(Error::setting("size", format!("must be within [64, 8192], got {s}")))
        }
        s => Ok(s),
    }
}
