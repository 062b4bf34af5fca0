//! The labels other tools read: A1111's `parameters` in EXIF as piexif (A1111's own reader) decodes
//! it, C2PA Content Credentials as the c2pa crate's reader and c2pa-python validate them, and the
//! invisible watermark as invisible-watermark's decoder reads it. `fixtures/generate_labels.py`
//! ran those tools on our samples (`examples/label_samples.rs`, deterministic but for the C2PA
//! signatures) and on files their writers made; what they read is in `labels/readback.json`.

use crate::common::{fixtures, Case};
use ghiblify::image_io::{self, OutputFormat};
use ghiblify::provenance::{LoraRecord, ModelRecord, Provenance};
use serde_json::Value;
use sha2::Digest;
use std::path::{Path, PathBuf};

fn readback() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("labels/readback.json")).unwrap()).unwrap()
}

fn hex(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

/// `examples/label_samples.rs`'s record (the example is not a library: kept in step by the
/// readback check below, which fails if they differ).
fn record() -> Provenance {
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

fn example_photo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/chelsea.png")
}

/// The samples' picture: the example photo at its 512-px working size, unmarked and marked.
fn pictures() -> (image::RgbImage, image::RgbImage) {
    let photo = image_io::load_rgb(&example_photo()).unwrap();
    let (w, h) = image_io::working_size(photo.width(), photo.height(), 512, 8);
    let unmarked = image_io::resize_to(photo, w, h);
    let mut marked = unmarked.clone();
    assert!(ghiblify::watermark::embed(&mut marked, ghiblify::watermark::PAYLOAD));
    (unmarked, marked)
}

#[test]
fn exif_parameters_are_what_a1111_writes_and_reads() {
    let r = readback();
    // A1111's writer (piexif): our reader gets its text, our writer makes the same bytes.
    let f = std::fs::File::open(fixtures().join("labels/a1111.jpg")).unwrap();
    // piexif writes an empty IFD1 pointer that kamadak-exif reports as an error after reading
    // everything else: take what it read.
    let exif = exif::Reader::new()
        .continue_on_error(true)
        .read_from_container(&mut std::io::BufReader::new(f))
        .or_else(|e| e.distill_partial_result(|_| {}))
        .unwrap();
    let field = exif.get_field(exif::Tag::UserComment, exif::In::PRIMARY).unwrap();
    let exif::Value::Undefined(bytes, _) = &field.value else { panic!("UserComment is UNDEFINED") };
    let text = r["a1111_text"].as_str().unwrap();
    assert_eq!(ghiblify::provenance::read_user_comment(bytes).as_deref(), Some(text));
    assert_eq!(ghiblify::provenance::user_comment(text), *bytes);
    // Our JPEG and WebP read back by piexif's loader: the parameters text, whole. The EXIF block
    // piexif read is the one our writer makes today (it is deterministic): big-endian, UNICODE.
    let params = record().parameters();
    let ours = record().exif().unwrap();
    for ext in ["jpg", "webp"] {
        assert_eq!(r["piexif"][ext].as_str().unwrap(), params, "{ext}");
        assert_eq!(r["exif_sha256"][ext].as_str().unwrap(), hex(&ours), "{ext}: the block piexif read is ours today");
    }
}

#[test]
fn the_watermark_is_what_invisible_watermarks_decoder_reads() {
    let r = readback();
    let wm = &r["watermark"];
    let (unmarked, marked) = pictures();
    // The picture their decoder read is the one we make today, and it read our payload, also
    // from our PNG, JPEG (quality 95, no chroma subsampling) and lossless WebP outputs.
    assert_eq!(hex(marked.as_raw()), wm["marked_sha256"].as_str().unwrap());
    assert_eq!(wm["decoded"], "ghiblify");
    for ext in ["png", "jpg", "webp"] {
        assert_eq!(wm["samples"][ext], "ghiblify", "{ext}");
    }
    let db = ghiblify::watermark::psnr(&unmarked, &marked);
    assert!((db - wm["psnr_db"].as_f64().unwrap()).abs() < 0.01 && db > 40.0, "PSNR {db}");
    assert_eq!(ghiblify::watermark::bytes_of(&ghiblify::watermark::decode(&marked, 64).unwrap()), b"ghiblify");
    // Our port of their decoder reads the same bits as theirs from a file their encoder wrote.
    let theirs = image::open(fixtures().join("labels/wm_theirs.png")).unwrap().to_rgb8();
    let bits: Vec<bool> = ghiblify::watermark::decode(&theirs, 64).unwrap();
    let want: Vec<bool> = wm["theirs_bits"].as_array().unwrap().iter().map(|b| b.as_u64() == Some(1)).collect();
    assert_eq!(bits, want);
}

#[test]
fn content_credentials_validate_with_the_c2pa_readers() {
    let r = readback();
    let creds = ghiblify::credentials::Credentials::per_user(&fixtures().join("labels/signing")).unwrap();
    let (_, marked) = pictures();
    let rec = record();
    let photo_sha = hex(&std::fs::read(example_photo()).unwrap());
    for (ext, format, mime) in [
        ("png", OutputFormat::Png, "image/png"),
        ("jpg", OutputFormat::Jpeg, "image/jpeg"),
        ("webp", OutputFormat::WebP, "image/webp"),
    ] {
        // c2pa-python on the samples the generator signed with the same key.
        let py = &r["c2pa"][ext];
        assert_eq!(py["validation_state"], "Valid", "{ext}");
        assert_eq!(py["status_codes"], serde_json::json!(["signingCredential.untrusted"]), "{ext}");
        assert_eq!(py["actions"], serde_json::json!(["c2pa.opened", "c2pa.edited"]), "{ext}");
        assert_eq!(py["digital_source_type"], ghiblify::provenance::DIGITAL_SOURCE_TYPE, "{ext}");
        assert_eq!(py["ingredient_relationship"], "parentOf");
        assert_eq!(py["ingredient_sha256"].as_str().unwrap(), photo_sha);
        assert_eq!(py["has_thumbnail"], false);
        // The c2pa crate's own reader on a picture signed now.
        let plain = image_io::encode(&marked, Path::new("x"), format, Some(&rec)).unwrap();
        let signed = ghiblify::credentials::sign(&plain, format, "x", &rec, &example_photo(), &creds).unwrap();
        let reader = c2pa::Reader::from_context(c2pa::Context::new())
            .with_stream(mime, std::io::Cursor::new(signed.clone()))
            .unwrap();
        assert_eq!(reader.validation_state(), c2pa::ValidationState::Valid, "{ext}");
        let j: Value = serde_json::from_str(&reader.json()).unwrap();
        let m = &j["manifests"][j["active_manifest"].as_str().unwrap()];
        let text = m.to_string();
        for needle in [
            "c2pa.opened",
            "c2pa.edited",
            ghiblify::provenance::DIGITAL_SOURCE_TYPE,
            &photo_sha,
            "creativeml-openrail-m",
            ghiblify::credentials::SETTINGS_ASSERTION,
        ] {
            assert!(text.contains(needle), "{ext}: {needle} in {text}");
        }
        // A changed pixel byte breaks it.
        let mut tampered = signed.clone();
        let n = tampered.len();
        tampered[n / 2] ^= 0x55;
        let state = c2pa::Reader::from_context(c2pa::Context::new())
            .with_stream(mime, std::io::Cursor::new(tampered))
            .map(|r| r.validation_state());
        assert!(!matches!(state, Ok(c2pa::ValidationState::Valid)), "{ext}: tampering detected: {state:?}");
        // The picture still decodes.
        image::load_from_memory(&signed).unwrap();
    }
}

#[test]
fn labels_can_be_turned_off_and_a_model_folder_is_named_not_located() {
    let case = Case::new();
    let model = fixtures().join("tiny-sd1");
    let run = |extra: &[&str]| {
        crate::common::ghiblify_cmd()
            .current_dir(case.dir.path())
            .args(["photo.png", "--model-dir", model.to_str().unwrap(), "--steps", "2", "--strength", "1", "-q"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&["-o", "signed.png", "--report", "r.jsonl"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(case.path("signed.png")).unwrap();
    let reader =
        c2pa::Reader::from_context(c2pa::Context::new()).with_stream("image/png", std::io::Cursor::new(bytes)).unwrap();
    assert_eq!(reader.validation_state(), c2pa::ValidationState::Valid);
    // The model folder by its name only, in the picture and the report.
    let params = crate::cli::png_text(&case.path("signed.png"), "parameters").unwrap();
    assert!(
        params.contains("Model: tiny-sd1,") && !params.contains(model.parent().unwrap().to_str().unwrap()),
        "{params}"
    );
    assert!(!reader.json().contains(model.parent().unwrap().to_str().unwrap()));
    let report: Value =
        serde_json::from_str(std::fs::read_to_string(case.path("r.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(report["model"]["name"], "tiny-sd1");
    for (extra, what) in [(&["--c2pa", "off"][..], "--c2pa off"), (&["--no-metadata"][..], "--no-metadata")] {
        let o = run(&[&["-o", "plain.png"][..], extra].concat());
        assert!(o.status.success());
        let bytes = std::fs::read(case.path("plain.png")).unwrap();
        assert!(
            c2pa::Reader::from_context(c2pa::Context::new())
                .with_stream("image/png", std::io::Cursor::new(bytes))
                .is_err(),
            "{what}: no manifest"
        );
    }
    // Bad signing credentials fail before any picture is made.
    std::fs::write(case.path("cert.pem"), "not a certificate").unwrap();
    let o = run(&["-o", "x.png", "--c2pa-cert", "cert.pem", "--c2pa-key", "cert.pem"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cert.pem") && !case.path("x.png").exists());
}
