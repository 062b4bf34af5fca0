//! One conversion from validated settings: decode the photo, get the model, run img2img, write.

use crate::error::Result;
use crate::image_io;
use crate::noise::SeededNoise;
use crate::pipeline::{Img2ImgParams, StableDiffusion, Trace};
use crate::printer::Printer;
use crate::settings::{ModelSource, Settings};
use std::collections::BTreeMap;
use std::time::Instant;

pub fn run(s: &Settings) -> Result<()> {
    let printer = Printer::new(s.verbosity);
    let t0 = Instant::now();
    // The photo first: a bad input fails in milliseconds, not after a model load.
    let photo = image_io::load_rgb(&s.input)?;
    let device = s.resolve_device()?;
    let dtype = s.resolve_dtype(&device)?;
    printer.verbose(format!("device {device:?}, dtype {dtype:?}"));

    let (model_dir, model_name) = match &s.model {
        ModelSource::Dir(d) => (d.clone(), d.display().to_string()),
        ModelSource::Hub { repo_id, revision } => {
            let files = crate::hub::default_preset().files;
            let dir = crate::hub::fetch(repo_id, revision.as_deref(), &files, printer)?;
            let name = match revision {
                Some(r) => format!("{repo_id}@{r}"),
                None => repo_id.clone(),
            };
            (dir, name)
        }
    };
    let t_load = Instant::now();
    let model = StableDiffusion::load(&model_dir, &device, dtype)?;
    printer.verbose(format!("loaded model '{model_name}' in {:.1} s", t_load.elapsed().as_secs_f64()));

    let f = model.vae_scale_factor() as u32;
    let size = s.size.unwrap_or(model.native_size() as u32);
    let (w, h) = image_io::working_size(photo.width(), photo.height(), size, f);
    if (w, h) != (photo.width(), photo.height()) {
        printer.verbose(format!("resizing {}x{} to {w}x{h}", photo.width(), photo.height()));
    }
    let working = image_io::resize_to(photo, w, h);
    let image = image_io::to_tensor(&working)?;

    let overflow = model.tokenizer.overflow(&s.prompt);
    if overflow > 0 {
        printer.warn(format!("--prompt is {overflow} tokens longer than the text encoder reads; the end was cut"));
    }
    if !s.seed_was_given {
        printer.info(format!("seed {} (pass --seed {} to repeat this picture)", s.seed, s.seed));
    }
    let params = Img2ImgParams {
        prompt: s.prompt.clone(),
        negative_prompt: s.negative_prompt.clone(),
        strength: s.strength,
        steps: s.steps,
        guidance: s.guidance,
        sampler: s.sampler,
        karras: s.karras,
    };
    let mut noise = SeededNoise::new(s.seed);
    let mut trace = if s.trace.is_some() { Trace::enabled() } else { Trace::disabled() };
    let bar = printer.steps_bar(0);
    bar.set_message(s.sampler.name());
    let t_run = Instant::now();
    let out = model.img2img(&image, &params, &mut noise, &mut trace, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let run_s = t_run.elapsed().as_secs_f64();
    let tm = out.timings;
    printer.verbose(format!(
        "timings: text {:.2} s, vae encode {:.2} s, denoise {:.2} s ({} unet calls, {:.2} s each), vae decode {:.2} s",
        tm.text, tm.vae_encode, tm.denoise, tm.unet_calls, tm.denoise / tm.unet_calls.max(1) as f64, tm.vae_decode
    ));

    let img = image_io::to_rgb8(&out.image)?;
    let parameters = format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}{}, CFG scale: {}, Seed: {}, Size: {}x{}, Denoising strength: {}, Model: {}",
        s.prompt, s.negative_prompt, s.steps, s.sampler, if s.karras { " Karras" } else { "" }, s.guidance, s.seed, w, h, s.strength, model_name
    );
    let source = s.input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let provenance = vec![
        ("parameters".to_string(), parameters.clone()),
        ("Software".to_string(), format!("ghiblify {}", env!("CARGO_PKG_VERSION"))),
        ("Source".to_string(), format!("AI-generated: latent-diffusion img2img of '{source}'")),
        (
            "DigitalSourceType".to_string(),
            "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia".to_string(),
        ),
    ];
    image_io::save(&img, &s.output, &provenance)?;
    if let Some(path) = &s.trace {
        let meta: BTreeMap<String, String> = [
            ("prompt", s.prompt.clone()),
            ("negative_prompt", s.negative_prompt.clone()),
            ("strength", s.strength.to_string()),
            ("steps", s.steps.to_string()),
            ("guidance", s.guidance.to_string()),
            ("seed", s.seed.to_string()),
            ("sampler", s.sampler.to_string()),
            ("karras", s.karras.to_string()),
            ("model", model_name.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        trace.save(path, &meta)?;
    }
    printer.info(format!(
        "wrote {} ({w}x{h}, {} steps in {run_s:.1} s, total {:.1} s)",
        s.output.display(),
        tm.unet_calls,
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
}
