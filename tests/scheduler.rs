//! DDIM against diffusers' DDIMScheduler: alphas_cumprod, timesteps cut by strength, and a step
//! sequence on diffusers' dummy model (sample · t / (t + 1)), for configs covering every beta
//! schedule, spacing, prediction type, clipping, thresholding and zero-SNR rescaling.

use crate::common::{fixtures, load_safetensors, rel_err};
use ghiblify::noise::SeededNoise;
use ghiblify::samplers::ddim::Ddim;
use ghiblify::samplers::{strength_start, Sampler, Schedule, SchedulerConfig};
use std::path::Path;

fn configs() -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(fixtures().join("schedules.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// f32 schedules match torch to ~1 ulp, except the zero-SNR rescale, whose tail (ᾱ ≈ 3e-5 after
/// subtracting two nearly equal square roots) amplifies float32 rounding to a few 1e-6.
const TOL: f64 = 5e-6;

#[test]
fn alphas_cumprod_match_diffusers() {
    for (name, entry) in configs() {
        let cfg: SchedulerConfig = serde_json::from_value(entry["config"].clone()).unwrap();
        let s = Schedule::from_config(&cfg, Path::new(&name)).unwrap();
        let want: Vec<f64> = entry["alphas_cumprod"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(s.alphas_cumprod.len(), want.len(), "{name}");
        for (i, (a, b)) in s.alphas_cumprod.iter().zip(&want).enumerate() {
            let rel = (*a as f64 - b).abs() / b.abs().max(1e-30);
            assert!(rel < TOL, "{name}: alphas_cumprod[{i}] {a} vs {b}");
        }
    }
}

#[test]
fn timesteps_and_strength_cuts_match_diffusers() {
    for (name, entry) in configs() {
        let cfg: SchedulerConfig = serde_json::from_value(entry["config"].clone()).unwrap();
        for case in entry["cases"].as_array().unwrap() {
            let steps = case["steps"].as_u64().unwrap() as usize;
            let strength = case["strength"].as_f64().unwrap();
            let ddim = Ddim::new(&cfg, Path::new(&name), steps).unwrap();
            let all: Vec<f64> = case["all"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let kept: Vec<f64> = case["kept"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(ddim.timesteps(), &all[..], "{name}: {steps} steps");
            let begin = strength_start(steps, strength, ddim.order());
            assert_eq!(&ddim.timesteps()[begin..], &kept[..], "{name}: {steps} steps, strength {strength}");
        }
    }
}

#[test]
fn ddim_steps_match_diffusers_on_the_dummy_model() {
    let (reference, _) = load_safetensors(&fixtures().join("ddim_steps.safetensors"));
    let mut noise = SeededNoise::new(0);
    for (name, entry) in configs() {
        let cfg: SchedulerConfig = serde_json::from_value(entry["config"].clone()).unwrap();
        let mut ddim = Ddim::new(&cfg, Path::new(&name), 10).unwrap();
        let mut sample = reference[&format!("{name}_sample")].clone();
        for i in 0..ddim.timesteps().len() {
            let t = ddim.timesteps()[i];
            let model_output = ((&sample * t).unwrap() / (t + 1.0)).unwrap();
            sample = ddim.step(&model_output, i, &sample, &mut noise).unwrap();
            let want = &reference[&format!("{name}_step{i:02}")];
            let err = rel_err(&sample, want);
            assert!(err < 1e-5, "{name}: step {i} differs by {err:e}");
        }
    }
}
