//! The real binary in a temp folder (ripgrep's `rgtest!` style): the happy path on the tiny SD1
//! model, determinism, --trace, and every kind of bad input → exit 1, one line naming the
//! problem, nothing written, the input untouched.

use crate::common::{fixtures, load_safetensors, Case};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn ghiblify() -> Command {
    let mut c = crate::common::ghiblify_cmd();
    // Never touch the user's cache or the network in tests.
    c.env("HF_ENDPOINT", "http://127.0.0.1:9").env_remove("HF_TOKEN");
    c
}

trait TinyRun {
    fn run(&self, extra: &[&str]) -> Output;
    fn written(&self) -> Vec<String>;
}

impl TinyRun for Case {
    /// A fast run on the tiny SD1 model with `extra` arguments.
    fn run(&self, extra: &[&str]) -> Output {
        let mut c = ghiblify();
        c.current_dir(self.dir.path())
            .env("HF_HOME", self.path("hf-home"))
            .args(["--model-dir", fixtures().join("tiny-sd1").to_str().unwrap()])
            .args(["--steps", "4", "--strength", "0.5", "--seed", "1", "-q"])
            .args(extra);
        c.output().unwrap()
    }
    /// Files in the case folder other than the input photo.
    fn written(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "photo.png")
            .collect();
        v.sort();
        v
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn png_text(path: &Path, key: &str) -> Option<String> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    info.utf8_text
        .iter()
        .find(|t| t.keyword == key)
        .map(|t| t.get_text().unwrap())
        .or_else(|| info.uncompressed_latin1_text.iter().find(|t| t.keyword == key).map(|t| t.text.clone()))
}

#[test]
fn converts_a_photo_with_provenance_and_a_clean_stdout() {
    let case = Case::new();
    let o = case.run(&["photo.png", "-o", "out.png"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.is_empty(), "stdout is for data only");
    let img = image::open(case.path("out.png")).unwrap();
    assert_eq!((img.width(), img.height()), (64, 48));
    let params = png_text(&case.path("out.png"), "parameters").expect("parameters text chunk");
    assert!(params.contains("Seed: 1") && params.contains("Sampler: ddim"), "{params}");
    assert!(png_text(&case.path("out.png"), "Software").unwrap().starts_with("ghiblify "));
    assert_eq!(case.written(), ["out.png"], "no temp files left behind");
    assert_eq!(
        std::fs::read(case.path("photo.png")).unwrap(),
        std::fs::read(fixtures().join("photo-64x48.png")).unwrap()
    );
}

#[test]
fn same_seed_same_picture_other_seed_other_picture() {
    let case = Case::new();
    assert!(case.run(&["photo.png", "-o", "a.png"]).status.success());
    assert!(case.run(&["photo.png", "-o", "b.png"]).status.success());
    assert!(case.run(&["photo.png", "-o", "c.png", "--seed", "2"]).status.success());
    let px = |n: &str| image::open(case.path(n)).unwrap().to_rgb8().into_raw();
    assert_eq!(px("a.png"), px("b.png"));
    assert_ne!(px("a.png"), px("c.png"));
}

#[test]
fn resizes_to_the_working_size_and_writes_jpeg_and_webp() {
    let case = Case::new();
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/chelsea.png"), case.path("cat.png")).unwrap();
    let o = case.run(&["cat.png", "-o", "cat.jpg", "--size", "64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(case.path("cat.jpg")).unwrap();
    // 451x300 → long side 64, short side round(300·64/451) = 43 → 40 (multiple of 8).
    assert_eq!((img.width(), img.height()), (64, 40));
    let o = case.run(&["photo.png", "-o", "out.webp", "--prompt", "ghibli style, café à Kyōto"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(image::open(case.path("out.webp")).unwrap().width(), 64);
    // Provenance as EXIF: Software, ImageDescription and the parameters in UserComment.
    for (file, want) in [("cat.jpg", "Seed: 1"), ("out.webp", "café à Kyōto")] {
        let f = std::fs::File::open(case.path(file)).unwrap();
        let exif = exif::Reader::new().read_from_container(&mut std::io::BufReader::new(f)).unwrap();
        let field = |t| exif.get_field(t, exif::In::PRIMARY).unwrap_or_else(|| panic!("{file}: no {t}"));
        assert!(field(exif::Tag::Software).display_value().to_string().contains("ghiblify"));
        assert!(field(exif::Tag::ImageDescription).display_value().to_string().contains("AI-generated"));
        let exif::Value::Undefined(bytes, _) = &field(exif::Tag::UserComment).value else { panic!("UserComment type") };
        // What A1111 writes and its reader (piexif) decodes: UNICODE + UTF-16 big-endian.
        assert!(bytes.starts_with(b"UNICODE\0"), "{file}");
        let text = ghiblify::provenance::read_user_comment(bytes).unwrap();
        assert!(text.contains(want) && text.contains("Sampler: ddim"), "{file}: {text}");
    }
}

#[test]
fn trace_records_every_intermediate() {
    let case = Case::new();
    let o = case.run(&["photo.png", "-o", "out.png", "--trace", "t.safetensors"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (t, meta) = load_safetensors(&case.path("t.safetensors"));
    for key in [
        "posterior_eps",
        "noise",
        "timesteps",
        "prompt_embeds",
        "negative_prompt_embeds",
        "init_latents",
        "step00_latents",
        "step01_latents",
        "final_latents",
        "output_float",
    ] {
        assert!(t.contains_key(key), "missing {key}");
    }
    assert_eq!(t["noise"].dims(), &[1, 4, 6, 8]);
    assert_eq!(t["output_float"].dims(), &[48, 64, 3]);
    assert_eq!(t["timesteps"].dims(), &[2]);
    assert_eq!(meta["seed"], "1");
}

/// Runs with `args`, expects exit 1 with one stderr line containing every `needles`, and no file.
fn fails(args: &[&str], needles: &[&str]) {
    let case = Case::new();
    std::fs::write(case.path("notes.jpg"), "this is a text file, not a JPEG").unwrap();
    std::fs::write(case.path("empty.png"), "").unwrap();
    let before = std::fs::read(case.path("photo.png")).unwrap();
    let o = case.run(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "args {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line, got: {err}");
    for n in needles {
        assert!(err.contains(n), "args {args:?}: {err:?} should mention {n:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(case.written(), ["empty.png", "notes.jpg"], "args {args:?}: nothing written");
    assert_eq!(std::fs::read(case.path("photo.png")).unwrap(), before, "input untouched");
}

#[test]
fn missing_input() {
    fails(&["nope.jpg", "-o", "out.png"], &["nope.jpg", "no such file"]);
}

#[test]
fn text_file_named_jpg() {
    fails(&["notes.jpg", "-o", "out.png"], &["notes.jpg", "not an image"]);
}

#[test]
fn zero_byte_file() {
    fails(&["empty.png", "-o", "out.png"], &["empty.png"]);
}

#[test]
fn strength_out_of_range() {
    fails(&["photo.png", "-o", "out.png", "--strength", "1.3"], &["--strength", "1.3"]);
    fails(&["photo.png", "-o", "out.png", "--strength", "-0.1"], &["--strength", "-0.1"]);
}

#[test]
fn zero_steps() {
    fails(&["photo.png", "-o", "out.png", "--steps", "0"], &["--steps", "0"]);
}

#[test]
fn strength_leaving_no_step() {
    fails(&["photo.png", "-o", "out.png", "--strength", "0.1", "--steps", "4"], &["--strength 0.1", "--steps 4"]);
}

#[test]
fn size_below_64() {
    fails(&["photo.png", "-o", "out.png", "--size", "32"], &["--size", "32"]);
}

#[test]
fn output_is_the_input() {
    fails(&["photo.png", "-o", "photo.png"], &["photo.png", "input"]);
    fails(&["photo.png", "-o", "./photo.png"], &["photo.png", "input"]);
}

#[test]
fn unknown_output_extension() {
    fails(&["photo.png", "-o", "out.gif"], &["out.gif", "extension"]);
}

#[test]
fn unknown_flag_value() {
    fails(&["photo.png", "-o", "out.png", "--sampler", "plms"], &["plms"]);
}

/// A copy of the tiny SD1 model with `edit` applied.
fn broken_model(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-sd1");
    for entry in walk(&src) {
        let rel = entry.strip_prefix(&src).unwrap();
        let dst = dir.path().join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &dst).unwrap();
    }
    edit(dir.path());
    dir
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path))
        } else {
            out.push(path)
        }
    }
    out
}

#[test]
fn model_dir_missing_a_component() {
    let m = broken_model(|d| std::fs::remove_dir_all(d.join("vae")).unwrap());
    fails(&["photo.png", "-o", "out.png", "--model-dir", m.path().to_str().unwrap()], &["vae/"]);
    let m = broken_model(|d| std::fs::remove_file(d.join("unet/diffusion_pytorch_model.safetensors")).unwrap());
    fails(
        &["photo.png", "-o", "out.png", "--model-dir", m.path().to_str().unwrap()],
        &["unet/diffusion_pytorch_model.safetensors"],
    );
}

#[test]
fn model_dir_with_malformed_json() {
    let m = broken_model(|d| std::fs::write(d.join("unet/config.json"), "{\"block_out_channels\": [8, 16,").unwrap());
    fails(
        &["photo.png", "-o", "out.png", "--model-dir", m.path().to_str().unwrap()],
        &["unet/config.json", "malformed"],
    );
    let m = broken_model(|d| {
        std::fs::write(d.join("scheduler/scheduler_config.json"), "{\"beta_schedule\": \"cubic\"}").unwrap()
    });
    fails(
        &["photo.png", "-o", "out.png", "--model-dir", m.path().to_str().unwrap()],
        &["scheduler_config.json", "beta_schedule", "cubic"],
    );
}

#[test]
fn model_dir_with_weights_that_do_not_match_the_config() {
    let m = broken_model(|d| {
        let p = d.join("unet/config.json");
        let text = std::fs::read_to_string(&p).unwrap().replace("\"layers_per_block\": 2", "\"layers_per_block\": 3");
        std::fs::write(p, text).unwrap();
    });
    fails(
        &["photo.png", "-o", "out.png", "--model-dir", m.path().to_str().unwrap()],
        &["diffusion_pytorch_model.safetensors"],
    );
}

#[test]
fn unreachable_hub_fails_fast_and_points_to_model_dir() {
    let case = Case::new();
    let start = Instant::now();
    let o = ghiblify()
        .current_dir(case.dir.path())
        .env("HF_HOME", case.path("hf-home"))
        .args(["photo.png", "-o", "out.png", "-q"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    assert!(err.contains("nitrosocke/Ghibli-Diffusion") && err.contains("--model-dir"), "{err}");
    assert!(!case.path("out.png").exists());
}

#[test]
fn help_lists_the_trace_keys_and_exit_codes() {
    let o = ghiblify().arg("--help").output().unwrap();
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for word in ["--trace", "posterior_eps", "stepNN_latents", "output_float", "Exit status", "--strength"] {
        assert!(help.contains(word), "--help lacks {word}");
    }
}

#[test]
fn karras_on_a_sampler_without_it() {
    fails(&["photo.png", "-o", "out.png", "--sampler", "euler-a", "--karras"], &["--karras", "euler-a"]);
    fails(&["photo.png", "-o", "out.png", "--sampler", "lcm", "--karras"], &["--karras", "lcm"]);
}

#[test]
fn lcm_steps_beyond_its_schedule() {
    fails(&["photo.png", "-o", "out.png", "--sampler", "lcm", "--steps", "60"], &["--steps", "60", "lcm"]);
}

#[test]
fn stochastic_sampler_traces_its_step_noise_and_repeats_with_the_seed() {
    let case = Case::new();
    for out in ["a.png", "b.png"] {
        let o = case.run(&[
            "photo.png",
            "-o",
            out,
            "--sampler",
            "dpmpp-2m-sde",
            "--karras",
            "--trace",
            &format!("{out}.safetensors"),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (t, meta) = load_safetensors(&case.path("a.png.safetensors"));
    assert_eq!(meta["sampler"], "dpmpp-2m-sde");
    assert_eq!(meta["karras"], "true");
    assert!(t.contains_key("step00_noise") && t.contains_key("step01_noise"), "{:?}", t.keys());
    let px = |n: &str| image::open(case.path(n)).unwrap().to_rgb8().into_raw();
    assert_eq!(px("a.png"), px("b.png"));
}

#[test]
fn threads_change_the_speed_not_the_picture() {
    let case = Case::new();
    assert!(case.run(&["photo.png", "-o", "all.png"]).status.success());
    let o = case.run(&["photo.png", "-o", "one.png", "--threads", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let px = |n: &str| image::open(case.path(n)).unwrap().to_rgb8().into_raw();
    assert_eq!(px("all.png"), px("one.png"));
}

#[test]
fn zero_threads() {
    fails(&["photo.png", "-o", "out.png", "--threads", "0"], &["--threads", "0"]);
}

/// f16/bf16 on the CPU store the UNet and VAE weights in half precision; f16 computes in f32 (the
/// result moves only by the weights' rounding), bf16 on a CPU with AVX512_BF16 multiplies in bf16
/// (the activations' rounding too; benches/bf16_accuracy.py compares it with diffusers' autocast).
#[test]
fn half_precision_weight_storage_on_the_cpu() {
    let case = Case::new();
    let o = case.run(&["photo.png", "-o", "f32.png", "--trace", "f32.safetensors"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (want, _) = load_safetensors(&case.path("f32.safetensors"));
    for (dtype, bound) in [("f16", 2e-3), ("bf16", 2e-2)] {
        let trace = format!("{dtype}.safetensors");
        let o = case.run(&["photo.png", "-o", &format!("{dtype}.png"), "--dtype", dtype, "--trace", &trace]);
        assert!(o.status.success(), "{dtype}: {}", stderr(&o));
        let (got, _) = load_safetensors(&case.path(&trace));
        let err = crate::common::rel_err(&got["final_latents"], &want["final_latents"]);
        assert!(err < bound && err > 0.0, "{dtype}: final latents differ by {err:e} from f32");
        // The picture says which arithmetic made it (an f32 picture says nothing).
        let params = png_text(&case.path(&format!("{dtype}.png")), "parameters").unwrap();
        let fast_bf16 = ghiblify::models::gemm_bf16::available();
        let want = match dtype {
            "bf16" if fast_bf16 => "Precision: bf16, ",
            _ => &format!("Precision: {dtype} weights, "),
        };
        assert!(params.contains(want), "{dtype}: {params}");
    }
    let params = png_text(&case.path("f32.png"), "parameters").unwrap();
    assert!(!params.contains("Precision"), "{params}");
}

/// `--dtype q8` quantises the UNet and text encoder to int8 per output channel: the result moves
/// by the quantisation (and, on a CPU with AVX512_BF16, the activations' bf16 rounding), on both
/// kernel paths and candle's generic operations, and the picture says so.
#[test]
fn int8_weights_on_the_cpu() {
    let case = Case::new();
    let o = case.run(&["photo.png", "-o", "f32.png", "--trace", "f32.safetensors"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (want, _) = load_safetensors(&case.path("f32.safetensors"));
    let fast_bf16 = ghiblify::models::gemm_bf16::available();
    let mut finals = Vec::new();
    for (name, env, label) in [
        ("kernels", None, if fast_bf16 { "Precision: q8 weights, bf16 products, " } else { "Precision: q8 weights, " }),
        ("f32", Some(("GHIBLIFY_BF16_ARITHMETIC", "0")), "Precision: q8 weights, "),
        ("generic", Some(("GHIBLIFY_GENERIC_OPS", "1")), "Precision: q8 weights, "),
    ] {
        let trace = format!("{name}.safetensors");
        let mut c = ghiblify();
        c.current_dir(case.dir.path()).env("HF_HOME", case.path("hf-home"));
        c.args(["--model-dir", fixtures().join("tiny-sd1").to_str().unwrap()]);
        c.args(["--steps", "4", "--strength", "0.5", "--seed", "1", "-q"]);
        c.args(["photo.png", "-o", &format!("{name}.png"), "--dtype", "q8", "--trace", &trace]);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let (got, _) = load_safetensors(&case.path(&trace));
        for key in ["prompt_embeds", "final_latents"] {
            let err = crate::common::rel_err(&got[key], &want[key]);
            // The tiny model's int8 rounding moves its latents by ~0.4 %; a wrong scale or sign
            // moves them by the whole of their size.
            assert!(err < 2e-2 && err > 1e-4, "{name}: {key} differs by {err:e} from f32");
        }
        let params = png_text(&case.path(&format!("{name}.png")), "parameters").unwrap();
        assert!(params.contains(label), "{name}: {params}");
        finals.push(got["final_latents"].clone());
    }
    // The f32 kernels and candle's generic ops compute the same dequantised products.
    assert!(crate::common::rel_err(&finals[1], &finals[2]) < 1e-4);
}

#[test]
fn noise_from_replays_a_diffusers_trace_through_the_binary() {
    // The binary with diffusers' recorded noise gives diffusers' latents, step by step (the parity
    // tests do this through the library; scripts/gpu-check does it on a GPU).
    let case = Case::new();
    for (model, trace) in [("tiny-sd1", "sd1_euler-a_s100.safetensors"), ("tiny-sd2", "sd2_s055.safetensors")] {
        let reference_path = fixtures().join("traces").join(trace);
        let (reference, meta) = load_safetensors(&reference_path);
        let photo = fixtures().join(&meta["photo"]);
        let o = ghiblify()
            .current_dir(case.dir.path())
            .env("HF_HOME", case.path("hf-home"))
            .args(["--model-dir", fixtures().join(model).to_str().unwrap(), photo.to_str().unwrap()])
            .args(["-o", "replayed.png", "--trace", "ours.safetensors", "-q"])
            .args(["--noise-from", reference_path.to_str().unwrap()])
            .args(["--prompt", &meta["prompt"], "--negative-prompt", &meta["negative_prompt"]])
            .args(["--strength", &meta["strength"], "--steps", &meta["steps"], "--guidance", &meta["guidance"]])
            .args(["--sampler", &meta["sampler"]])
            .output()
            .unwrap();
        assert!(o.status.success(), "{trace}: {}", stderr(&o));
        assert!(stderr(&o).is_empty(), "{trace}: every draw used, nothing to warn: {}", stderr(&o));
        let (ours, _) = load_safetensors(&case.path("ours.safetensors"));
        for (k, want) in &reference {
            if k.ends_with("_latents") || k.ends_with("_embeds") {
                let err = crate::common::rel_err(&ours[k], want);
                assert!(err <= 1e-4, "{trace}: {k} differs by {err:.2e}");
            }
        }
    }
    let o = case.run(&["photo.png", "-o", "x.png", "--noise-from", "photo.png"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--noise-from"), "{}", stderr(&o));
}

#[test]
fn devices_this_build_lacks_fail_in_one_line_saying_how_to_build() {
    if cfg!(feature = "cuda") || cfg!(feature = "metal") {
        return;
    }
    fails(&["photo.png", "-o", "out.png", "--device", "cuda"], &["--device cuda", "scripts/build-cuda"]);
    fails(&["photo.png", "-o", "out.png", "--device", "metal"], &["--device metal", "--features metal"]);
}

#[test]
fn verbose_names_the_device_dtype_and_operation_set() {
    let case = Case::new();
    let verbose = |out: &str, generic: bool| {
        let mut c = ghiblify();
        c.current_dir(case.dir.path()).args(["--model-dir", fixtures().join("tiny-sd1").to_str().unwrap()]).args([
            "--steps",
            "4",
            "--strength",
            "0.5",
            "--seed",
            "1",
            "-v",
            "photo.png",
            "-o",
            out,
        ]);
        if generic {
            c.env("GHIBLIFY_GENERIC_OPS", "1");
        }
        c.output().unwrap()
    };
    let o = verbose("a.png", false);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let line = err.lines().find(|l| l.starts_with("device ")).unwrap_or_else(|| panic!("no device line: {err}"));
    assert!(line.contains("CPU") && line.contains("F32") && line.contains("CPU kernels"), "{line}");
    if !cfg!(any(feature = "cuda", feature = "metal")) {
        assert!(err.contains("running on the CPU (this build has no GPU support"), "{err}");
    }
    let o = verbose("b.png", true);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.lines().any(|l| l.starts_with("device ") && l.contains("generic operations")), "{err}");
    // The two paths agree on the picture within the parity tolerance.
    let a = image::open(case.path("a.png")).unwrap().to_rgb8();
    let b = image::open(case.path("b.png")).unwrap().to_rgb8();
    let worst = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(worst <= 2, "kernels vs generic ops: {worst}/255");
}

#[test]
fn repo_names_and_revisions_that_would_leave_the_cache_are_refused() {
    fails(&["photo.png", "-o", "out.png", "--lora", "a/b/../../x.safetensors"], &["--lora", "a/b/../../x.safetensors"]);
    fails(&["photo.png", "-o", "out.png", "--lora", "../b/x.safetensors"], &["--lora", "../b/x.safetensors"]);
    fails(&["photo.png", "-o", "out.png", "--vae", "someone/vae@a/../b"], &["--vae", "a/../b"]);
    // --model cannot go with the --model-dir that `fails` passes.
    let case = Case::new();
    for (model, needle) in [("someone/tiny@../../rev", "../../rev"), ("some..one/tiny", "some..one/tiny")] {
        let o = ghiblify()
            .current_dir(case.dir.path())
            .args(["photo.png", "-o", "out.png", "--model", model])
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("--model") && err.contains(needle) && err.trim().lines().count() == 1, "{err}");
    }
    assert_eq!(case.written(), Vec::<String>::new());
}

#[test]
fn an_os_error_is_said_once() {
    let case = Case::new();
    std::fs::write(case.path("afile"), b"").unwrap();
    let o = case.run(&["photo.png", "-o", "out.png", "--report", "afile/r.jsonl"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("not a directory").count(), 1, "{err}");
    assert!(err.contains("afile") && !case.path("out.png").exists(), "{err}");
}

#[test]
fn guidance_that_would_overflow_to_a_black_picture_is_refused() {
    fails(&["photo.png", "-o", "out.png", "--guidance", "1e308"], &["--guidance", "1e308"]);
}
