//! Step-by-step parity with diffusers' StableDiffusionImg2ImgPipeline on the same weights and the
//! same noise (recorded by fixtures/generate.py and replayed here).

use crate::common::{fixtures, load_safetensors, max_abs, rel_err};
use candle_core::{DType, Device};
use ghiblify::image_io;
use ghiblify::noise::ReplayNoise;
use ghiblify::pipeline::{Control, Img2ImgParams, StableDiffusion, Trace, VaeTiling};
use ghiblify::samplers::SamplerKind;

/// Text embeddings, init latents and every step's latents: max abs diff / max abs value.
const REL_TOL: f64 = 1e-4;
/// Final 8-bit image: max abs difference per channel.
const IMAGE_TOL: u8 = 2;

fn check(model: &str, trace: &str) {
    let sd = StableDiffusion::load(&fixtures().join(model), &Device::Cpu, DType::F32).unwrap();
    check_loaded(&sd, trace);
}

/// Runs the trace's settings with its recorded noise on a loaded model and compares every stage,
/// once through the CPU kernels and once through candle's generic operations (the code CUDA and
/// Metal run; `GHIBLIFY_GENERIC_OPS=1`).
pub fn check_loaded(sd: &StableDiffusion, trace: &str) {
    check_path(sd, trace, "cpu kernels");
    ghiblify::device::with_generic_ops(true, || check_path(sd, trace, "generic ops"));
}

/// The run a trace records, from its metadata (tests/fixtures/generate.py, `run_trace`).
pub fn params_from_meta(meta: &std::collections::HashMap<String, String>) -> Img2ImgParams {
    Img2ImgParams {
        prompt: meta["prompt"].clone(),
        negative_prompt: meta["negative_prompt"].clone(),
        strength: meta["strength"].parse().unwrap(),
        steps: meta["steps"].parse().unwrap(),
        guidance: meta["guidance"].parse().unwrap(),
        sampler: meta["sampler"].parse::<SamplerKind>().unwrap(),
        karras: meta.get("karras").is_some_and(|k| k == "true"),
        vae_tiling: VaeTiling::Off,
    }
}

fn check_path(sd: &StableDiffusion, file: &str, path: &str) {
    check_path_with(sd, file, path, &[]);
}

/// Runs a trace with ControlNets (tests/controlnet.rs builds them from the trace's metadata).
pub fn check_path_with(sd: &StableDiffusion, file: &str, path: &str, controls: &[Control]) {
    let (reference, meta) = load_safetensors(&fixtures().join("traces").join(file));
    // Messages name the trace and the path it ran through.
    let trace = &format!("{file} ({path})");
    let params = params_from_meta(&meta);
    let photo = image_io::load_rgb(&fixtures().join(&meta["photo"])).unwrap();
    let image = image_io::to_tensor(&photo).unwrap();
    // The draws in diffusers' order: posterior (none with TAESD), forward noise, then each step's.
    let names = ReplayNoise::trace_draw_names(reference.keys().map(String::as_str));
    let step_draws: Vec<&str> = names.iter().copied().filter(|k| k.starts_with("step")).collect();
    let draws = names.iter().map(|k| reference[*k].clone());
    let mut noise = ReplayNoise::new(draws);
    let mut ours = Trace::enabled();
    let out =
        sd.img2img_controlled(&image, &params, controls, &mut noise, &mut ours, &mut |_, _, _| Ok(())).unwrap().image;
    assert_eq!(noise.remaining(), 0, "{trace}: every recorded draw is used");

    let ts = |t: &candle_core::Tensor| t.to_vec1::<f32>().unwrap();
    // Integer timesteps must match exactly; Karras' fractional ones (Euler, Heun) to float32
    // rounding of numpy's pow/log (3e-5 at most seen).
    let (a, b) = (ts(&ours.tensors["timesteps"]), ts(&reference["timesteps"]));
    assert_eq!(a.len(), b.len(), "{trace}: timesteps {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(&b) {
        let ok = if y.fract() == 0.0 { x == y } else { (x - y).abs() <= 1e-4 };
        assert!(ok, "{trace}: timesteps {a:?} vs {b:?}");
    }
    for k in &step_draws {
        assert!(ours.tensors.contains_key(*k), "{trace}: we did not trace {k}");
    }

    let mut keys: Vec<&String> = reference
        .keys()
        .filter(|k| {
            !matches!(k.as_str(), "timesteps" | "posterior_eps" | "noise" | "output_float") && !k.contains("_noise")
        })
        .collect();
    keys.sort();
    let mut report = Vec::new();
    for key in keys {
        let mine = ours.tensors.get(key).unwrap_or_else(|| panic!("{trace}: we did not record {key}"));
        let err = rel_err(mine, &reference[key]);
        report.push(format!("{key} {err:.2e}"));
        assert!(err <= REL_TOL, "{trace}: {key} differs from diffusers by {err:.3e} (relative) > {REL_TOL:e}");
    }
    assert_eq!(
        ours.tensors.keys().filter(|k| k.ends_with("_latents") && k.starts_with("step")).count(),
        reference.keys().filter(|k| k.ends_with("_latents") && k.starts_with("step")).count(),
        "{trace}: step count"
    );
    let float_err = max_abs(&out, &reference["output_float"]);
    let a = image_io::to_rgb8(&out).unwrap();
    let b = image_io::to_rgb8(&reference["output_float"]).unwrap();
    let worst = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    eprintln!("{trace}: {} | output_float max abs {float_err:.2e}, 8-bit max diff {worst}", report.join(", "));
    assert!(worst <= IMAGE_TOL, "{trace}: final image differs by {worst}/255 > {IMAGE_TOL}");
}

#[test]
fn sd1_strength_060_cfg_negative_prompt() {
    check("tiny-sd1", "sd1_s060.safetensors");
}

#[test]
fn sd1_strength_100() {
    check("tiny-sd1", "sd1_s100.safetensors");
}

#[test]
fn sd1_square_without_cfg() {
    check("tiny-sd1", "sd1_square_nocfg.safetensors");
}

#[test]
fn sd2_vprediction_strength_055() {
    check("tiny-sd2", "sd2_s055.safetensors");
}

#[test]
fn sd2_vprediction_strength_100_square() {
    check("tiny-sd2", "sd2_s100.safetensors");
}

/// Winograd F(4×4, 3×3) for every 3×3 stride-1 convolution (by default only layers large enough
/// to gain take it, which in the tiny fixtures is the VAE's full-resolution ones): the whole
/// pipeline at the same tolerances.
#[test]
fn winograd_everywhere_sd1_and_sd2() {
    for (model, trace) in [("tiny-sd1", "sd1_s060.safetensors"), ("tiny-sd2", "sd2_s055.safetensors")] {
        let sd = StableDiffusion::load(&fixtures().join(model), &Device::Cpu, DType::F32).unwrap();
        ghiblify::models::kernels::with_winograd(true, || check_path(&sd, trace, "cpu kernels, winograd"));
    }
}

macro_rules! sampler_parity {
    ($($name:ident: $model:literal, $trace:literal;)*) => {$(
        #[test]
        fn $name() {
            check($model, $trace);
        }
    )*};
}

sampler_parity! {
    ddim_sd1_s030: "tiny-sd1", "sd1_ddim_s030.safetensors";
    ddim_sd1_s100: "tiny-sd1", "sd1_ddim_s100.safetensors";
    euler_sd1_s030: "tiny-sd1", "sd1_euler_s030.safetensors";
    euler_sd1_s100: "tiny-sd1", "sd1_euler_s100.safetensors";
    euler_a_sd1_s030: "tiny-sd1", "sd1_euler-a_s030.safetensors";
    euler_a_sd1_s100: "tiny-sd1", "sd1_euler-a_s100.safetensors";
    heun_sd1_s030: "tiny-sd1", "sd1_heun_s030.safetensors";
    heun_sd1_s100: "tiny-sd1", "sd1_heun_s100.safetensors";
    dpmpp_2m_sd1_s030: "tiny-sd1", "sd1_dpmpp-2m_s030.safetensors";
    dpmpp_2m_sd1_s100: "tiny-sd1", "sd1_dpmpp-2m_s100.safetensors";
    dpmpp_2m_sde_sd1_s030: "tiny-sd1", "sd1_dpmpp-2m-sde_s030.safetensors";
    dpmpp_2m_sde_sd1_s100: "tiny-sd1", "sd1_dpmpp-2m-sde_s100.safetensors";
    unipc_sd1_s030: "tiny-sd1", "sd1_unipc_s030.safetensors";
    unipc_sd1_s100: "tiny-sd1", "sd1_unipc_s100.safetensors";
    lcm_sd1_s030: "tiny-sd1", "sd1_lcm_s030.safetensors";
    lcm_sd1_s100: "tiny-sd1", "sd1_lcm_s100.safetensors";
    euler_sd2_vpred_s070: "tiny-sd2", "sd2_euler_s070.safetensors";
    dpmpp_2m_sd2_vpred_s070: "tiny-sd2", "sd2_dpmpp-2m_s070.safetensors";
    unipc_sd2_vpred_s070: "tiny-sd2", "sd2_unipc_s070.safetensors";
    dpmpp_2m_karras_sd1_s060: "tiny-sd1", "sd1_dpmpp-2m_karras_s060.safetensors";
    euler_karras_sd1_s060: "tiny-sd1", "sd1_euler_karras_s060.safetensors";
    unipc_karras_sd1_s060: "tiny-sd1", "sd1_unipc_karras_s060.safetensors";
    // Two blocks (attention in the second only), per-block layer counts, unflipped sin/cos with
    // freq_shift 1, scaled mid block, a 3-block VAE (latent factor 4) without mid attention or
    // quant convs, 44x36 (latents 11x9: odd sizes through the UNet).
    odd_layout_euler_a_s080: "tiny-odd", "odd_euler-a_s080.safetensors";
    odd_layout_dpmpp_2m_s050: "tiny-odd", "odd_dpmpp-2m_s050.safetensors";
}
