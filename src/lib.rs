//! ghiblify: photos → Studio-Ghibli-style pictures with latent-diffusion img2img, computing what
//! diffusers' `StableDiffusionImg2ImgPipeline` computes, on candle.
//!
//! The flow is [`pipeline::StableDiffusion::img2img`]; the binary (its command line included) is a
//! thin shell over [`settings::Settings`] and [`run::run`]. docs/ARCHITECTURE.md maps the code.

pub mod alloc;
pub mod batch;
pub mod canny;
pub mod control;
pub mod credentials;
pub mod device;
pub mod error;
pub mod guard;
pub mod hub;
pub mod image_io;
pub mod lora;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod presets;
pub mod printer;
pub mod provenance;
pub mod repo;
pub mod run;
pub mod samplers;
pub mod settings;
pub mod watermark;

pub use error::{Error, Result};
