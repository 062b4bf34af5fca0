//! The command line (clap derive), part of the binary only: [`Args::into_settings`] builds the
//! library's validated [`Settings`] from its parts, so no clap type reaches the library, and
//! [`message`] turns a library error into the one line the user sees, naming flags where the
//! library names values.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{CommandFactory, Parser, ValueEnum};
use ghiblify::device::DevicePreference;
use ghiblify::error::{Error, Result};
use ghiblify::image_io::OutputFormat;
use ghiblify::lora::LoraSpec;
use ghiblify::pipeline::VaeTiling;
use ghiblify::printer::Verbosity;
use ghiblify::samplers::{SamplerKind, SAMPLERS};
use ghiblify::settings::{self, BatchOptions, GenerationArgs, Mode, ModelChoice, Outputs, Settings, VaeSource};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Examples:
  ghiblify photo.jpg -o photo-ghibli.png
  ghiblify photo.jpg -o out.png --strength 0.45 --seed 7 --steps 30
  ghiblify photo.jpg -o out.png --model-dir ./my-sd15-diffusers-folder
  ghiblify --list-models
  ghiblify --download-only --model ghibli-diffusion     # then copy the HF cache to offline nodes

Models: --model takes a preset name, or any hub repo in the diffusers layout (REPO_ID[@REVISION]);
files go to the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)
shared with Python tools, are verified against the hub's sha256/ETag, and a cut download resumes
on the next run. HF_ENDPOINT picks another hub, HF_TOKEN authenticates (private/gated repos).
With --offline or HF_HUB_OFFLINE=1 only the cache is used; when the hub is unreachable a complete
cache is used with a warning.

Trace (--trace FILE): a safetensors file with the run's intermediates, to compare against other
implementations: posterior_eps and noise (the two Gaussian draws, shape (1, C, h, w), in that
order), timesteps (the kept ones), prompt_embeds, negative_prompt_embeds (with CFG),
init_latents (posterior sample x scaling_factor), noised_latents, stepNN_latents (after each
step, NN = 00, 01, ...), stepNN_noise (samplers that draw noise inside a step), final_latents,
and output_float (H, W, 3 in [0, 1]). The run's settings are stored in the file's metadata.

Batch mode: with several inputs, a folder, or - (paths on stdin), -o names a folder; sub-folders
are mirrored, existing outputs are skipped (re-running resumes), each file gets its own seed derived
from --seed and its relative path, and a failing file prints 'path: error' and the run goes on.

Exit status: 0 when every picture was written (or skipped as already done), 1 when nothing could be
done (bad arguments, unreadable model, ...), 2 when some files failed in a batch.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA or Metal when this build has it and a device is present, else the CPU
    Auto,
    Cpu,
    Cuda,
    Metal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TilingArg {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PredictionArg {
    /// Noise (epsilon): SD1.x, SD2 512-base
    #[value(alias = "eps")]
    Epsilon,
    /// Velocity: SD2 768-v models
    V,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Png,
    Jpg,
    Webp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
    Q8,
}

/// Turn photos into Studio-Ghibli-style pictures with latent-diffusion img2img.
#[derive(Debug, Parser)]
#[command(name = "ghiblify", version, about, after_help = AFTER_HELP, args_override_self = true, allow_negative_numbers = true)]
pub struct Args {
    /// Photos to convert (PNG, JPEG, WebP, ...; EXIF orientation is applied), folders (walked for
    /// image files, by content), or - to read paths from stdin, one per line
    #[arg(required_unless_present_any = ["list_models", "download_only"], value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,

    /// One input: the output file, format from its extension (.png, .jpg, .jpeg, .webp).
    /// Several inputs, a folder or -: the output folder (created if needed)
    #[arg(short, long, value_name = "FILE|DIR", required_unless_present_any = ["list_models", "download_only"])]
    pub output: Option<PathBuf>,

    /// Batch output format
    #[arg(long, value_enum, default_value_t = FormatArg::Png)]
    pub format: FormatArg,

    /// Do not descend into sub-folders of folder inputs
    #[arg(long)]
    pub no_recursive: bool,

    /// Redo outputs that already exist (batch mode skips them by default, so re-running resumes)
    #[arg(long)]
    pub overwrite: bool,

    /// Write one JSON object per input (input, output, status, error, seed, width, height, seconds)
    #[arg(long, value_name = "FILE.jsonl")]
    pub report: Option<PathBuf>,

    /// Take only shard K of N of the inputs (a stable split by path), e.g. for Slurm job arrays:
    /// --shard $((SLURM_ARRAY_TASK_ID+1))/$SLURM_ARRAY_TASK_COUNT
    #[arg(long, value_name = "K/N")]
    pub shard: Option<String>,

    /// Write no provenance metadata into the outputs (no A1111 text, EXIF, XMP or C2PA)
    #[arg(long)]
    pub no_metadata: bool,

    /// C2PA Content Credentials: a signed manifest saying the picture was made from the photo by
    /// a trained model (on by default; without --c2pa-cert, signed with a per-user key made on
    /// first use: valid but untrusted)
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub c2pa: OnOff,

    /// The C2PA signing certificate chain (PEM, end entity first; ES256/P-256), with --c2pa-key
    #[arg(long, value_name = "FILE", requires = "c2pa_key")]
    pub c2pa_cert: Option<PathBuf>,

    /// The private key of --c2pa-cert (PEM)
    #[arg(long, value_name = "FILE", requires = "c2pa_cert")]
    pub c2pa_key: Option<PathBuf>,

    /// Embed no invisible watermark (by default pictures of at least 256x256 pixels carry
    /// invisible-watermark's dwtDct mark with the payload "ghiblify")
    #[arg(long)]
    pub no_watermark: bool,

    /// What the picture should look like; include the model's trigger words ("ghibli style").
    /// Default: the preset's (see --list-models), for other models: "ghibli style, hand-painted anime ..."
    #[arg(long)]
    pub prompt: Option<String>,

    /// What to steer away from (used when --guidance > 1); default: the preset's
    #[arg(long)]
    pub negative_prompt: Option<String>,

    /// How much to repaint, 0..1: low keeps the photo, high keeps only its layout [default: the
    /// preset's, 0.55]
    #[arg(long)]
    pub strength: Option<f64>,

    /// Denoising steps at strength 1 (img2img runs int(steps x strength) of them) [default: the
    /// preset's, 30]
    #[arg(long)]
    pub steps: Option<usize>,

    /// Classifier-free guidance scale; 1 or less disables guidance (one UNet pass per step)
    /// [default: the preset's, 7]
    #[arg(long)]
    pub guidance: Option<f64>,

    /// Seed for all noise (same seed and settings give the same picture on the same device);
    /// random when omitted, and printed
    #[arg(long)]
    pub seed: Option<u64>,

    /// Sampler (each reproduces its diffusers scheduler class on the model's scheduler_config.json)
    /// [default: the preset's, ddim]
    #[arg(long, value_parser = sampler_parser())]
    pub sampler: Option<SamplerKind>,

    /// Karras sigma spacing (euler, heun, dpmpp-2m, dpmpp-2m-sde, unipc)
    #[arg(long)]
    pub karras: bool,

    /// Long side of the working resolution in pixels, rounded down to a multiple of 8 (aspect
    /// kept); default: the model's native size (512 for SD1.5)
    #[arg(long, value_name = "N")]
    pub size: Option<u32>,

    /// A local model folder in the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    #[arg(long, value_name = "DIR", conflicts_with_all = ["model", "model_file"])]
    pub model_dir: Option<PathBuf>,

    /// A single-file SD1.x/SD2.x checkpoint (.safetensors or .ckpt in the original LDM layout, as
    /// civitai shares them); .ckpt files are read without running any code from them
    #[arg(long, value_name = "FILE", conflicts_with = "model")]
    pub model_file: Option<PathBuf>,

    /// What a single-file model predicts, which its file cannot say: epsilon (SD1, SD2 512-base)
    /// or v (SD2 768-v models) [default: epsilon]
    #[arg(long, value_enum)]
    pub prediction: Option<PredictionArg>,

    /// A preset (see --list-models; default ghibli-diffusion), any diffusers-layout hub repo
    /// REPO_ID[@REVISION], or a single-file checkpoint in one, REPO_ID/FILE.ckpt|.safetensors[@REV];
    /// downloaded once into the Hugging Face cache (HF_HOME, HF_HUB_CACHE)
    #[arg(long, value_name = "NAME|REPO_ID[@REV]")]
    pub model: Option<String>,

    /// A LoRA merged into the model: PATH[:SCALE] or a hub file REPO_ID/FILE.safetensors[:SCALE]
    /// (scale default 1.0); repeat for several. kohya/A1111 and diffusers/PEFT files, LoCon included
    #[arg(long, value_name = "SPEC")]
    pub lora: Vec<String>,

    /// Keep the photo's structure with a ControlNet: canny (its edges; keeps outlines) or tile (the
    /// photo itself; keeps layout and colours), with an optional weight (default 1.0); lets
    /// --strength go to 0.75-0.9. Fetches lllyasviel's SD1.5 ControlNet for the kind (723 MB, once);
    /// repeat for several
    #[arg(long, value_name = "KIND[:SCALE]")]
    pub control: Vec<String>,

    /// Any other diffusers ControlNet, a folder or hub repo DIR|REPO_ID[@REV][:SCALE], with its
    /// prepared image from --control-image (paired in order; one input only)
    #[arg(long, value_name = "DIR|REPO_ID[:SCALE]")]
    pub controlnet: Vec<String>,

    /// The control image for the --controlnet at the same position (resized to the working size)
    #[arg(long, value_name = "FILE")]
    pub control_image: Vec<PathBuf>,

    /// Fraction of the denoising steps where the ControlNets start acting [default: 0]
    #[arg(long, value_name = "F")]
    pub control_start: Option<f64>,

    /// Fraction of the denoising steps where they stop [default: 1]
    #[arg(long, value_name = "F")]
    pub control_end: Option<f64>,

    /// --control canny's hysteresis thresholds, as the ControlNet annotator's cv2.Canny takes them
    /// [default: 100,200]
    #[arg(long, value_name = "LOW,HIGH")]
    pub canny_thresholds: Option<String>,

    /// Write the (first) control image to FILE.png, to see what guided the picture (one input only)
    #[arg(long, value_name = "FILE.png")]
    pub save_control: Option<PathBuf>,

    /// Fast mode: LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) with the lcm sampler, 8 steps at
    /// strength 1 (4 at the default strength), guidance 1, and the TAESD VAE — several times
    /// faster, a little softer
    #[arg(long)]
    pub fast: bool,

    /// Replace the model's VAE: a folder (config.json + weights, AutoencoderKL or AutoencoderTiny),
    /// a hub repo REPO_ID[@REV] with them at its root, `taesd` (madebyollin/taesd, the tiny
    /// autoencoder: several times faster encode/decode, slightly softer detail), or `model` (the
    /// model's own, e.g. to keep it with --fast)
    #[arg(long, value_name = "DIR|REPO_ID|taesd|model")]
    pub vae: Option<String>,

    /// Write the picture as it forms to FILE.png after every step (decoded with TAESD, a 10 MB
    /// download on first use), to watch a slow run and stop it early
    #[arg(long, value_name = "FILE.png")]
    pub preview: Option<PathBuf>,

    /// Encode/decode the KL VAE in overlapping 512 px tiles (as diffusers' enable_tiling) so
    /// memory stays bounded for big pictures; auto: above 1024 px working size
    #[arg(long, value_enum, default_value_t = TilingArg::Auto)]
    pub vae_tiling: TilingArg,

    /// Use only the local Hugging Face cache, never the network (also HF_HUB_OFFLINE=1)
    #[arg(long)]
    pub offline: bool,

    /// Fetch the model into the cache and exit (to prefetch for machines without internet)
    #[arg(long, conflicts_with = "offline")]
    pub download_only: bool,

    /// Print the model presets with their size and licence, and exit
    #[arg(long, exclusive = true)]
    pub list_models: bool,

    /// Compute device
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,

    /// CPU worker threads (default: all cores, or RAYON_NUM_THREADS); fewer leaves cores free,
    /// e.g. one per job when several batch jobs share a machine
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// Weight precision (default: f32 on the CPU, f16 on CUDA/Metal). On the CPU f16 and bf16 halve
    /// the memory (f16 files are fetched; a 512² run stays under 3 GB). bf16 on a CPU with AMX
    /// (Intel Xeon 4th generation and later, where Linux grants it) multiplies in bf16 on its tile
    /// unit — convolutions, linear layers, attention — about 2× as fast as f32 (GHIBLIFY_AMX=0:
    /// not the tiles); on one with AVX512_BF16 whose bf16 dot products keep up with its f32 FMAs
    /// (timed once per run: AMD Zen 4 and later yes; Intel Xeon without AMX no, they run at half
    /// the f32 rate) it multiplies in bf16 too, the large 3×3 convolutions in f32 Winograd (faster
    /// still there) — about 1.4× as fast as f32. Sums are f32, and GroupNorm, softmax and the
    /// sampler stay f32, as under PyTorch's bf16 autocast: the picture within autocast's own
    /// distance of f32 (GHIBLIFY_BF16_ARITHMETIC=0/1 turns bf16 products off or on). Elsewhere,
    /// and with f16, the arithmetic stays f32 on the half-precision weights (as fast as f32 on an
    /// Intel Xeon). q8 quantises the UNet's, text encoder's and ControlNets'
    /// weights to int8 per output channel as they load (a 512² run in ~2 GB, 40 % of f32's; the
    /// VAE stays f32), multiplied in bf16 where bf16 products pay (as above), else dequantised per
    /// layer. f32 is the default because it is the same picture on every CPU and matches
    /// diffusers f32
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,

    /// Write the run's intermediates to FILE (safetensors; see below)
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,

    /// Take the run's Gaussian draws from a trace file (posterior_eps, noise, stepNN_noise, as
    /// --trace writes them, or another implementation records them) instead of from --seed: the
    /// same noise in two implementations, to compare them step by step. One input only
    #[arg(long, value_name = "TRACE.safetensors")]
    pub noise_from: Option<PathBuf>,

    /// Print only errors
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Print details (timings, seed, sizes)
    #[arg(short, long)]
    pub verbose: bool,
}

/// `--sampler`: the values and their help come from the library's sampler table.
fn sampler_parser() -> impl TypedValueParser<Value = SamplerKind> {
    PossibleValuesParser::new(SAMPLERS.iter().map(|s| PossibleValue::new(s.name).help(s.help)))
        .map(|name| SamplerKind::by_name(&name).expect("a listed sampler"))
}

impl From<DeviceArg> for DevicePreference {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Auto => DevicePreference::Auto,
            DeviceArg::Cpu => DevicePreference::Cpu,
            DeviceArg::Cuda => DevicePreference::Cuda,
            DeviceArg::Metal => DevicePreference::Metal,
        }
    }
}

impl From<TilingArg> for VaeTiling {
    fn from(t: TilingArg) -> Self {
        match t {
            TilingArg::Auto => VaeTiling::Auto,
            TilingArg::On => VaeTiling::On,
            TilingArg::Off => VaeTiling::Off,
        }
    }
}

impl From<FormatArg> for OutputFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Png => OutputFormat::Png,
            FormatArg::Jpg => OutputFormat::Jpeg,
            FormatArg::Webp => OutputFormat::WebP,
        }
    }
}

impl DTypeArg {
    /// The dtype the weights load in (`None`: the device's default, which q8 keeps for what it
    /// does not quantise).
    fn storage(self) -> Option<candle_core::DType> {
        match self {
            DTypeArg::F32 => Some(candle_core::DType::F32),
            DTypeArg::F16 => Some(candle_core::DType::F16),
            DTypeArg::Bf16 => Some(candle_core::DType::BF16),
            DTypeArg::Q8 => None,
        }
    }
}

impl Args {
    /// The validated settings, part by part.
    pub fn into_settings(self) -> Result<Settings> {
        let a = self;
        let (mut model, defaults) = ModelChoice::new(
            a.model_dir,
            a.model_file,
            a.model.as_deref(),
            a.device.into(),
            a.dtype.and_then(DTypeArg::storage),
            a.offline,
        )?;
        model.quantize = a.dtype == Some(DTypeArg::Q8);
        if let Some(p) = a.prediction {
            if !model.is_single_file() {
                return Err(Error::usage(
                    "--prediction is for single-file models (a folder's scheduler_config.json says it)",
                ));
            }
            model.prediction = Some(match p {
                PredictionArg::Epsilon => ghiblify::models::single_file::Prediction::Epsilon,
                PredictionArg::V => ghiblify::models::single_file::Prediction::V,
            });
        }
        let mode = if a.list_models {
            Mode::ListModels
        } else if a.download_only {
            match model.source {
                settings::ModelSource::Dir(_) => {
                    return Err(Error::usage("--download-only fetches hub models; --model-dir is already local"));
                }
                settings::ModelSource::File(_) => {
                    return Err(Error::usage(
                        "--download-only fetches hub models; a local --model-file is already here",
                    ));
                }
                _ => {}
            }
            Mode::DownloadOnly
        } else {
            let batch = BatchOptions {
                format: a.format.into(),
                recursive: !a.no_recursive,
                overwrite: a.overwrite,
                shard: a.shard,
            };
            Mode::convert(&a.inputs, a.output.as_deref(), batch)?
        };
        let mut outputs = Outputs::new(&mode, !a.no_metadata, a.report, a.trace, a.preview)?;
        outputs.watermark = !a.no_watermark;
        outputs.c2pa = match (a.c2pa, a.no_metadata, a.c2pa_cert, a.c2pa_key) {
            (OnOff::Off, ..) | (_, true, ..) => settings::C2pa::Off,
            (OnOff::On, false, Some(cert), Some(key)) => settings::C2pa::Files { cert, key },
            (OnOff::On, false, ..) => settings::C2pa::PerUser,
        };
        let noise_from = settings::check_noise_from(&mode, a.noise_from)?;
        let controls = ghiblify::control::Controls::from_args(
            ghiblify::control::ControlArgs {
                control: &a.control,
                controlnet: &a.controlnet,
                control_image: &a.control_image,
                start: a.control_start,
                end: a.control_end,
                canny_thresholds: a.canny_thresholds.as_deref(),
                save: a.save_control,
            },
            !matches!(mode, Mode::Batch(_)),
        )?;
        let defaults = if a.fast {
            model.loras.push(settings::fast_lora()?);
            settings::fast_defaults(defaults)
        } else {
            defaults
        };
        for l in &a.lora {
            model.loras.push(LoraSpec::parse(l)?);
        }
        // --fast takes TAESD unless --vae says otherwise (`--vae model` keeps the model's own).
        model.vae = match a.vae.as_deref() {
            Some("model") => None,
            Some(v) => Some(VaeSource::parse(v)?),
            None if a.fast => Some(VaeSource::taesd()),
            None => None,
        };
        let generation = GenerationArgs {
            prompt: a.prompt,
            negative_prompt: a.negative_prompt,
            strength: a.strength,
            steps: a.steps,
            guidance: a.guidance,
            sampler: a.sampler,
            karras: a.karras,
            vae_tiling: a.vae_tiling.into(),
        }
        .resolve(&defaults)?;
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
        Ok(Settings {
            mode,
            generation,
            seed,
            seed_was_given,
            size: settings::check_size(a.size)?,
            model,
            outputs,
            threads: a.threads.map(usize::from),
            verbosity,
            fast: a.fast,
            noise_from,
            controls,
        })
    }
}

/// The flag a library setting name stands for (`steps` → `--steps`), from clap's own list.
fn flag(setting: &str) -> Option<String> {
    Args::command().get_arguments().find(|a| a.get_id() == setting).and_then(|a| a.get_long()).map(|l| format!("--{l}"))
}

/// The one line an error is shown as: a library setting under its flag's name, anything else as
/// its whole cause chain.
pub fn message(e: Error) -> String {
    match e {
        Error::Setting { setting, msg } => format!("{} {msg}", flag(setting).unwrap_or_else(|| setting.to_string())),
        e => format!("{:#}", anyhow::Error::from(e)),
    }
}
