//! Euler's method in σ-space (Karras et al. 2022, Algorithm 2 with γ = 0), a port of diffusers'
//! `schedulers/scheduling_euler_discrete.py` (`set_timesteps`, `scale_model_input`, `step`,
//! `add_noise`), with Karras sigmas as an option.

use super::sigmas::{
    f32s, final_sigma, float_timesteps, interp, karras, log_sigmas, reject_unsupported, sigma_to_t, train_sigmas,
};
use super::{div, ClassDefaults, PredictionType, Sampler, Schedule, SchedulerConfig};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use candle_core::Tensor;
use std::path::Path;

/// The σ schedule Euler and Heun share: spaced timesteps, interpolated (or Karras) sigmas.
#[derive(Debug, Clone)]
pub struct KSigmas {
    pub schedule: Schedule,
    /// Timesteps fed to the UNet (fractional with Karras).
    pub timesteps: Vec<f64>,
    /// One sigma per timestep plus the final one.
    pub sigmas: Vec<f64>,
}

impl KSigmas {
    pub fn new(
        cfg: &SchedulerConfig,
        path: &Path,
        steps: usize,
        defaults: ClassDefaults,
        karras_on: bool,
        final_zero_only: bool,
    ) -> Result<Self> {
        reject_unsupported(cfg, path)?;
        let schedule = Schedule::with_defaults(cfg, path, defaults)?;
        if steps == 0 || steps > schedule.num_train_timesteps {
            return Err(Error::Argument(format!(
                "--steps must be within [1, {}], got {steps}",
                schedule.num_train_timesteps
            )));
        }
        if cfg.timestep_type.as_deref().is_some_and(|t| t != "discrete") {
            return Err(Error::config(path, "'timestep_type' = \"continuous\" is not supported"));
        }
        let train = train_sigmas(&schedule);
        let mut timesteps = float_timesteps(&schedule, steps);
        let mut sigmas: Vec<f64> = match cfg.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => timesteps.iter().map(|&t| interp(t, &train)).collect(),
            other => return Err(Error::config(path, format!("'interpolation_type' = {other:?} is not supported"))),
        };
        if karras_on {
            let min = cfg.sigma_min.unwrap_or(*sigmas.last().unwrap());
            let max = cfg.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras(min, max, steps);
            let log = log_sigmas(&train);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log) as f32 as f64).collect();
        }
        let last = if final_zero_only { 0.0 } else { final_sigma(cfg, &schedule, path)? };
        sigmas.push(last);
        Ok(Self { schedule, timesteps, sigmas: f32s(sigmas) })
    }

    /// x₀ from the model output at σ (diffusers' `pred_original_sample`).
    pub fn x0(&self, out: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(match self.schedule.prediction {
            PredictionType::Epsilon => (sample - (out * sigma)?)?,
            PredictionType::VPrediction => {
                let s2p1 = (sigma as f32) * (sigma as f32) + 1.0;
                ((out * (-sigma as f32 / s2p1.sqrt()) as f64)? + div(sample, s2p1 as f64)?)?
            }
            PredictionType::Sample => out.clone(),
        })
    }

    /// `sample / √(σ² + 1)`.
    pub fn scale(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let s = self.sigmas[index] as f32;
        div(sample, (s * s + 1.0).sqrt() as f64)
    }

    /// `original + noise · σ[index]`.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        Ok((original + (noise * self.sigmas[index])?)?)
    }
}

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
