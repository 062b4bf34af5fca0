//! Every sampler against its diffusers class on diffusers' scheduler-test dummy model
//! (`x_in · t / (t + 1)` of the scaled input, fixed arange sample): timesteps, and every step's
//! sample with the recorded noise replayed, for four configs and Karras variants.

use crate::common::{fixtures, load_safetensors, max_abs, rel_err};

fn max_abs_value(t: &candle_core::Tensor) -> f64 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64
}
use ghiblify::noise::ReplayNoise;
use ghiblify::samplers::{SamplerKind, SchedulerConfig};
use std::path::Path;

#[test]
fn every_sampler_matches_diffusers_on_the_dummy_model() {
    let (reference, _) = load_safetensors(&fixtures().join("sampler_steps.safetensors"));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("sampler_steps.json")).unwrap()).unwrap();
    let mut covered = std::collections::BTreeSet::new();
    for case in index.as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let kind: SamplerKind = case["sampler"].as_str().unwrap().parse().unwrap();
        let karras = case["karras"].as_bool().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let cfg: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let mut sampler = kind.build(&cfg, Path::new(key), steps, karras).unwrap();
        let want_t: Vec<f64> =
            reference[&format!("{key}_timesteps")].to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap();
        assert_eq!(sampler.timesteps().len(), want_t.len(), "{key}: timesteps {:?} vs {want_t:?}", sampler.timesteps());
        for (a, b) in sampler.timesteps().iter().zip(&want_t) {
            assert!((a - b).abs() < 1e-3, "{key}: timesteps {:?} vs {want_t:?}", sampler.timesteps());
        }
        let draws = (0..case["draws"].as_u64().unwrap()).map(|j| reference[&format!("{key}_draw{j:02}")].clone());
        let mut noise = ReplayNoise::new(draws);
        let mut sample = reference[&format!("{key}_sample")].clone();
        sampler.set_begin_index(0);
        for i in 0..sampler.timesteps().len() {
            let t = sampler.timesteps()[i];
            let x_in = sampler.scale_model_input(&sample, i).unwrap();
            let out = ((x_in * t).unwrap() / (t + 1.0)).unwrap();
            let prev = sample.clone();
            sample = sampler.step(&out, i, &sample, &mut noise).unwrap();
            let want = &reference[&format!("{key}_step{i:02}")];
            // Relative to the larger of the step's input and output: where σ ≫ 1 (the cosine
            // schedule's first σ is ~5000) the step cancels large f32 terms, and float32 rounding of
            // those terms, in torch and here alike, is what remains.
            let err = max_abs(&sample, want) / max_abs_value(&prev).max(max_abs_value(want));
            assert!(
                err < 1e-5,
                "{key}: step {i} differs from diffusers by {err:.3e} (rel {:.3e})",
                rel_err(&sample, want)
            );
        }
        assert_eq!(noise.remaining(), 0, "{key}: every recorded draw is used");
        covered.insert((kind.name(), karras));
    }
    for kind in SamplerKind::all() {
        assert!(covered.contains(&(kind.name(), false)), "{} has no reference", kind.name());
        if kind.supports_karras() {
            assert!(covered.contains(&(kind.name(), true)), "{} --karras has no reference", kind.name());
        }
    }
}
