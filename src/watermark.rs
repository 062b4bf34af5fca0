//! The invisible watermark Stable Diffusion's reference scripts and diffusers' SDXL pipeline put in
//! every picture: the `invisible-watermark` package's "dwtDct" method (`imwatermark/maxDct.py`,
//! `EmbedMaxDct`), so its decoder — `WatermarkDecoder('bytes', 64).decode(bgr, 'dwtDct')` — and
//! every tool built on it reads ours.
//!
//! The scheme: the picture's U chroma channel (OpenCV's BGR→YUV) goes through one level of the
//! Haar wavelet transform; the approximation band is cut into 4×4 blocks, and in each block the
//! largest non-DC coefficient is quantised to `(⌊|c|/36⌋ + 0.25 + 0.5·bit)·36` (sign kept), the
//! blocks taking the payload's bits in turn (row-major, repeating). The decoder reads
//! `|c| mod 36 > 18` per block and takes the majority for each bit. The package only ever embeds
//! in channel 1 (its loop is `range(2)` with a zero scale for Y), and we do the same.
//!
//! Unlike the package, which converts the whole picture to YUV and back through 8-bit values (and
//! swaps the horizontal and vertical detail bands on the way back), we change only what the mark
//! needs: each changed coefficient moves its 2×2 pixels' U by half its change, applied to B and G
//! so that Y and V stay as they were. The picture moves less; the decoder reads the same bits.

use image::RgbImage;

/// What ghiblify writes: the 8 ASCII bytes `ghiblify` (64 bits).
pub const PAYLOAD: &[u8; 8] = b"ghiblify";
/// The decoder refuses pictures under 256×256 pixels (`r*c < 256*256`), so smaller ones get none.
pub const MIN_PIXELS: u64 = 256 * 256;
const SCALE: f64 = 36.0;
const BLOCK: usize = 4;
/// How far the marked coefficient stays above the block's next one: rounding the picture back to
/// 8 bits moves coefficients by about 2 at most.
const MARGIN: f64 = 3.0;

/// OpenCV's U (Cb of its YUV, not YCrCb) of one pixel, before rounding.
fn u_of(r: u8, g: u8, b: u8) -> f64 {
    let y = 0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64;
    0.492 * (b as f64 - y) + 128.0
}

/// The U channel as OpenCV's 8-bit conversion gives it, over the region the package uses
/// (`rows//4*4` × `cols//4*4`).
fn u_channel(img: &RgbImage, rows: usize, cols: usize) -> Vec<f64> {
    let mut u = vec![0.0; rows * cols];
    for y in 0..rows {
        for x in 0..cols {
            let p = img.get_pixel(x as u32, y as u32);
            u[y * cols + x] = u_of(p[0], p[1], p[2]).round().clamp(0.0, 255.0);
        }
    }
    u
}

/// The Haar approximation band (pywt's `dwt2(..., 'haar')` cA: each 2×2 block's sum over 2).
fn haar_ca(u: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let (h, w) = (rows / 2, cols / 2);
    let mut ca = vec![0.0; h * w];
    for i in 0..h {
        for j in 0..w {
            let at = |y: usize, x: usize| u[y * cols + x];
            ca[i * w + j] =
                (at(2 * i, 2 * j) + at(2 * i, 2 * j + 1) + at(2 * i + 1, 2 * j) + at(2 * i + 1, 2 * j + 1)) / 2.0;
        }
    }
    ca
}

/// The position (row, column in the band) of a 4×4 block's largest non-DC coefficient by
/// magnitude, the first one as numpy's argmax picks it.
fn max_ac(ca: &[f64], w: usize, bi: usize, bj: usize) -> (usize, usize) {
    let mut best = (1usize, f64::NEG_INFINITY);
    for k in 1..BLOCK * BLOCK {
        let v = ca[(bi * BLOCK + k / BLOCK) * w + bj * BLOCK + k % BLOCK].abs();
        if v > best.1 {
            best = (k, v);
        }
    }
    (bi * BLOCK + best.0 / BLOCK, bj * BLOCK + best.0 % BLOCK)
}

/// The largest magnitude among a block's non-DC coefficients other than the one at `skip`.
fn second_ac(ca: &[f64], w: usize, bi: usize, bj: usize, skip: (usize, usize)) -> f64 {
    (1..BLOCK * BLOCK)
        .map(|k| (bi * BLOCK + k / BLOCK, bj * BLOCK + k % BLOCK))
        .filter(|&p| p != skip)
        .map(|(i, j)| ca[i * w + j].abs())
        .fold(0.0, f64::max)
}

/// The magnitude the block's largest coefficient gets: `(n + 0.25 + 0.5·bit)·36` for the `n`
/// nearest to the package's own `⌊|c|/36⌋` that keeps it the block's largest by a margin (the
/// package always takes `⌊|c|/36⌋`; when that lowers the coefficient below another one, the decoder
/// reads the other, and a quarter of the blocks of a smooth photo came out wrong that way).
fn target(mag: f64, second: f64, bit: f64) -> f64 {
    let at = |n: f64| (n + 0.25 + 0.5 * bit) * SCALE;
    let n0 = (mag / SCALE).floor();
    [n0, n0 + 1.0, n0 - 1.0, n0 + 2.0]
        .into_iter()
        .filter(|&n| n >= 0.0 && at(n) > second + MARGIN)
        .min_by(|a, b| (at(*a) - mag).abs().total_cmp(&(at(*b) - mag).abs()))
        .map(at)
        .unwrap_or_else(|| at(((second + MARGIN) / SCALE).ceil()))
}

fn bits_of(payload: &[u8]) -> Vec<bool> {
    payload.iter().flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1)).collect()
}

/// Embeds `payload` into `img` in place. Pictures under [`MIN_PIXELS`] are left as they are
/// (returns false): the decoder would not read them.
pub fn embed(img: &mut RgbImage, payload: &[u8]) -> bool {
    let (rows, cols) = ((img.height() as usize) / 4 * 4, (img.width() as usize) / 4 * 4);
    if (img.width() as u64 * img.height() as u64) < MIN_PIXELS || payload.is_empty() {
        return false;
    }
    let bits = bits_of(payload);
    let u = u_channel(img, rows, cols);
    let (h, w) = (rows / 2, cols / 2);
    let ca = haar_ca(&u, rows, cols);
    // First the package's own choice for every block; then, per bit, the blocks whose largest
    // coefficient it would push below another (the decoder then reads the other, right or wrong by
    // chance) are fixed, cheapest first, until at least 3 in 4 of the bit's blocks read right: a
    // clear majority for the decoder at the least change to the picture.
    struct Plan {
        pos: (usize, usize),
        val: f64,
        new: f64,
        fixed: f64,
        right: bool,
    }
    let mut plans: Vec<Vec<Plan>> = (0..bits.len()).map(|_| Vec::new()).collect();
    let mut num = 0;
    for bi in 0..h / BLOCK {
        for bj in 0..w / BLOCK {
            let bit = bits[num % bits.len()];
            let b = if bit { 1.0 } else { 0.0 };
            let (i, j) = max_ac(&ca, w, bi, bj);
            let val = ca[i * w + j];
            let second = second_ac(&ca, w, bi, bj, (i, j));
            let cheap = ((val.abs() / SCALE).floor() + 0.25 + 0.5 * b) * SCALE;
            // With the cheap value, what would the decoder read in this block?
            let right = if cheap > second + MARGIN {
                true
            } else {
                let mut block = ca.clone();
                block[i * w + j] = val.signum() * cheap;
                let (ri, rj) = max_ac(&block, w, bi, bj);
                (block[ri * w + rj].abs() % SCALE > 0.5 * SCALE) == bit
            };
            let fixed = target(val.abs(), second, b);
            plans[num % bits.len()].push(Plan {
                pos: (i, j),
                val,
                new: val.signum() * cheap,
                fixed: val.signum() * fixed,
                right,
            });
            num += 1;
        }
    }
    for blocks in &mut plans {
        let need = (blocks.len() * 3).div_ceil(4);
        let mut wrong: Vec<usize> = (0..blocks.len()).filter(|&k| !blocks[k].right).collect();
        wrong.sort_by(|&a, &b| {
            let cost = |p: &Plan| (p.fixed - p.val).abs() - (p.new - p.val).abs();
            cost(&blocks[a]).total_cmp(&cost(&blocks[b]))
        });
        let right = blocks.len() - wrong.len();
        for k in wrong.into_iter().take(need.saturating_sub(right)) {
            blocks[k].new = blocks[k].fixed;
        }
    }
    for p in plans.iter().flatten() {
        let (i, j) = p.pos;
        // The inverse Haar transform spreads a change of the approximation over its 2×2 pixels,
        // half each; a change of U alone moves B by 2.032 and G by -0.395 per unit (Y, V kept).
        let du = (p.new - p.val) / 2.0;
        if du == 0.0 {
            continue;
        }
        for (y, x) in [(2 * i, 2 * j), (2 * i, 2 * j + 1), (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1)] {
            let px = img.get_pixel_mut(x as u32, y as u32);
            let g = px[1] as f64 - 0.395 * du;
            let b = px[2] as f64 + 2.032 * du;
            px[1] = g.round().clamp(0.0, 255.0) as u8;
            px[2] = b.round().clamp(0.0, 255.0) as u8;
        }
    }
    true
}

/// Reads `len` bits back as the package's decoder does (`decode_frame` + `infer_dct_matrix`, the
/// mean score per bit above 127/255); `None` under [`MIN_PIXELS`].
pub fn decode(img: &RgbImage, len: usize) -> Option<Vec<bool>> {
    if (img.width() as u64 * img.height() as u64) < MIN_PIXELS || len == 0 {
        return None;
    }
    let (rows, cols) = ((img.height() as usize) / 4 * 4, (img.width() as usize) / 4 * 4);
    let u = u_channel(img, rows, cols);
    let (h, w) = (rows / 2, cols / 2);
    let ca = haar_ca(&u, rows, cols);
    let mut scores = vec![(0usize, 0usize); len];
    let mut num = 0;
    for bi in 0..h / BLOCK {
        for bj in 0..w / BLOCK {
            let (i, j) = max_ac(&ca, w, bi, bj);
            let one = ca[i * w + j].abs() % SCALE > 0.5 * SCALE;
            let s = &mut scores[num % len];
            s.0 += one as usize;
            s.1 += 1;
            num += 1;
        }
    }
    Some(scores.iter().map(|&(ones, n)| n > 0 && ones as f64 / n as f64 * 255.0 > 127.0).collect())
}

/// The payload bytes in `bits` (most significant bit first, as numpy's packbits).
pub fn bytes_of(bits: &[bool]) -> Vec<u8> {
    bits.chunks(8).map(|c| c.iter().fold(0u8, |acc, &b| acc << 1 | b as u8)).collect()
}

/// PSNR in dB between two pictures of the same size (all channels).
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let mse = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>()
        / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo() -> RgbImage {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/chelsea.png");
        let img = image::open(p).unwrap().to_rgb8();
        image::imageops::resize(&img, 512, 384, image::imageops::FilterType::Triangle)
    }

    #[test]
    fn the_mark_reads_back_and_barely_shows() {
        let original = photo();
        let mut marked = original.clone();
        assert!(embed(&mut marked, PAYLOAD));
        assert_eq!(bytes_of(&decode(&marked, 64).unwrap()), PAYLOAD);
        let db = psnr(&original, &marked);
        eprintln!("PSNR {db:.2} dB");
        assert!(db > 40.0, "PSNR {db:.1} dB");
        // Small pictures are left alone (the decoder cannot read them).
        let mut small = RgbImage::new(200, 200);
        assert!(!embed(&mut small, PAYLOAD));
    }

    #[test]
    fn bits_pack_most_significant_first() {
        assert_eq!(bytes_of(&bits_of(b"gh")), b"gh");
        assert!(bits_of(b"\x80")[0]);
    }
}
