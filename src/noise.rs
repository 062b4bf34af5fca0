//! Noise we own. candle's CPU RNG cannot be seeded, and a sampler that draws inside `step` cannot
//! be replayed; so every Gaussian draw of a run goes through one [`NoiseSource`], on the CPU, in a
//! fixed order (VAE posterior, forward noise, then any per-step draws). The same seed gives the
//! same noise on every device, and tests replay diffusers' recorded draws through the same seam.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::VecDeque;

pub trait NoiseSource {
    /// Standard-normal f32 values of `shape`, as a CPU tensor.
    fn randn(&mut self, shape: &[usize]) -> Result<Tensor>;
}

/// Seeded noise: ChaCha8 (a portable, value-stable stream) through rand_distr's standard normal.
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.rng)).collect();
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

/// Replays recorded draws in order (diffusers' noise in the parity tests; a `--trace` file).
pub struct ReplayNoise {
    draws: VecDeque<Tensor>,
}

impl ReplayNoise {
    pub fn new(draws: impl IntoIterator<Item = Tensor>) -> Self {
        Self { draws: draws.into_iter().collect() }
    }

    /// The names of a trace's Gaussian draws in the order a run makes them: the VAE posterior's
    /// (`posterior_eps`, absent with TAESD), the forward noise (`noise`), then each step's
    /// (`stepNN_noise`, `stepNN_noise_1`, ...).
    pub fn trace_draw_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        let names: Vec<&str> = names.into_iter().collect();
        let mut steps: Vec<&str> =
            names.iter().copied().filter(|k| k.starts_with("step") && k.contains("_noise")).collect();
        steps.sort();
        ["posterior_eps", "noise"]
            .into_iter()
            .filter_map(|k| names.iter().copied().find(|n| *n == k))
            .chain(steps)
            .collect()
    }

    /// Replays the draws a `--trace` file (ours, or one another implementation wrote with the
    /// same names) recorded, in the order a run makes them.
    pub fn from_trace(path: &std::path::Path) -> Result<Self> {
        let bad = |why: String| Error::Replay(format!("--noise-from '{}': {why}", path.display()));
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("not a trace file ({})", crate::error::candle_message(&e))))?;
        let names = Self::trace_draw_names(tensors.keys().map(String::as_str));
        if !names.contains(&"noise") {
            return Err(bad("it holds no 'noise' tensor (is it a ghiblify --trace file?)".into()));
        }
        Ok(Self::new(names.iter().map(|k| tensors[*k].clone())))
    }
    pub fn remaining(&self) -> usize {
        self.draws.len()
    }
}

impl NoiseSource for ReplayNoise {
    fn randn(&mut self, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .draws
            .pop_front()
            .ok_or_else(|| Error::Replay(format!("replayed noise ran out (asked for {shape:?})")))?;
        if t.dims() != shape {
            return Err(Error::Replay(format!("replayed noise has shape {:?}, the run asked for {shape:?}", t.dims())));
        }
        Ok(t.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_other_seed_other_noise() {
        let a = SeededNoise::new(7).randn(&[2, 3]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = SeededNoise::new(7).randn(&[2, 3]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let c = SeededNoise::new(8).randn(&[2, 3]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn seeded_noise_is_standard_normal() {
        let v = SeededNoise::new(1).randn(&[100_000]).unwrap().to_vec1::<f32>().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }

    #[test]
    fn replay_checks_shape_and_count() {
        let t = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut r = ReplayNoise::new([t]);
        assert!(r.randn(&[1, 5]).is_err());
        assert!(r.randn(&[1, 4]).is_err(), "the failed draw consumed the only tensor");
    }
}
