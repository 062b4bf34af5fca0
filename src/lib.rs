//! ghiblify: photos → Studio-Ghibli-style pictures with latent-diffusion img2img, computing what
//! diffusers' `StableDiffusionImg2ImgPipeline` computes, on candle.
//!
//! The flow is [`pipeline::StableDiffusion::img2img`]; the binary is a thin shell over
//! [`settings::Settings`] and [`run::run`].

pub mod alloc;
pub mod batch;
pub mod cli;
pub mod error;
pub mod hub;
pub mod image_io;
pub mod lora;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod printer;
pub mod run;
pub mod samplers;
pub mod settings;

pub use error::{Error, Result};
