//! Checkpoint variants real repos carry: the VAE's old attention key names (`query`, `key`,
//! `value`, `proj_attn`, some stored as 1×1 convolutions), a text encoder saved without the
//! `text_model.` prefix (transformers 5), and fp16 weight variants. Each must load to the same
//! numbers as the fixture in its current layout.

use crate::common::{fixtures, max_abs};
use candle_core::{DType, Device, Tensor};
use ghiblify::models::clip::ClipTextEncoder;
use ghiblify::models::vae::Vae;
use ghiblify::models::{component_files, ComponentFiles};
use std::collections::HashMap;
use std::path::Path;

/// Rewrites `src` into `dst` with `edit` applied to each (name, tensor).
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(&str, Tensor) -> (String, Tensor)) {
    let tensors = candle_core::safetensors::load(src, &Device::Cpu).unwrap();
    let out: HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| edit(&k, v)).collect();
    candle_core::safetensors::save(&out, dst).unwrap();
}

fn copy_component(component: &str, into: &Path) {
    std::fs::create_dir_all(into.join(component)).unwrap();
    std::fs::copy(
        fixtures().join("tiny-sd1").join(component).join("config.json"),
        into.join(component).join("config.json"),
    )
    .unwrap();
}

fn files(dir: &Path, component: &str, stem: &str, dtype: DType) -> ComponentFiles {
    component_files(dir, component, "config.json", stem, dtype).unwrap()
}

#[test]
fn vae_with_old_attention_names_and_conv_shaped_weights() {
    let tmp = tempfile::tempdir().unwrap();
    copy_component("vae", tmp.path());
    let src = fixtures().join("tiny-sd1/vae/diffusion_pytorch_model.safetensors");
    rewrite(&src, &tmp.path().join("vae/diffusion_pytorch_model.safetensors"), |k, v| {
        if !k.contains("mid_block.attentions") {
            return (k.to_string(), v);
        }
        let k = k
            .replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.");
        // Old conversions kept some projections as 1×1 convolutions.
        let v = if k.contains(".query.weight") { v.unsqueeze(2).unwrap().unsqueeze(3).unwrap() } else { v };
        (k, v)
    });
    let new = Vae::load(
        &files(&fixtures().join("tiny-sd1"), "vae", "diffusion_pytorch_model", DType::F32),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let old =
        Vae::load(&files(tmp.path(), "vae", "diffusion_pytorch_model", DType::F32), DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::rand(-1f32, 1f32, (1, 3, 32, 40), &Device::Cpu).unwrap();
    let (a, b) = (new.encode(&x).unwrap(), old.encode(&x).unwrap());
    assert_eq!(max_abs(&a.mean, &b.mean), 0.0);
    assert_eq!(max_abs(&new.decode(&a.mean).unwrap(), &old.decode(&a.mean).unwrap()), 0.0);
}

#[test]
fn text_encoder_saved_without_the_text_model_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    copy_component("text_encoder", tmp.path());
    let src = fixtures().join("tiny-sd1/text_encoder/model.safetensors");
    rewrite(&src, &tmp.path().join("text_encoder/model.safetensors"), |k, v| {
        (k.trim_start_matches("text_model.").to_string(), v)
    });
    let a = ClipTextEncoder::load(
        &files(&fixtures().join("tiny-sd1"), "text_encoder", "model", DType::F32),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let b = ClipTextEncoder::load(&files(tmp.path(), "text_encoder", "model", DType::F32), DType::F32, &Device::Cpu)
        .unwrap();
    let ids =
        Tensor::new(&[[49406u32, 320, 1125, 49407, 49407], [49406, 1929, 49407, 49407, 49407]], &Device::Cpu).unwrap();
    let (ea, eb) = (a.forward(&ids).unwrap(), b.forward(&ids).unwrap());
    assert_eq!(ea.dims(), &[2, 5, 16]);
    assert_eq!(max_abs(&ea, &eb), 0.0);
    // Batch 2 equals two batch-1 calls (candle's own CLIP cannot broadcast its mask at batch 2).
    let first = a.forward(&ids.narrow(0, 0, 1).unwrap()).unwrap();
    assert!(max_abs(&ea.narrow(0, 0, 1).unwrap(), &first) < 1e-6);
}

#[test]
fn fp16_variant_is_preferred_for_half_precision_only() {
    let tmp = tempfile::tempdir().unwrap();
    copy_component("unet", tmp.path());
    let unet = tmp.path().join("unet");
    std::fs::write(unet.join("diffusion_pytorch_model.safetensors"), b"").unwrap();
    std::fs::write(unet.join("diffusion_pytorch_model.fp16.safetensors"), b"").unwrap();
    let name = |d: DType| {
        files(tmp.path(), "unet", "diffusion_pytorch_model", d).weights[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(name(DType::F16), "diffusion_pytorch_model.fp16.safetensors");
    assert_eq!(name(DType::F32), "diffusion_pytorch_model.safetensors");
    std::fs::remove_file(unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(name(DType::F32), "diffusion_pytorch_model.fp16.safetensors", "falls back to what exists");
}

#[test]
fn sharded_weights_are_followed() {
    let tmp = tempfile::tempdir().unwrap();
    copy_component("unet", tmp.path());
    let src = fixtures().join("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    let all = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (k, v) in all {
        let shard = if k.starts_with("down_blocks") {
            "diffusion_pytorch_model-00001-of-00002.safetensors"
        } else {
            "diffusion_pytorch_model-00002-of-00002.safetensors"
        };
        map.insert(k.clone(), serde_json::Value::String(shard.into()));
        if shard.contains("00001") {
            a.insert(k, v)
        } else {
            b.insert(k, v)
        };
    }
    let unet = tmp.path().join("unet");
    candle_core::safetensors::save(&a, unet.join("diffusion_pytorch_model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, unet.join("diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(unet.join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
    let f = files(tmp.path(), "unet", "diffusion_pytorch_model", DType::F32);
    assert_eq!(f.weights.len(), 2);
    let unet = ghiblify::models::unet::UNet::load(&f, DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let ctx = Tensor::zeros((1, 77, 16), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(unet.forward(&x, 500.0, &ctx).unwrap().dims(), &[1, 4, 8, 8]);
}

#[test]
fn int8_quantisation_refuses_non_finite_weights_by_name() {
    // --dtype q8 cannot give a NaN a scale: the load names the tensor and says why, instead of
    // blaming the config; without q8 the same file loads (and a run then reports the NaN).
    let tmp = tempfile::tempdir().unwrap();
    copy_component("unet", tmp.path());
    let src = fixtures().join("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    let bad = "down_blocks.1.resnets.0.conv1.weight";
    rewrite(&src, &tmp.path().join("unet/diffusion_pytorch_model.safetensors"), |k, v| {
        if k != bad {
            return (k.to_string(), v);
        }
        let mut x = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        x[3] = f32::NAN;
        (k.to_string(), Tensor::from_vec(x, v.shape(), &Device::Cpu).unwrap())
    });
    let f = files(tmp.path(), "unet", "diffusion_pytorch_model", DType::F32);
    let load =
        |q8| ghiblify::models::nn::quantized(q8, || ghiblify::models::unet::UNet::load(&f, DType::F32, &Device::Cpu));
    let e = load(true).unwrap_err().to_string();
    assert!(e.contains(bad) && e.contains("NaN") && e.contains("q8") && !e.contains("do not match"), "{e}");
    assert!(load(false).is_ok());
}
