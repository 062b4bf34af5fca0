//! Euler ancestral (Karras et al. 2022 / k-diffusion `sample_euler_ancestral`), a port of diffusers'
//! `schedulers/scheduling_euler_ancestral_discrete.py`: an Euler step to σ_down, then fresh noise
//! scaled by σ_up, drawn every step (the last one is multiplied by σ_up = 0, as in diffusers).

use super::common::div;
use super::schedule::{ClassDefaults, PredictionType, SchedulerConfig};
use super::sigmas::KSigmas;
use super::Sampler;
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use candle_core::Tensor;
use std::path::Path;

#[derive(Debug)]
pub struct EulerAncestral {
    k: KSigmas,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, path: &Path, steps: usize) -> Result<Self> {
        // The class has no Karras option, no final_sigmas_type and no interpolation choice.
        let mut cfg = cfg.clone();
        cfg.use_karras_sigmas = None;
        cfg.interpolation_type = None;
        cfg.final_sigmas_type = None;
        cfg.timestep_type = None;
        let k = KSigmas::new(&cfg, path, steps, ClassDefaults::K, false, true)?;
        if k.schedule.prediction == PredictionType::Sample {
            return Err(Error::config(
                path,
                "'prediction_type' = \"sample\" is not supported by euler-a (as in diffusers)",
            ));
        }
        Ok(Self { k })
    }
}

impl Sampler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.k.timesteps
    }
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.k.scale(sample, index)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.k.add_noise(original, noise, index)
    }
    fn step(&mut self, out: &Tensor, index: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let (from, to) = (self.k.sigmas[index], self.k.sigmas[index + 1]);
        let x0 = self.k.x0(out, sample, from)?;
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let derivative = div(&(sample - x0)?, from)?;
        let prev = (sample + (derivative * (down - from))?)?;
        let z = noise.randn(sample.dims())?.to_device(sample.device())?.to_dtype(sample.dtype())?;
        Ok((prev + (z * up)?)?)
    }
}
