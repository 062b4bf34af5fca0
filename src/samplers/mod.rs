//! Samplers: the noise schedule (read from `scheduler/scheduler_config.json`, [`schedule`]), the
//! σ spacing ([`sigmas`]) and the algorithm (one file each) are separate axes, as in k-diffusion and
//! stable-diffusion.cpp. Samplers index steps by position (never by searching timestep values),
//! keep their own state for multistep methods, and take any noise they need from the caller's
//! [`NoiseSource`], so a seeded run can be replayed and traced.
//!
//! Adding a sampler: one file implementing [`Sampler`], one row in [`SAMPLERS`] (the command line's
//! `--sampler` values and their help come from it), and one fixture case in
//! `tests/fixtures/generate.py` with its `sampler_parity!` line in `tests/parity.rs`.

pub mod common;
pub mod ddim;
pub mod dpmsolver;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod lcm;
pub mod schedule;
pub mod sigmas;
pub mod unipc;

pub use schedule::{
    np_arange, np_linspace, spaced_timesteps, strength_start, ClassDefaults, PredictionType, Schedule, SchedulerConfig,
    Spacing,
};

use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use candle_core::Tensor;
use std::path::Path;

/// One sampler algorithm (a diffusers scheduler class).
pub trait Sampler: Send {
    /// All timesteps after `set_timesteps`, as the UNet sees them.
    fn timesteps(&self) -> &[f64];
    /// diffusers' `scheduler.order` (entries per step in `timesteps`).
    fn order(&self) -> usize {
        1
    }
    /// img2img: the first index the loop will run (`set_begin_index`).
    fn set_begin_index(&mut self, _index: usize) {}
    /// `scale_model_input` for the step at `index`.
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// `add_noise(original, noise, timesteps[index])`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
    /// One step from the model output at `index`; any noise is drawn from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

/// Builds a sampler for (scheduler config, its path for messages, steps, Karras sigmas).
pub type Build = fn(&SchedulerConfig, &Path, usize, bool) -> Result<Box<dyn Sampler>>;

/// One row of the sampler table.
#[derive(Debug)]
pub struct SamplerSpec {
    /// The `--sampler` value (A1111/ComfyUI habits).
    pub name: &'static str,
    /// One line for `--help`.
    pub help: &'static str,
    /// The diffusers class (and settings) it reproduces.
    pub diffusers_class: &'static str,
    /// Typical step count at strength 1 (benches, examples).
    pub typical_steps: usize,
    /// Whether the diffusers class has `use_karras_sigmas`.
    pub karras: bool,
    pub build: Build,
}

/// Every sampler, in the order `--help` lists them.
pub static SAMPLERS: &[SamplerSpec] = &[
    SamplerSpec {
        name: "ddim",
        help: "DDIM, deterministic (eta 0); 20-50 steps",
        diffusers_class: "DDIMScheduler (eta 0)",
        typical_steps: 30,
        karras: false,
        build: |c, p, s, _| Ok(Box::new(ddim::Ddim::new(c, p, s)?)),
    },
    SamplerSpec {
        name: "euler",
        help: "Euler; 20-30 steps (--karras supported)",
        diffusers_class: "EulerDiscreteScheduler",
        typical_steps: 30,
        karras: true,
        build: |c, p, s, k| Ok(Box::new(euler::Euler::new(c, p, s, k)?)),
    },
    SamplerSpec {
        name: "euler-a",
        help: "Euler ancestral, adds fresh noise each step; 20-40 steps",
        diffusers_class: "EulerAncestralDiscreteScheduler",
        typical_steps: 30,
        karras: false,
        build: |c, p, s, _| Ok(Box::new(euler_ancestral::EulerAncestral::new(c, p, s)?)),
    },
    SamplerSpec {
        name: "heun",
        help: "Heun, 2 UNet calls per step; 10-20 steps (--karras supported)",
        diffusers_class: "HeunDiscreteScheduler",
        typical_steps: 15,
        karras: true,
        build: |c, p, s, k| Ok(Box::new(heun::Heun::new(c, p, s, k)?)),
    },
    SamplerSpec {
        name: "dpmpp-2m",
        help: "DPM++ 2M; 15-25 steps, the usual best choice (--karras supported)",
        diffusers_class: "DPMSolverMultistepScheduler (dpmsolver++, order 2)",
        typical_steps: 20,
        karras: true,
        build: |c, p, s, k| Ok(Box::new(dpmsolver::DpmSolver::new(c, p, s, k, false)?)),
    },
    SamplerSpec {
        name: "dpmpp-2m-sde",
        help: "DPM++ 2M SDE, stochastic; 15-25 steps (--karras supported)",
        diffusers_class: "DPMSolverMultistepScheduler (sde-dpmsolver++, order 2)",
        typical_steps: 20,
        karras: true,
        build: |c, p, s, k| Ok(Box::new(dpmsolver::DpmSolver::new(c, p, s, k, true)?)),
    },
    SamplerSpec {
        name: "unipc",
        help: "UniPC predictor-corrector; 8-15 steps (--karras supported)",
        diffusers_class: "UniPCMultistepScheduler",
        typical_steps: 15,
        karras: true,
        build: |c, p, s, k| Ok(Box::new(unipc::UniPc::new(c, p, s, k)?)),
    },
    SamplerSpec {
        name: "lcm",
        help: "LCM, for LCM-LoRA/LCM models; 4-8 steps with --guidance 1-1.5",
        diffusers_class: "LCMScheduler",
        typical_steps: 4,
        karras: false,
        build: |c, p, s, _| Ok(Box::new(lcm::Lcm::new(c, p, s)?)),
    },
];

/// A sampler chosen by name: a handle to its row of [`SAMPLERS`].
#[derive(Debug, Clone, Copy)]
pub struct SamplerKind(&'static SamplerSpec);

impl PartialEq for SamplerKind {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for SamplerKind {}

impl SamplerKind {
    /// Every sampler, in table order.
    pub fn all() -> impl Iterator<Item = SamplerKind> {
        SAMPLERS.iter().map(SamplerKind)
    }

    pub fn by_name(name: &str) -> Option<SamplerKind> {
        SAMPLERS.iter().find(|s| s.name == name).map(SamplerKind)
    }

    pub fn spec(self) -> &'static SamplerSpec {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.0.name
    }

    pub fn diffusers_class(self) -> &'static str {
        self.0.diffusers_class
    }

    pub fn typical_steps(self) -> usize {
        self.0.typical_steps
    }

    pub fn supports_karras(self) -> bool {
        self.0.karras
    }

    /// Builds the sampler for `steps` inference steps from the model's scheduler config.
    /// `karras` (the `--karras` flag) or the config's own `use_karras_sigmas` selects Karras sigmas.
    pub fn build(self, cfg: &SchedulerConfig, path: &Path, steps: usize, karras: bool) -> Result<Box<dyn Sampler>> {
        if karras && !self.supports_karras() {
            return Err(Error::setting(
                "karras",
                format!(
                    "is not available for the {} sampler ({} has no use_karras_sigmas; use one of {})",
                    self.name(),
                    self.diffusers_class(),
                    Self::all().filter(|k| k.supports_karras()).map(|k| k.name()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let k = karras || (self.supports_karras() && cfg.use_karras_sigmas.unwrap_or(false));
        (self.0.build)(cfg, path, steps, k)
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::by_name(s).ok_or_else(|| {
            let names: Vec<&str> = SAMPLERS.iter().map(|s| s.name).collect();
            Error::setting("sampler", format!("{s:?} is unknown (samplers: {})", names.join(", ")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parse_back() {
        for k in SamplerKind::all() {
            assert_eq!(k.name().parse::<SamplerKind>().unwrap(), k);
            assert_eq!(SAMPLERS.iter().filter(|s| s.name == k.name()).count(), 1);
        }
        assert!("euler_a".parse::<SamplerKind>().is_err());
    }
}
