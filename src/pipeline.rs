//! Img2img with latent diffusion, following diffusers'
//! `pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py` (`__call__`) step by step:
//! the numbered steps below are that file's (its 2, call parameters, and 7, extra step arguments,
//! have nothing to do here; the decode after its loop is our 9). With ControlNets it follows
//! `pipelines/controlnet/pipeline_controlnet_img2img.py` (`StableDiffusionControlNetImg2ImgPipeline`):
//! the same steps, the control images prepared beside the photo, and each step's ControlNet
//! residuals added to the UNet's.

use crate::error::{Error, Result};
use crate::models::clip::ClipTextEncoder;
use crate::models::controlnet::ControlNet;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{Residuals, UNet};
use crate::models::Autoencoder;
use crate::models::{component_files, ComponentFiles};
use crate::noise::NoiseSource;
use crate::samplers::{strength_start, SamplerKind, SchedulerConfig};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What one img2img run computes.
#[derive(Debug, Clone)]
pub struct Img2ImgParams {
    pub prompt: String,
    /// diffusers treats a missing negative prompt as "".
    pub negative_prompt: String,
    pub strength: f64,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: SamplerKind,
    /// Karras sigmas (`--karras`).
    pub karras: bool,
    /// Whether to encode and decode a KL VAE in overlapping tiles (diffusers' `enable_tiling()`).
    pub vae_tiling: VaeTiling,
}

/// One ControlNet steering a run: diffusers' `controlnet`, `control_image`,
/// `controlnet_conditioning_scale`, `control_guidance_start` and `control_guidance_end` (several
/// at once are its `MultiControlNetModel`: their residuals summed).
pub struct Control<'a> {
    /// How messages name it (its folder or repo).
    pub name: String,
    pub net: &'a ControlNet,
    /// The control image, (1, C, H, W) in [0, 1], at the working size of the photo (diffusers'
    /// control image processor: RGB, resized, not normalised).
    pub image: Tensor,
    pub scale: f64,
    /// The fraction of the denoising steps where it starts and stops acting.
    pub start: f64,
    pub end: f64,
}

impl Control<'_> {
    /// Whether it acts at step `i` of `n` (diffusers' `controlnet_keep`: steps outside the window
    /// get the scale 0, which adds exact zeros, so they are skipped).
    pub fn acts(&self, i: usize, n: usize) -> bool {
        let (i, n) = (i as f64, n as f64);
        !(i / n < self.start || (i + 1.0) / n > self.end)
    }
}

/// When the KL VAE works in tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeTiling {
    /// Above [`VaeTiling::AUTO_ABOVE`] pixels on the long side.
    #[default]
    Auto,
    On,
    Off,
}

impl VaeTiling {
    /// Working sizes (long side, pixels) above which `Auto` tiles: untiled decoding passes ~6 GB
    /// at 1024 px and beyond (README, VAE).
    pub const AUTO_ABOVE: usize = 1024;

    /// Whether an image of `w`×`h` pixels is encoded and decoded in tiles.
    pub fn tiles(self, w: usize, h: usize) -> bool {
        match self {
            VaeTiling::On => true,
            VaeTiling::Off => false,
            VaeTiling::Auto => w.max(h) > Self::AUTO_ABOVE,
        }
    }
}

/// Named intermediates of a run, for `--trace` (a safetensors file) and the parity tests.
#[derive(Debug, Default)]
pub struct Trace {
    enabled: bool,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Trace {
    pub fn enabled() -> Self {
        Self { enabled: true, tensors: BTreeMap::new() }
    }
    pub fn disabled() -> Self {
        Self::default()
    }
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
    pub fn record(&mut self, name: impl Into<String>, t: &Tensor) -> Result<()> {
        if self.enabled {
            let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
            self.tensors.insert(name.into(), t);
        }
        Ok(())
    }
    /// Writes the trace as safetensors into `file` (made before the run, so an unwritable trace
    /// fails before any work), renamed into place when complete.
    pub fn save(&self, file: crate::guard::AtomicFile, metadata: &BTreeMap<String, String>) -> Result<()> {
        let path = file.target().to_path_buf();
        let path = path.as_path();
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(k, t)| {
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Ok((k.clone(), b, t.dims().to_vec()))
            })
            .collect::<Result<_>>()?;
        let views = bytes
            .iter()
            .map(|(k, b, s)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| Error::output(path, format!("trace tensor {k}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta: std::collections::HashMap<String, String> = metadata.clone().into_iter().collect();
        let out = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| Error::output(path, e))?;
        file.commit(|f| std::io::Write::write_all(f, &out))
    }
}

/// Scaled latents (1, C, h, w) → the picture (H, W, 3) in [0, 1] on the CPU: unscale, decode,
/// `(x / 2 + 0.5).clamp(0, 1)`, channels last (step 9, and `--preview`).
pub fn latents_to_image(vae: &Autoencoder, latents: &Tensor, tiled: bool) -> Result<Tensor> {
    let decoded = vae.decode(&(latents / vae.scaling_factor())?, tiled)?;
    check_finite(&decoded, || "the VAE's decoding".into())?;
    let out = ((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok(out.squeeze(0)?.permute((1, 2, 0))?.contiguous()?.to_device(&Device::Cpu)?)
}

/// `license:` in the front matter of a model folder's README.md (hub model cards have it).
pub fn model_card_license(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("README.md")).ok()?;
    let front = text.strip_prefix("---")?.split("\n---").next()?;
    front
        .lines()
        .find_map(|l| l.strip_prefix("license:").map(|v| v.trim().trim_matches('"').to_string()))
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn licence_from_the_model_card() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(super::model_card_license(d.path()), None);
        std::fs::write(
            d.path().join("README.md"),
            "---\nlanguage: en\nlicense: creativeml-openrail-m\ntags:\n- x\n---\n# Card\nlicense: not this\n",
        )
        .unwrap();
        assert_eq!(super::model_card_license(d.path()).as_deref(), Some("creativeml-openrail-m"));
    }
}

/// Fails when `t` holds NaN or infinite values, naming where they came from: a model or LoRA that
/// produces them would otherwise give a black picture and no word why.
fn check_finite(t: &Tensor, what: impl FnOnce() -> String) -> Result<()> {
    let sum = t.abs()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if sum.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite(what()))
    }
}

/// Passes draws through and keeps them, so a step's noise can be traced as `stepNN_noise`.
struct RecordingNoise<'a> {
    inner: &'a mut dyn NoiseSource,
    draws: Vec<Tensor>,
}

impl NoiseSource for RecordingNoise<'_> {
    fn randn(&mut self, shape: &[usize]) -> Result<Tensor> {
        let t = self.inner.randn(shape)?;
        self.draws.push(t.clone());
        Ok(t)
    }
}

/// The loaded model: tokenizer, text encoder, VAE, UNet and the scheduler config.
pub struct StableDiffusion {
    pub dir: PathBuf,
    /// The UNet weight files (for the provenance's model hash).
    pub unet_weights: Vec<PathBuf>,
    pub tokenizer: ClipTokenizer,
    /// The text encoder until [`Self::release_text_encoder`]; prompts it encoded stay cached.
    text_encoder: std::sync::Mutex<Option<ClipTextEncoder>>,
    prompt_cache: std::sync::Mutex<std::collections::HashMap<String, Tensor>>,
    pub vae: Autoencoder,
    pub unet: UNet,
    pub scheduler_config: SchedulerConfig,
    pub scheduler_path: PathBuf,
    pub device: Device,
    /// The activations' dtype: f32 on the CPU whatever the weights are stored in.
    pub dtype: DType,
}

/// What `StableDiffusion::load_with` adds to a model folder.
#[derive(Debug, Default, Clone, Copy)]
pub struct Extras<'a> {
    /// The LoRAs to merge.
    pub loras: &'a [crate::lora::LoraFile],
    /// A VAE folder (`--vae`) to use instead of the model's `vae/`.
    pub vae: Option<&'a Path>,
    /// A single-file checkpoint whose tensors replace the folder's weights (the folder then holds
    /// only configs and the tokenizer: `SingleFile::write_configs`).
    pub single_file: Option<&'a crate::models::single_file::SingleFile>,
    /// `--dtype q8`: the text encoder's and UNet's layers quantised to int8 as they load
    /// ([`crate::models::nn::quantized`]); the VAE keeps `dtype` (its last layers make every pixel).
    pub quantize: bool,
}

/// What the LoRAs of a load did.
#[derive(Debug, Default)]
pub struct LoraOutcome {
    pub reports: Vec<crate::lora::Report>,
    /// Model weights a LoRA changed that the model never reads (reported, harmless).
    pub unused: Vec<String>,
}

/// Wall time of each stage of one run, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub text: f64,
    pub vae_encode: f64,
    pub denoise: f64,
    pub vae_decode: f64,
    pub unet_calls: usize,
    pub controlnet_calls: usize,
}

/// What one run returns: the image (H, W, 3) in [0, 1] on the CPU, and its timings.
#[derive(Debug)]
pub struct Img2ImgOutput {
    pub image: Tensor,
    pub timings: Timings,
}

/// Per-step callback: (steps done, steps total, the latents after that step) — progress bars
/// and `--preview`. An error stops the run.
pub type OnStep<'a> = &'a mut dyn FnMut(usize, usize, &Tensor) -> Result<()>;

impl StableDiffusion {
    /// Loads a diffusers-layout folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(Self::load_with(dir, device, dtype, Extras::default())?.0)
    }

    /// Loads a single-file checkpoint (`.safetensors` or `.ckpt`, LDM layout) with `extras`: its
    /// configs (from the tensors' shapes and the family) go to a temporary folder for the load,
    /// its tensors are read from the file itself.
    pub fn load_single_file(
        path: &Path,
        prediction: Option<crate::models::single_file::Prediction>,
        device: &Device,
        dtype: DType,
        extras: Extras,
    ) -> Result<(Self, LoraOutcome)> {
        let sf = crate::models::single_file::open(path)?;
        let tmp = tempfile::Builder::new()
            .prefix("ghiblify-model-")
            .tempdir()
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        sf.write_configs(tmp.path(), prediction)?;
        let (mut model, outcome) =
            Self::load_with(tmp.path(), device, dtype, Extras { single_file: Some(&sf), ..extras })?;
        model.dir = path.to_path_buf();
        Ok((model, outcome))
    }

    /// Loads the model with `extras`: LoRAs merged into the UNet and text encoder weights, and
    /// another VAE in place of the folder's (which is then not loaded at all); returns what each
    /// LoRA applied.
    pub fn load_with(dir: &Path, device: &Device, dtype: DType, extras: Extras) -> Result<(Self, LoraOutcome)> {
        let loras = extras.loras;
        if !dir.is_dir() {
            return Err(Error::Model { dir: dir.to_path_buf(), what: "not a folder".into() });
        }
        let files = |c: &str, cfg: &str, w: &str| match extras.single_file {
            Some(sf) => Ok(sf.component(dir, c)),
            None => component_files(dir, c, cfg, w, dtype),
        };
        let mut unet_f: ComponentFiles = files("unet", "config.json", "diffusion_pytorch_model")?;
        let vae_f = files("vae", "config.json", "diffusion_pytorch_model")?;
        let mut te_f = files("text_encoder", "config.json", "model")?;
        let mut outcome = LoraOutcome::default();
        let set = crate::lora::prepare(loras, &mut unet_f, &mut te_f)?;
        let scheduler_path = dir.join("scheduler").join("scheduler_config.json");
        if !scheduler_path.is_file() {
            return Err(Error::Model {
                dir: dir.to_path_buf(),
                what: "missing 'scheduler/scheduler_config.json'".into(),
            });
        }
        let tok_dir = dir.join("tokenizer");
        if !tok_dir.is_dir() {
            return Err(Error::Model { dir: dir.to_path_buf(), what: "missing component folder 'tokenizer/'".into() });
        }
        let scheduler_config = SchedulerConfig::read(&scheduler_path)?;
        // Validate the schedule now, so a bad config fails before the slow loads.
        crate::samplers::Schedule::from_config(&scheduler_config, &scheduler_path)?;
        let compute = crate::models::compute_dtype(device, dtype);
        let text_encoder =
            crate::models::nn::quantized(extras.quantize, || ClipTextEncoder::load(&te_f, dtype, device))?;
        let tokenizer = ClipTokenizer::load(&tok_dir, text_encoder.config.max_position_embeddings)?;
        let unet = crate::models::nn::quantized(extras.quantize, || UNet::load(&unet_f, dtype, device))?;
        let vae = match extras.vae {
            None => Autoencoder::load(&vae_f, dtype, device)?,
            Some(other) => {
                // `--vae`: its latent space must be the one the UNet was trained in.
                let vae = Autoencoder::load_folder(other, dtype, device)?;
                let own: crate::models::vae::VaeConfig = crate::models::read_json(&vae_f.config)?;
                if vae.latent_channels() != unet.config.in_channels || vae.scale_factor() != own.scale_factor() {
                    return Err(Error::config(
                        other.join("config.json"),
                        format!(
                            "this VAE ({} latent channels, factor {}) does not fit the model's latent space ({} channels, factor {})",
                            vae.latent_channels(),
                            vae.scale_factor(),
                            unet.config.in_channels,
                            own.scale_factor()
                        ),
                    ));
                }
                vae
            }
        };
        if unet.config.context_dim() != text_encoder.hidden_size() {
            return Err(Error::config(
                &unet_f.config,
                format!(
                    "'cross_attention_dim' {} does not match the text encoder's hidden_size {}",
                    unet.config.context_dim(),
                    text_encoder.hidden_size()
                ),
            ));
        }
        if unet.config.in_channels != vae.latent_channels() {
            return Err(Error::config(
                &unet_f.config,
                format!(
                    "'in_channels' {} does not match the VAE's latent_channels {}",
                    unet.config.in_channels,
                    vae.latent_channels()
                ),
            ));
        }
        if let Some(set) = set {
            outcome.unused = set.unet.unused().into_iter().chain(set.text_encoder.unused()).collect();
            outcome.reports = set.reports;
        }
        let model = Self {
            dir: dir.to_path_buf(),
            unet_weights: unet_f.weights.clone(),
            tokenizer,
            text_encoder: std::sync::Mutex::new(Some(text_encoder)),
            prompt_cache: Default::default(),
            vae,
            unet,
            scheduler_config,
            scheduler_path,
            device: device.clone(),
            dtype: compute,
        };
        Ok((model, outcome))
    }

    /// A short hash naming the weights, as A1111's "Model hash" does (first 10 hex digits of a
    /// sha256), of the UNet weights file: free when it is a hub-cache blob, whose name is its
    /// sha256; hashed when small; otherwise omitted — hashing SD1.5's 3.4 GB UNet took 14 s here,
    /// too much to add to every run.
    pub fn model_hash(&self) -> Option<String> {
        const MAX_HASHED: u64 = 512 << 20;
        let file = self.unet_weights.first()?;
        if let Ok(target) = std::fs::read_link(file) {
            let name = target.file_name()?.to_str()?.to_string();
            if name.len() == 64 && name.chars().all(|c| c.is_ascii_hexdigit()) {
                return Some(name[..10].to_string());
            }
        }
        if std::fs::metadata(file).ok()?.len() > MAX_HASHED {
            return None;
        }
        crate::hub::file_sha256(file).ok().map(|h| h[..10].to_string())
    }

    /// The model's licence as its model card states it.
    pub fn license(&self) -> Option<String> {
        model_card_license(&self.dir)
    }

    /// Pixels per latent pixel.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// The image side the model was trained at (`unet.sample_size × vae scale`), 512 for SD1.5.
    pub fn native_size(&self) -> usize {
        self.unet.config.native_latent_size().map(|s| s * self.vae_scale_factor()).unwrap_or(512)
    }

    fn encode_text(&self, text: &str) -> Result<Tensor> {
        let mut cache = self.prompt_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(text) {
            return Ok(t.clone());
        }
        let encoder = self.text_encoder.lock().unwrap_or_else(|e| e.into_inner());
        let Some(encoder) = encoder.as_ref() else {
            return Err(Error::Model {
                dir: self.dir.clone(),
                what: format!("the text encoder was released before the prompt {text:?} was encoded"),
            });
        };
        let ids = self.tokenizer.encode(text)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
        let t = encoder.forward(&ids)?;
        cache.insert(text.to_string(), t.clone());
        Ok(t)
    }

    /// Encodes `prompts` now (they are cached for every later image).
    pub fn prepare_prompts(&self, prompts: &[&str]) -> Result<()> {
        prompts.iter().try_for_each(|p| self.encode_text(p).map(drop))
    }

    /// Frees the text encoder's weights (about 250 MB in f16, 500 MB in f32) once every prompt the
    /// run needs is cached: from then on only the UNet and the VAE hold memory.
    pub fn release_text_encoder(&self) {
        self.text_encoder.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Runs img2img on `image`, (1, 3, H, W) f32 in [-1, 1] with H, W multiples of the VAE scale.
    pub fn img2img(
        &self,
        image: &Tensor,
        p: &Img2ImgParams,
        noise: &mut dyn NoiseSource,
        trace: &mut Trace,
        on_step: OnStep,
    ) -> Result<Img2ImgOutput> {
        self.img2img_controlled(image, p, &[], noise, trace, on_step)
    }

    /// Each ControlNet fits the UNet, its window and scale make sense, and its image has the
    /// photo's working size at the ControlNet's channels.
    fn check_controls(&self, controls: &[Control], w: usize, h: usize) -> Result<()> {
        for (j, c) in controls.iter().enumerate() {
            if let Some(why) = c.net.mismatch(&self.unet.config) {
                return Err(Error::usage(format!("ControlNet {} does not fit the model: {why}", c.name)));
            }
            if !(c.scale.is_finite() && (0.0..=10.0).contains(&c.scale)) {
                return Err(Error::setting(
                    "control_scale",
                    format!("{}: must be within [0, 10], got {}", c.name, c.scale),
                ));
            }
            if !(0.0..=1.0).contains(&c.start) || !(0.0..=1.0).contains(&c.end) || c.start >= c.end {
                return Err(Error::setting(
                    "control_window",
                    format!("{}: start {} and end {} must satisfy 0 <= start < end <= 1", c.name, c.start, c.end),
                ));
            }
            let want = [1, c.net.config.conditioning_channels, h, w];
            if c.image.dims() != want {
                return Err(Error::usage(format!(
                    "control image {j} for {} has shape {:?}, expected {want:?}",
                    c.name,
                    c.image.dims()
                )));
            }
            // diffusers decides guess mode by the first ControlNet alone; a pooling ControlNet
            // beside others would run them in a mode (log-spaced scales) nothing here tests.
            if j > 0 && c.net.config.global_pool_conditions != controls[0].net.config.global_pool_conditions {
                return Err(Error::usage(format!(
                    "ControlNet {} pools its residuals (global_pool_conditions) and {} does not: they cannot run together",
                    if c.net.config.global_pool_conditions { &c.name } else { &controls[0].name },
                    if c.net.config.global_pool_conditions { &controls[0].name } else { &c.name },
                )));
            }
        }
        Ok(())
    }

    /// [`Self::img2img`] steered by ControlNets.
    pub fn img2img_controlled(
        &self,
        image: &Tensor,
        p: &Img2ImgParams,
        controls: &[Control],
        noise: &mut dyn NoiseSource,
        trace: &mut Trace,
        on_step: OnStep,
    ) -> Result<Img2ImgOutput> {
        let mut timings = Timings::default();
        let clock = std::time::Instant::now;
        // 1. Check inputs.
        if !(0.0..=1.0).contains(&p.strength) {
            return Err(Error::setting("strength", format!("must be within [0.0, 1.0], got {}", p.strength)));
        }
        let (_, _, h, w) = image.dims4()?;
        let f = self.vae_scale_factor();
        if h % f != 0 || w % f != 0 {
            return Err(Error::usage(format!("image size {w}x{h} is not a multiple of the VAE's scale factor {f}")));
        }
        let mut sampler = p.sampler.build(&self.scheduler_config, &self.scheduler_path, p.steps, p.karras)?;
        let begin = strength_start(p.steps, p.strength, sampler.order());
        let total = sampler.timesteps().len();
        if begin >= total {
            return Err(Error::setting(
                "strength",
                format!(
                    "{} with {} steps leaves no denoising step (int(steps x strength) = 0); raise either",
                    p.strength, p.steps
                ),
            ));
        }
        let cfg = p.guidance > 1.0;
        let tiled = p.vae_tiling.tiles(w, h);
        self.check_controls(controls, w, h)?;
        // diffusers' guess mode, which it turns on when the (first) ControlNet pools its residuals:
        // with CFG the ControlNets see only the conditional half, the unconditional one gets zeros.
        let guess = controls.first().is_some_and(|c| c.net.config.global_pool_conditions);

        // 3. Encode the prompt (and the negative prompt for classifier-free guidance).
        let t0 = clock();
        let cond = self.encode_text(&p.prompt)?;
        trace.record("prompt_embeds", &cond)?;
        let context = if cfg {
            let uncond = self.encode_text(&p.negative_prompt)?;
            trace.record("negative_prompt_embeds", &uncond)?;
            Tensor::cat(&[&uncond, &cond], 0)?
        } else {
            cond
        };
        timings.text = t0.elapsed().as_secs_f64();

        // 4. Preprocess the image (done by the caller: [-1, 1], working size), and the control
        // images ([0, 1], working size), doubled for CFG outside guess mode.
        let image = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        let mut control_images = Vec::with_capacity(controls.len());
        for (j, c) in controls.iter().enumerate() {
            trace.record(format!("control{j}_image"), &c.image)?;
            let img = c.image.to_device(&self.device)?.to_dtype(self.dtype)?;
            control_images.push(if cfg && !guess { Tensor::cat(&[&img, &img], 0)? } else { img });
        }

        // 5. Set timesteps, cut by strength (`get_timesteps`, `set_begin_index`).
        sampler.set_begin_index(begin);
        let kept: Vec<f32> = sampler.timesteps()[begin..].iter().map(|&t| t as f32).collect();
        let n_kept = kept.len();
        trace.record("timesteps", &Tensor::from_vec(kept, n_kept, &Device::Cpu)?)?;

        // 6. Prepare latent variables: sample the posterior, scale, add noise at the first kept step.
        let t0 = clock();
        let latents = match &self.vae {
            Autoencoder::Kl(vae) => {
                let posterior = if tiled { vae.encode_tiled(&image)? } else { vae.encode(&image)? };
                let eps = noise.randn(posterior.mean.dims())?;
                trace.record("posterior_eps", &eps)?;
                posterior.sample(&eps)?
            }
            // AutoencoderTiny gives latents, not a distribution: no posterior draw.
            Autoencoder::Tiny(t) => t.encode(&image)?,
        };
        let shape = latents.dims().to_vec();
        let init = (latents * self.vae.scaling_factor())?;
        check_finite(&init, || "the VAE's encoding of the photo".into())?;
        trace.record("init_latents", &init)?;
        let fwd = noise.randn(&shape)?;
        trace.record("noise", &fwd)?;
        let fwd = fwd.to_device(&self.device)?.to_dtype(self.dtype)?;
        let mut latents = sampler.add_noise(&init, &fwd, begin)?;
        trace.record("noised_latents", &latents)?;
        timings.vae_encode = t0.elapsed().as_secs_f64();

        // 8. Denoising loop.
        let t0 = clock();
        for (k, index) in (begin..total).enumerate() {
            let t = sampler.timesteps()[index];
            let input = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let input = sampler.scale_model_input(&input, index)?;
            let mut residuals: Option<Residuals> = None;
            let acting = controls.iter().enumerate().filter(|(_, c)| c.acts(k, n_kept)).collect::<Vec<_>>();
            // Guess mode with CFG: the ControlNets see the conditional half only.
            let guess_input = if guess && cfg && !acting.is_empty() {
                Some((sampler.scale_model_input(&latents, index)?, context.narrow(0, 1, 1)?))
            } else {
                None
            };
            for (j, c) in acting {
                let r = match &guess_input {
                    Some((x, cond)) => {
                        let r = c.net.forward(x, t, cond, &control_images[j], c.scale)?;
                        let zeros_first = |d: &Tensor| Tensor::cat(&[&d.zeros_like()?, d], 0);
                        Residuals {
                            down: r.down.iter().map(zeros_first).collect::<candle_core::Result<_>>()?,
                            mid: zeros_first(&r.mid)?,
                        }
                    }
                    None => c.net.forward(&input, t, &context, &control_images[j], c.scale)?,
                };
                timings.controlnet_calls += 1;
                if trace.is_enabled() {
                    let norms = r
                        .down
                        .iter()
                        .chain(std::iter::once(&r.mid))
                        .map(|d| d.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>())
                        .collect::<candle_core::Result<Vec<f32>>>()?;
                    let n = norms.len();
                    trace.record(format!("step{k:02}_control{j}_norms"), &Tensor::from_vec(norms, n, &Device::Cpu)?)?;
                }
                residuals = Some(match residuals {
                    None => r,
                    Some(sum) => sum.add(&r)?,
                });
            }
            let out = self.unet.forward_with(&input, t, &context, residuals.as_ref())?;
            timings.unet_calls += 1;
            let out = if cfg {
                let uncond = out.narrow(0, 0, 1)?;
                let text = out.narrow(0, 1, 1)?;
                (&uncond + ((text - &uncond)? * p.guidance)?)?
            } else {
                out
            };
            let mut recorder = RecordingNoise { inner: &mut *noise, draws: Vec::new() };
            latents = sampler.step(&out, index, &latents, &mut recorder)?;
            check_finite(&latents, || {
                format!("the latents after step {} of {n_kept} (UNet output at timestep {t})", k + 1)
            })?;
            for (j, z) in recorder.draws.iter().enumerate() {
                let suffix = if j == 0 { String::new() } else { format!("_{j}") };
                trace.record(format!("step{k:02}_noise{suffix}"), z)?;
            }
            trace.record(format!("step{k:02}_latents"), &latents)?;
            on_step(k + 1, n_kept, &latents)?;
        }
        trace.record("final_latents", &latents)?;
        timings.denoise = t0.elapsed().as_secs_f64();

        // 9. Decode and post-process: (x / 2 + 0.5).clamp(0, 1), channels last.
        let t0 = clock();
        let out = latents_to_image(&self.vae, &latents, tiled)?;
        trace.record("output_float", &out)?;
        timings.vae_decode = t0.elapsed().as_secs_f64();
        Ok(Img2ImgOutput { image: out, timings })
    }
}
