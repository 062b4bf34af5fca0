//! The noise schedule every sampler starts from: `scheduler/scheduler_config.json` with each
//! diffusers class's constructor defaults, β schedules (linear, scaled-linear, cosine, trained,
//! zero-terminal-SNR), ᾱ in float32 as torch computes it, the DDIM-family timestep spacings and the
//! img2img cut by strength (`get_timesteps`).

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// `scheduler_config.json` as written by any diffusers scheduler class. Every field is optional:
/// each sampler applies its own diffusers class's default to a missing key, exactly as
/// `XScheduler.from_config(config)` does.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    /// `_class_name` of the scheduler the model was saved with (informational).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// `num_train_timesteps` (default 1000).
    pub num_train_timesteps: Option<usize>,
    /// `beta_start` (default 0.0001).
    pub beta_start: Option<f64>,
    /// `beta_end` (default 0.02).
    pub beta_end: Option<f64>,
    /// `beta_schedule`: "linear" (default), "scaled_linear", "squaredcos_cap_v2".
    pub beta_schedule: Option<String>,
    /// `trained_betas`: explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// `prediction_type`: "epsilon" (default), "v_prediction", "sample".
    pub prediction_type: Option<String>,
    /// `timestep_spacing`: "leading" (default), "trailing", "linspace".
    pub timestep_spacing: Option<String>,
    /// `steps_offset` (default 0; 1 in SD repos).
    pub steps_offset: Option<usize>,
    /// `set_alpha_to_one` (DDIM default true).
    pub set_alpha_to_one: Option<bool>,
    /// `clip_sample` (DDIM default true).
    pub clip_sample: Option<bool>,
    /// `clip_sample_range` (default 1.0).
    pub clip_sample_range: Option<f64>,
    /// `thresholding` (dynamic thresholding, default false).
    pub thresholding: Option<bool>,
    /// `dynamic_thresholding_ratio` (default 0.995).
    pub dynamic_thresholding_ratio: Option<f64>,
    /// `sample_max_value` (default 1.0).
    pub sample_max_value: Option<f64>,
    /// `rescale_betas_zero_snr` (default false).
    pub rescale_betas_zero_snr: Option<bool>,
    /// `use_karras_sigmas` (default false; `--karras` turns it on).
    pub use_karras_sigmas: Option<bool>,
    /// `use_exponential_sigmas`, `use_beta_sigmas`, `use_lu_lambdas`, `use_flow_sigmas`: not
    /// supported, rejected when true.
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    /// `sigma_min` / `sigma_max` (Karras range override; Euler and UniPC read them).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// `final_sigmas_type`: "zero" (default) or "sigma_min".
    pub final_sigmas_type: Option<String>,
    /// `interpolation_type` (Euler): "linear" (default) or "log_linear".
    pub interpolation_type: Option<String>,
    /// `timestep_type` (Euler): "discrete" (default); "continuous" is rejected.
    pub timestep_type: Option<String>,
    /// `solver_type`: DPM-Solver "midpoint" (default) / "heun"; UniPC "bh2" (default) / "bh1".
    pub solver_type: Option<String>,
    /// `lower_order_final` (default true).
    pub lower_order_final: Option<bool>,
    /// `euler_at_final` (default false).
    pub euler_at_final: Option<bool>,
    /// `lambda_min_clipped` (default -inf).
    pub lambda_min_clipped: Option<f64>,
    /// `variance_type` (DPM-Solver): null; "learned"/"learned_range" are rejected.
    pub variance_type: Option<String>,
    /// `solver_order` (UniPC default 2; DPM++ 2M is order 2 by name).
    pub solver_order: Option<usize>,
    /// `predict_x0` (UniPC, default true).
    pub predict_x0: Option<bool>,
    /// `disable_corrector` (UniPC, default []).
    pub disable_corrector: Option<Vec<usize>>,
    /// `original_inference_steps` (LCM, default 50).
    pub original_inference_steps: Option<usize>,
    /// `timestep_scaling` (LCM, default 10.0).
    pub timestep_scaling: Option<f64>,
}

/// The constructor defaults that differ between diffusers' scheduler classes.
#[derive(Debug, Clone, Copy)]
pub struct ClassDefaults {
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
    pub spacing: Spacing,
    /// Whether the class honours `rescale_betas_zero_snr` at all (Heun does not).
    pub zero_snr: bool,
    /// Whether it then pins ᾱ_T to 2^-24 so the first sigma is finite (Euler, DPM, UniPC do).
    pub pin_terminal: bool,
}

impl ClassDefaults {
    /// DDIMScheduler.
    pub const DDIM: Self = Self {
        beta_start: 0.0001,
        beta_end: 0.02,
        beta_schedule: "linear",
        spacing: Spacing::Leading,
        zero_snr: true,
        pin_terminal: false,
    };
    /// EulerDiscrete, EulerAncestralDiscrete, DPMSolverMultistep, UniPCMultistep.
    pub const K: Self = Self {
        beta_start: 0.0001,
        beta_end: 0.02,
        beta_schedule: "linear",
        spacing: Spacing::Linspace,
        zero_snr: true,
        pin_terminal: true,
    };
    /// HeunDiscreteScheduler.
    pub const HEUN: Self = Self {
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: "linear",
        spacing: Spacing::Linspace,
        zero_snr: false,
        pin_terminal: false,
    };
    /// LCMScheduler.
    pub const LCM: Self = Self {
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: "scaled_linear",
        spacing: Spacing::Leading,
        zero_snr: true,
        pin_terminal: false,
    };
}

impl SchedulerConfig {
    pub fn read(path: &Path) -> Result<Self> {
        crate::models::read_json(path)
    }

    /// `(dynamic_thresholding_ratio, sample_max_value)` when `thresholding` is on.
    pub fn thresholding(&self) -> Option<(f64, f64)> {
        self.thresholding
            .unwrap_or(false)
            .then(|| (self.dynamic_thresholding_ratio.unwrap_or(0.995), self.sample_max_value.unwrap_or(1.0)))
    }

    /// `clip_sample_range` when `clip_sample` is on (`default`: the class's default for the switch).
    pub fn clip_sample(&self, default: bool) -> Option<f64> {
        self.clip_sample.unwrap_or(default).then(|| self.clip_sample_range.unwrap_or(1.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// The common schedule fields, validated, with diffusers' shared defaults applied.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub num_train_timesteps: usize,
    pub prediction: PredictionType,
    pub spacing: Spacing,
    pub steps_offset: usize,
    /// ᾱ_t for t = 0 … T-1, in f32 as torch computes them (cumprod of 1 - β in float32).
    pub alphas_cumprod: Vec<f32>,
}

impl Schedule {
    /// DDIM's defaults (see [`Schedule::with_defaults`]).
    pub fn from_config(cfg: &SchedulerConfig, path: &Path) -> Result<Self> {
        Self::with_defaults(cfg, path, ClassDefaults::DDIM)
    }

    /// The schedule as diffusers' class with these constructor defaults builds it from `cfg`.
    pub fn with_defaults(cfg: &SchedulerConfig, path: &Path, d: ClassDefaults) -> Result<Self> {
        let n = cfg.num_train_timesteps.unwrap_or(1000);
        crate::models::in_range(path, "num_train_timesteps", n, 2, 100_000)?;
        let offset = cfg.steps_offset.unwrap_or(0);
        crate::models::in_range(path, "steps_offset", offset, 0, n / 2)?;
        for (key, v) in [
            ("clip_sample_range", cfg.clip_sample_range),
            ("sample_max_value", cfg.sample_max_value),
            ("sigma_min", cfg.sigma_min),
            ("sigma_max", cfg.sigma_max),
            ("timestep_scaling", cfg.timestep_scaling),
        ] {
            if let Some(v) = v {
                crate::models::positive(path, key, v, 1e6)?;
            }
        }
        if let Some(r) = cfg.dynamic_thresholding_ratio {
            crate::models::positive(path, "dynamic_thresholding_ratio", r, 1.0)?;
        }
        if cfg.lambda_min_clipped.is_some_and(f64::is_nan) {
            return Err(Error::config(path, "'lambda_min_clipped' is not a number"));
        }
        let prediction = match cfg.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            other => return Err(Error::config(path, format!("'prediction_type' = {other:?} is not supported"))),
        };
        let spacing = match cfg.timestep_spacing.as_deref() {
            None => d.spacing,
            Some("leading") => Spacing::Leading,
            Some("trailing") => Spacing::Trailing,
            Some("linspace") => Spacing::Linspace,
            Some(other) => return Err(Error::config(path, format!("'timestep_spacing' = {other:?} is not supported"))),
        };
        let betas = match &cfg.trained_betas {
            Some(b) if !b.is_empty() => {
                if b.len() != n {
                    return Err(Error::config(
                        path,
                        format!("'trained_betas' has {} values, 'num_train_timesteps' is {n}", b.len()),
                    ));
                }
                b.iter().map(|&x| x as f32).collect()
            }
            _ => {
                let start = cfg.beta_start.unwrap_or(d.beta_start);
                let end = cfg.beta_end.unwrap_or(d.beta_end);
                match cfg.beta_schedule.as_deref().unwrap_or(d.beta_schedule) {
                    "linear" => linspace_f32(start as f32, end as f32, n),
                    "scaled_linear" => {
                        linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n).into_iter().map(|b| b * b).collect()
                    }
                    "squaredcos_cap_v2" => cosine_betas(n),
                    other => return Err(Error::config(path, format!("'beta_schedule' = {other:?} is not supported"))),
                }
            }
        };
        // Every β must be a probability strictly between 0 and 1 (else ᾱ is 0, negative or NaN
        // and every picture comes out black).
        if let Some((i, b)) = betas.iter().enumerate().find(|(_, b)| !(**b > 0.0 && **b < 1.0)) {
            let source = if cfg.trained_betas.as_ref().is_some_and(|t| !t.is_empty()) {
                "'trained_betas'"
            } else {
                "'beta_start'/'beta_end'"
            };
            return Err(Error::config(path, format!("{source} give beta[{i}] = {b}, outside (0, 1)")));
        }
        let zero_snr = d.zero_snr && cfg.rescale_betas_zero_snr.unwrap_or(false);
        let betas = if zero_snr { rescale_zero_terminal_snr(&betas) } else { betas };
        let mut alphas_cumprod = cumprod(&betas);
        if zero_snr && d.pin_terminal {
            // diffusers: "close to 0 without being 0 so first sigma is not inf".
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }
        Ok(Self { num_train_timesteps: n, prediction, spacing, steps_offset: offset, alphas_cumprod })
    }
}

/// `torch.cumprod(1 - betas)` in float32: `1 - β` in f32, the running product accumulated in f64
/// (torch's CPU `acc_type` for float), each partial product stored as f32.
fn cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    betas
        .iter()
        .map(|b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=float32)`: the first half counts up from `start`, the
/// second half down from `end`, as torch's CPU kernel does.
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 }).collect()
}

/// diffusers `betas_for_alpha_bar(..., "cosine")` (Nichol & Dhariwal 2021), computed in f64 then
/// stored as f32 like `torch.tensor(betas, dtype=torch.float32)`. (candle's version divides
/// integers and is wrong.)
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers `rescale_zero_terminal_snr` (Lin et al. 2023, "Common Diffusion Noise Schedules and
/// Sample Steps are Flawed", Algorithm 1), in f32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut sqrt_bar: Vec<f32> = cumprod(betas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = *sqrt_bar.last().unwrap();
    for s in sqrt_bar.iter_mut() {
        *s -= last;
        *s *= first / (first - last);
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut alphas = vec![bar[0]];
    alphas.extend(bar.windows(2).map(|w| w[1] / w[0]));
    alphas.iter().map(|a| 1.0 - a).collect()
}

/// `np.arange(start, stop, step)` in f64 as numpy computes it (length `ceil((stop-start)/step)`,
/// values `start + i·delta` with `delta = (start+step) - start`).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len <= 0.0 || !len.is_finite() {
        return Vec::new();
    }
    let delta = (start + step) - start;
    (0..len as usize).map(|i| start + i as f64 * delta).collect()
}

/// `np.linspace(start, stop, n)` (numpy: `start + i·step`, the last value set to `stop`).
pub fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
    v[n - 1] = stop;
    v
}

/// The integer timesteps diffusers' DDIM-family `set_timesteps` produces for `steps`.
pub fn spaced_timesteps(s: &Schedule, steps: usize) -> Vec<i64> {
    let t = s.num_train_timesteps;
    match s.spacing {
        Spacing::Linspace => {
            np_linspace(0.0, (t - 1) as f64, steps).iter().rev().map(|x| x.round_ties_even() as i64).collect()
        }
        Spacing::Leading => {
            let ratio = (t / steps) as i64;
            (0..steps as i64).rev().map(|i| i * ratio + s.steps_offset as i64).collect()
        }
        Spacing::Trailing => {
            let ratio = t as f64 / steps as f64;
            np_arange(t as f64, 0.0, -ratio).iter().map(|x| x.round_ties_even() as i64 - 1).collect()
        }
    }
}

/// Where img2img starts, as diffusers' `get_timesteps`: `init = min(int(steps·strength), steps)`,
/// `t_start = steps - init`, and the kept timesteps are `timesteps[t_start·order:]`.
pub fn strength_start(steps: usize, strength: f64, order: usize) -> usize {
    let init = ((steps as f64 * strength) as usize).min(steps);
    (steps - init) * order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_start_matches_get_timesteps() {
        // int(20 * 0.55) = 11 in Python (20 * 0.55 = 11.000000000000002), so 9 steps are skipped.
        assert_eq!(strength_start(20, 0.55, 1), 9);
        assert_eq!(strength_start(10, 1.0, 1), 0);
        assert_eq!(strength_start(10, 0.0, 1), 10);
        // 0.29 * 100 = 28.999999999999996 truncates to 28.
        assert_eq!(strength_start(100, 0.29, 1), 72);
        assert_eq!(strength_start(5, 0.5, 2), 6);
    }

    #[test]
    fn np_arange_length_follows_numpy() {
        // numpy: np.arange(1000, 0, -1000/3) has 3 elements: 1000, 666.67, 333.33.
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 7.0).len(), 7);
    }

    #[test]
    fn linspace_ends_exactly() {
        let v = linspace_f32(0.1, 0.7, 7);
        assert_eq!(v[0], 0.1);
        assert_eq!(v[6], 0.7);
    }
}
