//! Hostile configs never panic: every config a model folder carries (UNet, VAE, text encoder,
//! scheduler, TAESD) with one or two keys set to hostile values either loads and runs, with a
//! finite picture, or fails with an error; the process never panics or aborts. The values below
//! are the ones a red-team pass found (zero groups, offsets past the schedule, thresholding ratios
//! above one, huge sizes, zero scaling) and their neighbours.

use crate::common::fixtures;
use candle_core::{DType, Device};
use ghiblify::noise::SeededNoise;
use ghiblify::pipeline::{Img2ImgParams, StableDiffusion, Trace, VaeTiling};
use ghiblify::samplers::SamplerKind;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::path::Path;

/// Hostile JSON values for any key.
fn hostile_values() -> Vec<Value> {
    vec![
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(3),
        json!(7),
        json!(1e-30),
        json!(0.5),
        json!(1.5),
        json!(1e30),
        json!(1e308),
        json!(-1e308),
        json!(4294967296u64),
        json!(u64::MAX),
        json!(100000000),
        json!(""),
        json!("squaredcos_cap_v2"),
        json!("v_prediction"),
        json!("trailing"),
        json!(null),
        json!(true),
        json!([]),
        json!([0]),
        json!([1, 2, 3, 4, 5, 6, 7, 8, 9]),
        json!({}),
    ]
}

/// Keys worth hitting besides the ones a config already has.
const EXTRA_KEYS: &[&str] = &[
    "norm_num_groups",
    "norm_eps",
    "steps_offset",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "num_train_timesteps",
    "sample_size",
    "scaling_factor",
    "beta_start",
    "beta_end",
    "trained_betas",
    "clip_sample_range",
    "timestep_spacing",
    "rescale_betas_zero_snr",
    "layer_norm_eps",
    "max_position_embeddings",
    "upsampling_scaling_factor",
];

fn copy_tree(src: &Path, dst: &Path) {
    for e in walkdir::WalkDir::new(src).into_iter().map(Result::unwrap) {
        let rel = e.path().strip_prefix(src).unwrap();
        let to = dst.join(rel);
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
        } else if e.path().extension().is_some_and(|x| x == "safetensors") {
            std::fs::hard_link(e.path(), &to).unwrap();
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// Sets `edits` in `dir/file` (a JSON object).
fn edit(dir: &Path, file: &str, edits: &[(String, Value)]) {
    let p = dir.join(file);
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    for (k, v) in edits {
        cfg[k] = v.clone();
    }
    std::fs::write(&p, serde_json::to_string(&cfg).unwrap()).unwrap();
}

fn keys_of(dir: &Path, file: &str) -> Vec<String> {
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
    let mut keys: Vec<String> = cfg.as_object().unwrap().keys().filter(|k| !k.starts_with('_')).cloned().collect();
    keys.extend(EXTRA_KEYS.iter().map(|k| k.to_string()));
    keys
}

/// Loads the edited model and runs one short img2img with a sampler; Ok(()) or an error, and a
/// successful run's picture is finite.
fn load_and_run(dir: &Path, sampler: SamplerKind, steps: usize) -> Result<(), String> {
    let sd = StableDiffusion::load(dir, &Device::Cpu, DType::F32).map_err(|e| e.to_string())?;
    let photo = ghiblify::image_io::load_rgb(&fixtures().join("photo-64x48.png")).unwrap();
    let image = ghiblify::image_io::to_tensor(&photo).unwrap();
    let params = Img2ImgParams {
        prompt: "a cat".into(),
        negative_prompt: String::new(),
        strength: 1.0,
        steps,
        guidance: 2.0,
        sampler,
        karras: false,
        vae_tiling: VaeTiling::On,
    };
    let out = sd
        .img2img(&image, &params, &mut SeededNoise::new(1), &mut Trace::disabled(), &mut |_, _, _| Ok(()))
        .map_err(|e| e.to_string())?;
    let v = out.image.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x)), "a run that succeeds makes a finite picture");
    Ok(())
}

const COMPONENTS: &[(&str, &str)] = &[
    ("tiny-sd1", "unet/config.json"),
    ("tiny-sd1", "vae/config.json"),
    ("tiny-sd1", "text_encoder/config.json"),
    ("tiny-sd1", "scheduler/scheduler_config.json"),
    ("tiny-sd2", "scheduler/scheduler_config.json"),
    ("tiny-odd", "vae/config.json"),
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_config_value_panics(
        component in 0..COMPONENTS.len(),
        k1 in any::<prop::sample::Index>(),
        v1 in 0..hostile_values().len(),
        k2 in any::<prop::sample::Index>(),
        v2 in 0..hostile_values().len(),
        two in any::<bool>(),
        sampler in any::<prop::sample::Index>(),
        steps in prop::sample::select(vec![1usize, 2, 3]),
    ) {
        let (model, file) = COMPONENTS[component];
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&fixtures().join(model), dir.path());
        let keys = keys_of(dir.path(), file);
        let values = hostile_values();
        let mut edits = vec![(keys[k1.index(keys.len())].clone(), values[v1].clone())];
        if two {
            edits.push((keys[k2.index(keys.len())].clone(), values[v2].clone()));
        }
        edit(dir.path(), file, &edits);
        let samplers: Vec<SamplerKind> = SamplerKind::all().collect();
        let kind = samplers[sampler.index(samplers.len())];
        let r = std::panic::catch_unwind(|| load_and_run(dir.path(), kind, steps));
        prop_assert!(r.is_ok(), "{model}/{file} with {edits:?}, {kind} {steps} steps: panicked");
    }
}

/// (model, config file, edits, what the error must name).
type Finding<'a> = (&'a str, &'a str, &'a [(&'a str, Value)], &'a str);

#[test]
fn the_red_team_findings_fail_in_one_line_naming_the_key() {
    let cases: &[Finding] = &[
        ("tiny-sd1", "unet/config.json", &[("norm_num_groups", json!(0))], "norm_num_groups"),
        ("tiny-sd1", "vae/config.json", &[("norm_num_groups", json!(0))], "norm_num_groups"),
        ("tiny-sd1", "vae/config.json", &[("sample_size", json!(0))], "sample_size"),
        ("tiny-sd1", "vae/config.json", &[("scaling_factor", json!(0))], "scaling_factor"),
        ("tiny-sd1", "unet/config.json", &[("norm_eps", json!(-1e-5))], "norm_eps"),
        ("tiny-sd1", "scheduler/scheduler_config.json", &[("steps_offset", json!(5000))], "steps_offset"),
        (
            "tiny-sd1",
            "scheduler/scheduler_config.json",
            &[("thresholding", json!(true)), ("dynamic_thresholding_ratio", json!(1.5))],
            "dynamic_thresholding_ratio",
        ),
        (
            "tiny-sd1",
            "scheduler/scheduler_config.json",
            &[("thresholding", json!(true)), ("sample_max_value", json!(-1))],
            "sample_max_value",
        ),
        (
            "tiny-sd1",
            "scheduler/scheduler_config.json",
            &[("num_train_timesteps", json!(4294967296u64))],
            "num_train_timesteps",
        ),
        ("tiny-sd1", "scheduler/scheduler_config.json", &[("beta_end", json!(1.5))], "beta"),
        ("tiny-sd1", "unet/config.json", &[("sample_size", json!(100000000))], "sample_size"),
        (
            "tiny-sd1",
            "text_encoder/config.json",
            &[("max_position_embeddings", json!(100000000))],
            "max_position_embeddings",
        ),
    ];
    for (model, file, edits, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&fixtures().join(model), dir.path());
        let edits: Vec<(String, Value)> = edits.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        edit(dir.path(), file, &edits);
        let err = load_and_run(dir.path(), SamplerKind::by_name("ddim").unwrap(), 4).unwrap_err();
        assert!(err.contains(needle) && err.contains(file.rsplit('/').next().unwrap()), "{edits:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
