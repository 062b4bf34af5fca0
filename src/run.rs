//! Conversions from validated settings: one photo to one file, or a batch into a folder. The model
//! is loaded once, and only when there is something to do.

use crate::batch::{self, Job, Report, ReportLine};
use crate::error::{Error, Result};
use crate::image_io::{self, OutputFormat};
use crate::noise::SeededNoise;
use crate::pipeline::{Img2ImgParams, StableDiffusion, Trace};
use crate::printer::Printer;
use crate::settings::{Batch, Mode, ModelSource, Settings};
use candle_core::DType;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a run did, for the exit status.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
}

/// What the provenance says about the model.
struct ModelInfo {
    hash: Option<String>,
    license: Option<String>,
    /// (name, first 10 hex digits of the file's sha256, scale) per LoRA.
    loras: Vec<(String, String, f64)>,
}

/// The model, loaded on first use.
struct Engine<'a> {
    s: &'a Settings,
    printer: Printer,
    /// The model, its name, and (model hash, licence) for the provenance, all computed once.
    model: Option<(StableDiffusion, String, ModelInfo)>,
    /// The per-image step bar.
    bar: indicatif::ProgressBar,
    /// TAESD for `--preview`, loaded with the model.
    preview: Option<crate::models::Autoencoder>,
}

impl Engine<'_> {
    fn model(&mut self) -> Result<&(StableDiffusion, String, ModelInfo)> {
        if self.model.is_none() {
            let device = self.s.resolve_device()?;
            let dtype: DType = self.s.resolve_dtype(&device)?;
            if device.is_cpu() && dtype != DType::F32 {
                // Half-precision weights on the CPU are asked for to save memory: keep it low.
                crate::alloc::set_purge_delay(crate::alloc::LOW_MEMORY_PURGE_DELAY_MS);
            }
            self.printer.verbose(format!("device {device:?}, dtype {dtype:?}"));
            let hub = LazyHub::new(self.s, self.printer);
            let (dir, name) = model_folder(self.s, &hub, dtype)?;
            let loras = lora_files(self.s, &hub)?;
            let vae_dir = vae_folder(self.s, &hub)?;
            let preview_dir = match &self.s.preview {
                Some(_) => Some(fetch_vae_repo(&hub, crate::settings::TAESD_REPO, None)?),
                None => None,
            };
            let t = Instant::now();
            let extras = crate::pipeline::Extras { loras: &loras, vae: vae_dir.as_deref() };
            let (model, outcome) = StableDiffusion::load_with(&dir, &device, dtype, extras)?;
            if let Some(v) = &vae_dir {
                self.printer.verbose(format!("vae: {} from {}", model.vae.name(), v.display()));
            }
            // The preview decodes with TAESD: the model's own when --vae made it TAESD.
            if let Some(p) = preview_dir.filter(|_| !matches!(model.vae, crate::models::Autoencoder::Tiny(_))) {
                self.preview = Some(crate::models::Autoencoder::load_folder(&p, dtype, &device)?);
            }
            self.printer.verbose(format!("loaded model '{name}' in {:.1} s", t.elapsed().as_secs_f64()));
            for r in &outcome.reports {
                self.printer.info(r.line());
                for k in &r.unmatched {
                    self.printer.verbose(format!("lora '{}': '{k}' matches nothing in this model", r.name));
                }
            }
            if !outcome.unused.is_empty() {
                self.printer.warn(format!(
                    "LoRAs changed {} weights this model never reads: {}",
                    outcome.unused.len(),
                    outcome.unused.join(", ")
                ));
            }
            let kept = (self.s.steps as f64 * self.s.strength) as usize;
            if self.s.fast {
                self.printer.info(format!(
                    "fast mode: LCM-LoRA, {} {kept} steps, guidance {}; drop --fast for the full-quality sampler",
                    self.s.sampler, self.s.guidance
                ));
            } else if device.is_cpu() && kept > 8 {
                // Measured on 2 cores, 512x512: 434 s for 16 steps with guidance, 64 s with
                // --fast (README, Fast mode).
                self.printer.info(format!("{} {kept} steps with guidance {} on the CPU; --fast (LCM-LoRA, 4 steps, TAESD) is several times faster", self.s.sampler, self.s.guidance));
            }
            let lora_info = loras.iter().map(|(n, p, s)| (n.clone(), file_sha256_10(p), *s)).collect();
            let overflow = model.tokenizer.overflow(&self.s.prompt);
            if overflow > 0 {
                self.printer
                    .warn(format!("--prompt is {overflow} tokens longer than the text encoder reads; the end was cut"));
            }
            // Every image of the run uses these two prompts: encode them once, then free the
            // text encoder (part of keeping a 512² run with f16 weights under 3 GB).
            model.prepare_prompts(&[&self.s.prompt, &self.s.negative_prompt])?;
            model.release_text_encoder();
            let hash = if self.s.metadata { model.model_hash() } else { None };
            let license = model.license().or_else(|| match &self.s.model {
                ModelSource::Hub { license, .. } => license.clone(),
                ModelSource::Dir(_) => None,
            });
            self.model = Some((model, name, ModelInfo { hash, license, loras: lora_info }));
        }
        Ok(self.model.as_ref().expect("loaded above"))
    }

    /// Converts one decoded photo and writes `output`; returns the working size.
    fn convert(
        &mut self,
        photo: image::RgbImage,
        source: &Path,
        output: &Path,
        format: OutputFormat,
        seed: u64,
        trace: &mut Trace,
    ) -> Result<(u32, u32)> {
        let s = self.s;
        let printer = self.printer;
        let bar = self.bar.clone();
        self.model()?;
        let (model, name, info) = self.model.as_ref().expect("loaded above");
        let f = model.vae_scale_factor() as u32;
        let size = s.size.unwrap_or(model.native_size() as u32);
        let (w, h) = image_io::working_size(photo.width(), photo.height(), size, f);
        if (w, h) != (photo.width(), photo.height()) {
            printer.verbose(format!("{}: resizing {}x{} to {w}x{h}", source.display(), photo.width(), photo.height()));
        }
        let image = image_io::to_tensor(&image_io::resize_to(photo, w, h))?;
        let params = Img2ImgParams {
            prompt: s.prompt.clone(),
            negative_prompt: s.negative_prompt.clone(),
            strength: s.strength,
            steps: s.steps,
            guidance: s.guidance,
            sampler: s.sampler,
            karras: s.karras,
            vae_tiling: s.vae_tiling_for(w, h),
        };
        bar.reset();
        bar.set_message(s.sampler.name());
        let preview_vae = match &model.vae {
            crate::models::Autoencoder::Tiny(_) => Some(&model.vae),
            _ => self.preview.as_ref(),
        };
        let preview = preview_vae.zip(s.preview.as_ref());
        let out = model.img2img(&image, &params, &mut SeededNoise::new(seed), trace, &mut |done, total, latents| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            if let Some((vae, path)) = preview {
                write_preview(vae, latents, path)?;
            }
            Ok(())
        })?;
        let tm = out.timings;
        printer.verbose(format!(
            "timings: text {:.2} s, vae encode {:.2} s, denoise {:.2} s ({} unet calls, {:.2} s each), vae decode {:.2} s",
            tm.text, tm.vae_encode, tm.denoise, tm.unet_calls, tm.denoise / tm.unet_calls.max(1) as f64, tm.vae_decode
        ));
        let img = image_io::to_rgb8(&out.image)?;
        let provenance = if s.metadata { provenance(s, name, info, source, seed, w, h) } else { Vec::new() };
        image_io::save_as(&img, output, format, &provenance)?;
        Ok((w, h))
    }
}

/// The provenance written into every output (see README): A1111 `parameters`, software, source,
/// and the IPTC digital source type of a photo transformed by a generative model.
fn provenance(
    s: &Settings,
    model: &str,
    info: &ModelInfo,
    source: &Path,
    seed: u64,
    w: u32,
    h: u32,
) -> Vec<(String, String)> {
    let version = format!("ghiblify {}", env!("CARGO_PKG_VERSION"));
    let parameters = format!(
        "{}{}\nNegative prompt: {}\nSteps: {}, Sampler: {}{}, CFG scale: {}, Seed: {}, Size: {}x{}, {}Model: {}, Denoising strength: {}, {}Version: {}",
        s.prompt,
        // A1111 names LoRAs in the prompt as <lora:NAME:SCALE> and hashes them in "Lora hashes".
        info.loras.iter().map(|(n, _, sc)| format!(" <lora:{n}:{sc}>")).collect::<String>(),
        s.negative_prompt,
        s.steps,
        s.sampler,
        if s.karras { " Karras" } else { "" },
        s.guidance,
        seed,
        w,
        h,
        info.hash.as_ref().map(|h| format!("Model hash: {h}, ")).unwrap_or_default(),
        model,
        s.strength,
        match &s.vae {
            None => String::new(),
            Some(crate::settings::VaeSource::Dir(d)) => format!("VAE: {}, ", d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
            Some(crate::settings::VaeSource::Hub { repo_id, .. }) => format!("VAE: {repo_id}, "),
        } + &if info.loras.is_empty() {
            String::new()
        } else {
            format!("Lora hashes: \"{}\", ", info.loras.iter().map(|(n, h, _)| format!("{n}: {h}")).collect::<Vec<_>>().join(", "))
        },
        version
    );
    let name = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    vec![
        ("parameters".to_string(), parameters),
        ("Software".to_string(), version),
        ("Source".to_string(), format!("AI-generated: latent-diffusion img2img of '{name}'")),
        ("Model".to_string(), model.to_string()),
        (
            "License".to_string(),
            format!("model licence: {}", info.license.as_deref().unwrap_or("unknown (see the model card)")),
        ),
    ]
}

pub fn run(s: &Settings) -> Result<Outcome> {
    if let Some(n) = s.threads {
        set_threads(n);
    }
    match &s.mode {
        Mode::Single { input, output } => single(s, input, output),
        Mode::Batch(b) => run_batch(s, b),
        Mode::ListModels => {
            print!("{}", crate::hub::list_models());
            Ok(Outcome::default())
        }
        Mode::DownloadOnly => {
            let printer = Printer::new(s.verbosity);
            let device = s.resolve_device()?;
            let hub = LazyHub::new(s, printer);
            let (dir, name) = model_folder(s, &hub, s.resolve_dtype(&device)?)?;
            if let Some(v) = vae_folder(s, &hub)? {
                printer.info(format!("vae is in the cache: {}", v.display()));
            }
            for (n, p, _) in lora_files(s, &hub)? {
                printer.info(format!("lora '{n}' is in the cache: {}", p.display()));
            }
            printer.info(format!("'{name}' is in the cache: {}", dir.display()));
            println!("{}", dir.display());
            Ok(Outcome { done: 1, ..Default::default() })
        }
    }
}

/// The LoRA files of the run (hub files fetched into the cache), named for the report.
fn lora_files(s: &Settings, hub: &LazyHub) -> Result<Vec<(String, PathBuf, f64)>> {
    let mut out = Vec::new();
    for spec in &s.loras {
        let path = match &spec.source {
            crate::lora::LoraSource::File(p) => p.clone(),
            crate::lora::LoraSource::Hub { repo, file } => {
                hub.get()?.fetch_file(repo, None, file, &format!("{repo}/{file}"))?
            }
        };
        out.push((spec.name(), path, spec.scale));
    }
    Ok(out)
}

/// Decodes the current latents with TAESD and replaces `path` atomically (a viewer never sees a
/// half-written file).
fn write_preview(vae: &crate::models::Autoencoder, latents: &candle_core::Tensor, path: &Path) -> Result<()> {
    let img = crate::pipeline::latents_to_image(vae, latents, false)?;
    image_io::save_as(&image_io::to_rgb8(&img)?, path, OutputFormat::Png, &[])
}

/// The `--vae` folder (a hub repo is fetched: config.json and the safetensors weights).
fn vae_folder(s: &Settings, hub: &LazyHub) -> Result<Option<PathBuf>> {
    match &s.vae {
        None => Ok(None),
        Some(crate::settings::VaeSource::Dir(d)) => Ok(Some(d.clone())),
        Some(crate::settings::VaeSource::Hub { repo_id, revision }) => {
            Ok(Some(fetch_vae_repo(hub, repo_id, revision.as_deref())?))
        }
    }
}

/// A VAE repo's config.json and safetensors weights (at its root).
fn fetch_vae_repo(hub: &LazyHub, repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let files = ["config.json".to_string(), "diffusion_pytorch_model.safetensors".to_string()];
    hub.get()?.fetch(repo_id, revision, &files, repo_id)
}

/// First 10 hex digits of a file's sha256 (A1111's short hash), "unknown" if unreadable.
fn file_sha256_10(path: &Path) -> String {
    crate::hub::file_sha256(path).map(|h| h[..10].to_string()).unwrap_or_else(|_| "unknown".into())
}

/// One hub session per run, made on first use, so an unreachable hub is found out once (not
/// once for the model, once for each LoRA and once for the VAE).
struct LazyHub {
    offline: bool,
    printer: Printer,
    hub: std::cell::OnceCell<crate::hub::Hub>,
}

impl LazyHub {
    fn new(s: &Settings, printer: Printer) -> Self {
        Self { offline: s.offline, printer, hub: std::cell::OnceCell::new() }
    }
    fn get(&self) -> Result<&crate::hub::Hub> {
        if self.hub.get().is_none() {
            let _ = self.hub.set(crate::hub::Hub::new(self.offline, self.printer)?);
        }
        Ok(self.hub.get().expect("set above"))
    }
}

/// The local model folder: `--model-dir`, or the hub snapshot (downloaded when needed).
/// Sizes the CPU thread pool: rayon's (our kernels, candle's elementwise ops) and gemm's (candle's
/// matmul reads RAYON_NUM_THREADS on each call). Must run before the first parallel operation.
pub fn set_threads(n: usize) {
    // SAFETY (of set_var): called from `run` before any worker thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // An already-built pool (a library caller's) keeps its size; the env var still applies to gemm.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
}

fn model_folder(s: &Settings, hub: &LazyHub, dtype: DType) -> Result<(PathBuf, String)> {
    match &s.model {
        ModelSource::Dir(d) => Ok((d.clone(), d.display().to_string())),
        ModelSource::Hub { repo_id, revision, files, cli, .. } => {
            let hub = hub.get()?;
            let rev = revision.as_deref();
            let listed = match files {
                Some(f) => Some(f.clone()),
                None => hub.repo_files(repo_id, rev, matches!(dtype, DType::F16 | DType::BF16))?,
            };
            let dir = match listed {
                Some(f) => hub.fetch(repo_id, rev, &f, cli)?,
                None => hub.cached_snapshot(repo_id, rev, cli)?,
            };
            Ok((dir, revision.as_ref().map(|r| format!("{repo_id}@{r}")).unwrap_or_else(|| repo_id.clone())))
        }
    }
}

fn single(s: &Settings, input: &Path, output: &Path) -> Result<Outcome> {
    let printer = Printer::new(s.verbosity);
    let t0 = Instant::now();
    // The photo first: a bad input fails in milliseconds, not after a model load.
    let photo = image_io::load_rgb(input)?;
    let format = OutputFormat::from_path(output)
        .ok_or_else(|| Error::Argument(format!("-o '{}': unknown output extension", output.display())))?;
    if !s.seed_was_given {
        printer.info(format!("seed {} (pass --seed {} to repeat this picture)", s.seed, s.seed));
    }
    let mut engine = Engine { s, printer, model: None, bar: printer.steps_bar(0), preview: None };
    let mut trace = if s.trace.is_some() { Trace::enabled() } else { Trace::disabled() };
    let (w, h) = engine.convert(photo, input, output, format, s.seed, &mut trace)?;
    engine.bar.finish_and_clear();
    if let Some(path) = &s.trace {
        let model = engine.model.as_ref().map(|m| m.1.clone()).unwrap_or_default();
        let meta: BTreeMap<String, String> = [
            ("prompt", s.prompt.clone()),
            ("negative_prompt", s.negative_prompt.clone()),
            ("strength", s.strength.to_string()),
            ("steps", s.steps.to_string()),
            ("guidance", s.guidance.to_string()),
            ("seed", s.seed.to_string()),
            ("sampler", s.sampler.to_string()),
            ("karras", s.karras.to_string()),
            ("model", model),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        trace.save(path, &meta)?;
    }
    let mut report = Report::create(s.report.as_deref())?;
    report.write(&ReportLine {
        input: &input.to_string_lossy(),
        output: &output.to_string_lossy(),
        status: "ok",
        error: None,
        seed: s.seed,
        width: Some(w),
        height: Some(h),
        seconds: t0.elapsed().as_secs_f64(),
    })?;
    printer.info(format!("wrote {} ({w}x{h}) in {:.1} s", output.display(), t0.elapsed().as_secs_f64()));
    Ok(Outcome { done: 1, ..Default::default() })
}

fn canonical(p: &Path) -> Option<PathBuf> {
    p.canonicalize().ok()
}

fn run_batch(s: &Settings, b: &Batch) -> Result<Outcome> {
    let printer = Printer::new(s.verbosity);
    let t0 = Instant::now();
    let mut jobs: Vec<Job> = batch::collect(&b.inputs, b.recursive)?;
    if let Some((k, n)) = b.shard {
        jobs.retain(|j| batch::in_shard(&j.rel, k, n));
        printer.verbose(format!("shard {k}/{n}: {} inputs", jobs.len()));
    }
    if !s.seed_was_given {
        printer.info(format!("base seed {} (pass --seed {} to repeat these pictures)", s.seed, s.seed));
    }
    std::fs::create_dir_all(&b.out_dir).map_err(|e| Error::io(&b.out_dir, e))?;
    let inputs: HashSet<PathBuf> = jobs.iter().filter_map(|j| canonical(&j.input)).collect();
    let mut report = Report::create(s.report.as_deref())?;
    let (overall, steps) = printer.batch_bars(jobs.len());
    let mut engine = Engine { s, printer, model: None, bar: steps.clone(), preview: None };
    let mut outcome = Outcome::default();
    let mut claimed: HashMap<PathBuf, PathBuf> = HashMap::new();
    for job in &jobs {
        let started = Instant::now();
        let output = b.out_dir.join(&job.rel).with_extension(b.format.extension());
        let seed = batch::file_seed(s.seed, &job.rel);
        printer.verbose(format!("{}: seed {seed}", job.input.display()));
        let result: Result<Option<(u32, u32)>> = (|| {
            if let Some(first) = claimed.get(&output) {
                return Err(Error::Argument(format!(
                    "output '{}' is also the output of '{}'",
                    output.display(),
                    first.display()
                )));
            }
            claimed.insert(output.clone(), job.input.clone());
            if canonical(&output).is_some_and(|c| inputs.contains(&c)) {
                return Err(Error::Argument(format!(
                    "output '{}' is an input; refusing to overwrite it",
                    output.display()
                )));
            }
            if output.exists() && !b.overwrite {
                return Ok(None);
            }
            let photo = image_io::load_rgb(&job.input)?;
            if let Some(dir) = output.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            engine.convert(photo, &job.input, &output, b.format, seed, &mut Trace::disabled()).map(Some)
        })();
        let (status, error, size) = match result {
            Ok(Some(size)) => {
                outcome.done += 1;
                ("ok", None, Some(size))
            }
            Ok(None) => {
                outcome.skipped += 1;
                ("skipped", None, None)
            }
            Err(e) => {
                // A model that cannot be loaded stops the whole run: nothing else could succeed.
                if engine.model.is_none()
                    && matches!(
                        e,
                        Error::Model { .. }
                            | Error::Config { .. }
                            | Error::Weights { .. }
                            | Error::Tokenizer { .. }
                            | Error::Hub(_)
                    )
                {
                    return Err(e);
                }
                outcome.failed += 1;
                let msg = format!("{:#}", anyhow::Error::from(e));
                overall.suspend(|| eprintln!("{}: {msg}", job.input.display()));
                ("failed", Some(msg), None)
            }
        };
        report.write(&ReportLine {
            input: &job.input.to_string_lossy(),
            output: &output.to_string_lossy(),
            status,
            error,
            seed,
            width: size.map(|s| s.0),
            height: size.map(|s| s.1),
            seconds: started.elapsed().as_secs_f64(),
        })?;
        overall.inc(1);
    }
    steps.finish_and_clear();
    overall.finish_and_clear();
    let total = t0.elapsed().as_secs_f64();
    let per =
        if outcome.done > 0 { format!(", {:.2} s per image", total / outcome.done as f64) } else { String::new() };
    printer.info(format!(
        "done {}, skipped {}, failed {} in {total:.1} s{per}",
        outcome.done, outcome.skipped, outcome.failed
    ));
    Ok(outcome)
}
