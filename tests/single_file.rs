//! Single-file checkpoints (original LDM layout, `.safetensors` and `.ckpt`) against diffusers'
//! `from_single_file` on the same weights (`fixtures/generate_single_file.py`), the refusals of
//! files that are not SD1/SD2 checkpoints, and hostile `.ckpt` files.

use crate::common::{fixtures, ghiblify_cmd, Case};
use candle_core::{DType, Device};
use ghiblify::models::weights::TensorSource;
use ghiblify::pipeline::{Extras, StableDiffusion};
use std::io::Write;
use std::path::{Path, PathBuf};

fn single(name: &str) -> PathBuf {
    fixtures().join("single").join(name)
}

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load_single_file(&single(name), None, &Device::Cpu, DType::F32, Extras::default()).unwrap().0
}

#[test]
fn sd1_safetensors_matches_from_single_file() {
    crate::parity::check_loaded(&load("sd1.safetensors"), "single_sd1.safetensors");
}

#[test]
fn sd1_ckpt_matches_from_single_file() {
    crate::parity::check_loaded(&load("sd1.ckpt"), "single_sd1.safetensors");
}

#[test]
fn sd2_openclip_safetensors_matches_from_single_file() {
    crate::parity::check_loaded(&load("sd2.safetensors"), "single_sd2.safetensors");
}

#[test]
fn the_ckpt_and_the_safetensors_give_identical_tensors() {
    let a = ghiblify::models::single_file::open(&single("sd1.safetensors")).unwrap();
    let b = ghiblify::models::single_file::open(&single("sd1.ckpt")).unwrap();
    assert_eq!(a.family, ghiblify::models::single_file::Family::Sd1);
    assert_eq!((&a.unet_config, &a.vae_config, &a.text_config), (&b.unet_config, &b.vae_config, &b.text_config));
    let mut n = 0;
    for (x, y) in [(&a.unet, &b.unet), (&a.vae, &b.vae), (&a.text_encoder, &b.text_encoder)] {
        let mut names = x.names();
        names.sort();
        let mut other = y.names();
        other.sort();
        assert_eq!(names, other);
        for name in names {
            let (tx, ty) = (x.load(&name, &Device::Cpu).unwrap(), y.load(&name, &Device::Cpu).unwrap());
            assert_eq!(tx.dims(), ty.dims(), "{name}");
            let (vx, vy) = (
                tx.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                ty.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(vx, vy, "{name}");
            n += 1;
        }
    }
    // Everything a pipeline reads, nothing of model_ema.*, the schedule buffers or position_ids.
    assert!(n > 300, "{n} tensors");
    assert!(!a
        .unet
        .names()
        .iter()
        .chain(a.text_encoder.names().iter())
        .any(|k| k.contains("ema") || k.contains("position_ids")));
}

/// What a run reads in place from a single file (the f32 runs of these f32 fixtures) is exactly
/// what it would have copied, under diffusers' names: plain keys, `.ckpt` storages, and the rows
/// of OpenCLIP's fused `in_proj` (q, k, v).
#[test]
fn weights_read_in_place_are_the_values_a_load_copies() {
    for file in ["sd1.safetensors", "sd1.ckpt", "sd2.safetensors"] {
        let sf = ghiblify::models::single_file::open(&single(file)).unwrap();
        let (mut viewed, mut total) = (0, 0);
        for part in [&sf.unet, &sf.vae, &sf.text_encoder] {
            for name in part.names() {
                let t = part.load(&name, &Device::Cpu).unwrap();
                total += 1;
                let Some(v) = part.view(&name, t.dtype()) else { continue };
                viewed += 1;
                assert_eq!(v.dims(), t.dims(), "{file}: {name}");
                let a = v.to_tensor(DType::F32, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let b = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(a, b, "{file}: {name}");
                // Never lent as another dtype (that needs a conversion, so a copy).
                let other = if t.dtype() == DType::BF16 { DType::F32 } else { DType::BF16 };
                assert!(part.view(&name, other).is_none(), "{file}: {name}");
            }
        }
        // torch's writers align every tensor, so every one can be read in place.
        assert_eq!(viewed, total, "{file}: {viewed} of {total} tensors lent in place");
        if file == "sd2.safetensors" {
            for part in ["q_proj", "k_proj", "v_proj"] {
                let name = format!("text_model.encoder.layers.0.self_attn.{part}.weight");
                let stored = sf.text_encoder.load(&name, &Device::Cpu).unwrap().dtype();
                assert!(sf.text_encoder.view(&name, stored).is_some(), "OpenCLIP's {part} rows in place");
            }
        }
    }
}

#[test]
fn the_architecture_comes_from_the_shapes_and_the_family() {
    let sd2 = ghiblify::models::single_file::open(&single("sd2.safetensors")).unwrap();
    assert_eq!(sd2.family, ghiblify::models::single_file::Family::Sd2);
    assert_eq!(sd2.unet_config["block_out_channels"], serde_json::json!([32, 64]));
    assert_eq!(sd2.unet_config["use_linear_projection"], true);
    assert_eq!(sd2.unet_config["cross_attention_dim"], 8);
    // OpenCLIP's 3 blocks in the file, the last unused.
    assert_eq!(sd2.text_config["num_hidden_layers"], 2);
    assert_eq!(sd2.text_config["hidden_act"], "gelu");
    let sd1 = ghiblify::models::single_file::open(&single("sd1.safetensors")).unwrap();
    assert_eq!(sd1.unet_config["attention_head_dim"], serde_json::json!([8, 8]));
    assert_eq!(sd1.unet_config["use_linear_projection"], false);
}

/// Writes `tensors` (name → shape, zeros) as a safetensors file.
fn write_safetensors(path: &Path, tensors: &[(&str, &[usize])]) {
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .iter()
        .map(|(k, s)| (k.to_string(), candle_core::Tensor::zeros(*s, DType::F16, &Device::Cpu).unwrap()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

/// Runs the binary with `--model-file FILE`; returns (exit code, stderr).
fn run_file(case: &Case, file: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let o = ghiblify_cmd()
        .current_dir(case.dir.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .args(["photo.png", "-o", "out.png", "--steps", "2", "--strength", "1", "--seed", "1", "--size", "64", "-q"])
        .arg("--model-file")
        .arg(file)
        .args(extra)
        .output()
        .unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn the_binary_runs_single_files_and_refuses_what_they_are_not() {
    let case = Case::new();
    for f in ["sd1.safetensors", "sd1.ckpt", "sd2.safetensors"] {
        let (code, err) = run_file(&case, &single(f), &[]);
        assert_eq!(code, Some(0), "{f}: {err}");
        let params = crate::cli::png_text(&case.path("out.png"), "parameters").unwrap();
        assert!(params.contains(&format!("Model: {f}")), "{params}");
    }
    let (code, err) = run_file(&case, &single("sd2.safetensors"), &["--prediction", "v"]);
    assert_eq!(code, Some(0), "{err}");
    // What a user sees for the usual wrong files: one line saying what the file looks like.
    let lora = case.path("style.safetensors");
    write_safetensors(&lora, &[("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", &[4, 32])]);
    let sdxl = case.path("xl.safetensors");
    write_safetensors(
        &sdxl,
        &[
            ("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]),
            ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", &[10, 8]),
            ("first_stage_model.decoder.conv_in.weight", &[8, 4, 3, 3]),
        ],
    );
    let vae = case.path("vae.safetensors");
    write_safetensors(&vae, &[("encoder.conv_in.weight", &[8, 3, 3, 3]), ("decoder.conv_in.weight", &[8, 4, 3, 3])]);
    let text = case.path("notes.ckpt");
    std::fs::write(&text, "not a checkpoint at all").unwrap();
    let notes = "notes.ckpt: not a checkpoint (neither safetensors nor a PyTorch zip archive)";
    for (file, needle) in [(&lora, "a LoRA"), (&sdxl, "SDXL"), (&vae, "a VAE on its own"), (&text, notes)] {
        let (code, err) = run_file(&case, file, &[]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(needle) && err.trim().lines().count() == 1, "{needle}: {err}");
    }
    // --prediction belongs to single files; --download-only to hub models.
    let o = ghiblify_cmd()
        .current_dir(case.dir.path())
        .args([
            "photo.png",
            "-o",
            "x.png",
            "--model-dir",
            fixtures().join("tiny-sd1").to_str().unwrap(),
            "--prediction",
            "v",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--prediction"));
    let o = ghiblify_cmd()
        .current_dir(case.dir.path())
        .arg("--download-only")
        .arg("--model-file")
        .arg(single("sd1.ckpt"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--model-file"));
}

#[test]
fn weights_of_the_wrong_rank_are_named_not_indexed() {
    // A real file with one tensor the architecture is read from flattened or made a scalar (what a
    // broken converter or a hostile file gives): a one-line error naming the key, never a panic.
    let case = Case::new();
    let all = candle_core::safetensors::load(single("sd2.safetensors"), &Device::Cpu).unwrap();
    for (key, shape) in [
        ("model.diffusion_model.input_blocks.0.0.weight", vec![7]),
        ("cond_stage_model.model.token_embedding.weight", vec![]),
        ("first_stage_model.encoder.conv_in.weight", vec![3]),
        ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias", vec![]),
    ] {
        assert!(all.contains_key(key), "{key}");
        let mut t = all.clone();
        t.insert(key.to_string(), candle_core::Tensor::zeros(shape, DType::F16, &Device::Cpu).unwrap());
        let file = case.path("broken.safetensors");
        candle_core::safetensors::save(&t, &file).unwrap();
        let (code, err) = run_file(&case, &file, &[]);
        assert_eq!(code, Some(1), "{key}: {err}");
        assert!(err.contains(key) && err.trim().lines().count() == 1, "{key}: {err}");
        assert!(!err.contains("panicked") && !err.contains("ghiblify-model-"), "{err}");
    }
}

#[test]
fn an_inpainting_checkpoint_is_named() {
    let case = Case::new();
    let bytes = std::fs::read(single("sd1.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> =
        st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect();
    for (k, s) in &mut tensors {
        if k == "model.diffusion_model.input_blocks.0.0.weight" {
            s[1] = 9;
        }
    }
    let refs: Vec<(&str, &[usize])> = tensors.iter().map(|(k, s)| (k.as_str(), s.as_slice())).collect();
    let path = case.path("inpaint.safetensors");
    write_safetensors(&path, &refs);
    let (code, err) = run_file(&case, &path, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("inpainting") && err.contains("9 input channels"), "{err}");
}

/// A `torch.save`-shaped zip with `pickle` as its data.pkl and `storages` as data/<key>.
fn ckpt(path: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    for (k, b) in storages {
        zip.start_file(format!("archive/data/{k}"), opts).unwrap();
        zip.write_all(b).unwrap();
    }
    zip.finish().unwrap();
}

/// One hostile file: its name, its `data.pkl`, other archive members, and what the error names.
type HostileCase<'a> = (&'a str, Vec<u8>, Vec<(&'a str, Vec<u8>)>, &'a str);

/// Pickle opcodes (protocol 2) for the hostile files below.
fn global(module: &str, name: &str) -> Vec<u8> {
    format!("c{module}\n{name}\n").into_bytes()
}
fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

#[test]
fn hostile_ckpt_files_are_refused_in_one_line_without_running_anything() {
    let case = Case::new();
    let marker = case.path("pwned");
    let cases: Vec<HostileCase> = vec![
        // os.system("touch pwned"): refused by name, nothing runs.
        (
            "system.ckpt",
            [
                b"\x80\x02".to_vec(),
                global("os", "system"),
                unicode(&format!("touch {}", marker.display())),
                b"\x85R.".to_vec(),
            ]
            .concat(),
            vec![],
            "os.system",
        ),
        (
            "eval.ckpt",
            [b"\x80\x02".to_vec(), global("builtins", "eval"), unicode("1"), b"\x85R.".to_vec()].concat(),
            vec![],
            "builtins.eval",
        ),
        // A string that claims 2 GB.
        (
            "liar.ckpt",
            [b"\x80\x02}X".to_vec(), 0x7fff_ffffu32.to_le_bytes().to_vec(), b"abc".to_vec()].concat(),
            vec![],
            "bytes",
        ),
        // Billions of references: the stack limit stops it long before memory does.
        (
            "bomb.ckpt",
            [b"\x80\x02]q\x00".to_vec(), b"h\x00".repeat(200_000), b".".to_vec()].concat(),
            vec![],
            "pickle bomb",
        ),
        // A tensor that claims more than its storage holds.
        (
            "overread.ckpt",
            [
                b"\x80\x02}(".to_vec(),
                unicode("w"),
                global("torch._utils", "_rebuild_tensor_v2"),
                b"((".to_vec(),
                unicode("storage"),
                global("torch", "FloatStorage"),
                unicode("0"),
                unicode("cpu"),
                b"K\x04t".to_vec(),
                b"Q".to_vec(),
                b"K\x00(M\xe8\x03K\x01t(K\x01K\x01t\x89)tR".to_vec(),
                b"u.".to_vec(),
            ]
            .concat(),
            vec![("0", vec![0u8; 16])],
            "reads past its storage",
        ),
        // Cut in the middle.
        ("cut.ckpt", b"\x80\x02}(X\x05\x00\x00\x00ab".to_vec(), vec![], "past the end"),
    ];
    for (name, pickle, storages, needle) in cases {
        let path = case.path(name);
        ckpt(&path, &pickle, &storages);
        let (code, err) = run_file(&case, &path, &[]);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(err.contains(needle) && err.trim().lines().count() == 1, "{name}: {needle} in {err}");
    }
    assert!(!marker.exists(), "nothing from the file ran");
    // A truncated real checkpoint.
    let bytes = std::fs::read(single("sd1.ckpt")).unwrap();
    let cut = case.path("truncated.ckpt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, err) = run_file(&case, &cut, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("truncated.ckpt") && err.trim().lines().count() == 1, "{err}");
    // torch.save before 1.6 wrote a bare pickle; a bare pickle may be anything: not read at all.
    let legacy = case.path("legacy.ckpt");
    std::fs::write(&legacy, [b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.".to_vec(), global("os", "system")].concat())
        .unwrap();
    let (code, err) = run_file(&case, &legacy, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("legacy.ckpt") && err.contains("pre-1.6") && err.trim().lines().count() == 1, "{err}");
}

/// A checkpoint's `data.pkl` and its storages (key, bytes).
type CkptParts = (Vec<u8>, Vec<(String, Vec<u8>)>);

/// The real checkpoint's `data.pkl` and storages, to mutate.
fn sd1_ckpt_parts() -> CkptParts {
    use std::io::Read;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(single("sd1.ckpt")).unwrap()).unwrap();
    let mut pickle = Vec::new();
    let mut storages = Vec::new();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let name = String::from_utf8_lossy(f.name_raw()).into_owned();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        if name.ends_with("/data.pkl") {
            pickle = bytes;
        } else if let Some((_, key)) = name.split_once("/data/") {
            storages.push((key.to_string(), bytes));
        }
    }
    assert!(!pickle.is_empty() && !storages.is_empty());
    (pickle, storages)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 120, ..Default::default() })]
    /// A real checkpoint's pickle cut short, with bytes changed, or with a stretch repeated: the
    /// reader and the planner return an error or tensors, never panic, hang or run anything.
    #[test]
    fn a_damaged_ckpt_pickle_is_an_error_never_a_panic(
        cut in proptest::option::of(0usize..1 << 16),
        flips in proptest::collection::vec((0usize..1 << 16, proptest::num::u8::ANY), 0..6),
        repeat in proptest::option::of((0usize..1 << 16, 1usize..64, 1usize..4)),
    ) {
        use std::sync::OnceLock;
        static PARTS: OnceLock<CkptParts> = OnceLock::new();
        let (pickle, storages) = PARTS.get_or_init(sd1_ckpt_parts);
        let mut p = pickle.clone();
        for (at, v) in &flips {
            let i = at % p.len();
            p[i] = *v;
        }
        if let Some((at, len, times)) = repeat {
            let s = at % p.len();
            let piece = p[s..(s + len).min(p.len())].to_vec();
            for _ in 0..times {
                p.splice(s..s, piece.iter().copied());
            }
        }
        if let Some(c) = cut {
            p.truncate(c % (p.len() + 1));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("damaged.ckpt");
        let st: Vec<(&str, Vec<u8>)> = storages.iter().map(|(k, b)| (k.as_str(), b.clone())).collect();
        ckpt(&path, &p, &st);
        // SAFETY: the file is ours and stays as it is.
        if let Ok(raw) = unsafe { ghiblify::models::ckpt::Ckpt::open(&path) } {
            for name in raw.names() {
                let _ = raw.load(&name, &Device::Cpu);
            }
        }
        let _ = ghiblify::models::single_file::open(&path);
    }
}
