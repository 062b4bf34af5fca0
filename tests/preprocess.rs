//! Image preprocessing against the reference: Pillow's LANCZOS resize (what diffusers'
//! VaeImageProcessor calls), downscaling and upscaling, must give the same bytes.

use crate::common::fixtures;
use ghiblify::image_io;
use std::path::Path;

fn check(src: &Path, name: &str) {
    let reference = image::open(fixtures().join("pil_resize").join(format!("{name}.png"))).unwrap().to_rgb8();
    let input = image_io::load_rgb(src).unwrap();
    let ours = image_io::resize_to(input, reference.width(), reference.height());
    let worst = ours.as_raw().iter().zip(reference.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    let differing = ours.as_raw().iter().zip(reference.as_raw()).filter(|(a, b)| a != b).count();
    assert_eq!(worst, 0, "{name}: {differing} values differ from PIL, by up to {worst}");
}

#[test]
fn lanczos_downscale_matches_pil() {
    let cat = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/chelsea.png");
    check(&cat, "down_64x40");
    check(&cat, "down_w_200x300");
}

#[test]
fn lanczos_upscale_matches_pil() {
    let small = fixtures().join("photo-64x48.png");
    check(&small, "up_100x75");
    check(&small, "up_h_64x61");
}
