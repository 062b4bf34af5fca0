//! DPM-Solver++(2M) and its SDE variant (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
//! Sampling of Diffusion Probabilistic Models"), a port of diffusers'
//! `schedulers/scheduling_dpmsolver_multistep.py` with `algorithm_type` "dpmsolver++" or
//! "sde-dpmsolver++" and `solver_order = 2`: data-prediction (x₀) multistep updates in λ = log(α/σ),
//! lower-order warm-up and final steps, Karras sigmas as an option. The SDE variant draws one noise
//! tensor every step (the last is multiplied by σ = 0, as in diffusers).

use super::common::threshold;
use super::schedule::SchedulerConfig;
use super::sigmas::{alpha_sigma, lambda, MultistepSigmas};
use super::Sampler;
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use candle_core::Tensor;
use std::path::Path;

#[derive(Debug)]
pub struct DpmSolver {
    m: MultistepSigmas,
    sde: bool,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    thresholding: Option<(f64, f64)>,
    /// x₀ predictions of the previous and current step.
    outputs: [Option<Tensor>; 2],
    lower_order_nums: usize,
}

impl DpmSolver {
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize, karras_on: bool, sde: bool) -> Result<Self> {
        if let Some(v) = cfg.variance_type.as_deref() {
            return Err(Error::config(path, format!("'variance_type' = {v:?} is not supported")));
        }
        let m = MultistepSigmas::new(
            cfg,
            path,
            steps,
            karras_on,
            cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            false,
        )?;
        let heun = match cfg.solver_type.as_deref().unwrap_or("midpoint") {
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => return Err(Error::config(path, format!("'solver_type' = {other:?} is not supported"))),
        };
        let thresholding = cfg.thresholding();
        Ok(Self {
            final_zero: cfg.final_sigmas_type.as_deref().unwrap_or("zero") == "zero",
            m,
            sde,
            heun,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            thresholding,
            outputs: [None, None],
            lower_order_nums: 0,
        })
    }
}

impl Sampler for DpmSolver {
    fn timesteps(&self) -> &[f64] {
        &self.m.timesteps
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.m.add_noise(original, noise, index)
    }
    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let n = self.m.timesteps.len();
        let lower_final = i == n - 1 && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_zero);
        let mut x0 = self.m.x0(out, sample, i)?;
        if let Some((ratio, max)) = self.thresholding {
            x0 = threshold(&x0, ratio, max)?;
        }
        self.outputs = [self.outputs[1].take(), Some(x0)];
        let z = if self.sde {
            Some(noise.randn(sample.dims())?.to_device(sample.device())?.to_dtype(sample.dtype())?)
        } else {
            None
        };
        let s = &self.m.sigmas;
        let (alpha_t, sigma_t) = alpha_sigma(s[i + 1]);
        let (_, sigma_s0) = alpha_sigma(s[i]);
        let h = lambda(s[i + 1]) - lambda(s[i]);
        let m0 = self.outputs[1].as_ref().expect("set above");
        let first = self.lower_order_nums < 1 || lower_final;
        let prev = if first {
            if self.sde {
                let noise_coef = sigma_t * (1.0 - (-2.0 * h).exp()).sqrt();
                ((sample * (sigma_t / sigma_s0 * (-h).exp()))?
                    + (m0 * (alpha_t * (1.0 - (-2.0 * h).exp())))?
                    + (z.as_ref().unwrap() * noise_coef)?)?
            } else {
                ((sample * (sigma_t / sigma_s0))? - (m0 * (alpha_t * ((-h).exp() - 1.0)))?)?
            }
        } else {
            let m1 = self.outputs[0].as_ref().expect("a previous output after warm-up");
            let h0 = lambda(s[i]) - lambda(s[i - 1]);
            let r0 = h0 / h;
            let d1 = ((m0 - m1)? * (1.0 / r0))?;
            if self.sde {
                let e = 1.0 - (-2.0 * h).exp();
                let d1_coef = if self.heun { alpha_t * (e / (-2.0 * h) + 1.0) } else { 0.5 * alpha_t * e };
                let noise_coef = sigma_t * e.sqrt();
                ((((sample * (sigma_t / sigma_s0 * (-h).exp()))? + (m0 * (alpha_t * e))?)? + (d1 * d1_coef)?)?
                    + (z.as_ref().unwrap() * noise_coef)?)?
            } else {
                let e = (-h).exp() - 1.0;
                let base = ((sample * (sigma_t / sigma_s0))? - (m0 * (alpha_t * e))?)?;
                if self.heun {
                    (base + (d1 * (alpha_t * (e / h + 1.0)))?)?
                } else {
                    (base - (d1 * (0.5 * alpha_t * e))?)?
                }
            }
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
