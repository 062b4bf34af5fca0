//! Conversions from validated settings: one photo to one file, or a batch into a folder. The model
//! is loaded once, and only when there is something to do.

use crate::batch::{self, Job, Report, ReportLine};
use crate::control::{ControlSource, ControlSpec};
use crate::error::{Error, Result};
use crate::guard::{AtomicFile, Guard};
use crate::image_io::{self, OutputFormat};
use crate::lora::{LoraFile, LoraSource};
use crate::models::controlnet::ControlNet;
use crate::noise::{NoiseSource, ReplayNoise, SeededNoise};
use crate::pipeline::{Control, StableDiffusion, Trace};
use crate::printer::Printer;
use crate::provenance::{ControlRecord, LoraRecord, ModelRecord, Provenance};
use crate::settings::{Batch, Mode, ModelSource, Settings, VaeSource};
use candle_core::DType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a run did, for the exit status.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
}

/// The model of a run, loaded once, with what the provenance says about it.
struct Loaded {
    model: StableDiffusion,
    record: ModelRecord,
    loras: Vec<LoraRecord>,
    /// One per `s.controls.specs`, in order.
    controlnets: Vec<ControlNet>,
    /// The arithmetic, when not f32 (see `device::precision`).
    precision: Option<String>,
}

/// The model, loaded on first use.
struct Engine<'a> {
    s: &'a Settings,
    printer: Printer,
    loaded: Option<Loaded>,
    /// The per-image step bar.
    bar: indicatif::ProgressBar,
    /// TAESD for `--preview`, loaded with the model.
    preview: Option<crate::models::Autoencoder>,
    /// The C2PA signing credentials, read (or made) before any work.
    credentials: Option<crate::credentials::Credentials>,
}

impl Engine<'_> {
    fn new(s: &Settings, printer: Printer, bar: indicatif::ProgressBar) -> Result<Engine<'_>> {
        let credentials = match &s.outputs.c2pa {
            crate::settings::C2pa::Off => None,
            crate::settings::C2pa::Files { cert, key } => Some(crate::credentials::Credentials::from_files(cert, key)?),
            crate::settings::C2pa::PerUser => {
                let dir = crate::credentials::default_dir().ok_or_else(|| {
                    Error::usage("C2PA: no config folder for the signing key (set HOME or XDG_CONFIG_HOME, pass --c2pa-cert/--c2pa-key, or --c2pa off)")
                })?;
                Some(crate::credentials::Credentials::per_user(&dir)?)
            }
        };
        Ok(Engine { s, printer, loaded: None, bar, preview: None, credentials })
    }

    fn load(&mut self) -> Result<&Loaded> {
        if self.loaded.is_none() {
            let loaded = self.load_now()?;
            self.loaded = Some(loaded);
        }
        Ok(self.loaded.as_ref().expect("loaded above"))
    }

    fn load_now(&mut self) -> Result<Loaded> {
        let s = self.s;
        let g = &s.generation;
        let chosen = s.model.device.resolve()?;
        let device = chosen.device;
        if let Some(why) = &chosen.fallback {
            let line = format!("running on the CPU ({why})");
            // A build that has a GPU backend and does not use it says so; a CPU build only with -v.
            if cfg!(any(feature = "cuda", feature = "metal")) {
                self.printer.info(line);
            } else {
                self.printer.verbose(line);
            }
        }
        let dtype = crate::device::default_dtype(&device, s.model.dtype);
        self.printer.verbose(crate::device::describe(&device, dtype, s.model.quantize));
        let hub = LazyHub::new(s, self.printer);
        let location = model_path(s, &hub, dtype)?;
        let loras = lora_files(s, &hub)?;
        let vae_dir = vae_folder(s, &hub)?;
        let preview_dir = match &s.outputs.preview {
            Some(_) => Some(fetch_vae_repo(&hub, &VaeSource::taesd())?),
            None => None,
        };
        let t = Instant::now();
        let in_place = crate::models::nn::in_place_bytes();
        let quantize = s.model.quantize;
        let extras = crate::pipeline::Extras { loras: &loras, vae: vae_dir.as_deref(), single_file: None, quantize };
        let (model, outcome) = match &location {
            ModelPath::Folder(dir) => StableDiffusion::load_with(dir, &device, dtype, extras)?,
            ModelPath::File(file) => {
                StableDiffusion::load_single_file(file, s.model.prediction, &device, dtype, extras)?
            }
        };
        if let Some(v) = &vae_dir {
            self.printer.verbose(format!("vae: {} from {}", model.vae.name(), v.display()));
        }
        // The preview decodes with TAESD: the model's own when --vae made it TAESD.
        if let Some(p) = preview_dir.filter(|_| !matches!(model.vae, crate::models::Autoencoder::Tiny(_))) {
            self.preview = Some(crate::models::Autoencoder::load_folder(&p, dtype, &device)?);
        }
        let name = s.model.name();
        // Weights read where they lie in the files cost no copy (models/weights.rs).
        let mapped = crate::models::nn::in_place_bytes() - in_place;
        let mapped = match mapped {
            0 => String::new(),
            b if b >= 1 << 30 => format!(" ({:.2} GB of weights read in place from the files)", b as f64 / 1e9),
            b => format!(" ({:.1} MB of weights read in place from the files)", b as f64 / 1e6),
        };
        self.printer.verbose(format!("loaded model '{name}' in {:.1} s{mapped}", t.elapsed().as_secs_f64()));
        let mut controlnets = Vec::with_capacity(s.controls.specs.len());
        for spec in &s.controls.specs {
            let t = Instant::now();
            let dir = control_folder(spec, &hub)?;
            let files = crate::models::component_files(&dir, ".", "config.json", "diffusion_pytorch_model", dtype)?;
            let net = crate::models::nn::quantized(quantize, || ControlNet::load(&files, dtype, &device))?;
            if let Some(why) = net.mismatch(&model.unet.config) {
                return Err(Error::usage(format!(
                    "ControlNet '{}' does not fit the model '{name}': {why} (a ControlNet works only with the model family it was trained for)",
                    spec.name()
                )));
            }
            self.printer.verbose(format!("loaded ControlNet '{}' in {:.1} s", spec.name(), t.elapsed().as_secs_f64()));
            controlnets.push(net);
        }
        if device.is_cpu() && (dtype != DType::F32 || s.model.quantize) {
            // Half-precision or int8 weights on the CPU are asked for to save memory: keep it low
            // from here on. (Not during the load: it frees one converted tensor per weight, and
            // handing each back to the OS only for the next to fault in again doubled q8's load.)
            crate::alloc::set_purge_delay(crate::alloc::LOW_MEMORY_PURGE_DELAY_MS);
        }
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
        let kept = (g.steps as f64 * g.strength) as usize;
        if s.fast {
            self.printer.info(format!(
                "fast mode: LCM-LoRA, {} {kept} steps, guidance {}; drop --fast for the full-quality sampler",
                g.sampler, g.guidance
            ));
        } else if device.is_cpu() && kept > 8 {
            // Measured on 2 cores, 512x512: 434 s for 16 steps with guidance, 64 s with
            // --fast (README, Fast mode).
            self.printer.info(format!(
                "{} {kept} steps with guidance {} on the CPU; --fast (LCM-LoRA, 4 steps, TAESD) is several times faster",
                g.sampler, g.guidance
            ));
        }
        let overflow = model.tokenizer.overflow(&g.prompt);
        if overflow > 0 {
            self.printer
                .warn(format!("--prompt is {overflow} tokens longer than the text encoder reads; the end was cut"));
        }
        // Every image of the run uses these two prompts: encode them once, then free the
        // text encoder (part of keeping a 512² run with f16 weights under 3 GB).
        model.prepare_prompts(&[&g.prompt, &g.negative_prompt])?;
        model.release_text_encoder();
        let hash = if s.outputs.metadata { model.model_hash() } else { None };
        let license = model.license().or_else(|| match &s.model.source {
            ModelSource::Hub { license, .. } | ModelSource::HubFile { license, .. } => license.clone(),
            ModelSource::Dir(_) | ModelSource::File(_) => None,
        });
        let loras = loras
            .iter()
            .map(|l| LoraRecord { name: l.name.clone(), hash: file_sha256_10(&l.path), scale: l.scale })
            .collect();
        let precision = crate::device::precision(&device, dtype, s.model.quantize);
        Ok(Loaded {
            model,
            record: ModelRecord { name: s.model.public_name(), hash, license },
            loras,
            controlnets,
            precision,
        })
    }

    /// Converts one decoded photo and writes its picture; returns the working size.
    fn convert(
        &mut self,
        photo: image::RgbImage,
        job: &Picture,
        noise: &mut dyn NoiseSource,
        trace: &mut Trace,
    ) -> Result<(u32, u32)> {
        let Picture { source, output, format, seed } = *job;
        let s = self.s;
        let printer = self.printer;
        let bar = self.bar.clone();
        self.load()?;
        let loaded = self.loaded.as_ref().expect("loaded above");
        let model = &loaded.model;
        let f = model.vae_scale_factor() as u32;
        let size = s.size.unwrap_or(model.native_size() as u32);
        let (w, h) = image_io::working_size(photo.width(), photo.height(), size, f);
        if (w, h) != (photo.width(), photo.height()) {
            printer.verbose(format!("{}: resizing {}x{} to {w}x{h}", source.display(), photo.width(), photo.height()));
        }
        let photo = image_io::resize_to(photo, w, h);
        let mut controls = Vec::with_capacity(s.controls.specs.len());
        for (spec, net) in s.controls.specs.iter().zip(&loaded.controlnets) {
            let img = crate::control::control_image(&spec.input, &photo)?;
            if let (Some(path), true) = (&s.controls.save, controls.is_empty()) {
                image_io::save_as(&img, path, OutputFormat::Png, None)?;
            }
            controls.push(Control {
                name: spec.name(),
                net,
                image: image_io::to_control_tensor(&img)?,
                scale: spec.scale,
                start: s.controls.start,
                end: s.controls.end,
            });
        }
        let image = image_io::to_tensor(&photo)?;
        bar.reset();
        bar.set_message(s.generation.sampler.name());
        let preview_vae = match &model.vae {
            crate::models::Autoencoder::Tiny(_) => Some(&model.vae),
            _ => self.preview.as_ref(),
        };
        let preview = preview_vae.zip(s.outputs.preview.as_ref());
        let out = model
            .img2img_controlled(&image, &s.generation, &controls, noise, trace, &mut |done, total, latents| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                if let Some((vae, path)) = preview {
                    write_preview(vae, latents, path)?;
                }
                Ok(())
            })
            .map_err(|e| out_of_memory_hint(e, &model.device))?;
        let tm = out.timings;
        if tm.controlnet_calls > 0 {
            printer.verbose(format!("{} ControlNet calls", tm.controlnet_calls));
        }
        printer.verbose(format!(
            "timings: text {:.2} s, vae encode {:.2} s, denoise {:.2} s ({} unet calls, {:.2} s each), vae decode {:.2} s",
            tm.text,
            tm.vae_encode,
            tm.denoise,
            tm.unet_calls,
            tm.denoise / tm.unet_calls.max(1) as f64,
            tm.vae_decode
        ));
        let mut img = image_io::to_rgb8(&out.image)?;
        if s.outputs.watermark {
            crate::watermark::embed(&mut img, crate::watermark::PAYLOAD);
        }
        let provenance = s.outputs.metadata.then(|| self.provenance(source, seed, w, h));
        let mut bytes = image_io::encode(&img, output, format, provenance.as_ref())?;
        if let (Some(creds), Some(record)) = (&self.credentials, &provenance) {
            let title = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let t = Instant::now();
            bytes = crate::credentials::sign(&bytes, format, &title, record, source, creds)?;
            printer.verbose(format!("C2PA manifest signed in {:.0} ms", t.elapsed().as_secs_f64() * 1e3));
        }
        crate::guard::write_atomically(output, |f| std::io::Write::write_all(f, &bytes))?;
        Ok((w, h))
    }

    /// The record of one picture (see `provenance`).
    fn provenance(&self, source: &Path, seed: u64, width: u32, height: u32) -> Provenance {
        let g = &self.s.generation;
        let loaded = self.loaded.as_ref().expect("a picture was made");
        Provenance {
            prompt: g.prompt.clone(),
            negative_prompt: g.negative_prompt.clone(),
            steps: g.steps,
            sampler: g.sampler.name().to_string(),
            karras: g.karras,
            guidance: g.guidance,
            strength: g.strength,
            seed,
            width,
            height,
            model: loaded.record.clone(),
            vae: self.s.model.vae.as_ref().map(VaeSource::name),
            loras: loaded.loras.clone(),
            controlnets: self
                .s
                .controls
                .specs
                .iter()
                .map(|c| ControlRecord {
                    module: c.input.module().to_string(),
                    model: c.name(),
                    license: c.license.clone(),
                    weight: c.scale,
                    start: self.s.controls.start,
                    end: self.s.controls.end,
                })
                .collect(),
            source: source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            precision: loaded.precision.clone(),
        }
    }
}

/// One picture to make: from which photo, into which file and format, with which seed (for the
/// provenance; the noise itself is passed separately).
#[derive(Clone, Copy)]
struct Picture<'a> {
    source: &'a Path,
    output: &'a Path,
    format: OutputFormat,
    seed: u64,
}

/// A GPU out-of-memory gets the ways out in its message.
fn out_of_memory_hint(e: Error, device: &candle_core::Device) -> Error {
    match e {
        Error::Candle(msg) if !device.is_cpu() && crate::device::is_out_of_memory(&msg) => Error::Candle(format!(
            "the GPU ran out of memory ({msg}); try --vae-tiling on, a smaller --size, or --device cpu"
        )),
        e => e,
    }
}

pub fn run(s: &Settings) -> Result<Outcome> {
    if let Some(n) = s.threads {
        set_threads(n)?;
    }
    match &s.mode {
        Mode::Single { input, output } => single(s, input, output),
        Mode::Batch(b) => run_batch(s, b),
        Mode::ListModels => {
            print!("{}", crate::presets::list_models());
            Ok(Outcome::default())
        }
        Mode::DownloadOnly => {
            let printer = Printer::new(s.verbosity);
            let hub = LazyHub::new(s, printer);
            // Half-precision files for a GPU default or an explicit f16/bf16, as a run would read.
            let dtype = s.model.dtype.unwrap_or(DType::F32);
            let dir = model_path(s, &hub, dtype)?;
            let dir = dir.path();
            if let Some(v) = vae_folder(s, &hub)? {
                printer.info(format!("vae is in the cache: {}", v.display()));
            }
            for l in lora_files(s, &hub)? {
                printer.info(format!("lora '{}' is in the cache: {}", l.name, l.path.display()));
            }
            for c in &s.controls.specs {
                let d = control_folder(c, &hub)?;
                printer.info(format!("ControlNet '{}' is in the cache: {}", c.name(), d.display()));
            }
            printer.info(format!("'{}' is in the cache: {}", s.model.name(), dir.display()));
            println!("{}", dir.display());
            Ok(Outcome { done: 1, ..Default::default() })
        }
    }
}

/// A ControlNet's folder: its own, or its hub repo's config.json and weights (the fp16 file when
/// the repo has one: half the download), fetched into the cache.
fn control_folder(spec: &ControlSpec, hub: &LazyHub) -> Result<PathBuf> {
    match &spec.source {
        ControlSource::Dir(d) => Ok(d.clone()),
        ControlSource::Hub(repo) => {
            let hub = hub.get()?;
            let rev = repo.revision.as_deref();
            let cli = match &spec.input {
                crate::control::ControlInput::Canny { .. } => "--control canny".to_string(),
                crate::control::ControlInput::Tile => "--control tile".to_string(),
                crate::control::ControlInput::Image(_) => format!("--controlnet {repo}"),
            };
            match hub.component_files(&repo.id, rev, "diffusion_pytorch_model", true)? {
                Some(files) => hub.fetch(&repo.id, rev, &files, &cli),
                None => hub.cached_snapshot(&repo.id, rev, &cli),
            }
        }
    }
}

/// The LoRA files of the run (hub files fetched into the cache), named for the report.
fn lora_files(s: &Settings, hub: &LazyHub) -> Result<Vec<LoraFile>> {
    let mut out = Vec::new();
    for spec in &s.model.loras {
        let path = match &spec.source {
            LoraSource::File(p) => p.clone(),
            LoraSource::Hub { repo, file, revision, pinned } => {
                let cli =
                    format!("--lora {repo}/{file}{}", revision.as_ref().map(|r| format!("@{r}")).unwrap_or_default());
                let hub = hub.get()?;
                match (revision, pinned) {
                    (Some(pin), true) => hub.fetch_pinned(repo, pin, std::slice::from_ref(file), &cli)?.join(file),
                    _ => hub.fetch_file(repo, revision.as_deref(), file, &cli)?,
                }
            }
        };
        out.push(LoraFile { name: spec.name(), path, scale: spec.scale });
    }
    Ok(out)
}

/// Decodes the current latents with TAESD and replaces `path` atomically (a viewer never sees a
/// half-written file).
fn write_preview(vae: &crate::models::Autoencoder, latents: &candle_core::Tensor, path: &Path) -> Result<()> {
    let img = crate::pipeline::latents_to_image(vae, latents, false)?;
    image_io::save_as(&image_io::to_rgb8(&img)?, path, OutputFormat::Png, None)
}

/// The `--vae` folder (a hub repo is fetched: config.json and the safetensors weights).
fn vae_folder(s: &Settings, hub: &LazyHub) -> Result<Option<PathBuf>> {
    match &s.model.vae {
        None => Ok(None),
        Some(VaeSource::Dir(d)) => Ok(Some(d.clone())),
        Some(v) => Ok(Some(fetch_vae_repo(hub, v)?)),
    }
}

/// A VAE repo's config.json and safetensors weights (at its root).
fn fetch_vae_repo(hub: &LazyHub, vae: &VaeSource) -> Result<PathBuf> {
    let VaeSource::Hub(repo) = vae else {
        unreachable!("only hub VAEs are fetched");
    };
    let files = ["config.json".to_string(), "diffusion_pytorch_model.safetensors".to_string()];
    // The hint names what fetches it: `--vae taesd` for TAESD, else the repo.
    let cli = if repo.id == crate::settings::TAESD_REPO { "taesd".to_string() } else { repo.to_string() };
    hub.get()?.fetch(&repo.id, repo.revision.as_deref(), &files, &format!("--vae {cli}"))
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
        Self { offline: s.model.offline, printer, hub: std::cell::OnceCell::new() }
    }
    fn get(&self) -> Result<&crate::hub::Hub> {
        if self.hub.get().is_none() {
            let _ = self.hub.set(crate::hub::Hub::new(self.offline, self.printer)?);
        }
        Ok(self.hub.get().expect("set above"))
    }
}

/// Sizes the CPU thread pool: rayon's (our kernels, candle's elementwise ops) and gemm's (candle's
/// matmul reads RAYON_NUM_THREADS on each call). Must run before the first parallel operation.
pub fn set_threads(n: usize) -> Result<()> {
    // SAFETY (of set_var): called from `run` before any worker thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
        // A pool a library caller built first keeps its size (the env var still applies to gemm);
        // any other failure is the OS refusing that many threads.
        if !e.to_string().contains("already been initialized") {
            return Err(Error::setting("threads", format!("{n}: the worker threads could not be started ({e})")));
        }
    }
    Ok(())
}

/// The local model folder: `--model-dir`, or the hub snapshot (downloaded when needed).
/// The model on disk: a diffusers folder, or one checkpoint file in the LDM layout.
enum ModelPath {
    Folder(PathBuf),
    File(PathBuf),
}

impl ModelPath {
    fn path(&self) -> &Path {
        match self {
            ModelPath::Folder(p) | ModelPath::File(p) => p,
        }
    }
}

/// The local model: `--model-dir`, `--model-file`, or the hub snapshot (downloaded when needed).
fn model_path(s: &Settings, hub: &LazyHub, dtype: DType) -> Result<ModelPath> {
    match &s.model.source {
        ModelSource::File(f) => Ok(ModelPath::File(f.clone())),
        ModelSource::HubFile { repo, file, cli, pinned, .. } => {
            let hub = hub.get()?;
            let cli = format!("--model {cli}");
            let path = match (&repo.revision, pinned) {
                (Some(pin), true) => hub.fetch_pinned(&repo.id, pin, std::slice::from_ref(file), &cli)?.join(file),
                _ => hub.fetch_file(&repo.id, repo.revision.as_deref(), file, &cli)?,
            };
            Ok(ModelPath::File(path))
        }
        _ => model_folder(s, hub, dtype).map(ModelPath::Folder),
    }
}

fn model_folder(s: &Settings, hub: &LazyHub, dtype: DType) -> Result<PathBuf> {
    match &s.model.source {
        ModelSource::Dir(d) => Ok(d.clone()),
        ModelSource::File(_) | ModelSource::HubFile { .. } => unreachable!("single files are handled by model_path"),
        ModelSource::Hub { repo, files, cli, pinned, .. } => {
            let hub = hub.get()?;
            let rev = repo.revision.as_deref();
            let listed = match files {
                Some(f) => Some(f.clone()),
                None => hub.repo_files(&repo.id, rev, matches!(dtype, DType::F16 | DType::BF16))?,
            };
            let cli = format!("--model {cli}");
            match (listed, rev) {
                (Some(f), Some(pin)) if *pinned => hub.fetch_pinned(&repo.id, pin, &f, &cli),
                (Some(f), _) => hub.fetch(&repo.id, rev, &f, &cli),
                (None, _) => hub.cached_snapshot(&repo.id, rev, &cli),
            }
        }
    }
}

/// The files a run reads besides its photos (a trace to replay, local LoRAs, local model and VAE
/// folders): outputs may not land on them either.
fn guard_side_inputs(guard: &mut Guard, s: &Settings) {
    if let Some(p) = &s.noise_from {
        guard.add_input(p);
    }
    for l in &s.model.loras {
        if let LoraSource::File(p) = &l.source {
            guard.add_input(p);
        }
    }
    if let ModelSource::Dir(d) = &s.model.source {
        guard.add_input_tree(d);
    }
    if let Some(VaeSource::Dir(d)) = &s.model.vae {
        guard.add_input_tree(d);
    }
    for c in &s.controls.specs {
        if let ControlSource::Dir(d) = &c.source {
            guard.add_input_tree(d);
        }
        if let crate::control::ControlInput::Image(p) = &c.input {
            guard.add_input(p);
        }
    }
}

/// Claims the run's other outputs (report, trace, preview, control image) and proves each
/// writable before any work: the report and the trace are opened now, the folders of the preview
/// and the control image are tried.
fn claim_side_outputs(guard: &mut Guard, s: &Settings) -> Result<(Report, Option<AtomicFile>)> {
    let o = &s.outputs;
    let save = &s.controls.save;
    for (flag, path) in
        [("--report", &o.report), ("--trace", &o.trace), ("--preview", &o.preview), ("--save-control", save)]
    {
        if let Some(p) = path {
            guard.claim(p, flag)?;
        }
    }
    for p in [&o.preview, save].into_iter().flatten() {
        drop(AtomicFile::create(p)?);
    }
    let trace = o.trace.as_deref().map(AtomicFile::create).transpose()?;
    Ok((Report::create(o.report.as_deref())?, trace))
}

fn single(s: &Settings, input: &Path, output: &Path) -> Result<Outcome> {
    let printer = Printer::new(s.verbosity);
    let t0 = Instant::now();
    let mut guard = Guard::new();
    guard.add_input(input);
    guard_side_inputs(&mut guard, s);
    guard.claim(output, "-o")?;
    let (mut report, trace_file) = claim_side_outputs(&mut guard, s)?;
    // The photo first: a bad input fails in milliseconds, not after a model load.
    let photo = image_io::load_rgb(input)?;
    let format = OutputFormat::from_path(output)
        .ok_or_else(|| Error::usage(format!("-o '{}': unknown output extension", output.display())))?;
    if !s.seed_was_given && s.noise_from.is_none() {
        printer.info(format!("seed {} (pass --seed {} to repeat this picture)", s.seed, s.seed));
    }
    let mut engine = Engine::new(s, printer, printer.steps_bar(0))?;
    let mut trace = if s.outputs.trace.is_some() { Trace::enabled() } else { Trace::disabled() };
    let mut replay = s.noise_from.as_deref().map(ReplayNoise::from_trace).transpose()?;
    let mut seeded = SeededNoise::new(s.seed);
    let noise: &mut dyn NoiseSource = match replay.as_mut() {
        Some(r) => r,
        None => &mut seeded,
    };
    let picture = Picture { source: input, output, format, seed: s.seed };
    let (w, h) = engine.convert(photo, &picture, noise, &mut trace)?;
    if let Some(left) = replay.map(|r| r.remaining()).filter(|&n| n > 0) {
        printer.warn(format!("--noise-from: {left} recorded draws were not used (do the settings match the trace's?)"));
    }
    engine.bar.finish_and_clear();
    if let Some(file) = trace_file {
        trace.save(file, &trace_metadata(s))?;
    }
    report.write(&ReportLine {
        input: &input.to_string_lossy(),
        output: &output.to_string_lossy(),
        status: "ok",
        error: None,
        seed: s.seed,
        width: Some(w),
        height: Some(h),
        seconds: t0.elapsed().as_secs_f64(),
        model: engine.loaded.as_ref().map(|l| &l.record),
        loras: engine.loaded.as_ref().map(|l| l.loras.as_slice()).unwrap_or_default(),
    })?;
    printer.info(format!("wrote {} ({w}x{h}) in {:.1} s", output.display(), t0.elapsed().as_secs_f64()));
    Ok(Outcome { done: 1, ..Default::default() })
}

/// The run's settings, stored in a trace file's metadata.
fn trace_metadata(s: &Settings) -> BTreeMap<String, String> {
    let g = &s.generation;
    [
        ("prompt", g.prompt.clone()),
        ("negative_prompt", g.negative_prompt.clone()),
        ("strength", g.strength.to_string()),
        ("steps", g.steps.to_string()),
        ("guidance", g.guidance.to_string()),
        ("seed", s.seed.to_string()),
        ("sampler", g.sampler.to_string()),
        ("karras", g.karras.to_string()),
        ("model", s.model.public_name()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn run_batch(s: &Settings, b: &Batch) -> Result<Outcome> {
    let printer = Printer::new(s.verbosity);
    let t0 = Instant::now();
    let mut jobs: Vec<Job> = batch::collect(&b.inputs, b.recursive, Some(&b.out_dir))?;
    if let Some((k, n)) = b.shard {
        jobs.retain(|j| batch::in_shard(&j.rel, k, n));
        printer.verbose(format!("shard {k}/{n}: {} inputs", jobs.len()));
    }
    if !s.seed_was_given {
        printer.info(format!("base seed {} (pass --seed {} to repeat these pictures)", s.seed, s.seed));
    }
    std::fs::create_dir_all(&b.out_dir).map_err(|e| Error::io(&b.out_dir, e))?;
    let mut guard = Guard::new();
    for j in &jobs {
        guard.add_input(&j.input);
    }
    guard_side_inputs(&mut guard, s);
    let (mut report, _) = claim_side_outputs(&mut guard, s)?;
    let (overall, steps) = printer.batch_bars(jobs.len());
    let mut engine = Engine::new(s, printer, steps.clone())?;
    let mut outcome = Outcome::default();
    for job in &jobs {
        let started = Instant::now();
        let output = b.out_dir.join(&job.rel).with_extension(b.format.extension());
        let seed = batch::file_seed(s.seed, &job.rel);
        printer.verbose(format!("{}: seed {seed}", job.input.display()));
        let result: Result<Option<(u32, u32)>> = (|| {
            if let Some(why) = &job.problem {
                return Err(Error::image(&job.input, why));
            }
            guard.claim(&output, &format!("the output of '{}'", job.input.display()))?;
            if output.exists() && !b.overwrite {
                return Ok(None);
            }
            let photo = image_io::load_rgb(&job.input)?;
            if let Some(dir) = output.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let mut noise = SeededNoise::new(seed);
            let picture = Picture { source: &job.input, output: &output, format: b.format, seed };
            engine.convert(photo, &picture, &mut noise, &mut Trace::disabled()).map(Some)
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
                // A failure every other file would repeat (the model, the settings) ends the run.
                if e.aborts_batch() {
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
            model: engine.loaded.as_ref().map(|l| &l.record),
            loras: engine.loaded.as_ref().map(|l| l.loras.as_slice()).unwrap_or_default(),
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
