//! ControlNet against diffusers' `ControlNetModel` and the UNet's residual inputs
//! (tests/fixtures/generate_controlnet.py): every residual and the UNet's output with them added
//! within the suite's 1e-4 relative tolerance, on an SD1 ControlNet (rgb) and an SD2 one (bgr
//! channel order and global pooling), through the CPU kernels and candle's generic ops alike.

use crate::common::{fixtures, load_safetensors, rel_err};
use candle_core::{DType, Device};
use ghiblify::image_io;
use ghiblify::models::component_files;
use ghiblify::models::controlnet::ControlNet;
use ghiblify::models::unet::UNet;
use ghiblify::noise::ReplayNoise;
use ghiblify::pipeline::{Control, StableDiffusion, Trace};

const TOL: f64 = 1e-4;

#[test]
fn controlnet_residuals_and_the_controlled_unet_match_diffusers() {
    let (refs, _) = load_safetensors(&fixtures().join("controlnet_refs.safetensors"));
    for (m, model) in [("sd1", "tiny-sd1"), ("sd2", "tiny-sd2")] {
        let dir = fixtures().join(format!("tiny-controlnet-{m}"));
        let files = component_files(&dir, ".", "config.json", "diffusion_pytorch_model", DType::F32).unwrap();
        let cn = ControlNet::load(&files, DType::F32, &Device::Cpu).unwrap();
        let ufiles =
            component_files(&fixtures().join(model), "unet", "config.json", "diffusion_pytorch_model", DType::F32)
                .unwrap();
        let unet = UNet::load(&ufiles, DType::F32, &Device::Cpu).unwrap();
        assert!(cn.mismatch(&unet.config).is_none(), "{m}");
        let r = |k: &str| refs[&format!("{m}.{k}")].clone();
        let t = r("t").to_vec1::<f32>().unwrap()[0] as f64;
        let res = cn.forward(&r("sample"), t, &r("context"), &r("cond"), 0.7).unwrap();
        assert_eq!(res.down.len(), unet.skips(), "{m}");
        for (i, d) in res.down.iter().enumerate() {
            let e = rel_err(d, &r(&format!("down.{i}")));
            assert!(e <= TOL, "{m} down.{i}: {e:e}");
        }
        let e = rel_err(&res.mid, &r("mid"));
        assert!(e <= TOL, "{m} mid: {e:e}");
        let out = unet.forward_with(&r("sample"), t, &r("context"), Some(&res)).unwrap();
        let e = rel_err(&out, &r("unet"));
        assert!(e <= TOL, "{m} unet: {e:e}");
        // The residuals matter: without them the UNet gives something else.
        let plain = unet.forward(&r("sample"), t, &r("context")).unwrap();
        assert!(rel_err(&plain, &r("unet")) > 100.0 * TOL, "{m}: residuals change nothing");
        println!("{m}: mid {:e}, controlled UNet {e:e}", rel_err(&res.mid, &r("mid")));
    }
}

#[test]
fn a_controlnet_for_another_model_or_with_unknown_options_is_named() {
    let dir = fixtures().join("tiny-controlnet-sd1");
    let files = component_files(&dir, ".", "config.json", "diffusion_pytorch_model", DType::F32).unwrap();
    let cn = ControlNet::load(&files, DType::F32, &Device::Cpu).unwrap();
    let ufiles =
        component_files(&fixtures().join("tiny-sd2"), "unet", "config.json", "diffusion_pytorch_model", DType::F32)
            .unwrap();
    let sd2 = UNet::load(&ufiles, DType::F32, &Device::Cpu).unwrap();
    let why = cn.mismatch(&sd2.config).expect("an SD1 ControlNet does not fit the SD2 UNet");
    assert!(why.contains("[8, 16, 24]") && why.contains("[8, 12, 16]"), "{why}");

    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::copy(
        dir.join("diffusion_pytorch_model.safetensors"),
        tmp.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    for (from, to, key) in [
        (
            r#""controlnet_conditioning_channel_order": "rgb""#,
            r#""controlnet_conditioning_channel_order": "hsv""#,
            "controlnet_conditioning_channel_order",
        ),
        (r#""addition_embed_type": null"#, r#""addition_embed_type": "text_time""#, "addition_embed_type"),
        (r#""conditioning_channels": 3"#, r#""conditioning_channels": 0"#, "conditioning_channels"),
    ] {
        assert!(text.contains(from), "{from}");
        std::fs::write(tmp.path().join("config.json"), text.replace(from, to)).unwrap();
        let f = component_files(tmp.path(), ".", "config.json", "diffusion_pytorch_model", DType::F32).unwrap();
        let err = ControlNet::load(&f, DType::F32, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("config.json") && !err.contains('\n'), "{key}: {err}");
    }
}

/// The trace's ControlNets, built as its metadata says (tests/fixtures/generate_controlnet.py).
fn run_controlled_trace(model: &str, file: &str) {
    let (_, meta) = load_safetensors(&fixtures().join("traces").join(file));
    let specs: Vec<serde_json::Value> = serde_json::from_str(&meta["controls"]).unwrap();
    let mut nets = std::collections::HashMap::new();
    for s in &specs {
        let net = s["net"].as_str().unwrap().to_string();
        nets.entry(net.clone()).or_insert_with(|| {
            let files =
                component_files(&fixtures().join(&net), ".", "config.json", "diffusion_pytorch_model", DType::F32)
                    .unwrap();
            ControlNet::load(&files, DType::F32, &Device::Cpu).unwrap()
        });
    }
    let controls: Vec<Control> = specs
        .iter()
        .map(|s| {
            let spec = s["image"].as_str().unwrap();
            let img = match spec.strip_prefix("canny:") {
                Some(photo) => {
                    let edges =
                        ghiblify::canny::canny(&image_io::load_rgb(&fixtures().join(photo)).unwrap(), 100.0, 200.0);
                    image::DynamicImage::ImageLuma8(edges).to_rgb8()
                }
                None => image_io::load_rgb(&fixtures().join(spec)).unwrap(),
            };
            Control {
                name: s["net"].as_str().unwrap().to_string(),
                net: &nets[s["net"].as_str().unwrap()],
                image: image_io::to_control_tensor(&img).unwrap(),
                scale: s["scale"].as_f64().unwrap(),
                start: s["start"].as_f64().unwrap(),
                end: s["end"].as_f64().unwrap(),
            }
        })
        .collect();
    let sd = StableDiffusion::load(&fixtures().join(model), &Device::Cpu, DType::F32).unwrap();
    crate::parity::check_path_with(&sd, file, "cpu kernels", &controls);
    ghiblify::device::with_generic_ops(true, || crate::parity::check_path_with(&sd, file, "generic ops", &controls));

    // The ControlNets matter: the same run without them ends elsewhere.
    let (reference, _) = load_safetensors(&fixtures().join("traces").join(file));
    let params = crate::parity::params_from_meta(&meta);
    let image = image_io::to_tensor(&image_io::load_rgb(&fixtures().join(&meta["photo"])).unwrap()).unwrap();
    let names = ReplayNoise::trace_draw_names(reference.keys().map(String::as_str));
    let mut noise = ReplayNoise::new(names.iter().map(|k| reference[*k].clone()));
    let mut ours = Trace::enabled();
    sd.img2img(&image, &params, &mut noise, &mut ours, &mut |_, _, _| Ok(())).unwrap();
    let e = rel_err(&ours.tensors["final_latents"], &reference["final_latents"]);
    assert!(e > 1e-2, "{file}: without its ControlNets the run differs by only {e:e}");
}

#[test]
fn controlnet_img2img_with_cfg_matches_diffusers() {
    run_controlled_trace("tiny-sd1", "controlnet_sd1_cfg.safetensors");
}

#[test]
fn controlnet_on_canny_edges_in_a_window_without_cfg_matches_diffusers() {
    run_controlled_trace("tiny-sd1", "controlnet_sd1_window_nocfg.safetensors");
}

#[test]
fn two_controlnets_at_once_match_diffusers_multicontrolnet() {
    run_controlled_trace("tiny-sd1", "controlnet_sd1_multi.safetensors");
}

#[test]
fn a_pooling_bgr_controlnet_on_sd2_matches_diffusers_guess_mode() {
    run_controlled_trace("tiny-sd2", "controlnet_sd2_pool_cfg.safetensors");
}

#[test]
fn the_binary_runs_controlnets_from_folders_and_refuses_what_does_not_fit() {
    let case = crate::common::Case::new();
    let photo = fixtures().join("photo-64x48.png");
    let run = |extra: &[&str], out: &str| {
        crate::common::ghiblify_cmd()
            .current_dir(case.dir.path())
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .arg(&photo)
            .args(["-o", out, "--steps", "4", "--strength", "0.8", "--seed", "3", "--model-dir"])
            .arg(fixtures().join("tiny-sd1"))
            .args(extra)
            .output()
            .unwrap()
    };
    let cn = fixtures().join("tiny-controlnet-sd1");
    let cn = cn.to_str().unwrap();
    let canny_cn = format!("{cn}:0.9");
    let photo_s = photo.to_str().unwrap();
    let o = run(
        &["--controlnet", &canny_cn, "--control-image", photo_s, "--control-end", "0.5", "--save-control", "ctrl.png"],
        "with.png",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The control image written is what guided the picture: here the photo at the working size.
    let ctrl = image::open(case.path("ctrl.png")).unwrap().to_rgb8();
    assert_eq!(ctrl, image::open(&photo).unwrap().to_rgb8());
    let params = crate::cli::png_text(&case.path("with.png"), "parameters").unwrap();
    assert!(
        params.contains(r#"ControlNet 0: "Module: none, Model: tiny-controlnet-sd1, Weight: 0.9, Guidance Start: 0, Guidance End: 0.5""#),
        "{params}"
    );
    // With int8 weights (the ControlNet's too) the same run still works and says so.
    let o = run(
        &["--controlnet", &canny_cn, "--control-image", photo_s, "--control-end", "0.5", "--dtype", "q8"],
        "q8.png",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let params = crate::cli::png_text(&case.path("q8.png"), "parameters").unwrap();
    assert!(params.contains("ControlNet 0: ") && params.contains("Precision: q8 weights"), "{params}");
    let o = run(&[], "without.png");
    assert!(o.status.success());
    let a = image::open(case.path("with.png")).unwrap().to_rgb8();
    let b = image::open(case.path("without.png")).unwrap().to_rgb8();
    assert_ne!(a, b, "the ControlNet changed nothing");

    // Refused in one line: a ControlNet for another model, a prepared image for a batch, a
    // window that ends before it starts, an unknown kind.
    let sd2 = fixtures().join("tiny-controlnet-sd2");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--controlnet", sd2.to_str().unwrap(), "--control-image", photo_s], "does not fit the model"),
        (vec!["--control", "canny", "--control-start", "0.6", "--control-end", "0.4"], "--control-end"),
        (vec!["--control", "depth"], "unknown kind 'depth'"),
        (vec!["--controlnet", cn], "each --controlnet needs its --control-image"),
        (vec!["--controlnet", cn, "--control-image", "missing.png"], "--control-image 'missing.png': no such file"),
    ];
    for (extra, needle) in cases {
        let o = run(&extra, "x.png");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        assert!(
            err.contains(needle) && err.trim().lines().filter(|l| l.starts_with("ghiblify:")).count() == 1,
            "{extra:?}: {err}"
        );
        assert!(!case.path("x.png").exists());
    }
    // --save-control is an output like the others: never the input, always a PNG.
    let own = case.path("own.png");
    std::fs::copy(&photo, &own).unwrap();
    let own_s = own.to_str().unwrap();
    for (save, needle) in [(own_s, "--save-control is an input file"), ("ctrl.jpg", "name it .png")] {
        let o = crate::common::ghiblify_cmd()
            .current_dir(case.dir.path())
            .args([own_s, "-o", "y.png", "--controlnet", cn, "--control-image", photo_s, "--save-control", save])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert_eq!(std::fs::read(&own).unwrap(), std::fs::read(&photo).unwrap(), "the input is untouched");
    let dir = case.path("in");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(&photo, dir.join("a.png")).unwrap();
    let o = crate::common::ghiblify_cmd()
        .current_dir(case.dir.path())
        .args(["in", "-o", "out", "--controlnet", cn, "--control-image", photo_s])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--control-image is one picture for one photo"));
}
