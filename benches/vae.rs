//! VAE encode and decode of the full-size SD1.5 architecture and of TAESD (random weights:
//! compute does not depend on weight values) at 512×512, f32 on the CPU. Opt-in, since one KL
//! decode takes tens of seconds on a laptop CPU:
//!
//!     GHIBLIFY_BENCH_FULL=1 cargo bench --bench vae
//!
//! Peak memory and the tiled / 2048 px cases: `benches/vae_matrix.sh` (one process each).

// Why this allocator: src/alloc.rs.
#[global_allocator]
static GLOBAL: ghiblify::alloc::Allocator = ghiblify::alloc::Allocator {};

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use ghiblify::models::random::{random_var_builder, SD15_VAE_CONFIG};
use ghiblify::models::taesd::{TinyConfig, TinyVae};
use ghiblify::models::vae::{Vae, VaeConfig};
use std::path::Path;

fn vae(c: &mut Criterion) {
    ghiblify::alloc::keep_freed_memory();
    if std::env::var_os("GHIBLIFY_BENCH_FULL").is_none() {
        eprintln!(
            "vae: skipped (set GHIBLIFY_BENCH_FULL=1 to time the full-size VAE and TAESD, ~35 s per KL decode here)"
        );
        return;
    }
    let dev = Device::Cpu;
    let image = Tensor::randn(0f32, 0.5, (1, 3, 512, 512), &dev).unwrap();
    let latent = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &dev).unwrap();
    let kl = Vae::from_config(
        serde_json::from_str::<VaeConfig>(SD15_VAE_CONFIG).unwrap(),
        random_var_builder(DType::F32, &dev),
        Path::new("sd15-vae"),
    )
    .unwrap();
    let tiny = TinyVae::from_config(
        serde_json::from_str::<TinyConfig>("{}").unwrap(),
        random_var_builder(DType::F32, &dev),
        Path::new("taesd"),
    )
    .unwrap();
    let mut g = c.benchmark_group("vae");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(30));
    g.bench_function("taesd_encode_512", |b| b.iter(|| tiny.encode(&image).unwrap()));
    g.bench_function("taesd_decode_512", |b| b.iter(|| tiny.decode(&latent).unwrap()));
    g.bench_function("kl_encode_512", |b| b.iter(|| kl.encode(&image).unwrap()));
    g.bench_function("kl_decode_512", |b| b.iter(|| kl.decode(&latent).unwrap()));
    g.finish();
}

criterion_group!(benches, vae);
criterion_main!(benches);
