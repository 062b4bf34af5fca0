//! DDIM (Song et al. 2020, "Denoising Diffusion Implicit Models"), deterministic (η = 0), a port
//! of diffusers' `schedulers/scheduling_ddim.py` (`DDIMScheduler.set_timesteps`, `step`,
//! `add_noise`, `_threshold_sample`), including its quirk that the previous timestep is
//! `t - T // steps` whatever the spacing.

use super::{spaced_timesteps, PredictionType, Sampler, Schedule, SchedulerConfig};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Tensor};
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
        if steps == 0 || steps > schedule.num_train_timesteps {
            return Err(Error::Argument(format!(
                "--steps must be within [1, {}] (the model's num_train_timesteps), got {steps}",
                schedule.num_train_timesteps
            )));
        }
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { schedule.alphas_cumprod[0] };
        let timesteps = spaced_timesteps(&schedule, steps).into_iter().map(|t| t as f64).collect();
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

    /// diffusers `_threshold_sample` (Saharia et al. 2022, Imagen): per sample, clamp to the
    /// `ratio` quantile of |x0| (at least 1, at most `max`) and divide by it.
    pub(crate) fn threshold(x0: &Tensor, ratio: f64, max: f64) -> Result<Tensor> {
        let dims = x0.dims().to_vec();
        let b = dims[0];
        let flat = x0.to_dtype(DType::F32)?.reshape((b, ()))?;
        let rows: Vec<Vec<f32>> = flat.to_vec2()?;
        let mut out = Vec::with_capacity(flat.elem_count());
        for row in rows {
            let mut abs: Vec<f32> = row.iter().map(|v| v.abs()).collect();
            abs.sort_by(|a, c| a.total_cmp(c));
            // torch.quantile's default "linear" interpolation.
            let pos = ratio * (abs.len() - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = pos.ceil() as usize;
            let q = abs[lo] as f64 + (abs[hi] as f64 - abs[lo] as f64) * (pos - lo as f64);
            let s = q.clamp(1.0, max) as f32;
            out.extend(row.iter().map(|v| v.clamp(-s, s) / s));
        }
        Ok(Tensor::from_vec(out, dims, x0.device())?.to_dtype(x0.dtype())?)
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let a = self.alpha(self.timesteps[index] as i64) as f64;
        Ok(((original * a.sqrt())? + (noise * (1.0 - a).sqrt())?)?)
    }

    fn step(
        &mut self,
        eps_or_v: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timesteps[index] as i64;
        let prev_t = t - (self.schedule.num_train_timesteps / self.steps) as i64;
        let a_t = self.alpha(t) as f64;
        let a_prev = self.alpha(prev_t) as f64;
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.schedule.prediction {
            PredictionType::Epsilon => {
                let x0 = ((sample - (eps_or_v * b_t.sqrt())?)? / a_t.sqrt())?;
                (x0, eps_or_v.clone())
            }
            PredictionType::Sample => {
                let eps = ((sample - (eps_or_v * a_t.sqrt())?)? / b_t.sqrt())?;
                (eps_or_v.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = ((sample * a_t.sqrt())? - (eps_or_v * b_t.sqrt())?)?;
                let eps = ((eps_or_v * a_t.sqrt())? + (sample * b_t.sqrt())?)?;
                (x0, eps)
            }
        };
        if let Some((ratio, max)) = self.thresholding {
            x0 = Self::threshold(&x0, ratio, max)?;
        } else if let Some(r) = self.clip_sample {
            x0 = x0.clamp(-r as f32, r as f32)?;
        }
        // η = 0: σ_t = 0, so no noise is drawn and the direction term is √(1-ᾱ_prev)·ε.
        let dir = (eps * (1.0 - a_prev).sqrt())?;
        Ok(((x0 * a_prev.sqrt())? + dir)?)
    }
}
