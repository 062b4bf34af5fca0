//! DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models"), deterministic (η = 0), a port
//! of diffusers' `schedulers/scheduling_ddim.py` (`DDIMScheduler.set_timesteps`, `step`,
//! `add_noise`, `_threshold_sample`), including its quirk that the previous timestep is
//! `t - T // steps` whatever the spacing.

use super::common::{add_noise_vp, check_steps, predicted_eps, predicted_x0, threshold_or_clip};
use super::schedule::{spaced_timesteps, Schedule, SchedulerConfig};
use super::Sampler;
use crate::error::Result;
use crate::noise::NoiseSource;
use candle_core::Tensor;
use std::path::Path;

#[derive(Debug)]
pub struct Ddim {
    schedule: Schedule,
    steps: usize,
    timesteps: Vec<f64>,
    final_alpha_cumprod: f32,
    clip_sample: Option<f64>,
    thresholding: Option<(f64, f64)>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        let schedule = Schedule::from_config(cfg, path)?;
        check_steps(steps, schedule.num_train_timesteps, "the model's num_train_timesteps")?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { schedule.alphas_cumprod[0] };
        let timesteps: Vec<f64> = spaced_timesteps(&schedule, steps).into_iter().map(|t| t as f64).collect();
        // "leading" spacing plus steps_offset can step past the schedule (diffusers then fails
        // with an IndexError): say so instead.
        if let Some(&t) = timesteps.iter().find(|&&t| t as usize >= schedule.num_train_timesteps) {
            return Err(crate::error::Error::setting(
                "steps",
                format!(
                    "{steps} with the model's steps_offset {} reaches timestep {t}, past its {} training steps; use fewer steps",
                    schedule.steps_offset, schedule.num_train_timesteps
                ),
            ));
        }
        let clip_sample = cfg.clip_sample(true);
        let thresholding = cfg.thresholding();
        Ok(Self { schedule, steps, timesteps, final_alpha_cumprod, clip_sample, thresholding })
    }

    fn alpha(&self, t: i64) -> f32 {
        if t >= 0 {
            self.schedule.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        add_noise_vp(original, noise, self.alpha(self.timesteps[index] as i64) as f64)
    }

    fn step(&mut self, out: &Tensor, index: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let t = self.timesteps[index] as i64;
        let prev_t = t - (self.schedule.num_train_timesteps / self.steps) as i64;
        let a_t = self.alpha(t) as f64;
        let a_prev = self.alpha(prev_t) as f64;
        let (alpha, sigma) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let prediction = self.schedule.prediction;
        let x0 = predicted_x0(prediction, out, sample, alpha, sigma)?;
        let eps = predicted_eps(prediction, out, sample, alpha, sigma)?;
        let x0 = threshold_or_clip(x0, self.thresholding, self.clip_sample)?;
        // η = 0: σ_t = 0, so no noise is drawn and the direction term is √(1-ᾱ_prev)·ε.
        let dir = (eps * (1.0 - a_prev).sqrt())?;
        Ok(((x0 * a_prev.sqrt())? + dir)?)
    }
}
