//! The Canny edge detector (J. Canny, "A Computational Approach to Edge Detection", IEEE PAMI 1986)
//! exactly as the ControlNet canny annotator runs it: OpenCV's `cv2.Canny(rgb, low, high)` with its
//! defaults — 3×3 Sobel derivatives with replicated borders, no smoothing before, the L1 gradient
//! magnitude, the colour channel with the largest magnitude per pixel, non-maximum suppression in
//! four sectors decided by fixed-point tan 22.5°, and 8-connected hysteresis (the structure of
//! `modules/imgproc/src/canny.cpp`, `cv::Canny`). The control image a canny ControlNet was trained
//! on is this map, so it follows OpenCV's integer arithmetic and tie-breaking rather than a smoothed
//! textbook variant; `imageproc::edges::canny` blurs first and so draws other edges.

use image::{GrayImage, RgbImage};

/// Edges of `img` (255 on an edge, 0 elsewhere), as `cv2.Canny(img, low, high)` gives them for an
/// 8-bit RGB array. The thresholds are swapped when `low > high` and floored, as OpenCV does.
pub fn canny(img: &RgbImage, low: f64, high: f64) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    // Saturating casts: any threshold past the largest magnitude (4·255·2) behaves the same.
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    let (dx, dy, mag) = gradients(img, w, h);

    // 0: may be an edge, 1: cannot be, 2: is (a strong local maximum, or reached from one).
    let mut map = vec![1u8; w * h];
    let mut stack = Vec::new();
    // Magnitudes outside the picture are zero.
    let at = |y: isize, x: isize| -> i32 {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    const SHIFT: u32 = 15;
    let tg22 = (std::f64::consts::SQRT_2 - 1.0) * f64::from(1 << SHIFT) + 0.5;
    let tg22 = tg22 as i64;
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (xs, ys) = (i64::from(dx[i]), i64::from(dy[i]));
            let ax = xs.abs();
            let ay = ys.abs() << SHIFT;
            let tg22x = ax * tg22;
            let (yi, xi) = (y as isize, x as isize);
            let peak = if ay < tg22x {
                // Mostly horizontal gradient: compare left and right.
                m > at(yi, xi - 1) && m >= at(yi, xi + 1)
            } else if ay > tg22x + (ax << (SHIFT + 1)) {
                // Mostly vertical: above and below.
                m > at(yi - 1, xi) && m >= at(yi + 1, xi)
            } else {
                // Diagonal: the direction the signs of dx and dy give.
                let s = if (xs ^ ys) < 0 { -1 } else { 1 };
                m > at(yi - 1, xi - s) && m > at(yi + 1, xi + s)
            };
            if !peak {
                continue;
            }
            if m > high {
                map[i] = 2;
                stack.push(i);
            } else {
                map[i] = 0;
            }
        }
    }
    // Hysteresis: everything 8-connected to a strong pixel through candidates is an edge.
    while let Some(i) = stack.pop() {
        let (y, x) = ((i / w) as isize, (i % w) as isize);
        for (oy, ox) in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)] {
            let (ny, nx) = (y + oy, x + ox);
            if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if map[j] == 0 {
                map[j] = 2;
                stack.push(j);
            }
        }
    }
    let px = map.into_iter().map(|v| if v == 2 { 255 } else { 0 }).collect();
    GrayImage::from_raw(w as u32, h as u32, px).expect("one byte per pixel")
}

/// Per pixel, the Sobel derivatives of the channel with the largest L1 magnitude (the first such
/// channel on a tie), and that magnitude.
fn gradients(img: &RgbImage, w: usize, h: usize) -> (Vec<i16>, Vec<i16>, Vec<i32>) {
    let raw = img.as_raw();
    // Replicated borders: coordinates clamp to the picture.
    let px = |y: usize, x: usize, c: usize| i32::from(raw[(y * w + x) * 3 + c]);
    let mut dx = vec![0i16; w * h];
    let mut dy = vec![0i16; w * h];
    let mut mag = vec![0i32; w * h];
    for y in 0..h {
        let (yu, yd) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            let (xl, xr) = (x.saturating_sub(1), (x + 1).min(w - 1));
            let mut best = (-1, 0, 0);
            for c in 0..3 {
                let gx = (px(yu, xr, c) - px(yu, xl, c))
                    + 2 * (px(y, xr, c) - px(y, xl, c))
                    + (px(yd, xr, c) - px(yd, xl, c));
                let gy = (px(yd, xl, c) - px(yu, xl, c))
                    + 2 * (px(yd, x, c) - px(yu, x, c))
                    + (px(yd, xr, c) - px(yu, xr, c));
                let m = gx.abs() + gy.abs();
                if m > best.0 {
                    best = (m, gx, gy);
                }
            }
            let i = y * w + x;
            // |gx|, |gy| ≤ 4·255: they fit OpenCV's 16-bit derivatives.
            (mag[i], dx[i], dy[i]) = (best.0, best.1 as i16, best.2 as i16);
        }
    }
    (dx, dy, mag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_gives_one_line_and_a_flat_picture_none() {
        let flat = RgbImage::from_pixel(9, 7, image::Rgb([90, 90, 90]));
        assert!(canny(&flat, 100.0, 200.0).pixels().all(|p| p.0[0] == 0));
        // A vertical step: the Sobel response peaks on both columns next to it with equal
        // magnitude, and OpenCV's "m > left && m >= right" keeps the left one.
        let step = RgbImage::from_fn(9, 7, |x, _| if x < 4 { image::Rgb([0, 0, 0]) } else { image::Rgb([200, 0, 0]) });
        let e = canny(&step, 100.0, 200.0);
        for y in 0..7 {
            let row: Vec<u8> = (0..9).map(|x| e.get_pixel(x, y).0[0]).collect();
            assert_eq!(row, [0, 0, 0, 255, 0, 0, 0, 0, 0], "row {y}");
        }
        // Swapped thresholds are put in order; a high threshold above every magnitude gives none.
        assert_eq!(canny(&step, 200.0, 100.0), e);
        assert!(canny(&step, 100.0, 1e9).pixels().all(|p| p.0[0] == 0));
    }

    #[test]
    fn weak_edges_survive_only_when_connected_to_a_strong_one() {
        // Two vertical steps: a strong one (magnitude 4·200) and a weak one (4·40 = 160).
        let img = RgbImage::from_fn(16, 6, |x, _| {
            let v = if x < 4 {
                0
            } else if x < 10 {
                200
            } else {
                240
            };
            image::Rgb([v, v, v])
        });
        let e = canny(&img, 100.0, 300.0);
        assert_eq!(e.get_pixel(3, 2).0[0], 255);
        assert_eq!(e.get_pixel(9, 2).0[0], 0, "weak and not connected");
        let e = canny(&img, 100.0, 150.0);
        assert_eq!(e.get_pixel(9, 2).0[0], 255, "strong once the threshold drops");
    }
}
