//! The canny control image against OpenCV's `cv2.Canny` (tests/fixtures/generate_canny.py): the
//! example photo, a grey one (every channel ties) and a synthetic texture, at the default
//! thresholds, a lower pair, and a swapped fractional pair.

use crate::common::fixtures;

#[test]
fn canny_matches_opencv_on_three_photos_and_three_threshold_pairs() {
    let dir = fixtures().join("canny");
    let photos = [
        ("chelsea", fixtures().join("../../examples/chelsea.png")),
        ("grey", dir.join("grey.png")),
        ("texture", dir.join("texture.png")),
    ];
    let mut worst = 1.0f64;
    for (name, photo) in &photos {
        let img = image::open(photo).unwrap().to_rgb8();
        for (low, high) in [("100", "200"), ("50", "150"), ("180.5", "60.7")] {
            let want = image::open(dir.join(format!("{name}_{low}_{high}.png"))).unwrap().to_luma8();
            let got = ghiblify::canny::canny(&img, low.parse().unwrap(), high.parse().unwrap());
            assert_eq!(got.dimensions(), want.dimensions());
            let same = got.pixels().zip(want.pixels()).filter(|(a, b)| a == b).count();
            let frac = same as f64 / want.pixels().len() as f64;
            let edges = want.pixels().filter(|p| p.0[0] > 0).count();
            assert!(edges > 500, "{name} {low},{high}: too few edges ({edges}) for the test to mean anything");
            println!("{name} {low},{high}: {same} of {} pixels identical ({edges} edges)", want.pixels().len());
            worst = worst.min(frac);
        }
    }
    // The bar asked for is 99 % of pixels; the port follows OpenCV's integer arithmetic and
    // tie-breaking, and measured 100 % on every case (OpenCV 5.0.0), so any difference is a bug.
    assert_eq!(worst, 1.0, "worst agreement {worst}");
}
