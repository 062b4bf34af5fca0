//! Writes the labelled sample pictures that `tests/fixtures/generate_labels.py` reads back with
//! the tools other people wrote (piexif, c2pa-python, invisible-watermark), and prints what each
//! label costs.
//!
//!     cargo run --release --example label_samples -- OUT_DIR [SIGNING_DIR]
//!
//! OUT_DIR receives `unmarked.png` (the example photo at its 512-px working size), `marked.png`
//! (the same with the invisible watermark), and `sample.{png,jpg,webp}` (marked, with the
//! provenance of [`record`] and a C2PA manifest signed with the per-user key kept in SIGNING_DIR,
//! default `tests/fixtures/labels/signing`). Everything but the C2PA signatures is deterministic.

use ghiblify::credentials::Credentials;
use ghiblify::image_io::{self, OutputFormat};
use ghiblify::provenance::{LoraRecord, ModelRecord, Provenance};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The provenance the samples carry (a prompt that is not ASCII, a LoRA, a VAE).
pub fn record() -> Provenance {
    Provenance {
        prompt: "ghibli style, café à Kyōto, 猫".into(),
        negative_prompt: "photo, blurry".into(),
        steps: 30,
        sampler: "dpmpp-2m".into(),
        karras: true,
        guidance: 7.0,
        strength: 0.55,
        seed: 1234,
        width: 512,
        height: 336,
        model: ModelRecord {
            name: "nitrosocke/Ghibli-Diffusion".into(),
            hash: Some("0123456789".into()),
            license: Some("creativeml-openrail-m".into()),
        },
        vae: Some("madebyollin/taesd".into()),
        loras: vec![LoraRecord { name: "style".into(), hash: "abcdef0123".into(), scale: 0.8 }],
        controlnets: vec![],
        source: "chelsea.png".into(),
        precision: None,
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(args.first().ok_or_else(|| anyhow::anyhow!("usage: label_samples OUT_DIR [SIGNING_DIR]"))?);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let signing = args.get(1).map(PathBuf::from).unwrap_or_else(|| root.join("tests/fixtures/labels/signing"));
    std::fs::create_dir_all(&out)?;
    let photo_path = root.join("examples/chelsea.png");
    let photo = image_io::load_rgb(&photo_path)?;
    let (w, h) = image_io::working_size(photo.width(), photo.height(), 512, 8);
    let unmarked = image_io::resize_to(photo, w, h);
    image_io::save_as(&unmarked, &out.join("unmarked.png"), OutputFormat::Png, None)?;
    let mut marked = unmarked.clone();
    let t = Instant::now();
    assert!(ghiblify::watermark::embed(&mut marked, ghiblify::watermark::PAYLOAD));
    let embed_ms = t.elapsed().as_secs_f64() * 1e3;
    image_io::save_as(&marked, &out.join("marked.png"), OutputFormat::Png, None)?;
    println!(
        "watermark: {w}x{h}, PSNR {:.2} dB against the unmarked picture, embedded in {embed_ms:.1} ms",
        ghiblify::watermark::psnr(&unmarked, &marked)
    );
    let creds = Credentials::per_user(&signing)?;
    let rec = record();
    for (ext, format) in [("png", OutputFormat::Png), ("jpg", OutputFormat::Jpeg), ("webp", OutputFormat::WebP)] {
        let path = out.join(format!("sample.{ext}"));
        let plain = image_io::encode(&marked, &path, format, Some(&rec))?;
        let t = Instant::now();
        let signed = ghiblify::credentials::sign(&plain, format, &format!("sample.{ext}"), &rec, &photo_path, &creds)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        std::fs::write(&path, &signed)?;
        println!(
            "c2pa {ext}: signed in {ms:.1} ms, {} -> {} bytes (+{})",
            plain.len(),
            signed.len(),
            signed.len() - plain.len()
        );
    }
    Ok(())
}
