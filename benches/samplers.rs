//! Samplers side by side: (1) the step arithmetic alone, a whole loop of each sampler's typical
//! step count on a (1, 4, 64, 64) latent with a dummy model; (2) the whole img2img run on the tiny
//! fixture model at each sampler's typical step count (strength 1, CFG).
//!
//!     cargo bench --bench samplers

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use ghiblify::noise::SeededNoise;
use ghiblify::pipeline::{Img2ImgParams, StableDiffusion, Trace, VaeTiling};
use ghiblify::samplers::{SamplerKind, SchedulerConfig};
use std::path::Path;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn step_arithmetic(c: &mut Criterion) {
    let path = fixtures().join("tiny-sd1/scheduler/scheduler_config.json");
    let cfg = SchedulerConfig::read(&path).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("step_loop_cpu_f32_1x4x64x64");
    for kind in SamplerKind::all() {
        let steps = kind.typical_steps();
        g.bench_function(format!("{}_{}steps", kind.name(), steps), |b| {
            b.iter(|| {
                let mut s = kind.build(&cfg, &path, steps, false).unwrap();
                let mut noise = SeededNoise::new(0);
                let mut sample = x.clone();
                for i in 0..s.timesteps().len() {
                    let input = s.scale_model_input(&sample, i).unwrap();
                    let out = (input * 0.5).unwrap();
                    sample = s.step(&out, i, &sample, &mut noise).unwrap();
                }
                sample
            })
        });
    }
    g.finish();
}

fn img2img_tiny(c: &mut Criterion) {
    let sd = StableDiffusion::load(&fixtures().join("tiny-sd1"), &Device::Cpu, DType::F32).unwrap();
    let photo = ghiblify::image_io::load_rgb(&fixtures().join("photo-64x48.png")).unwrap();
    let image = ghiblify::image_io::to_tensor(&photo).unwrap();
    let mut g = c.benchmark_group("img2img_tiny_sd1_64x48");
    g.sample_size(10);
    for kind in SamplerKind::all() {
        let steps = kind.typical_steps();
        let params = Img2ImgParams {
            prompt: "ghibli style, a cat".into(),
            negative_prompt: String::new(),
            strength: 1.0,
            steps,
            guidance: if kind.name() == "lcm" { 1.0 } else { 5.0 },
            sampler: kind,
            karras: false,
            vae_tiling: VaeTiling::Off,
        };
        g.bench_function(format!("{}_{}steps", kind.name(), steps), |b| {
            b.iter(|| {
                let mut noise = SeededNoise::new(1);
                sd.img2img(&image, &params, &mut noise, &mut Trace::disabled(), &mut |_, _, _| Ok(())).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, step_arithmetic, img2img_tiny);
criterion_main!(benches);
