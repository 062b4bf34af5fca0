//! Time and peak memory of one VAE operation on the full-size SD1.5 architecture with random
//! weights (compute and memory do not depend on weight values), one operation per process so
//! the peak resident memory (VmHWM) is that operation's:
//!
//!     cargo run --release --example vae_probe -- kl|kl-tiled|taesd encode|decode SIZE
//!
//! `benches/vae_matrix.sh` runs the table the README shows. Linux only (reads /proc/self/status).

use candle_core::{DType, Device, Tensor};
use ghiblify::models::random::{random_var_builder, SD15_VAE_CONFIG};
use ghiblify::models::taesd::{TinyConfig, TinyVae};
use ghiblify::models::vae::{Vae, VaeConfig};
use std::path::Path;
use std::time::Instant;

fn status_kb(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (kind, op, size) = match args.as_slice() {
        [k, o, s] => (k.as_str(), o.as_str(), s.parse::<usize>().expect("SIZE is a number")),
        _ => {
            eprintln!("usage: vae_probe kl|kl-tiled|taesd encode|decode SIZE");
            std::process::exit(2);
        }
    };
    let dev = Device::Cpu;
    let vb = random_var_builder(DType::F32, &dev);
    let image = Tensor::randn(0f32, 0.5, (1, 3, size, size), &dev).unwrap();
    let latent = Tensor::randn(0f32, 1.0, (1, 4, size / 8, size / 8), &dev).unwrap();
    enum Model {
        Kl(Box<Vae>),
        Tiny(Box<TinyVae>),
    }
    let model = match kind {
        "kl" | "kl-tiled" => {
            let cfg: VaeConfig = serde_json::from_str(SD15_VAE_CONFIG).unwrap();
            Model::Kl(Box::new(Vae::from_config(cfg, vb, Path::new("sd15-vae")).unwrap()))
        }
        "taesd" => {
            let cfg: TinyConfig = serde_json::from_str("{}").unwrap();
            Model::Tiny(Box::new(TinyVae::from_config(cfg, vb, Path::new("taesd")).unwrap()))
        }
        _ => panic!("unknown kind {kind}"),
    };
    let weights_kb = status_kb("VmRSS:");
    let t = Instant::now();
    let tiled = kind == "kl-tiled";
    let result = match (&model, op, tiled) {
        (Model::Kl(v), "encode", false) => v.encode(&image).unwrap().mean,
        (Model::Kl(v), "encode", true) => v.encode_tiled(&image).unwrap().mean,
        (Model::Kl(v), _, false) => v.decode(&latent).unwrap(),
        (Model::Kl(v), _, true) => v.decode_tiled(&latent).unwrap(),
        (Model::Tiny(v), "encode", _) => v.encode(&image).unwrap(),
        (Model::Tiny(v), _, _) => v.decode(&latent).unwrap(),
    };
    let out = (result, t.elapsed());
    println!(
        "{kind} {op} {size}: {:.2} s, peak RSS {:.2} GB (weights and inputs {:.2} GB), output {:?}",
        out.1.as_secs_f64(),
        status_kb("VmHWM:") as f64 / 1e6,
        weights_kb as f64 / 1e6,
        out.0.dims()
    );
}
