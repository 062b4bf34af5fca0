//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
//! Diffusion Models"), a port of diffusers' `schedulers/scheduling_unipc_multistep.py`
//! (`multistep_uni_p_bh_update`, `multistep_uni_c_bh_update`, `step`) with the B(h) variants bh1/bh2,
//! data prediction by default, any `solver_order`, lower-order warm-up and final steps.

use super::common::{predicted_eps, threshold};
use super::schedule::SchedulerConfig;
use super::sigmas::{alpha_sigma, lambda, MultistepSigmas};
use super::Sampler;
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use candle_core::Tensor;
use std::path::Path;

#[derive(Debug)]
pub struct UniPc {
    m: MultistepSigmas,
    order: usize,
    bh2: bool,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    thresholding: Option<(f64, f64)>,
    /// Converted model outputs, oldest first (`solver_order` slots).
    outputs: Vec<Option<Tensor>>,
    last_sample: Option<Tensor>,
    this_order: usize,
    lower_order_nums: usize,
}

/// Solves the small dense system `a · x = b` (Gaussian elimination with partial pivoting).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (v, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

impl UniPc {
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize, karras_on: bool) -> Result<Self> {
        let m = MultistepSigmas::new(cfg, path, steps, karras_on, f64::NEG_INFINITY, true)?;
        let bh2 = match cfg.solver_type.as_deref().unwrap_or("bh2") {
            "bh2" | "midpoint" | "heun" | "logrho" => true,
            "bh1" => false,
            other => return Err(Error::config(path, format!("'solver_type' = {other:?} is not supported"))),
        };
        let order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&order) {
            return Err(Error::config(path, format!("'solver_order' = {order} is not supported (1 to 3)")));
        }
        let thresholding = cfg.thresholding();
        Ok(Self {
            m,
            order,
            bh2,
            predict_x0: cfg.predict_x0.unwrap_or(true),
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            disable_corrector: cfg.disable_corrector.clone().unwrap_or_default(),
            thresholding,
            outputs: vec![None; order],
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
        })
    }

    fn convert(&self, out: &Tensor, sample: &Tensor, index: usize) -> Result<Tensor> {
        if self.predict_x0 {
            let mut x0 = self.m.x0(out, sample, index)?;
            if let Some((ratio, max)) = self.thresholding {
                x0 = threshold(&x0, ratio, max)?;
            }
            return Ok(x0);
        }
        let (a, s) = alpha_sigma(self.m.sigmas[index]);
        predicted_eps(self.m.schedule.prediction, out, sample, a, s)
    }

    /// h, φ-terms and B(h) of the update from σ_{s0} to σ_t.
    fn coefficients(&self, h: f64, order: usize, rks: &[f64]) -> (f64, f64, Vec<Vec<f64>>, Vec<f64>) {
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (h_phi_1, b_h, r, b)
    }

    /// `x_t_` — the first-order part shared by predictor and corrector.
    fn base(&self, x: &Tensor, m0: &Tensor, sigma_t: f64, sigma_s0: f64, h_phi_1: f64) -> Result<Tensor> {
        let (alpha_t, st) = alpha_sigma(sigma_t);
        let (alpha_s0, ss0) = alpha_sigma(sigma_s0);
        Ok(if self.predict_x0 {
            ((x * (st / ss0))? - (m0 * (alpha_t * h_phi_1))?)?
        } else {
            ((x * (alpha_t / alpha_s0))? - (m0 * (st * h_phi_1))?)?
        })
    }

    fn scale_t(&self, sigma_t: f64) -> f64 {
        let (a, s) = alpha_sigma(sigma_t);
        if self.predict_x0 {
            a
        } else {
            s
        }
    }

    /// Predictor (`multistep_uni_p_bh_update`) from step `i` to `i + 1`.
    fn predict(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let s = &self.m.sigmas;
        let m0 = self.outputs[self.order - 1].as_ref().expect("current output");
        let h = lambda(s[i + 1]) - lambda(s[i]);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let mk = self.outputs[self.order - 1 - k].as_ref().expect("history for this order");
            let rk = (lambda(s[i - k]) - lambda(s[i])) / h;
            d1s.push(((mk - m0)? / rk)?);
            rks.push(rk);
        }
        rks.push(1.0);
        let (h_phi_1, b_h, r, b) = self.coefficients(h, order, &rks);
        let x_t = self.base(x, m0, s[i + 1], s[i], h_phi_1)?;
        if d1s.is_empty() {
            return Ok(x_t);
        }
        let rhos: Vec<f64> = if order == 2 {
            vec![0.5]
        } else {
            let n = order - 1;
            solve(r[..n].iter().map(|row| row[..n].to_vec()).collect(), b[..n].to_vec())
        };
        let mut res = (&d1s[0] * rhos[0])?;
        for (d, rho) in d1s.iter().zip(&rhos).skip(1) {
            res = (res + (d * *rho)?)?;
        }
        Ok((x_t - (res * (self.scale_t(s[i + 1]) * b_h))?)?)
    }

    /// Corrector (`multistep_uni_c_bh_update`) of the sample at step `i` given its model output.
    fn correct(&self, model_t: &Tensor, last: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let s = &self.m.sigmas;
        let m0 = self.outputs[self.order - 1].as_ref().expect("previous output");
        let h = lambda(s[i]) - lambda(s[i - 1]);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let mk = self.outputs[self.order - 1 - k].as_ref().expect("history for this order");
            let rk = (lambda(s[i - 1 - k]) - lambda(s[i - 1])) / h;
            d1s.push(((mk - m0)? / rk)?);
            rks.push(rk);
        }
        rks.push(1.0);
        let (h_phi_1, b_h, r, b) = self.coefficients(h, order, &rks);
        let x_t = self.base(last, m0, s[i], s[i - 1], h_phi_1)?;
        let rhos: Vec<f64> = if order == 1 { vec![0.5] } else { solve(r, b) };
        let d1_t = (model_t - m0)?;
        let mut corr = (d1_t * rhos[rhos.len() - 1])?;
        for (d, rho) in d1s.iter().zip(&rhos) {
            corr = (corr + (d * *rho)?)?;
        }
        Ok((x_t - (corr * (self.scale_t(s[i]) * b_h))?)?)
    }
}

impl Sampler for UniPc {
    fn timesteps(&self) -> &[f64] {
        &self.m.timesteps
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.m.add_noise(original, noise, index)
    }
    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let converted = self.convert(out, sample, i)?;
        let mut sample = sample.clone();
        if i > 0 && !self.disable_corrector.contains(&(i - 1)) {
            if let Some(last) = self.last_sample.take() {
                sample = self.correct(&converted, &last, i, self.this_order)?;
            }
        }
        self.outputs.remove(0);
        self.outputs.push(Some(converted));
        let n = self.m.timesteps.len();
        let this_order = if self.lower_order_final { self.order.min(n - i) } else { self.order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev = self.predict(&sample, i, self.this_order)?;
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::solve;

    #[test]
    fn solves_a_small_system() {
        let x = solve(vec![vec![2.0, 1.0], vec![1.0, 3.0]], vec![3.0, 5.0]);
        assert!((x[0] - 0.8).abs() < 1e-12 && (x[1] - 1.4).abs() < 1e-12);
    }
}
