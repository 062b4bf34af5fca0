//! Winograd F(4×4, 3×3) one block of tiles at a time, for layers with few channels (TAESD's
//! 64 → 64, the autoencoders' and the UNet's first and last layers): each job transforms the
//! inputs of [`T`] tiles, runs the 36 products on them and transforms its products back to output
//! rows while all of it is in the core's caches, instead of passing the whole layer's transformed
//! inputs and products through memory between three parallel passes (the split path in
//! `winograd.rs`). With 64 channels a transformed tile is as large as the work done on it
//! (36 × 64 values in and out for 36 × 64 × 64 multiply-adds), so those passes were bound by
//! memory and copies: at TAESD's 512² layers the split path spent 35 % of its time in the
//! products, the fused one 40–45 % (at the rate of the gemm crate's largest products here).
//! The tiles of a job are the vector lanes; the transformed filters (36 × cin × cout, 0.6 MB at
//! 64 → 64) stay in the L2 cache for every job; the micro-kernel keeps a 12-channel × 32-tile
//! block of products in 24 zmm registers while it sums over the input channels.
//!
//! Only with AVX-512 (the micro-kernel's registers); other CPUs take the split path.

use super::{
    cols_1d, fill_line, out_cols_1d, out_rows_1d, out_rows_1d_to, rows_1d, transform_filters, Filters, RowTail, Shape,
    Tail, XI,
};
use crate::models::kernels::SendPtr;
use rayon::prelude::*;

/// Outputs above this size (bytes) are streamed to memory: a layer's input and output together
/// then pass the L3 cache of most laptop and desktop CPUs (8–32 MB), so the next layer reads them
/// from memory anyway. Measured here (32 MB L3): TAESD's 256² layers (16 MB out) 9.0–9.4 →
/// 8.0–8.2 ms streamed (its 512² ones gain too; its 128² ones, 4 MB, stay in the cache).
const STREAM_BYTES: usize = 8 << 20;

/// Tiles per job: two vectors of 16 lanes.
const T: usize = 32;
/// Output channels per micro-tile (with T tiles: 24 accumulators of the 32 zmm registers).
const CO: usize = 12;

/// Floats from one position ξ of a job's transformed inputs (or products) to the next: one cache
/// line more than `channels` rows of T, so that the 36 rows a transform reads or writes for one
/// channel do not all fall into the same L1 set (with 64 channels they were 8 KB apart).
fn stride(channels: usize) -> usize {
    channels * T + 16
}

/// Whether this CPU runs the fused path (AVX-512F, detected once).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether a layer of these channel counts gains from it: its transformed filters small enough to
/// stay in a core's L2 cache next to a job's operands (measured on TAESD's, the VAE's and the
/// UNet's layers, docs/PERFORMANCE.md; taking the UNet's wide layers too made them up to 1.5×
/// slower: 36 × 320 × 320 filters and a job's operands overflow the L2).
pub(super) fn suits(cin: usize, cout: usize) -> bool {
    // (And a job's operands within a few MB: 36 × 32 tiles × the wider side.)
    cin * cout <= 128 * 128 && cin.max(cout) <= 1024
}

thread_local! {
    /// A job's transformed inputs, products and transform rows, kept between jobs and calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The convolution of `x` (NCHW) by the 3×3 filters `w` (OIHW, f32), bias added, output NCHW: the
/// same result as the split path's up to the summation order of the products.
pub(super) fn conv(x: &[f32], sh: Shape, w: Filters, tail: Tail) -> Vec<f32> {
    let (oh, ow) = sh.out_size();
    let (ty, tx) = sh.tiles();
    let (cin, cout) = (sh.cin, sh.cout);
    // u[ξ][ci][co]: a micro-tile's 12 filters for one input channel are 12 consecutive floats.
    let mut by_co = vec![0f32; cout * XI * cin];
    transform_filters(w, cin, 0..cout, &mut by_co);
    let mut u = vec![0f32; XI * cin * cout];
    u.par_chunks_mut(cin * cout).enumerate().for_each(|(xi, ux)| {
        for (ci, row) in ux.chunks_mut(cout).enumerate() {
            for (co, d) in row.iter_mut().enumerate() {
                *d = by_co[(co * XI + xi) * cin + ci];
            }
        }
    });
    let total = sh.batch * ty * tx;
    // Not zeroed first (a pass over the largest tensor of the layer): the jobs write every value,
    // each output row of each tile once, before the length is set.
    let len = sh.batch * cout * oh * ow;
    let mut out = Vec::<f32>::with_capacity(len);
    let outp = SendPtr(out.as_mut_ptr());
    let job = |j: usize, scratch: &mut Vec<f32>| {
        let need = XI * (stride(cin) + stride(cout)) + 36 * T + 8 * T;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (v, rest) = scratch.split_at_mut(XI * stride(cin));
        let (m, rest) = rest.split_at_mut(XI * stride(cout));
        let (rows, line) = rest.split_at_mut(36 * T);
        let first = j * T;
        let tiles = first..(first + T).min(total);
        transform_inputs(x, sh, tiles.clone(), v, rows, line);
        products(&u, v, m, cin, cout);
        transform_outputs(m, sh, tiles, tail, rows, line, outp);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a fence has no preconditions; it orders the job's streamed stores before the
        // pool's signal that the job is done.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
    };
    (0..total.div_ceil(T))
        .into_par_iter()
        .for_each(|j| crate::models::kernels::with_kept(&SCRATCH, |kept| job(j, kept)));
    // SAFETY: the tiles cover the output plane (4·ty ≥ oh, 4·tx ≥ ow), so the jobs wrote all
    // `len` values of every (image, channel) plane.
    unsafe { out.set_len(len) };
    out
}

/// The runs of consecutive tiles within one tile row among the flat tiles `tiles` (image-major,
/// then tile row, then tile column): (image, tile row, first tile column, count, first slot).
fn runs_of(tiles: std::ops::Range<usize>, (ty, tx): (usize, usize)) -> Runs {
    let mut runs = Runs { runs: [[0; 5]; T], len: 0 };
    let mut f = tiles.start;
    while f < tiles.end {
        let (r, c) = (f / tx, f % tx);
        let n = (tx - c).min(tiles.end - f);
        runs.runs[runs.len] = [r / ty, r % ty, c, n, f - tiles.start];
        runs.len += 1;
        f += n;
    }
    runs
}

/// At most one run per tile of a job.
struct Runs {
    runs: [[usize; 5]; T],
    len: usize,
}

impl Runs {
    fn iter(&self) -> impl Iterator<Item = [usize; 5]> + '_ {
        self.runs[..self.len].iter().copied()
    }
}

/// `v[ξ][ci][slot]` (ξ rows [`stride`] apart) = (Bᵀ d B)_ξ of each tile's input.
fn transform_inputs(
    x: &[f32],
    sh: Shape,
    tiles: std::ops::Range<usize>,
    v: &mut [f32],
    rows: &mut [f32],
    line: &mut [f32],
) {
    let (vh, vw) = (sh.ih * sh.up, sh.iw * sh.up);
    let plane = sh.ih * sh.iw;
    let runs = runs_of(tiles, sh.tiles());
    for ci in 0..sh.cin {
        if ci + AHEAD < sh.cin {
            prefetch_lines(x, sh, &runs, ci + AHEAD);
        }
        for [bi, ty0, c0, n, slot] in runs.iter() {
            let src = &x[(bi * sh.cin + ci) * plane..(bi * sh.cin + ci + 1) * plane];
            // Rows of the tiles: each input line transformed along x (d B), 16 tiles at a time.
            // A group inside the input reads its line in place (4·16 + 4 values); one at a padded
            // edge, of an upsampled input or of fewer tiles reads a padded copy, its count rounded
            // up to whole vectors (the extra slots transform zeros and are never read back).
            for i in 0..6 {
                let y = (4 * ty0 + i) as isize - sh.pad as isize;
                let dst = &mut rows[i * 6 * T + slot..];
                if y < 0 || y >= vh as isize {
                    for nu in 0..6 {
                        dst[nu * T..nu * T + n].fill(0.0);
                    }
                    continue;
                }
                let src_line = &src[(y as usize / sh.up) * sh.iw..(y as usize / sh.up + 1) * sh.iw];
                for t in (0..n).step_by(16) {
                    let (c, m) = (c0 + t, (n - t).min(16));
                    if m == 16 && sh.up == 1 && 4 * c >= sh.pad && 4 * (c + 16) + 4 <= sh.iw + sh.pad {
                        let x = 4 * c - sh.pad;
                        rows_1d(&src_line[x..x + 68], &mut dst[t..], T, 16);
                    } else {
                        let padded = (m.div_ceil(16) * 16).min(T - slot - t);
                        let line = &mut line[..4 * padded + 4];
                        fill_line(line, src_line, 4 * c, sh.pad, vw, sh.up);
                        rows_1d(line, &mut dst[t..], T, padded);
                    }
                }
            }
        }
        // Columns: Bᵀ (d B), 36 runs of T slots at stride cin · T (slots past the last tile hold
        // stale values: their products are never read).
        cols_1d(rows, v, T, stride(sh.cin), ci * T);
    }
}

/// Input channels ahead of the one being transformed whose lines are prefetched.
const AHEAD: usize = 2;

/// Asks for the input lines channel `ci` of the tiles will read (at most 6 × 8 cache lines per
/// run): a job reads 6 short pieces of line per channel, hundreds of streams in all, more than
/// the hardware prefetchers follow, so without this the first load of each piece waited on
/// memory (a third of the input transform's time at TAESD's 512² layers).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn prefetch_lines(x: &[f32], sh: Shape, runs: &Runs, ci: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (vh, plane) = (sh.ih * sh.up, sh.ih * sh.iw);
        for [bi, ty0, c0, n, _] in runs.iter() {
            let base = (bi * sh.cin + ci) * plane;
            let lo = (4 * c0).saturating_sub(sh.pad) / sh.up;
            let hi = ((4 * (c0 + n) + 2).saturating_sub(sh.pad) / sh.up + 1).min(sh.iw);
            for i in 0..6 {
                let y = (4 * ty0 + i) as isize - sh.pad as isize;
                // (An upsampled input repeats each line: every other one is the same.)
                if y < 0 || y >= vh as isize || (sh.up > 1 && i > 0 && !(y as usize).is_multiple_of(sh.up)) {
                    continue;
                }
                let line = base + (y as usize / sh.up) * sh.iw;
                for q in (lo..hi).step_by(16) {
                    // SAFETY: a prefetch never faults; the address is inside x.
                    unsafe {
                        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                        _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().add(line + q) as *const i8);
                    }
                }
            }
        }
    }
}

/// Output rows of the tiles `tiles`: Aᵀ M A plus the bias (and the ReLU), into `out` (NCHW, the
/// whole layer's output; each job writes its own tiles' rows).
fn transform_outputs(
    m: &[f32],
    sh: Shape,
    tiles: std::ops::Range<usize>,
    tail: Tail,
    cols: &mut [f32],
    line: &mut [f32],
    out: SendPtr,
) {
    let (oh, ow) = sh.out_size();
    let cout = sh.cout;
    let runs = runs_of(tiles, sh.tiles());
    // Large outputs are written around the caches (see STREAM_BYTES and out_rows_1d_to).
    let stream = sh.batch * cout * oh * ow * 4 > STREAM_BYTES;
    for co in 0..cout {
        out_cols_1d(m, cols, T, stride(cout), co * T);
        for [bi, ty0, c0, n, slot] in runs.iter() {
            // Whole tiles are written in place; a last one cut by the right edge through `line`.
            let (x0, width) = (4 * c0, (4 * n).min(ow - 4 * c0));
            let whole = width / 4;
            for a in 0..4 {
                let y = 4 * ty0 + a;
                if y >= oh {
                    break;
                }
                let at = ((bi * cout + co) * oh + y) * ow + x0;
                // SAFETY: columns x0 .. x0 + width of row y of plane (bi, co) lie inside the
                // output (x0 + width ≤ ow) and belong to this job's tiles only.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(at), width) };
                let cols = &cols[a * 6 * T + slot..];
                let row = tail.row(co, at, width);
                out_rows_1d_to(cols, &mut dst[..4 * whole], T, whole, row, stream);
                if whole < n {
                    // (The cut tile's residual values are fewer than its four: added after.)
                    out_rows_1d(&cols[whole..], line, T, 1, RowTail { residual: None, relu: false, ..row });
                    let cut = &mut line[..width - 4 * whole];
                    row.finish(cut, 4 * whole);
                    dst[4 * whole..].copy_from_slice(cut);
                }
            }
        }
    }
}

/// `m[ξ][co][slot] = Σ_ci u[ξ][ci][co] · v[ξ][ci][slot]` for each ξ (ξ rows [`stride`] apart).
fn products(u: &[f32], v: &[f32], m: &mut [f32], cin: usize, cout: usize) {
    assert!(u.len() >= XI * cin * cout && v.len() >= XI * stride(cin) && m.len() >= XI * stride(cout));
    for xi in 0..XI {
        let (ux, vx) = (&u[xi * cin * cout..], &v[xi * stride(cin)..]);
        let mx = &mut m[xi * stride(cout)..];
        for co0 in (0..cout).step_by(CO) {
            // SAFETY: rows ci < cin of ux hold cout values from co0 (≥ r of them), rows ci of vx
            // hold T values, and rows co0 .. co0 + r of mx hold T values (the lengths asserted);
            // available() said the CPU has AVX-512F.
            unsafe { tile(cout - co0, ux.as_ptr().add(co0), cout, vx.as_ptr(), cin, mx.as_mut_ptr().add(co0 * T)) }
        }
    }
}

/// One micro-tile of `min(rest, CO)` output channels.
///
/// # Safety
/// As in [`products`]; the CPU has AVX-512F.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_macros))]
unsafe fn tile(rest: usize, u: *const f32, ustride: usize, v: *const f32, cin: usize, m: *mut f32) {
    macro_rules! by_rows {
        ($($r:literal)*) => {
            match rest.min(CO) {
                $($r => kernel::<$r>(u, ustride, v, cin, m),)*
                _ => unreachable!("1 ≤ rows ≤ CO"),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's.
    unsafe {
        by_rows!(1 2 3 4 5 6 7 8 9 10 11 12)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false off x86-64")
}

/// `m[r][0..T] = Σ_ci u[ci·ustride + r] · v[ci·T + 0..T]` for r < R, the R × T block in registers.
///
/// # Safety
/// As in [`products`]; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const R: usize>(u: *const f32, ustride: usize, v: *const f32, cin: usize, m: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for ci in 0..cin {
        // SAFETY: in bounds per the caller.
        unsafe {
            let (v0, v1) = (_mm512_loadu_ps(v.add(ci * T)), _mm512_loadu_ps(v.add(ci * T + 16)));
            let ur = u.add(ci * ustride);
            for (r, acc) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*ur.add(r));
                acc[0] = _mm512_fmadd_ps(b, v0, acc[0]);
                acc[1] = _mm512_fmadd_ps(b, v1, acc[1]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: in bounds per the caller.
        unsafe {
            _mm512_storeu_ps(m.add(r * T), acc[0]);
            _mm512_storeu_ps(m.add(r * T + 16), acc[1]);
        }
    }
}
