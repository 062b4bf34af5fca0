//! ControlNet against diffusers' `ControlNetModel` and the UNet's residual inputs
//! (tests/fixtures/generate_controlnet.py): every residual and the UNet's output with them added
//! within the suite's 1e-4 relative tolerance, on an SD1 ControlNet (rgb) and an SD2 one (bgr
//! channel order and global pooling), through the CPU kernels and candle's generic ops alike.

use crate::common::{fixtures, load_safetensors, rel_err};
use candle_core::{DType, Device};
use ghiblify::models::component_files;
use ghiblify::models::controlnet::ControlNet;
use ghiblify::models::unet::UNet;

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
