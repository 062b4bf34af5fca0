//! σ-space schedules shared by the k-diffusion family (Karras et al. 2022, "Elucidating the Design
//! Space of Diffusion-Based Generative Models"): σ_t = √((1-ᾱ_t)/ᾱ_t), timestep spacings as each
//! diffusers class computes them, `np.interp`, Karras ρ=7 spacing and `_sigma_to_t`; the σ schedule
//! Euler, Euler-a and Heun share ([`KSigmas`]) and the one DPM-Solver and UniPC share
//! ([`MultistepSigmas`]).

use super::common::{add_noise_sigma, check_steps, div, predicted_x0};
use super::schedule::{np_arange, np_linspace, ClassDefaults, PredictionType, Schedule, SchedulerConfig, Spacing};
use crate::error::{Error, Result};
use candle_core::Tensor;
use std::path::Path;

/// σ for every training timestep, computed in f32 like `((1 - ᾱ) / ᾱ) ** 0.5` on a float32 tensor.
pub fn train_sigmas(s: &Schedule) -> Vec<f64> {
    s.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt() as f64).collect()
}

/// `np.log(sigmas)` on the float32 array diffusers holds: the logs are float32 too, which decides on
/// which side of a training timestep a Karras sigma falls (and so its rounded timestep).
pub fn log_sigmas(train: &[f64]) -> Vec<f64> {
    train.iter().map(|&s| (s as f32).ln() as f64).collect()
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub fn interp(x: f64, fp: &[f64]) -> f64 {
    if x <= 0.0 {
        return fp[0];
    }
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    // numpy's formula: slope * (x - xp[i]) + fp[i]
    (fp[i + 1] - fp[i]) * w + fp[i]
}

/// Float timesteps as Euler / Euler-a / Heun `set_timesteps` make them (float32 values).
pub fn float_timesteps(s: &Schedule, steps: usize) -> Vec<f64> {
    let t = s.num_train_timesteps;
    let v: Vec<f64> = match s.spacing {
        Spacing::Linspace => np_linspace(0.0, (t - 1) as f64, steps).into_iter().rev().collect(),
        Spacing::Leading => {
            let ratio = (t / steps) as f64;
            (0..steps).rev().map(|i| (i as f64 * ratio).round_ties_even() + s.steps_offset as f64).collect()
        }
        Spacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / steps as f64))
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
    };
    v.into_iter().map(|x| x as f32 as f64).collect()
}

/// Integer timesteps as DPM-Solver / UniPC `set_timesteps` make them (`steps + 1` points, last dropped).
pub fn multistep_timesteps(s: &Schedule, steps: usize, last_timestep: usize) -> Vec<f64> {
    let t = s.num_train_timesteps;
    match s.spacing {
        Spacing::Linspace => {
            let v = np_linspace(0.0, (last_timestep - 1) as f64, steps + 1);
            v.iter().rev().take(steps).map(|x| x.round_ties_even()).collect()
        }
        Spacing::Leading => {
            let ratio = (last_timestep / (steps + 1)) as f64;
            (1..=steps).rev().map(|i| (i as f64 * ratio).round_ties_even() + s.steps_offset as f64).collect()
        }
        Spacing::Trailing => np_arange(last_timestep as f64, 0.0, -(t as f64 / steps as f64))
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
    }
}

/// Karras et al. ρ = 7 spacing between `sigma_max` and `sigma_min` (diffusers `_convert_to_karras`).
pub fn karras(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, steps).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// diffusers `_sigma_to_t`: the (fractional) timestep whose log-sigma matches, by linear
/// interpolation between neighbouring training log-sigmas.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // low_idx = last index whose log_sigma <= log(sigma), clipped to n - 2.
    let count = log_sigmas.iter().filter(|&&ls| log_sigma - ls >= 0.0).count();
    let low = if count == 0 { 0 } else { (count - 1).min(n - 2) };
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The final sigma appended after the schedule.
pub fn final_sigma(cfg: &SchedulerConfig, s: &Schedule, path: &Path) -> Result<f64> {
    match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
        "zero" => Ok(0.0),
        "sigma_min" => {
            let a = s.alphas_cumprod[0];
            Ok(((1.0 - a) / a).sqrt() as f64)
        }
        other => Err(Error::config(path, format!("'final_sigmas_type' = {other:?} is not supported"))),
    }
}

/// Rejects sigma-spacing options we do not implement (rather than ignoring them).
pub fn reject_unsupported(cfg: &SchedulerConfig, path: &Path) -> Result<()> {
    for (key, on) in [
        ("use_exponential_sigmas", cfg.use_exponential_sigmas),
        ("use_beta_sigmas", cfg.use_beta_sigmas),
        ("use_lu_lambdas", cfg.use_lu_lambdas),
        ("use_flow_sigmas", cfg.use_flow_sigmas),
    ] {
        if on == Some(true) {
            return Err(Error::config(path, format!("'{key}' = true is not supported")));
        }
    }
    Ok(())
}

/// Rounds to f32 and back: diffusers stores sigmas as a float32 tensor.
pub fn f32s(v: impl IntoIterator<Item = f64>) -> Vec<f64> {
    v.into_iter().map(|x| x as f32 as f64).collect()
}

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
        check_steps(steps, schedule.num_train_timesteps, "the model's num_train_timesteps")?;
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
        add_noise_sigma(original, noise, self.sigmas[index])
    }
}

/// α_t = 1/√(σ²+1), σ_t = σ·α_t (diffusers `_sigma_to_alpha_sigma_t`).
pub fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

/// λ = log α_t − log σ_t.
pub fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// The multistep family's σ schedule (DPM-Solver and UniPC `set_timesteps`).
#[derive(Debug, Clone)]
pub struct MultistepSigmas {
    pub schedule: Schedule,
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
}

impl MultistepSigmas {
    /// `unipc`: UniPC honours `sigma_min`/`sigma_max` for the Karras range and rounds Karras
    /// timesteps for every beta schedule; DPM-Solver ignores the range and keeps the cosine
    /// schedule's fractional timesteps (truncated to integers).
    pub fn new(
        cfg: &SchedulerConfig,
        path: &Path,
        steps: usize,
        karras_on: bool,
        lambda_min_clipped: f64,
        unipc: bool,
    ) -> Result<Self> {
        reject_unsupported(cfg, path)?;
        let schedule = Schedule::with_defaults(cfg, path, ClassDefaults::K)?;
        let t = schedule.num_train_timesteps;
        check_steps(steps, t, "the model's num_train_timesteps")?;
        let train = train_sigmas(&schedule);
        // searchsorted(flip(λ_t), lambda_min_clipped): how many of the smallest λ are clipped.
        let lambdas: Vec<f64> = schedule
            .alphas_cumprod
            .iter()
            .map(|&a| ((a as f64).sqrt()).ln() - ((1.0 - a as f64).sqrt()).ln())
            .collect();
        let clipped = lambdas.iter().rev().take_while(|&&l| l < lambda_min_clipped).count();
        let last_timestep = t - clipped;
        let mut timesteps = multistep_timesteps(&schedule, steps, last_timestep);
        let log = log_sigmas(&train);
        let mut sigmas: Vec<f64> = if karras_on {
            let (mut min, mut max) = (train[0], *train.last().unwrap());
            if unipc {
                min = cfg.sigma_min.unwrap_or(min);
                max = cfg.sigma_max.unwrap_or(max);
            }
            let s = karras(min, max, steps);
            let cosine = !unipc && cfg.beta_schedule.as_deref() == Some("squaredcos_cap_v2");
            timesteps =
                s.iter().map(|&x| sigma_to_t(x, &log)).map(|x| if cosine { x } else { x.round_ties_even() }).collect();
            // diffusers stores these timesteps as int64.
            timesteps = timesteps.into_iter().map(|x| x.trunc()).collect();
            s
        } else {
            timesteps.iter().map(|&x| interp(x, &train)).collect()
        };
        sigmas.push(final_sigma(cfg, &schedule, path)?);
        Ok(Self { schedule, timesteps, sigmas: f32s(sigmas) })
    }

    /// x₀ from the model output at `sigmas[index]` (data prediction).
    pub fn x0(&self, out: &Tensor, sample: &Tensor, index: usize) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[index]);
        predicted_x0(self.schedule.prediction, out, sample, a, s)
    }

    /// `α_t · original + σ_t · noise` at `sigmas[index]`.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[index]);
        Ok(((original * a)? + (noise * s)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_matches_numpy() {
        let fp = [0.0, 10.0, 20.0];
        assert_eq!(interp(0.5, &fp), 5.0);
        assert_eq!(interp(-1.0, &fp), 0.0);
        assert_eq!(interp(5.0, &fp), 20.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() {
        let log_sigmas: Vec<f64> = (0..10).map(|i| (i as f64 * 0.5).ln_1p()).collect();
        let sig: Vec<f64> = log_sigmas.iter().map(|l| l.exp()).collect();
        assert!((sigma_to_t(sig[4], &log_sigmas) - 4.0).abs() < 1e-12);
        let mid = ((log_sigmas[4] + log_sigmas[5]) / 2.0).exp();
        assert!((sigma_to_t(mid, &log_sigmas) - 4.5).abs() < 1e-9);
    }
}
