//! One UNet step of the full-size SD1.5 architecture (random weights: compute does not depend on
//! weight values) at 512×512 with classifier-free guidance (batch 2), f32 on the CPU.
//! Opt-in, since one step takes tens of seconds on a laptop CPU:
//!
//!     GHIBLIFY_BENCH_FULL=1 cargo bench --bench unet

// Why this allocator: src/alloc.rs.
#[global_allocator]
static GLOBAL: ghiblify::alloc::Allocator = ghiblify::alloc::Allocator {};

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use ghiblify::models::random::{random_var_builder, SD15_UNET_CONFIG};
use ghiblify::models::unet::{UNet, UNetConfig};
use std::path::Path;

fn unet_step(c: &mut Criterion) {
    ghiblify::alloc::keep_freed_memory();
    if std::env::var_os("GHIBLIFY_BENCH_FULL").is_none() {
        eprintln!("unet: skipped (set GHIBLIFY_BENCH_FULL=1 to run the full-size UNet step, ~30 s per iteration here)");
        return;
    }
    let dev = Device::Cpu;
    let cfg: UNetConfig = serde_json::from_str(SD15_UNET_CONFIG).unwrap();
    let unet = UNet::from_config(cfg, random_var_builder(DType::F32, &dev), Path::new("sd15-unet")).unwrap();
    let latents = Tensor::randn(0f32, 1.0, (2, 4, 64, 64), &dev).unwrap();
    let context = Tensor::randn(0f32, 1.0, (2, 77, 768), &dev).unwrap();
    let mut g = c.benchmark_group("unet");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(60));
    g.bench_function("cpu_f32_512_unet_step_cfg", |b| b.iter(|| unet.forward(&latents, 500.0, &context).unwrap()));
    g.finish();
}

criterion_group!(benches, unet_step);
criterion_main!(benches);
