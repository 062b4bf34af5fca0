//! Batch conversion through the real binary: a folder of every hostile input (generated here, but
//! for the CMYK JPEG the image crate cannot write), resume, sharding, stdin, a killed run, the
//! JSON-lines report and the provenance written into outputs.

use crate::common::fixtures;
use image::{ImageEncoder, Rgb, RgbImage};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ghiblify(dir: &Path) -> Command {
    let mut c = crate::common::ghiblify_cmd();
    c.current_dir(dir)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", dir.join("hf-home"))
        .args(["--model-dir", fixtures().join("tiny-sd1").to_str().unwrap()])
        .args(["--steps", "2", "--strength", "0.5", "--seed", "5", "--size", "64", "-q"]);
    c
}

fn photo() -> RgbImage {
    image::open(fixtures().join("photo-64x48.png")).unwrap().to_rgb8()
}

fn jpeg_bytes(img: &RgbImage, exif: Option<Vec<u8>>) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90);
    if let Some(e) = exif {
        enc.set_exif_metadata(e).unwrap();
    }
    img.write_with_encoder(enc).unwrap();
    buf
}

/// An EXIF block with an orientation tag and (to check it is never copied) a GPS latitude ref.
fn exif_with(orientation: u16) -> Vec<u8> {
    use exif::{Field, In, Tag, Value};
    let fields = [
        Field { tag: Tag::Orientation, ifd_num: In::PRIMARY, value: Value::Short(vec![orientation]) },
        Field { tag: Tag::GPSLatitudeRef, ifd_num: In::PRIMARY, value: Value::Ascii(vec![b"N".to_vec()]) },
    ];
    let mut w = exif::experimental::Writer::new();
    for f in &fields {
        w.push_field(f);
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    w.write(&mut buf, false).unwrap();
    buf.into_inner()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn png_bytes(img: &image::DynamicImage) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

/// The hostile folder: name → whether it should convert.
fn hostile(dir: &Path) -> Vec<(&'static str, bool)> {
    let p = photo();
    let dyn_p = image::DynamicImage::ImageRgb8(p.clone());
    let good_png = png_bytes(&dyn_p);
    let good_jpg = jpeg_bytes(&p, None);
    write(&dir.join("good.png"), &good_png);
    write(&dir.join("sub/deeper/nested.jpg"), &good_jpg);
    write(&dir.join("with space é.png"), &good_png);
    write(&dir.join("-dash.png"), &good_png);
    write(&dir.join("truncated.jpg"), &good_jpg[..good_jpg.len() / 2]);
    let mut corrupt = good_png.clone();
    let mid = corrupt.len() / 2;
    for b in &mut corrupt[mid..mid + 40] {
        *b ^= 0x5A;
    }
    write(&dir.join("corrupt.png"), &corrupt);
    write(&dir.join("zero.png"), b"");
    write(&dir.join("notes.jpg"), b"just some text, not a JPEG");
    write(&dir.join("sixteen.png"), &png_bytes(&image::DynamicImage::ImageRgb16(dyn_p.to_rgb16())));
    write(&dir.join("gray.png"), &png_bytes(&image::DynamicImage::ImageLuma8(dyn_p.to_luma8())));
    write(&dir.join("gray_alpha.png"), &png_bytes(&image::DynamicImage::ImageLumaA8(dyn_p.to_luma_alpha8())));
    let mut rgba = dyn_p.to_rgba8();
    for (x, _, px) in rgba.enumerate_pixels_mut() {
        if x < 20 {
            px[3] = 0;
        }
    }
    write(&dir.join("rgba.png"), &png_bytes(&image::DynamicImage::ImageRgba8(rgba)));
    std::fs::copy(fixtures().join("cmyk-64x48.jpg"), dir.join("cmyk.jpg")).unwrap();
    for o in 1..=8u16 {
        write(&dir.join(format!("orient/o{o}.jpg")), &jpeg_bytes(&p, Some(exif_with(o))));
    }
    write(
        &dir.join("tiny.png"),
        &png_bytes(&image::DynamicImage::ImageRgb8(RgbImage::from_pixel(10, 7, Rgb([200, 120, 40])))),
    );
    // Animated GIF, two frames: the first is converted.
    let mut gif = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut gif);
        let f1 = image::Frame::new(image::DynamicImage::ImageRgb8(p.clone()).to_rgba8());
        let f2 = image::Frame::new(image::RgbaImage::from_pixel(64, 48, image::Rgba([0, 0, 255, 255])));
        enc.encode_frames([f1, f2]).unwrap();
    }
    write(&dir.join("anim.gif"), &gif);
    // 20000 x 20000 claimed by the header: refused before any pixel is decoded.
    let mut huge = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut huge, 20000, 20000);
        enc.set_color(png::ColorType::Rgb);
        let mut w = enc.write_header().unwrap();
        let _ = w.write_image_data(&[]);
    }
    write(&dir.join("huge.png"), &huge);
    let mut v = vec![
        ("good.png", true),
        ("sub/deeper/nested.jpg", true),
        ("with space é.png", true),
        ("-dash.png", true),
        ("truncated.jpg", false),
        ("corrupt.png", false),
        ("sixteen.png", true),
        ("gray.png", true),
        ("gray_alpha.png", true),
        ("rgba.png", true),
        ("cmyk.jpg", true),
        ("tiny.png", true),
        ("anim.gif", true),
        ("huge.png", false),
        // Named like images, not images by content: each fails on its own line with the reason,
        // so a user with a folder of photos learns why some did not come out.
        ("zero.png", false),
        ("notes.jpg", false),
    ];
    for o in [
        "orient/o1.jpg",
        "orient/o2.jpg",
        "orient/o3.jpg",
        "orient/o4.jpg",
        "orient/o5.jpg",
        "orient/o6.jpg",
        "orient/o7.jpg",
        "orient/o8.jpg",
    ] {
        v.push((o, true));
    }
    v
}

fn out_name(rel: &str) -> PathBuf {
    PathBuf::from(rel).with_extension("png")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .map(|e| e.into_path())
        .filter(|p| ghiblify::batch::is_temp_name(p))
        .collect()
}

#[test]
fn a_folder_of_hostile_inputs_resumes_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let expected = hostile(&input);
    let o = ghiblify(tmp.path()).args(["in", "-o", "out", "--report", "r.jsonl"]).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "some files fail → exit 2: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for (rel, ok) in &expected {
        let out = tmp.path().join("out").join(out_name(rel));
        assert_eq!(out.exists(), *ok, "{rel}: output exists = {}", out.exists());
        if *ok {
            image::open(&out).unwrap_or_else(|e| panic!("{rel}: output does not decode: {e}"));
        } else {
            let line =
                err.lines().find(|l| l.contains(rel)).unwrap_or_else(|| panic!("no error line for {rel}: {err}"));
            assert!(line.starts_with(&format!("in/{rel}: ")), "{line}");
        }
    }
    assert!(err.lines().any(|l| l.starts_with("in/notes.jpg: ") && l.contains("not one we can read")), "{err}");
    assert!(err.contains("huge.png") && err.contains("larger than 16384"), "{err}");
    // EXIF orientation: 5-8 turn the 64x48 photo upright as 48x64; the working size follows.
    for o in 1..=8 {
        let img = image::open(tmp.path().join(format!("out/orient/o{o}.png"))).unwrap();
        let want = if o >= 5 { (48, 64) } else { (64, 48) };
        assert_eq!((img.width(), img.height()), want, "orientation {o}");
    }
    // The report: one parseable line per input, in order, statuses matching.
    let report = std::fs::read_to_string(tmp.path().join("r.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = report.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), expected.len());
    for (rel, ok) in &expected {
        let l = lines
            .iter()
            .find(|l| l["input"].as_str().unwrap().ends_with(rel))
            .unwrap_or_else(|| panic!("{rel} not in report"));
        assert_eq!(l["status"], if *ok { "ok" } else { "failed" }, "{rel}");
        assert!(l["seed"].as_u64().is_some() && l["seconds"].as_f64().is_some());
        if *ok {
            assert_eq!(l["width"].as_u64().unwrap().max(l["height"].as_u64().unwrap()), 64);
        } else {
            assert!(l["error"].as_str().unwrap().contains(rel.rsplit('/').next().unwrap()));
        }
    }
    assert!(temp_files(tmp.path()).is_empty());
    // A second run skips everything that was done, without loading the model.
    let t = Instant::now();
    let o = ghiblify(tmp.path()).args(["in", "-o", "out", "--report", "r2.jsonl"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let report = std::fs::read_to_string(tmp.path().join("r2.jsonl")).unwrap();
    let ok = expected.iter().filter(|e| e.1).count();
    assert_eq!(report.lines().filter(|l| l.contains("\"skipped\"")).count(), ok);
}

#[test]
fn explicit_non_images_fail_on_their_own_line() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("zero.png"), b"");
    write(&tmp.path().join("notes.jpg"), b"text");
    std::fs::copy(fixtures().join("photo-64x48.png"), tmp.path().join("good.png")).unwrap();
    let o = ghiblify(tmp.path()).args(["zero.png", "notes.jpg", "good.png", "-o", "out"]).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("zero.png: ")) && err.lines().any(|l| l.starts_with("notes.jpg: ")),
        "{err}"
    );
    assert!(tmp.path().join("out/good.png").exists());
}

#[test]
fn shards_cover_every_input_exactly_once_and_seeds_do_not_depend_on_them() {
    let tmp = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixtures().join("photo-64x48.png")).unwrap();
    for i in 0..9 {
        write(&tmp.path().join(format!("in/d{}/p{i}.png", i % 2)), &png);
    }
    let mut seen = std::collections::BTreeMap::new();
    for k in 1..=3 {
        let o = ghiblify(tmp.path())
            .args(["in", "-o", "out", "--shard", &format!("{k}/3"), "--report", &format!("r{k}.jsonl")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        for l in std::fs::read_to_string(tmp.path().join(format!("r{k}.jsonl"))).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["status"], "ok");
            assert!(
                seen.insert(v["input"].as_str().unwrap().to_string(), v["seed"].as_u64().unwrap()).is_none(),
                "twice: {l}"
            );
        }
    }
    assert_eq!(seen.len(), 9);
    // The same files unsharded, into another folder: the same seeds, the same pixels.
    let o = ghiblify(tmp.path()).args(["in", "-o", "all", "--report", "all.jsonl"]).output().unwrap();
    assert!(o.status.success());
    for l in std::fs::read_to_string(tmp.path().join("all.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(seen[v["input"].as_str().unwrap()], v["seed"].as_u64().unwrap());
    }
    let a = image::open(tmp.path().join("out/d1/p3.png")).unwrap().to_rgb8();
    let b = image::open(tmp.path().join("all/d1/p3.png")).unwrap().to_rgb8();
    assert_eq!(a, b);
    let c = image::open(tmp.path().join("all/d0/p4.png")).unwrap().to_rgb8();
    assert_ne!(a, c, "different files get different seeds");
}

#[test]
fn paths_from_stdin_and_outputs_with_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    let p = photo();
    write(&tmp.path().join("a/gps.jpg"), &jpeg_bytes(&p, Some(exif_with(1))));
    std::fs::copy(fixtures().join("photo-64x48.png"), tmp.path().join("b.png")).unwrap();
    let mut child =
        ghiblify(tmp.path()).args(["-", "-o", "out", "--format", "jpg"]).stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"./a/gps.jpg\nb.png\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let jpg = tmp.path().join("out/a/gps.jpg");
    let f = std::fs::File::open(&jpg).unwrap();
    let exif = exif::Reader::new().read_from_container(&mut std::io::BufReader::new(f)).unwrap();
    assert!(exif.get_field(exif::Tag::GPSLatitudeRef, exif::In::PRIMARY).is_none(), "input EXIF (GPS) was copied");
    assert!(exif.get_field(exif::Tag::Orientation, exif::In::PRIMARY).is_none());
    let bytes = std::fs::read(&jpg).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("http://ns.adobe.com/xap/1.0/") && text.contains(ghiblify::provenance::DIGITAL_SOURCE_TYPE),
        "XMP in JPEG"
    );
    assert!(tmp.path().join("out/b.jpg").exists());
    // PNG: A1111 parameters in tEXt with the version, and the XMP packet.
    std::fs::create_dir_all(tmp.path().join("pngs")).unwrap();
    let o = ghiblify(tmp.path()).args(["b.png", "a/gps.jpg", "-o", "pngs"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let reader =
        png::Decoder::new(std::io::BufReader::new(std::fs::File::open(tmp.path().join("pngs/b.png")).unwrap()))
            .read_info()
            .unwrap();
    let info = reader.info();
    let params = info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").expect("tEXt parameters");
    assert!(params.text.contains("Negative prompt: ") && params.text.contains("Version: ghiblify "), "{}", params.text);
    let hash = params.text.split("Model hash: ").nth(1).expect("Model hash").split(',').next().unwrap();
    assert!(hash.len() == 10 && hash.chars().all(|c| c.is_ascii_hexdigit()), "{hash}");
    let xmp = info.utf8_text.iter().find(|t| t.keyword == "XML:com.adobe.xmp").expect("XMP iTXt");
    assert!(xmp.get_text().unwrap().contains("Iptc4xmpExt:DigitalSourceType"));
    // --no-metadata: none of it.
    let o = ghiblify(tmp.path()).args(["b.png", "-o", "plain.png", "--no-metadata"]).output().unwrap();
    assert!(o.status.success());
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(tmp.path().join("plain.png")).unwrap()))
        .read_info()
        .unwrap();
    assert!(reader.info().uncompressed_latin1_text.is_empty() && reader.info().utf8_text.is_empty());
}

#[test]
fn a_killed_run_leaves_no_partial_file_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixtures().join("photo-64x48.png")).unwrap();
    for i in 0..12 {
        write(&tmp.path().join(format!("in/p{i:02}.png")), &png);
    }
    let mut child = ghiblify(tmp.path()).args(["in", "-o", "out", "--steps", "30", "--strength", "1"]).spawn().unwrap();
    let start = Instant::now();
    // Wait for two finished outputs (not temp files), then kill during the third image's compute.
    let finished = || {
        std::fs::read_dir(tmp.path().join("out"))
            .map(|d| d.filter_map(|e| e.ok()).filter(|e| !ghiblify::batch::is_temp_name(&e.path())).count())
            .unwrap_or(0)
    };
    while finished() < 2 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done: Vec<PathBuf> = std::fs::read_dir(tmp.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !ghiblify::batch::is_temp_name(p))
        .collect();
    assert!(!done.is_empty() && done.len() < 12, "killed mid-way: {} done", done.len());
    for p in &done {
        image::open(p).unwrap_or_else(|e| panic!("{}: partial output: {e}", p.display()));
    }
    let o = ghiblify(tmp.path())
        .args(["in", "-o", "out", "--steps", "30", "--strength", "1", "--report", "r.jsonl"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let report = std::fs::read_to_string(tmp.path().join("r.jsonl")).unwrap();
    assert_eq!(report.lines().filter(|l| l.contains("\"skipped\"")).count(), done.len());
    assert_eq!(report.lines().filter(|l| l.contains("\"ok\"")).count(), 12 - done.len());
    assert!(temp_files(tmp.path()).is_empty(), "{:?}", temp_files(tmp.path()));
}

#[test]
fn unwritable_output_places() {
    let tmp = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixtures().join("photo-64x48.png")).unwrap();
    write(&tmp.path().join("in/ok.png"), &png);
    write(&tmp.path().join("in/sub/blocked.png"), &png);
    // out/sub is a file, so in/sub/blocked.png cannot be written: that file fails, the rest goes on.
    write(&tmp.path().join("out/sub"), b"a file in the way");
    let o = ghiblify(tmp.path()).args(["in", "-o", "out"]).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.lines().any(|l| l.starts_with("in/sub/blocked.png: ")), "{err}");
    assert!(tmp.path().join("out/ok.png").exists());
    // An output folder that cannot be created at all: nothing can be done → 1.
    let o = ghiblify(tmp.path()).args(["in", "-o", "out/sub/x"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

    /// The image-loading path never panics: random bytes and randomly damaged PNG/JPEG files
    /// either decode or give an error.
    #[test]
    fn loading_arbitrary_bytes_never_panics(
        kind in 0u8..3,
        noise in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
        cut in 0usize..4096,
        flips in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 0..8),
    ) {
        let base: Vec<u8> = match kind {
            0 => noise.clone(),
            1 => png_bytes(&image::DynamicImage::ImageRgb8(photo())),
            _ => jpeg_bytes(&photo(), Some(exif_with(6))),
        };
        let mut bytes = base[..cut.min(base.len())].to_vec();
        for (i, v) in &flips {
            if !bytes.is_empty() {
                let n = bytes.len();
                bytes[i % n] ^= v;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(if kind == 2 { "x.jpg" } else { "x.png" });
        std::fs::write(&path, &bytes).unwrap();
        let _ = ghiblify::image_io::load_rgb(&path);
    }
}

#[test]
fn outputs_that_would_overwrite_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixtures().join("photo-64x48.png")).unwrap();
    write(&tmp.path().join("in/p.png"), &png);
    write(&tmp.path().join("in/-dash.png"), &png);
    // Output folder = input folder, same format: every output would be its input.
    let o = ghiblify(tmp.path()).args(["in", "-o", "in"]).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("in/p.png: ") && err.contains("is an input"), "{err}");
    assert_eq!(std::fs::read(tmp.path().join("in/p.png")).unwrap(), png, "input untouched");
    // A file whose name starts with a dash, after --.
    let o = ghiblify(tmp.path()).args(["-o", "dash-out.png", "--", "in/-dash.png"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(tmp.path().join("dash-out.png").exists());
}

/// Every file below `dir` with its bytes (to prove inputs untouched).
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().to_path_buf(), std::fs::read(e.path()).unwrap()))
        .collect()
}

#[test]
fn report_preview_and_trace_never_land_on_an_input_a_link_to_one_or_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixtures().join("photo-64x48.png")).unwrap();
    write(&tmp.path().join("in/a.png"), &png);
    write(&tmp.path().join("in/b.png"), &png);
    std::fs::hard_link(tmp.path().join("in/a.png"), tmp.path().join("hard.png")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("in/a.png"), tmp.path().join("soft.png")).unwrap();
    let before = snapshot(&tmp.path().join("in"));
    let cases: &[&[&str]] = &[
        // An input found inside a batch folder.
        &["in", "-o", "out", "--report", "in/a.png"],
        &["in", "-o", "out", "--preview", "in/b.png"],
        // A hard link and a symlink to an input.
        &["in", "-o", "out", "--report", "hard.png"],
        &["in/a.png", "-o", "x.png", "--trace", "soft.png"],
        &["in/a.png", "-o", "x.png", "--trace", "hard.png"],
        // The output itself.
        &["in/a.png", "-o", "x.png", "--report", "x.png"],
        &["in/a.png", "-o", "x.png", "--preview", "./x.png"],
        &["in/a.png", "-o", "x.png", "--trace", "x.png"],
    ];
    for args in cases {
        let o = ghiblify(tmp.path()).args(*args).output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("input") || err.contains("is also -o"), "{args:?}: {err}");
        assert_eq!(snapshot(&tmp.path().join("in")), before, "{args:?}: inputs untouched");
        assert!(!tmp.path().join("x.png").exists() && !tmp.path().join("out/a.png").exists(), "{args:?}: nothing made");
    }
}

#[test]
fn outputs_and_cache_files_get_the_umask_mode() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("in.png"), &std::fs::read(fixtures().join("photo-64x48.png")).unwrap());
    let cmd = ghiblify(tmp.path())
        .args(["in.png", "-o", "out.png", "--report", "r.jsonl", "--trace", "t.st"])
        .get_args()
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    let o = Command::new("sh")
        .env("XDG_CONFIG_HOME", crate::common::test_config_home())
        .current_dir(tmp.path())
        .arg("-c")
        .arg(format!("umask 022; exec {} {cmd}", env!("CARGO_BIN_EXE_ghiblify")))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    use std::os::unix::fs::PermissionsExt;
    for f in ["out.png", "r.jsonl", "t.st"] {
        let mode = std::fs::metadata(tmp.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{f}: {mode:o}");
    }
}

#[test]
fn an_output_folder_inside_the_input_folder_is_not_walked() {
    let tmp = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixtures().join("photo-64x48.png")).unwrap();
    write(&tmp.path().join("photos/a.png"), &png);
    for _ in 0..2 {
        let o = ghiblify(tmp.path()).args(["photos", "-o", "photos/ghibli", "--report", "r.jsonl"]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let report = std::fs::read_to_string(tmp.path().join("r.jsonl")).unwrap();
        assert_eq!(report.lines().count(), 1, "only photos/a.png is an input: {report}");
    }
    assert!(!tmp.path().join("photos/ghibli/ghibli").exists());
}

#[test]
fn special_files_fail_on_their_own_line_instead_of_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("good.png"), &std::fs::read(fixtures().join("photo-64x48.png")).unwrap());
    let fifo = tmp.path().join("pipe.png");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let t = Instant::now();
    let o = ghiblify(tmp.path()).args(["pipe.png", "good.png", "/dev/null", "-o", "out"]).output().unwrap();
    let err = stderr(&o);
    assert!(t.elapsed() < Duration::from_secs(30), "blocked: {:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.lines().any(|l| l.starts_with("pipe.png: ") && l.contains("not a regular file")), "{err}");
    assert!(err.lines().any(|l| l.starts_with("/dev/null: ")), "{err}");
    assert!(tmp.path().join("out/good.png").exists());
}

#[test]
fn settings_wrong_for_every_file_end_the_batch_at_once_with_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixtures().join("photo-64x48.png")).unwrap();
    for i in 0..3 {
        write(&tmp.path().join(format!("in/{i}.png")), &png);
    }
    let o = ghiblify(tmp.path()).args(["in", "-o", "out", "--steps", "5000"]).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line, not one per file: {err}");
    assert!(err.contains("--steps") && err.contains("5000"), "{err}");
    // A report or trace that cannot be written fails before any picture is made.
    let o =
        ghiblify(tmp.path()).args(["in/0.png", "-o", "x.png", "--trace", "nowhere/t.safetensors"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("nowhere"), "{}", stderr(&o));
    assert!(!tmp.path().join("x.png").exists(), "no picture before the failure");
    let o = ghiblify(tmp.path()).args(["in", "-o", "out", "--report", "nowhere/r.jsonl"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!tmp.path().join("out/0.png").exists());
}

#[test]
fn partial_files_of_a_killed_run_are_removed_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("in/a.png"), &std::fs::read(fixtures().join("photo-64x48.png")).unwrap());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
    // A writer that no longer exists (pid above the kernel's maximum), and one a day and a half old.
    let dead = tmp.path().join(format!("out/.ghiblify-{host}-4194304-x1.partial"));
    let old = tmp.path().join("out/.ghiblify-elsewhere-7-x2.partial");
    write(&dead, b"half");
    write(&old, b"half");
    let f = std::fs::File::options().write(true).open(&old).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(36 * 3600)).unwrap();
    let o = ghiblify(tmp.path()).args(["in", "-o", "out"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!dead.exists() && !old.exists());
}

#[test]
fn symlinked_images_are_followed_and_loops_reported() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("elsewhere/real.png"), &std::fs::read(fixtures().join("photo-64x48.png")).unwrap());
    std::fs::create_dir_all(tmp.path().join("in")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("elsewhere/real.png"), tmp.path().join("in/linked.png")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("in"), tmp.path().join("in/loop")).unwrap();
    let o = ghiblify(tmp.path()).args(["in", "-o", "out"]).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(tmp.path().join("out/linked.png").exists(), "{err}");
    assert!(err.lines().any(|l| l.contains("loop") && l.contains("symbolic link loop")), "{err}");
}

#[test]
fn a_batch_into_a_picture_name_and_odd_stdin_lines() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("empty")).unwrap();
    let o = ghiblify(tmp.path()).args(["empty", "-o", "e.png"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("e.png") && !tmp.path().join("e.png").exists(), "{}", stderr(&o));
    // A path that is not UTF-8 on stdin is still a path: that line fails alone (no such file).
    write(&tmp.path().join("good.png"), &std::fs::read(fixtures().join("photo-64x48.png")).unwrap());
    let mut child =
        ghiblify(tmp.path()).args(["-", "-o", "out"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"bad-\xff\xfe.png\ngood.png\n").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(tmp.path().join("out/good.png").exists(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
