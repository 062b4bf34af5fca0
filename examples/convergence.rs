//! How close each sampler gets, in few steps, to its own 200-step result on the same noise: the
//! number users actually want when choosing a sampler. Runs img2img at strength 1 on the tiny
//! fixture model (or on `--model-dir DIR` at its native size if given) and prints a Markdown table
//! of PSNR (dB, decoded image vs the reference; higher is closer) and the latents' relative L2
//! distance.
//!
//!     cargo run --release --example convergence [-- --model-dir DIR]
//!
//! LCM's schedule has at most `original_inference_steps` (50) steps, so its reference is 50 steps.
//! Stochastic samplers (euler-a, dpmpp-2m-sde, lcm) draw different noise at each step count, so
//! they converge to a neighbouring sample, not to the same one: their distances stay larger.

use candle_core::{DType, Device, Tensor};
use ghiblify::image_io;
use ghiblify::noise::SeededNoise;
use ghiblify::pipeline::{Img2ImgParams, StableDiffusion, Trace, VaeTiling};
use ghiblify::samplers::SamplerKind;
use std::path::PathBuf;

fn run(sd: &StableDiffusion, image: &Tensor, kind: SamplerKind, karras: bool, steps: usize) -> (Tensor, Tensor) {
    let params = Img2ImgParams {
        prompt: "ghibli style, a cat sitting on a wooden fence".into(),
        negative_prompt: "blurry, photo".into(),
        strength: 1.0,
        steps,
        guidance: if kind.name() == "lcm" { 1.0 } else { 5.0 },
        sampler: kind,
        karras,
        vae_tiling: VaeTiling::Off,
    };
    let mut trace = Trace::enabled();
    let out = sd.img2img(image, &params, &mut SeededNoise::new(42), &mut trace, &mut |_, _, _| Ok(())).unwrap();
    (out.image, trace.tensors["final_latents"].clone())
}

fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse = (a - b).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    (d / n).sqrt()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (dir, photo) = match args.iter().position(|a| a == "--model-dir") {
        Some(i) => (PathBuf::from(&args[i + 1]), root.join("examples/chelsea.png")),
        None => (root.join("tests/fixtures/tiny-sd1"), root.join("tests/fixtures/photo-64x48.png")),
    };
    let sd = StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let img = image_io::load_rgb(&photo).unwrap();
    let size = sd.native_size() as u32;
    let (w, h) = if img.width().max(img.height()) <= size {
        (img.width() / 8 * 8, img.height() / 8 * 8)
    } else {
        image_io::working_size(img.width(), img.height(), size, 8)
    };
    let image = image_io::to_tensor(&image_io::resize_to(img, w, h)).unwrap();
    println!(
        "Convergence on {} ({w}x{h}), strength 1, seed 42: PSNR dB / latent rel. L2 vs the same sampler at 200 steps\n",
        dir.display()
    );
    println!("| sampler | 4 steps | 8 steps | 15 steps | 30 steps | UNet calls at 15 |");
    println!("|---|---|---|---|---|---|");
    let mut rows: Vec<(SamplerKind, bool)> = SamplerKind::all().map(|k| (k, false)).collect();
    rows.insert(5, (SamplerKind::by_name("dpmpp-2m").expect("a sampler"), true));
    for (kind, karras) in rows {
        let reference_steps = if kind.name() == "lcm" { 50 } else { 200 };
        let (ref_img, ref_lat) = run(&sd, &image, kind, karras, reference_steps);
        let mut cells = Vec::new();
        for steps in [4, 8, 15, 30] {
            let (img, lat) = run(&sd, &image, kind, karras, steps);
            cells.push(format!("{:.1} / {:.3}", psnr(&img, &ref_img), rel_l2(&lat, &ref_lat)));
        }
        let calls = if kind.name() == "heun" { 29 } else { 15 };
        let name = format!("{}{}", kind.name(), if karras { " --karras" } else { "" });
        println!("| {name} | {} | {calls} |", cells.join(" | "));
    }
}
