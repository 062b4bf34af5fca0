//! Arithmetic every sampler shares: the model output converted to x₀ (or ε) for each prediction
//! type, Imagen's dynamic thresholding or plain clipping of x₀, the forward process `add_noise`, the
//! step-count check, and torch's true division by a float32 scalar.

use super::schedule::PredictionType;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

/// `t / s` as a true division by the f32 scalar, as torch divides by a 0-d float32 tensor (candle's
/// `Tensor / f64` multiplies by the reciprocal, which differs by an ulp — visible where σ ≫ 1).
pub(crate) fn div(t: &Tensor, s: f64) -> Result<Tensor> {
    let s = Tensor::new(s as f32, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&s)?)
}

/// x₀ from the model output for a sample `x = α·x₀ + σ·ε` (the variance-preserving form DDIM, LCM,
/// DPM-Solver and UniPC use; diffusers' `pred_original_sample` / `convert_model_output`).
pub fn predicted_x0(
    prediction: PredictionType,
    out: &Tensor,
    sample: &Tensor,
    alpha: f64,
    sigma: f64,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => ((sample - (out * sigma)?)? / alpha)?,
        PredictionType::Sample => out.clone(),
        PredictionType::VPrediction => ((sample * alpha)? - (out * sigma)?)?,
    })
}

/// ε from the model output for a sample `x = α·x₀ + σ·ε` (DDIM's direction term, UniPC with
/// `predict_x0 = false`).
pub fn predicted_eps(
    prediction: PredictionType,
    out: &Tensor,
    sample: &Tensor,
    alpha: f64,
    sigma: f64,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => out.clone(),
        PredictionType::Sample => ((sample - (out * alpha)?)? / sigma)?,
        PredictionType::VPrediction => ((out * alpha)? + (sample * sigma)?)?,
    })
}

/// diffusers `_threshold_sample` (Saharia et al. 2022, Imagen): per sample, clamp to the `ratio`
/// quantile of |x0| (at least 1, at most `max`) and divide by it.
pub fn threshold(x0: &Tensor, ratio: f64, max: f64) -> Result<Tensor> {
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

/// Dynamic thresholding when the config turns it on, else clipping to ±`clip` when that is on
/// (diffusers checks `thresholding` first, then `clip_sample`).
pub fn threshold_or_clip(x0: Tensor, thresholding: Option<(f64, f64)>, clip: Option<f64>) -> Result<Tensor> {
    if let Some((ratio, max)) = thresholding {
        threshold(&x0, ratio, max)
    } else if let Some(r) = clip {
        Ok(x0.clamp(-r as f32, r as f32)?)
    } else {
        Ok(x0)
    }
}

/// The forward process at ᾱ: `√ᾱ · original + √(1-ᾱ) · noise` (DDPM-family `add_noise`).
pub fn add_noise_vp(original: &Tensor, noise: &Tensor, alpha_cumprod: f64) -> Result<Tensor> {
    Ok(((original * alpha_cumprod.sqrt())? + (noise * (1.0 - alpha_cumprod).sqrt())?)?)
}

/// The forward process in σ-space: `original + σ · noise` (the k-diffusion family).
pub fn add_noise_sigma(original: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok((original + (noise * sigma)?)?)
}

/// `steps` must be within [1, `max`]; `why` says where the bound comes from.
pub fn check_steps(steps: usize, max: usize, why: &str) -> Result<()> {
    if steps == 0 || steps > max {
        return Err(Error::setting("steps", format!("must be within [1, {max}] ({why}), got {steps}")));
    }
    Ok(())
}
