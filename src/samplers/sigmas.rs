//! Sigma-space helpers shared by the k-diffusion family (Karras et al. 2022, "Elucidating the Design
//! Space of Diffusion-Based Generative Models"): σ_t = √((1-ᾱ_t)/ᾱ_t), timestep spacings as each
//! diffusers class computes them, `np.interp`, Karras ρ=7 spacing and `_sigma_to_t`.

use super::{np_arange, np_linspace, Schedule, SchedulerConfig, Spacing};
use crate::error::{Error, Result};
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
