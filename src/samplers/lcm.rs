//! The latent consistency model sampler (Luo et al. 2023, "Latent Consistency Models"), a port of
//! diffusers' `schedulers/scheduling_lcm.py`: timesteps picked from the `original_inference_steps`
//! skipping schedule, the consistency boundary scalings c_skip/c_out, and fresh noise at every step
//! but the last (for LCM-LoRA and LCM-distilled models; few steps, guidance ≈ 1).

use super::common::{add_noise_vp, check_steps, predicted_x0, threshold_or_clip};
use super::schedule::{np_linspace, ClassDefaults, Schedule, SchedulerConfig};
use super::Sampler;
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use candle_core::Tensor;
use std::path::Path;

#[derive(Debug)]
pub struct Lcm {
    schedule: Schedule,
    timesteps: Vec<f64>,
    final_alpha_cumprod: f32,
    timestep_scaling: f64,
    clip_sample: Option<f64>,
    thresholding: Option<(f64, f64)>,
}

impl Lcm {
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        let schedule = Schedule::with_defaults(cfg, path, ClassDefaults::LCM)?;
        let t = schedule.num_train_timesteps;
        let original = cfg.original_inference_steps.unwrap_or(50);
        if original == 0 || original > t {
            return Err(Error::config(
                path,
                format!("'original_inference_steps' = {original} must be within [1, {t}]"),
            ));
        }
        check_steps(steps, original, "the lcm sampler reads the model's original_inference_steps")?;
        let k = t / original;
        let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k as i64 - 1).collect();
        let timesteps = np_linspace(0.0, origin.len() as f64, steps + 1)
            .into_iter()
            .take(steps)
            .map(|x| origin[x.floor() as usize] as f64)
            .collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { schedule.alphas_cumprod[0] };
        Ok(Self {
            schedule,
            timesteps,
            final_alpha_cumprod,
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0),
            clip_sample: cfg.clip_sample(false),
            thresholding: cfg.thresholding(),
        })
    }

    fn alpha(&self, t: i64) -> f64 {
        if t >= 0 {
            self.schedule.alphas_cumprod[t as usize] as f64
        } else {
            self.final_alpha_cumprod as f64
        }
    }
}

impl Sampler for Lcm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        add_noise_vp(original, noise, self.alpha(self.timesteps[index] as i64))
    }
    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let t = self.timesteps[i] as i64;
        let prev_t = self.timesteps.get(i + 1).map(|&x| x as i64).unwrap_or(t);
        let a_t = self.alpha(t);
        let a_prev = self.alpha(prev_t);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let sigma_data = 0.5f64;
        let scaled = t as f64 * self.timestep_scaling;
        let c_skip = sigma_data * sigma_data / (scaled * scaled + sigma_data * sigma_data);
        let c_out = scaled / (scaled * scaled + sigma_data * sigma_data).sqrt();
        let x0 = predicted_x0(self.schedule.prediction, out, sample, a_t.sqrt(), b_t.sqrt())?;
        let x0 = threshold_or_clip(x0, self.thresholding, self.clip_sample)?;
        let denoised = ((x0 * c_out)? + (sample * c_skip)?)?;
        if i + 1 != self.timesteps.len() {
            let z = noise.randn(sample.dims())?.to_device(sample.device())?.to_dtype(sample.dtype())?;
            Ok(((denoised * a_prev.sqrt())? + (z * b_prev.sqrt())?)?)
        } else {
            Ok(denoised)
        }
    }
}
