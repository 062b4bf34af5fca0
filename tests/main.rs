//! The integration suite: one binary, one module per area. Fixtures (tiny random-weight models in
//! the diffusers layout and diffusers' recorded runs) are made by `fixtures/generate.py`.

mod batch;
mod canny;
mod cli;
mod common;
mod configs;
mod controlnet;
mod hub;
mod labels;
mod loading;
mod lora;
mod parity;
mod preprocess;
mod samplers;
mod scheduler;
mod single_file;
mod tokenizer;
mod vae;
