//! LoRA merging against diffusers (`load_lora_weights` + `fuse_lora`) on the tiny SD1 model: the
//! merged weights, and the whole img2img trace with the fused model (fixtures/generate_lora.py).

use crate::common::{fixtures, load_safetensors, rel_err, Case};
use candle_core::{DType, Device, Tensor};
use ghiblify::lora::{plan, Layout, LoraFile, LoraSet, MergingBackend, Part};
use ghiblify::pipeline::{Extras, StableDiffusion};
use std::collections::HashMap;
use std::path::PathBuf;

/// Merged weights vs diffusers' fused ones: max abs diff / max abs value, per tensor.
const WEIGHT_TOL: f64 = 1e-5;

fn lora(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

fn unet_files() -> Vec<PathBuf> {
    vec![fixtures().join("tiny-sd1/unet/diffusion_pytorch_model.safetensors")]
}

fn te_files() -> Vec<PathBuf> {
    vec![fixtures().join("tiny-sd1/text_encoder/model.safetensors")]
}

/// Every weight of the UNet and text encoder after merging `loras`, keyed as diffusers'
/// state dicts (`unet.…`, `text_encoder.…` without `text_model.`), and the reports.
fn merged(loras: &[(&str, f64)]) -> (HashMap<String, Tensor>, Vec<String>) {
    let (unet, te) = (Layout::read(&unet_files()).unwrap(), Layout::read(&te_files()).unwrap());
    let planned = loras.iter().map(|(f, s)| plan(f, &lora(f), *s, &unet, &te).unwrap()).collect();
    let set = LoraSet::new(planned);
    let mut out = HashMap::new();
    for (part, files, prefix) in [(Part::Unet, unet_files(), "unet."), (Part::TextEncoder, te_files(), "text_encoder.")]
    {
        let inner = unsafe { ghiblify::models::weights::Weights::open(&files) }.unwrap();
        let names: Vec<String> = inner.names().map(String::from).collect();
        let backend =
            MergingBackend { inner: std::sync::Arc::new(inner), merge: set.merge_for(part).unwrap_or_default() };
        use candle_nn::var_builder::SimpleBackend;
        for n in names {
            let t = backend.get_unchecked(&n, DType::F32, &Device::Cpu).unwrap();
            out.insert(format!("{prefix}{}", n.strip_prefix("text_model.").unwrap_or(&n)), t);
        }
    }
    (out, set.reports.iter().map(|r| r.line()).collect())
}

/// The merged weights equal diffusers' fused ones, and exactly the tensors diffusers changed changed.
fn check_weights(case: &str, loras: &[(&str, f64)]) -> Vec<String> {
    let (ours, reports) = merged(loras);
    let (base, _) = merged(&[]);
    let (fused, _) = load_safetensors(&lora(&format!("fused_{case}.safetensors")));
    let mut worst: f64 = 0.0;
    for (k, want) in &fused {
        let got = ours.get(k).unwrap_or_else(|| panic!("{case}: no weight {k}"));
        let err = rel_err(got, want);
        worst = worst.max(err);
        assert!(err <= WEIGHT_TOL, "{case}: {k} differs from diffusers' fused weight by {err:.2e}");
    }
    for (k, t) in &ours {
        let changed = rel_err(t, &base[k]) > 0.0;
        assert_eq!(
            changed,
            fused.contains_key(k),
            "{case}: {k} changed={changed}, diffusers changed={}",
            fused.contains_key(k)
        );
    }
    eprintln!("{case}: {} fused tensors, worst {worst:.2e}; {}", fused.len(), reports.join("; "));
    reports
}

fn check_trace(case: &str, loras: &[(&str, f64)]) {
    let named: Vec<LoraFile> =
        loras.iter().map(|(f, s)| LoraFile { name: f.to_string(), path: lora(f), scale: *s }).collect();
    let (sd, outcome) = StableDiffusion::load_with(
        &fixtures().join("tiny-sd1"),
        &Device::Cpu,
        DType::F32,
        Extras { loras: &named, ..Extras::default() },
    )
    .unwrap();
    assert!(outcome.unused.is_empty(), "{:?}", outcome.unused);
    crate::parity::check_loaded(&sd, &format!("lora_{case}.safetensors"));
}

#[test]
fn peft_format_at_scales_1_and_half() {
    let r = check_weights("peft_100", &[("peft.safetensors", 1.0)]);
    assert_eq!(r, ["lora 'peft.safetensors': applied 150 of 150 tensors (unet 132, text encoder 18)"]);
    check_weights("peft_050", &[("peft.safetensors", 0.5)]);
    check_trace("peft_100", &[("peft.safetensors", 1.0)]);
    check_trace("peft_050", &[("peft.safetensors", 0.5)]);
}

#[test]
fn kohya_format_at_scales_1_and_half() {
    let r = check_weights("kohya_100", &[("kohya.safetensors", 1.0)]);
    assert_eq!(r, ["lora 'kohya.safetensors': applied 150 of 150 tensors (unet 132, text encoder 18)"]);
    check_weights("kohya_050", &[("kohya.safetensors", 0.5)]);
    check_trace("kohya_100", &[("kohya.safetensors", 1.0)]);
    check_trace("kohya_050", &[("kohya.safetensors", 0.5)]);
}

#[test]
fn two_loras_at_once_with_locon_convolutions() {
    check_weights("two", &[("peft.safetensors", 0.5), ("locon.safetensors", 1.0)]);
    check_trace("two", &[("peft.safetensors", 0.5), ("locon.safetensors", 1.0)]);
}

#[test]
fn ldm_named_locon_merges_like_its_diffusers_named_twin() {
    // diffusers cannot load LDM names for SD1; the same tensors under diffusers names are the reference.
    let (a, ra) = merged(&[("locon.safetensors", 1.0)]);
    let (b, rb) = merged(&[("locon_ldm.safetensors", 1.0)]);
    assert_eq!(ra[0].replace("locon.safetensors", "x"), rb[0].replace("locon_ldm.safetensors", "x"), "{ra:?} {rb:?}");
    assert!(rb[0].contains("applied 84 of 84"), "{rb:?}");
    for (k, t) in &a {
        assert_eq!(rel_err(&b[k], t), 0.0, "{k}");
    }
}

// ---- the CLI: reports and bad LoRAs ------------------------------------------------------------

fn run(case: &Case, extra: &[&str]) -> std::process::Output {
    crate::common::ghiblify_cmd()
        .current_dir(case.dir.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", case.path("hf-home"))
        .args([
            "photo.png",
            "-o",
            "out.png",
            "--model-dir",
            fixtures().join("tiny-sd1").to_str().unwrap(),
            "--steps",
            "2",
            "--seed",
            "1",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn cli_reports_what_each_lora_applied_and_records_it() {
    let case = Case::new();
    let peft = lora("peft.safetensors");
    let locon = lora("locon.safetensors");
    let o = run(&case, &["--lora", &format!("{}:0.5", peft.display()), "--lora", locon.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("lora 'peft': applied 150 of 150 tensors (unet 132, text encoder 18)"), "{err}");
    assert!(err.contains("lora 'locon': applied 84 of 84 tensors (unet 84, text encoder 0)"), "{err}");
    let params = crate::cli::png_text(&case.path("out.png"), "parameters").unwrap();
    assert!(
        params.contains(" <lora:peft:0.5> <lora:locon:1>\n") && params.contains("Lora hashes: \"peft: "),
        "{params}"
    );
}

/// Writes a LoRA with `tensors` (name → shape, zeros) into the case folder.
fn write_lora(case: &Case, name: &str, tensors: &[(&str, Vec<usize>)]) -> String {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, s)| (k.to_string(), Tensor::zeros(s.as_slice(), DType::F32, &Device::Cpu).unwrap()))
        .collect();
    let p = case.path(name);
    candle_core::safetensors::save(&map, &p).unwrap();
    p.to_string_lossy().into_owned()
}

fn fails(case: &Case, lora: &str, needles: &[&str]) {
    let o = run(case, &["--lora", lora]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{n} in {err}");
    }
    assert!(!case.path("out.png").exists());
}

#[test]
fn bad_loras_fail_in_one_line_and_write_nothing() {
    let case = Case::new();
    // An SDXL LoRA (second text encoder, 2048-wide cross-attention) on an SD1 model.
    let sdxl = write_lora(
        &case,
        "sdxl.safetensors",
        &[
            ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", vec![4, 1280]),
            ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", vec![1280, 4]),
            ("lora_unet_input_blocks_4_1_transformer_blocks_9_attn2_to_k.lora_down.weight", vec![4, 2048]),
            ("lora_unet_input_blocks_4_1_transformer_blocks_9_attn2_to_k.lora_up.weight", vec![640, 4]),
        ],
    );
    fails(&case, &sdxl, &["sdxl", "applied 0 of 2", "SDXL"]);
    // Right names, wrong shapes (a LoRA for a wider model).
    let wide = write_lora(
        &case,
        "wide.safetensors",
        &[
            ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", vec![4, 320, 1, 1]),
            ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", vec![320, 4, 1, 1]),
        ],
    );
    fails(
        &case,
        &wide,
        &[
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            "[4, 320, 1, 1]",
            "down_blocks.0.attentions.0.proj_in.weight",
            "[8, 8, 1, 1]",
        ],
    );
    // LoHa.
    let loha = write_lora(
        &case,
        "loha.safetensors",
        &[("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", vec![8, 4])],
    );
    fails(&case, &loha, &["LoHa", "hada_w1_a"]);
    // Truncated file.
    let bytes = std::fs::read(lora("kohya.safetensors")).unwrap();
    std::fs::write(case.path("cut.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails(&case, case.path("cut.safetensors").to_str().unwrap(), &["cut.safetensors", "not a valid safetensors file"]);
    // No such file; a bad scale.
    fails(&case, "nope.safetensors", &["--lora 'nope.safetensors'"]);
    let peft = lora("peft.safetensors");
    fails(&case, &format!("{}:abc", peft.display()), &["--lora"]);
}

#[test]
fn half_precision_weights_get_the_f32_merge_rounded_once() {
    let (unet, te) = (Layout::read(&unet_files()).unwrap(), Layout::read(&te_files()).unwrap());
    let set = LoraSet::new(vec![plan("p", &lora("peft.safetensors"), 1.0, &unet, &te).unwrap()]);
    let inner = unsafe { ghiblify::models::weights::Weights::open(&unet_files()) }.unwrap();
    let backend = MergingBackend { inner: std::sync::Arc::new(inner), merge: set.merge_for(Part::Unet).unwrap() };
    use candle_nn::var_builder::SimpleBackend;
    let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    let full = backend.get_unchecked(name, DType::F32, &Device::Cpu).unwrap();
    let half = backend.get_unchecked(name, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(half.dtype(), DType::F16);
    let (fused, _) = load_safetensors(&lora("fused_peft_100.safetensors"));
    assert!(rel_err(&full, &fused[&format!("unet.{name}")]) <= WEIGHT_TOL);
    let err = rel_err(&half.to_dtype(DType::F32).unwrap(), &full);
    assert!(err > 0.0 && err < 1e-3, "{err}");
}

#[test]
fn scalar_rank_zero_and_non_finite_loras_are_named_not_panicked_on() {
    let case = Case::new();
    let m = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let scalar = write_lora(
        &case,
        "scalar.safetensors",
        &[(&format!("{m}.lora_down.weight"), vec![]), (&format!("{m}.lora_up.weight"), vec![8, 4, 1, 1])],
    );
    fails(&case, &scalar, &["scalar", "not matrices"]);
    let rank0 = write_lora(
        &case,
        "rank0.safetensors",
        &[(&format!("{m}.lora_down.weight"), vec![0, 8, 1, 1]), (&format!("{m}.lora_up.weight"), vec![8, 0, 1, 1])],
    );
    fails(&case, &rank0, &["rank0", "rank 0"]);
    // NaN weights and an infinite alpha: refused by name instead of a black picture.
    let mut map: HashMap<String, Tensor> = HashMap::new();
    let nan = Tensor::from_vec(vec![f32::NAN; 32], (4, 8, 1, 1), &Device::Cpu).unwrap();
    map.insert(format!("{m}.lora_down.weight"), nan);
    map.insert(format!("{m}.lora_up.weight"), Tensor::zeros((8, 4, 1, 1), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&map, case.path("nan.safetensors")).unwrap();
    fails(&case, case.path("nan.safetensors").to_str().unwrap(), &["nan", "NaN or infinite", "lora_down"]);
    map.insert(format!("{m}.lora_down.weight"), Tensor::zeros((4, 8, 1, 1), DType::F32, &Device::Cpu).unwrap());
    map.insert(format!("{m}.alpha"), Tensor::new(f32::INFINITY, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&map, case.path("alpha.safetensors")).unwrap();
    fails(&case, case.path("alpha.safetensors").to_str().unwrap(), &["alpha", "inf"]);
    // A file whose name has a colon is taken whole.
    std::fs::copy(lora("peft.safetensors"), case.path("style:v2.safetensors")).unwrap();
    let o = run(&case, &["--lora", case.path("style:v2.safetensors").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}
