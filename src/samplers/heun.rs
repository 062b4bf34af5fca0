//! Heun's method (Karras et al. 2022, Algorithm 1 with γ = 0), a port of diffusers'
//! `schedulers/scheduling_heun_discrete.py`: timesteps and sigmas are interleaved so each step is a
//! first-order (Euler) evaluation followed by a second-order correction — two UNet calls per step,
//! `order = 2`, and img2img starts at `2 · t_start`.

use super::common::{add_noise_sigma, div, threshold_or_clip};
use super::schedule::{ClassDefaults, SchedulerConfig};
use super::sigmas::KSigmas;
use super::Sampler;
use crate::error::Result;
use crate::noise::NoiseSource;
use candle_core::Tensor;
use std::path::Path;

#[derive(Debug)]
pub struct Heun {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    k: KSigmas,
    clip: Option<f64>,
    /// (derivative, dt, sample) of the pending first-order half-step.
    state: Option<(Tensor, f64, Tensor)>,
}

impl Heun {
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize, karras_on: bool) -> Result<Self> {
        // HeunDiscreteScheduler has no final_sigmas_type / interpolation options.
        let mut c = cfg.clone();
        c.final_sigmas_type = None;
        c.interpolation_type = None;
        c.timestep_type = None;
        c.sigma_min = None;
        c.sigma_max = None;
        let k = KSigmas::new(&c, path, steps, ClassDefaults::HEUN, karras_on, true)?;
        let n = k.timesteps.len();
        let mut timesteps = vec![k.timesteps[0]];
        for &t in &k.timesteps[1..] {
            timesteps.extend([t, t]);
        }
        let mut sigmas = vec![k.sigmas[0]];
        for &s in &k.sigmas[1..n] {
            sigmas.extend([s, s]);
        }
        sigmas.push(k.sigmas[n]);
        let clip = cfg.clip_sample(false);
        Ok(Self { timesteps, sigmas, k, clip, state: None })
    }
}

impl Sampler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn order(&self) -> usize {
        2
    }
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let s = self.sigmas[index] as f32;
        div(sample, (s * s + 1.0).sqrt() as f64)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        add_noise_sigma(original, noise, self.sigmas[index])
    }
    fn step(&mut self, out: &Tensor, index: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let first = self.state.is_none();
        let (sigma, next) = if first {
            (self.sigmas[index], self.sigmas[index + 1])
        } else {
            (self.sigmas[index - 1], self.sigmas[index])
        };
        let sigma_input = if first { sigma } else { next };
        let x0 = threshold_or_clip(self.k.x0(out, sample, sigma_input)?, None, self.clip)?;
        match self.state.take() {
            None => {
                let derivative = div(&(sample - x0)?, sigma)?;
                let dt = next - sigma;
                let prev = (sample + (&derivative * dt)?)?;
                self.state = Some((derivative, dt, sample.clone()));
                Ok(prev)
            }
            Some((d0, dt, s0)) => {
                let d1 = div(&(sample - x0)?, next)?;
                let derivative = ((d0 + d1)? / 2.0)?;
                Ok((s0 + (derivative * dt)?)?)
            }
        }
    }
}
