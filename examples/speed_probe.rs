//! Time and peak memory of the hot operations on the full-size SD1.5 architecture with random
//! weights (compute does not depend on weight values): median of N runs after one warm-up.
//!
//!     cargo run --release --example speed_probe -- unet|unet-b1|controlnet|controlnet-b1|vae-decode|vae-encode|taesd|attention|matmul|conv|conv-shapes|gemm-shapes|linear-shapes [N] [f32|f16|bf16|q8] [cpu|cuda]
//!     cargo run --release --example speed_probe -- load [N] [f32|f16|bf16|q8] DIR
//!     cargo run --release --example speed_probe -- conv-shapes [N] [f32|bf16] [unet|vae|taesd|"unet b1 up"|"unet b1 1x640->640"...]
//!     GHIBLIFY_PROBE_WEIGHTS=16 cargo run --release --example speed_probe -- conv-shapes ...
//!
//! `load` times loading the diffusers folder DIR (text encoder, UNet, VAE, as a run does; warm page
//! cache after the warm-up): weights read in place where stored as the run keeps them
//! (`GHIBLIFY_IN_PLACE=0` copies them, as before).
//!
//! `conv-shapes` with `GHIBLIFY_PROBE_WINOGRAD=1` (or `0`) runs every shape through Winograd (or
//! im2col) whatever the size rules pick; with `both`, through each in turn (im2col / Winograd).
//!
//! `conv-shapes` with `GHIBLIFY_PROBE_WEIGHTS=N` takes N weights of each shape in turn, so that
//! every call reads its weight from memory as in a model run (a single weight stays in a large L3
//! cache: the UNet's 1280 → 1280 at 8² ran 1.7 ms that way and 2.8–3.4 ms with 16, as in the UNet).
//!
//! `controlnet` times one SD1.5 ControlNet call at the CFG batch, `controlnet-b1` without CFG (as
//! with `--fast`): the added cost per step of `--control`; compare with `unet` / `unet-b1`.
//!
//! `benches/compare_torch.py` runs diffusers on the same shapes and prints the ratio;
//! `scripts/gpu-check` does the same on a GPU (built with `scripts/build-cuda --example speed_probe`,
//! which synchronises the device before reading the clock). Linux only for the memory figure
//! (reads /proc/self/status; on a GPU the device memory is the parent's to measure).

use candle_core::{DType, Device, Module, Tensor};
use ghiblify::models::random::{random_var_builder, SD15_UNET_CONFIG, SD15_VAE_CONFIG};
use ghiblify::models::unet::{UNet, UNetConfig};
use ghiblify::models::vae::{Vae, VaeConfig};
use std::path::Path;
use std::time::Instant;

// Why this allocator: src/alloc.rs.
#[global_allocator]
static GLOBAL: ghiblify::alloc::Allocator = ghiblify::alloc::Allocator {};

fn status_kb(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    ghiblify::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(String::as_str).unwrap_or("unet");
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let dtype = match args.get(2).map(String::as_str) {
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        _ => DType::F32,
    };
    // q8: f32 weights quantised to int8 as the layers are built (`--dtype q8`); the autoencoders
    // stay f32 under q8, as in the pipeline.
    let q8 = args.get(2).map(String::as_str) == Some("q8") && !what.starts_with("vae") && what != "taesd";
    if what == "gemm-shapes" {
        gemm_shapes(n);
        return Ok(());
    }
    if what == "linear-shapes" {
        return linear_shapes(n, args.get(2).map(String::as_str) == Some("bf16"));
    }
    if what == "conv-shapes" {
        return conv_shapes(n, args.get(2).map(String::as_str) == Some("bf16"), args.get(3).map_or("", String::as_str));
    }
    if what == "load" {
        let dir = args.get(3).ok_or_else(|| anyhow::anyhow!("load needs a model folder: load N DTYPE DIR"))?;
        let q8 = args.get(2).map(String::as_str) == Some("q8");
        let dtype = if q8 { DType::F32 } else { dtype };
        let extras = ghiblify::pipeline::Extras { quantize: q8, ..Default::default() };
        let load = || ghiblify::pipeline::StableDiffusion::load_with(Path::new(dir), &Device::Cpu, dtype, extras);
        let label = if q8 { "q8".to_string() } else { format!("{dtype:?}") };
        return report(what, &label, n, &Device::Cpu, &mut || {
            drop(load().map_err(|e| candle_core::Error::Msg(e.to_string()))?);
            Tensor::zeros(1, DType::F32, &Device::Cpu)
        });
    }
    let dev = match args.get(3).map(String::as_str) {
        Some("cuda") => Device::new_cuda(0)?,
        _ => Device::Cpu,
    };
    // Activations in the compute dtype the pipeline uses on this device.
    let act = ghiblify::models::compute_dtype(&dev, dtype);
    let vb = random_var_builder(dtype, &dev);
    type Run = Box<dyn FnMut() -> candle_core::Result<Tensor>>;
    let mut run: Run = ghiblify::models::nn::quantized(q8, || -> anyhow::Result<Run> {
        Ok(match what {
            "unet" | "unet-b1" => {
                let b = if what == "unet" { 2 } else { 1 };
                let cfg: UNetConfig = serde_json::from_str(SD15_UNET_CONFIG)?;
                let unet = UNet::from_config(cfg, vb, Path::new("sd15-unet"))?;
                let latents = Tensor::randn(0f32, 1.0, (b, 4, 64, 64), &dev)?.to_dtype(act)?;
                let context = Tensor::randn(0f32, 1.0, (b, 77, 768), &dev)?.to_dtype(act)?;
                Box::new(move || unet.forward(&latents, 500.0, &context))
            }
            "controlnet" | "controlnet-b1" => {
                let b = if what == "controlnet" { 2 } else { 1 };
                let cfg: ghiblify::models::controlnet::ControlNetConfig = serde_json::from_str(SD15_UNET_CONFIG)?;
                let cn = ghiblify::models::controlnet::ControlNet::from_config(cfg, vb, Path::new("sd15-controlnet"))?;
                let latents = Tensor::randn(0f32, 1.0, (b, 4, 64, 64), &dev)?.to_dtype(act)?;
                let context = Tensor::randn(0f32, 1.0, (b, 77, 768), &dev)?.to_dtype(act)?;
                let cond = Tensor::rand(0f32, 1.0, (b, 3, 512, 512), &dev)?.to_dtype(act)?;
                Box::new(move || Ok(cn.forward(&latents, 500.0, &context, &cond, 1.0)?.mid))
            }
            "vae-decode" | "vae-encode" => {
                let cfg: VaeConfig = serde_json::from_str(SD15_VAE_CONFIG)?;
                let vae = Vae::from_config(cfg, vb, Path::new("sd15-vae"))?;
                let image = Tensor::randn(0f32, 0.5, (1, 3, 512, 512), &dev)?.to_dtype(act)?;
                let latent = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &dev)?.to_dtype(act)?;
                if what == "vae-decode" {
                    Box::new(move || vae.decode(&latent))
                } else {
                    Box::new(move || Ok(vae.encode(&image)?.mean))
                }
            }
            "taesd" => {
                // A fast run's autoencoder work: one TAESD encode and one decode at 512².
                let cfg: ghiblify::models::taesd::TinyConfig = serde_json::from_str("{}")?;
                let tiny = ghiblify::models::taesd::TinyVae::from_config(cfg, vb, Path::new("taesd"))?;
                let image = Tensor::randn(0f32, 0.5, (1, 3, 512, 512), &dev)?.to_dtype(act)?;
                Box::new(move || tiny.decode(&tiny.encode(&image)?))
            }
            "attention" => {
                // The UNet's largest attention at 512² with CFG: 4096 tokens, 8 heads of 40.
                let t = || Tensor::randn(0f32, 1.0, (2, 4096, 320), &dev);
                let (q, k, v) = (t()?, t()?, t()?);
                let bf16 = dtype == DType::BF16 && ghiblify::models::kernels::bf16_arithmetic();
                Box::new(move || ghiblify::models::kernels::attention(&q, &k, &v, 8, bf16))
            }
            "matmul" => {
                let a = Tensor::randn(0f32, 1.0, (4096, 4096), &dev)?;
                let b = Tensor::randn(0f32, 1.0, (4096, 4096), &dev)?;
                Box::new(move || a.matmul(&b))
            }
            "conv" => {
                let x = Tensor::randn(0f32, 1.0, (2, 320, 64, 64), &dev)?;
                let conv = ghiblify::models::nn::conv2d(vb.pp("c"), 320, 320, 3, 1, 1)?;
                Box::new(move || conv.forward(&x))
            }
            other => anyhow::bail!("unknown probe {other}"),
        })
    })?;
    let label = if q8 { "q8".to_string() } else { format!("{dtype:?}") };
    report(what, &label, n, &dev, &mut run)
}

/// Times `run` once to warm up, then `n` times, and prints the median and the peak RSS.
fn report(
    what: &str,
    label: &str,
    n: usize,
    dev: &Device,
    run: &mut dyn FnMut() -> candle_core::Result<Tensor>,
) -> anyhow::Result<()> {
    let loaded_kb = status_kb("VmRSS:");
    // A GPU queues work: the clock is read once the device has finished it.
    let mut timed = || -> anyhow::Result<f64> {
        dev.synchronize()?;
        let t = Instant::now();
        let out = run()?;
        dev.synchronize()?;
        drop(out);
        Ok(t.elapsed().as_secs_f64())
    };
    eprintln!("{what}: warm-up {:.2} s", timed()?);
    let mut times = Vec::new();
    for _ in 0..n.max(1) {
        times.push(timed()?);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{what} {label}: median {:.3} s of {} ({:?}), peak RSS {:.2} GB (loaded {:.2} GB)",
        times[times.len() / 2],
        times.len(),
        times.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>(),
        status_kb("VmHWM:") as f64 / 1e6,
        loaded_kb as f64 / 1e6
    );
    Ok(())
}

/// Every 3×3 stride-1 convolution shape of a 512² run (UNet at the CFG batch, KL VAE decoder,
/// TAESD), best of `n`: run once with `GHIBLIFY_WINOGRAD=0` and once without to compare the two
/// algorithms layer by layer. `only`: the shapes of one model (unet, vae, taesd).
/// `GHIBLIFY_PROBE_WEIGHTS=N` takes N weights per shape in turn (see below).
fn conv_shapes(n: usize, bf16: bool, only: &str) -> anyhow::Result<()> {
    use ghiblify::models::kernels::{conv2d, upsample2x_conv2d, Weight};
    let shapes: &[(&str, usize, usize, usize, usize)] = &[
        ("unet", 2, 320, 320, 64),
        ("unet", 2, 640, 320, 64),
        ("unet", 2, 320, 640, 32),
        ("unet", 2, 640, 640, 32),
        ("unet", 2, 1280, 640, 32),
        ("unet", 2, 640, 1280, 16),
        ("unet", 2, 1280, 1280, 16),
        ("unet", 2, 2560, 1280, 16),
        ("unet", 2, 1280, 1280, 8),
        ("unet b1", 1, 640, 640, 32),
        ("unet b1", 1, 1280, 640, 32),
        ("unet b1", 1, 1280, 1280, 32),
        ("unet b1", 1, 1920, 640, 32),
        ("unet b1", 1, 960, 320, 64),
        ("unet b1", 1, 1280, 1280, 16),
        ("unet b1", 1, 2560, 1280, 16),
        ("unet b1", 1, 1280, 1280, 8),
        // The up blocks' upsamplers: ×2 nearest, then the 3×3 convolution (`upsample2x_conv2d`);
        // the size is the input's.
        ("unet b1 up", 1, 1280, 1280, 8),
        ("unet b1 up", 1, 1280, 1280, 16),
        ("unet b1 up", 1, 640, 640, 32),
        ("vae", 1, 512, 512, 64),
        ("vae", 1, 512, 512, 128),
        ("vae", 1, 512, 512, 256),
        ("vae", 1, 256, 256, 256),
        ("vae", 1, 256, 128, 512),
        ("vae", 1, 128, 128, 512),
        ("taesd", 1, 64, 64, 64),
        ("taesd", 1, 64, 64, 128),
        ("taesd", 1, 64, 64, 256),
        ("taesd", 1, 64, 64, 512),
        ("taesd", 1, 3, 64, 512),
        ("taesd", 1, 64, 3, 512),
        ("unet in/out", 2, 4, 320, 64),
        ("unet in/out", 2, 320, 4, 64),
        ("vae in/out", 1, 3, 128, 512),
        ("vae in/out", 1, 128, 3, 512),
        ("vae in/out", 1, 4, 512, 64),
        ("vae in/out", 1, 512, 8, 64),
    ];
    let dtype = if bf16 { DType::BF16 } else { DType::F32 };
    let label =
        |&(model, b, cin, cout, hw): &(&str, usize, usize, usize, usize)| format!("{model} {b}x{cin}->{cout} @{hw}²");
    // GHIBLIFY_PROBE_WEIGHTS=N: N weights of each shape taken in turn, so that each call reads its
    // weight from memory as in a model run (one weight stays in this machine's large L3 cache).
    let copies: usize = std::env::var("GHIBLIFY_PROBE_WEIGHTS").map_or(Ok(1), |v| v.parse())?;
    // GHIBLIFY_PROBE_WINOGRAD=1 (or 0): every shape through Winograd (or im2col) whatever its size,
    // to time a path the size rules do not pick; `both`: im2col / Winograd, alternating.
    let paths = match std::env::var("GHIBLIFY_PROBE_WINOGRAD").as_deref() {
        Ok("both") => vec![Some(false), Some(true)],
        Ok(v) => vec![Some(v == "1")],
        Err(_) => vec![None],
    };
    let path = std::cell::Cell::new(None);
    let mut totals = vec![0.0; paths.len()];
    for shape @ &(model, b, cin, cout, hw) in shapes.iter().filter(|s| label(s).starts_with(only)) {
        let x = Tensor::randn(0f32, 1.0, (b, cin, hw, hw), &Device::Cpu)?;
        let weights = (0..copies.max(1))
            .map(|_| Ok(Weight::Dense(Tensor::randn(0f32, 0.05, (cout, cin, 3, 3), &Device::Cpu)?.to_dtype(dtype)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let bias = Tensor::randn(0f32, 1.0, cout, &Device::Cpu)?;
        let turn = std::cell::Cell::new(0);
        let conv = || {
            let w = &weights[turn.get() % weights.len()];
            turn.set(turn.get() + 1);
            let run = || match model.ends_with(" up") {
                true => upsample2x_conv2d(&x, w, Some(&bias), 1, 1),
                false => conv2d(&x, w, Some(&bias), 1, 1),
            };
            match path.get() {
                Some(on) => ghiblify::models::kernels::with_winograd(on, run),
                None => run(),
            }
        };
        for &p in &paths {
            path.set(p);
            conv()?;
        }
        let mut bests = vec![f64::MAX; paths.len()];
        for _ in 0..n {
            // The paths in turn: a slow spell of the machine falls on each alike.
            for (best, &p) in bests.iter_mut().zip(&paths) {
                path.set(p);
                let t = Instant::now();
                conv()?;
                *best = best.min(t.elapsed().as_secs_f64());
            }
        }
        totals.iter_mut().zip(&bests).for_each(|(t, b)| *t += b);
        let times: Vec<String> = bests.iter().map(|b| format!("{:.1} ms", b * 1e3)).collect();
        println!("{}: {}", label(shape), times.join(" / "));
    }
    let totals: Vec<String> = totals.iter().map(|t| format!("{t:.3} s")).collect();
    println!("total {}", totals.join(" / "));
    Ok(())
}

/// Each linear layer shape of the UNet's transformers and time embedding at 512² without CFG
/// (tokens, in, out, count per call), timed through `kernels::linear` with a bias as the model
/// calls it (the feed-forward's first layer through `kernels::linear_geglu`, its GEGLU included),
/// f32 activations, f32 or bf16 weights; the rate and the whole call's linear time.
fn linear_shapes(n: usize, bf16: bool) -> anyhow::Result<()> {
    use ghiblify::models::kernels::{linear, linear_geglu, Weight};
    let shapes: &[(usize, usize, usize, usize)] = &[
        // (tokens, in, out, layers per call): q/k/v/out + cross q/out + proj_in/out, GEGLU in, ff out
        (4096, 320, 320, 40),
        (4096, 320, 2560, 5),
        (4096, 1280, 320, 5),
        (1024, 640, 640, 40),
        (1024, 640, 5120, 5),
        (1024, 2560, 640, 5),
        (256, 1280, 1280, 48),
        (256, 1280, 10240, 6),
        (256, 5120, 1280, 6),
        // The time embedding's projections (one row; two with guidance): linear_1, then linear_2
        // and the 1280-channel resnets' time_emb_proj, the 640- and the 320-channel ones.
        (1, 320, 1280, 1),
        (1, 1280, 1280, 13),
        (1, 1280, 640, 5),
        (1, 1280, 320, 5),
    ];
    let dtype = if bf16 { DType::BF16 } else { DType::F32 };
    let mut total = 0.0;
    for &(t, k, o, count) in shapes {
        let x = Tensor::randn(0f32, 1.0, (1, t, k), &Device::Cpu)?;
        let w = Weight::Dense(Tensor::randn(0f32, 0.05, (o, k), &Device::Cpu)?.to_dtype(dtype)?);
        let bias = Tensor::randn(0f32, 1.0, o, &Device::Cpu)?;
        // The feed-forward's first layer (8 × its input) with its GEGLU, as the UNet runs it.
        let geglu = o == 8 * k;
        let run = || if geglu { linear_geglu(&x, &w, Some(&bias)) } else { linear(&x, &w, Some(&bias)) };
        run()?;
        let mut best = f64::MAX;
        for _ in 0..n {
            let s = Instant::now();
            run()?;
            best = best.min(s.elapsed().as_secs_f64());
        }
        total += best * count as f64;
        let rate = 2.0 * (t * k * o) as f64 / best / 1e9;
        let what = if geglu { " + GEGLU" } else { "" };
        println!("{t}x{k}->{o}{what} (x{count}): {:.2} ms, {rate:.0} GFLOP/s", best * 1e3);
    }
    println!("per call {:.3} s", total);
    Ok(())
}

/// The UNet's typical matrix products (conv as im2col: cout × cin·9 · pixels; linear; attention),
/// f32 (the gemm crate, as the kernels call it) against bf16 (`gemm_bf16`), in GFLOP/s.
fn gemm_shapes(n: usize) {
    use ghiblify::models::gemm_bf16::{self, Lhs, View};
    let shapes = [
        ("conv 320x2880 @4096", 320, 4096, 2880),
        ("conv 640x5760 @1024", 640, 1024, 5760),
        ("conv 1280x11520 @256", 1280, 256, 11520),
        ("conv 1280x11520 @64", 1280, 64, 11520),
        ("linear 320x320 @4096", 320, 4096, 320),
        ("ff 2560x320 @4096", 2560, 4096, 320),
    ];
    let threads = rayon::current_num_threads();
    for (name, m, cols, k) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let b: Vec<f32> = (0..k * cols).map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5).collect();
        let a16: Vec<half::bf16> = a.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let mut c = vec![0f32; m * cols];
        let flops = 2.0 * (m * cols * k) as f64;
        let mut time = |f: &mut dyn FnMut(&mut [f32])| {
            f(&mut c);
            let mut best = f64::MAX;
            for _ in 0..n {
                let t = Instant::now();
                f(&mut c);
                best = best.min(t.elapsed().as_secs_f64());
            }
            best
        };
        let f32_s = time(&mut |c| unsafe {
            gemm::gemm(
                m,
                cols,
                k,
                c.as_mut_ptr(),
                1,
                cols as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                cols as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        });
        let bf_s = if gemm_bf16::available() {
            time(&mut |c| unsafe {
                gemm_bf16::gemm(
                    (m, cols, k),
                    c.as_mut_ptr(),
                    cols,
                    false,
                    Lhs::<f32>::InPlace { ptr: a16.as_ptr(), rs: k },
                    View { ptr: b.as_ptr(), rs: cols, cs: 1 },
                    gemm_bf16::Scale::ONE,
                    true,
                )
            })
        } else {
            f64::NAN
        };
        // No bf16 kernel on this CPU (no AVX512_BF16): say so rather than print NaN.
        let bf16 = if bf_s.is_nan() {
            "   n/a (no AVX512_BF16)".to_string()
        } else {
            format!("{:7.1} GFLOP/s", flops / bf_s / 1e9)
        };
        println!("{name:24} f32 {:7.1} GFLOP/s   bf16 {bf16}", flops / f32_s / 1e9);
    }
}
