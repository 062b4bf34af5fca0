//! Euler's method in σ-space (Karras et al. 2022, Algorithm 2 with γ = 0), a port of diffusers'
//! `schedulers/scheduling_euler_discrete.py` (`set_timesteps`, `scale_model_input`, `step`,
//! `add_noise`), with Karras sigmas as an option.

use super::common::div;
use super::schedule::{ClassDefaults, SchedulerConfig};
use super::sigmas::KSigmas;
use super::Sampler;
use crate::error::Result;
use crate::noise::NoiseSource;
use candle_core::Tensor;
use std::path::Path;

#[derive(Debug)]
pub struct Euler {
    k: KSigmas,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize, karras_on: bool) -> Result<Self> {
        Ok(Self { k: KSigmas::new(cfg, path, steps, ClassDefaults::K, karras_on, false)? })
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.k.timesteps
    }
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.k.scale(sample, index)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.k.add_noise(original, noise, index)
    }
    fn step(&mut self, out: &Tensor, index: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let sigma = self.k.sigmas[index];
        let x0 = self.k.x0(out, sample, sigma)?;
        let derivative = div(&(sample - x0)?, sigma)?;
        let dt = self.k.sigmas[index + 1] - sigma;
        Ok((sample + (derivative * dt)?)?)
    }
}
