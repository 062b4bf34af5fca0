//! Winograd minimal filtering F(4×4, 3×3) for 3×3 stride-1 convolutions (Lavin & Gray 2016, "Fast
//! Algorithms for Convolutional Neural Networks", §4–5; the interpolation points 0, ±1, ±2, ∞ that
//! oneDNN, NNPACK and ncnn use for F(4, 3)).
//!
//! Each 4×4 output tile is computed from its 6×6 input tile: per input channel the tile becomes
//! V = Bᵀ d B, per filter U = G g Gᵀ, then for each of the 36 positions ξ of a transformed tile one
//! matrix product M_ξ[cout × tiles] = U_ξ[cout × cin] · V_ξ[cin × tiles] sums over the input
//! channels, and Y = Aᵀ M A gives the outputs: 36 multiply-adds per channel pair and 16 outputs
//! instead of 144. The transforms cost a pass over the input and the output per layer and are
//! linear in the channel count, so the products dominate for the UNet's and VAE's layers.
//!
//! The filters are transformed per call (4× the weight's size would have to stay resident
//! otherwise); the caller keeps small convolutions, where that transform would cost more than it
//! saves, on the im2col path ([`worthwhile`]).
//!
//! Accuracy: the transforms add and subtract values up to 8× apart, so f32 results differ from a
//! direct convolution by a few units in the 6th digit (the unit test bounds it against f64).

mod fused;

use super::{avx2_fma, join, relu_if, sgemm, SendPtr};
use gemm::Parallelism;
use rayon::prelude::*;

/// Positions of a transformed tile.
const XI: usize = 36;
/// Floats each of the input, filter and product buffers may hold (16 MB), like the im2col tiles.
const BUDGET: usize = 1 << 22;

/// Whether a 3×3 stride-1 convolution runs faster this way: enough tiles for the 36 products to
/// be efficient and to pay for transforming the filters, and, on the split path, enough channels
/// for the products to dominate the transforms. Measured on the UNet's, VAE's and TAESD's layers
/// (docs/PERFORMANCE.md);
/// `GHIBLIFY_WINOGRAD=0` turns it off (the im2col path everywhere, as before). Not where the
/// im2col products run on AMX tiles (`amx_products`: bf16 or int8 weights multiplied in bf16, cout
/// filling the tiles' 32 rows, cin ≥ 320): there a 3 × 3 layer is as fast or faster in bf16 than in f32
/// Winograd at the UNet's sizes (docs/PERFORMANCE.md, round thirteen), and as close to f32 as
/// autocast's bf16 convolutions.
pub(super) fn worthwhile(sh: &Shape, amx_products: bool) -> bool {
    if let Some(forced) = FORCED.get() {
        return forced;
    }
    if amx_products {
        return false;
    }
    let (ty, tx) = sh.tiles();
    let tiles = sh.batch * ty * tx;
    let (cin, cout) = (sh.cin, sh.cout);
    // The fused path also pays on layers with one side narrow (TAESD's 3 → 64 and 64 → 3 at the
    // full image: 13.9 → 4.1 and 17.6 → 8.2–9.9 ms against im2col, whose patch matrix is 9 × the
    // input).
    let suits = fused::suits(cin, cout);
    let narrow_ok = fused::available() && suits;
    // With AVX2's kernel the jobs over output channels also beat im2col at 16 to 63 tiles (the
    // UNet's 16² layers, and its 8² upsamplers at batch 1: 1280 → 1280 2–3× faster), not at 8 or
    // fewer (its 8² layers; docs/PERFORMANCE.md, round twenty-two). AVX-512's were not measured
    // there and keep im2col.
    let few = tiles >= MIN_TILES_AVX2_BY_CHANNELS
        && !fused::avx512()
        && fused::by_channels_available()
        && !suits
        && fused::suits_by_channels(sh);
    enabled() && (tiles >= 64 || few) && (narrow_ok || (cin >= 16 && cout >= 16))
}

/// See [`worthwhile`].
const MIN_TILES_AVX2_BY_CHANNELS: usize = 16;

/// Unless `GHIBLIFY_WINOGRAD=0` (read once).
pub(super) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GHIBLIFY_WINOGRAD").map_or(true, |v| v != "0"))
}

thread_local! {
    static FORCED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    /// Tests: the split path even where the fused one would run.
    static SPLIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Tests: [`fused::conv_by_channels`] wherever the fused paths run with AVX-512.
    static BY_CHANNELS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with Winograd convolutions on this thread taking the split path (three parallel
/// passes over the whole layer) even where [`fused`] would run: tests compare both.
#[cfg(test)]
pub(super) fn split<T>(f: impl FnOnce() -> T) -> T {
    crate::device::with_thread_switch(&SPLIT, true, f)
}

/// Runs `f` with Winograd convolutions on this thread taking [`fused::conv_by_channels`] (jobs
/// over output channels) wherever a fused path runs: tests compare it with the others.
#[cfg(test)]
pub(super) fn by_channels<T>(f: impl FnOnce() -> T) -> T {
    crate::device::with_thread_switch(&BY_CHANNELS, true, f)
}

/// Runs `f` with every 3×3 stride-1 convolution on this thread taking (`true`) or not taking
/// (`false`) this path whatever its size: for tests of either path on small shapes.
pub(super) fn forced<T>(on: bool, f: impl FnOnce() -> T) -> T {
    crate::device::with_thread_switch(&FORCED, Some(on), f)
}

/// Whether any of this module's thread-local switches is set on this thread.
pub(super) fn switched() -> bool {
    FORCED.get().is_some() || SPLIT.get() || BY_CHANNELS.get()
}

/// Whether a test chose Winograd or im2col ([`forced`]): then the AMX implicit convolution stays
/// out of the way too.
pub(super) fn is_forced() -> bool {
    FORCED.get().is_some()
}

/// Bᵀ d for one column (or row) of an input tile.
#[inline(always)]
fn input_1d(d: [f32; 6]) -> [f32; 6] {
    [
        4.0 * d[0] - 5.0 * d[2] + d[4],
        -4.0 * (d[1] + d[2]) + d[3] + d[4],
        4.0 * (d[1] - d[2]) - d[3] + d[4],
        2.0 * (d[3] - d[1]) - d[2] + d[4],
        2.0 * (d[1] - d[3]) - d[2] + d[4],
        4.0 * d[1] - 5.0 * d[3] + d[5],
    ]
}

/// G g for one column (or row) of a filter (multiplying by the reciprocals: a division would not
/// vectorise as well, and the rounding differs only in the last bit).
#[inline(always)]
fn filter_1d(g: [f32; 3]) -> [f32; 6] {
    const SIXTH: f32 = 1.0 / 6.0;
    let (even, odd) = (g[0] + g[2], g[1]);
    let (quarter, g2_6) = (g[0] * 0.25, g[2] * SIXTH);
    [
        quarter,
        -(even + odd) * SIXTH,
        (odd - even) * SIXTH,
        quarter * SIXTH + odd * (0.5 * SIXTH) + g2_6,
        quarter * SIXTH - odd * (0.5 * SIXTH) + g2_6,
        g[2],
    ]
}

/// Aᵀ m for one column (or row) of a product tile.
#[inline(always)]
fn output_1d(m: [f32; 6]) -> [f32; 4] {
    let (s12, d12, s34, d34) = (m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]);
    [m[0] + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + m[5]]
}

/// The convolution's shape as the transforms see it.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub batch: usize,
    pub cin: usize,
    /// The stored input plane (before upsampling).
    pub ih: usize,
    pub iw: usize,
    /// Nearest-neighbour upsampling factor read through the indices (1 or 2).
    pub up: usize,
    pub pad: usize,
    pub cout: usize,
}

impl Shape {
    pub fn out_size(&self) -> (usize, usize) {
        (self.ih * self.up + 2 * self.pad - 2, self.iw * self.up + 2 * self.pad - 2)
    }

    /// Tiles per (image) row and column.
    fn tiles(&self) -> (usize, usize) {
        let (oh, ow) = self.out_size();
        (oh.div_ceil(4), ow.div_ceil(4))
    }
}

thread_local! {
    /// [`conv`]'s transformed filters, inputs and products.
    static BUFFERS: std::cell::RefCell<[Vec<f32>; 3]> =
        const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// The convolution of `x` (NCHW) by the 3×3 filters `w` (OIHW, f32), bias added, output NCHW.
///
/// The products are f32 also for bf16 and int8 weights (widened first): rounding the transformed
/// operands to bf16 put a bf16 version's results 3–10 % (of the largest value) from the exact
/// ones, 30–60× the bf16 im2col path's error, while f32 Winograd is faster than bf16 im2col on
/// every layer where it applies.
pub(super) fn conv(x: &[f32], sh: Shape, w: Filters, tail: Tail) -> Vec<f32> {
    if fused::available() && !SPLIT.get() {
        let by_channels = BY_CHANNELS.get() || (!fused::suits(sh.cin, sh.cout) && fused::suits_by_channels(&sh));
        if fused::by_channels_available() && by_channels {
            return fused::conv_by_channels(x, sh, w, tail);
        }
        if fused::suits(sh.cin, sh.cout) {
            return fused::conv(x, sh, w, tail);
        }
    }
    let (oh, ow) = sh.out_size();
    let (ty, tx) = sh.tiles();
    let (cin, cout) = (sh.cin, sh.cout);
    // Output channels per block (the transformed filters within the budget), tile rows per chunk
    // (transformed inputs and products within it).
    let blk = (BUDGET / (XI * cin)).clamp(1, cout);
    let rows_total = sh.batch * ty;
    // Twice the budget when the filters come in blocks: each chunk transforms them again.
    let budget = if blk < cout { 2 * BUDGET } else { BUDGET };
    let chunk = (budget / (XI * tx * cin.max(blk))).clamp(1, rows_total);
    // The calling thread's buffers, kept between calls: fresh ones fault their pages in (zeroed
    // by the kernel) on every call, 25-35 % of a UNet layer's time. Their capacity is set once at
    // its largest (pages are only touched as far as a layer needs them): growing by steps left
    // the outgrown blocks resident and raised a VAE encode's peak by 0.35 GB.
    // A thread that re-enters while its buffers are in use (a rayon worker that, waiting inside
    // one convolution, steals a job running another) takes fresh ones.
    let write = |out: &mut [std::mem::MaybeUninit<f32>]| {
        super::with_kept(&BUFFERS, |[u, v, m]| {
            for (buf, len, cap) in [
                (&mut *u, blk * XI * cin, BUDGET),
                (&mut *v, cin * XI * chunk * tx, 2 * BUDGET),
                (&mut *m, blk * XI * chunk * tx, 2 * BUDGET),
            ] {
                kept_at_least(buf, len, cap);
            }
            let once = blk == cout;
            if once {
                transform_filters(w, cin, 0..cout, u);
            }
            for r0 in (0..rows_total).step_by(chunk) {
                let rows = r0..(r0 + chunk).min(rows_total);
                let nt = rows.len() * tx;
                let v = &mut v[..cin * XI * nt];
                transform_input(x, sh, rows.clone(), v);
                for co0 in (0..cout).step_by(blk) {
                    let nb = blk.min(cout - co0);
                    if !once {
                        transform_filters(w, cin, co0..co0 + nb, u);
                    }
                    let m = &mut m[..nb * XI * nt];
                    products(&u[..nb * XI * cin], v, m, (nb, cin, nt));
                    transform_output(m, sh, rows.clone(), co0..co0 + nb, tail, out);
                }
            }
        });
    };
    // SAFETY: the chunks of tile rows and the blocks of output channels cover every (image,
    // channel) plane, and transform_output writes each output row whole, reading none.
    unsafe { super::written(sh.batch * cout * oh * ow, write) }
}

/// Makes a kept buffer at least `len` long without shrinking it; when it must grow, its capacity
/// becomes at least `cap` at once (see [`conv`]: growing by steps left outgrown blocks resident).
fn kept_at_least(buf: &mut Vec<f32>, len: usize, cap: usize) {
    if buf.capacity() < len {
        *buf = Vec::with_capacity(len.max(cap));
    }
    buf.resize(buf.len().max(len), 0.0);
}

/// A convolution's 3×3 filters (OIHW) as stored: f32, or f16, bf16 or int8 codes with their channel
/// scales read where they lie, each output channel's widened into a buffer of its own as its
/// filters are transformed (widening the whole weight first wrote and read back 4 bytes per value
/// on every call: 59 MB for one of the UNet's 1280 → 1280 layers).
#[derive(Clone, Copy)]
pub(super) enum Filters<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    Bf16(&'a [half::bf16]),
    Q8 { codes: &'a [super::Q8], scales: &'a [f32] },
}

/// `u[co][ξ][ci]` = (G g Gᵀ)_ξ for the filters of output channels `cos`.
fn transform_filters(w: Filters, cin: usize, cos: std::ops::Range<usize>, u: &mut [f32]) {
    let per = 9 * cin;
    let (lo, hi) = (cos.start * per, cos.end * per);
    let u = u[..cos.len() * XI * cin].par_chunks_mut(XI * cin);
    match w {
        Filters::F32(w) => u.zip(w[lo..hi].par_chunks(per)).for_each(|(dst, g)| filters_of(g, dst, cin)),
        Filters::F16(w) => transform_half(&w[lo..hi], cin, u, super::f16_to_f32),
        Filters::Bf16(w) => transform_half(&w[lo..hi], cin, u, super::bf16_to_f32),
        Filters::Q8 { codes, scales } => {
            u.zip(codes[lo..hi].par_chunks(per)).zip(&scales[cos]).for_each_init(Vec::new, |gf, ((dst, q), &s)| {
                gf.resize(per, 0.0);
                super::dequantize_row(q, super::as_uninit(gf), s);
                filters_of(gf, dst, cin)
            })
        }
    }
}

/// [`transform_filters`] for half-precision filters: each output channel's widened by `convert`
/// (the kernels' `f16_to_f32` / `bf16_to_f32`) into a buffer of the job's own, then transformed.
fn transform_half<H: Sync>(
    w: &[H],
    cin: usize,
    u: rayon::slice::ChunksMut<'_, f32>,
    convert: impl Fn(&[H], &mut [std::mem::MaybeUninit<f32>]) + Sync,
) {
    let per = 9 * cin;
    u.zip(w.par_chunks(per)).for_each_init(Vec::new, |gf, (dst, g)| {
        gf.resize(per, 0.0);
        convert(g, super::as_uninit(gf));
        filters_of(gf, dst, cin)
    })
}

/// One value per vector lane: 16 input channels at a time.
type Lanes = [f32; 16];

/// [`filter_1d`] lane by lane.
#[inline(always)]
fn filter_1d_lanes(g0: &Lanes, g1: &Lanes, g2: &Lanes) -> [Lanes; 6] {
    let mut o = [[0f32; 16]; 6];
    for l in 0..16 {
        let r = filter_1d([g0[l], g1[l], g2[l]]);
        for (o, r) in o.iter_mut().zip(r) {
            o[l] = r;
        }
    }
    o
}

/// One output channel's filters (cin × 3 × 3) → 36 runs of cin, 16 input channels at a time
/// (transposed first so that the arithmetic runs across channels, in vector lanes).
fn filters_of(g: &[f32], dst: &mut [f32], cin: usize) {
    assert!(g.len() >= 9 * cin && dst.len() >= XI * cin);
    #[cfg(target_arch = "x86_64")]
    if fused::avx512() {
        // SAFETY: the lengths asserted; the CPU has AVX-512F.
        let done = unsafe { filters_of_avx512(g, dst, cin) };
        return filters_of_from(g, dst, cin, done);
    }
    filters_of_from(g, dst, cin, 0)
}

/// [`filters_of`] for whole groups of 16 input channels, in AVX-512 registers: each of the 9 taps
/// of 16 channels gathered into a vector, G g Gᵀ across them, the 36 results stored as vectors
/// (the portable loop, whose transposes and stores of up to 16 values LLVM did not turn into
/// vector code, transformed a 1280 → 1280 layer's filters in about as long as its products took
/// at batch 1). The same operations in the same order as [`filter_1d`]: the same values.
/// Returns the channels done.
///
/// # Safety
/// g holds 9·cin values, dst 36·cin; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn filters_of_avx512(g: &[f32], dst: &mut [f32], cin: usize) -> usize {
    use std::arch::x86_64::*;
    let idx = _mm512_setr_epi32(0, 9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 99, 108, 117, 126, 135);
    let full = cin / 16 * 16;
    for ci0 in (0..full).step_by(16) {
        // SAFETY: taps k < 9 of channels ci0 .. ci0 + 16 lie inside g (16 · 9 from ci0 · 9).
        let mut gt = [_mm512_setzero_ps(); 9];
        for (k, t) in gt.iter_mut().enumerate() {
            *t = unsafe { _mm512_i32gather_ps::<4>(idx, g.as_ptr().add(ci0 * 9 + k)) };
        }
        // SAFETY: rows (a·6 + b)·cin + ci0 + 16 ≤ 36·cin.
        unsafe { filter_2d_avx512(&gt, dst.as_mut_ptr().add(ci0), cin) };
    }
    full
}

/// [`filter_1d`]'s arithmetic on vectors, as [`input_1d_vec`]: `(add, sub, mul, set1)` for one
/// vector width. `-(even + odd) / 6` is `(even + odd) · (−1/6)`: negating a product's operand
/// negates the rounded product exactly, so the same bits as the scalar version.
#[cfg(target_arch = "x86_64")]
macro_rules! filter_1d_vec {
    (($add:ident, $sub:ident, $mul:ident, $set1:ident), [$g0:expr, $g1:expr, $g2:expr]) => {{
        let (g0, g1, g2) = ($g0, $g1, $g2);
        let sixth = $set1(1.0 / 6.0);
        let (even, odd) = ($add(g0, g2), g1);
        let (quarter, g2_6) = ($mul(g0, $set1(0.25)), $mul(g2, sixth));
        let q6 = $mul(quarter, sixth);
        let o12 = $mul(odd, $set1(0.5 / 6.0));
        [
            quarter,
            $mul($add(even, odd), $set1(-1.0 / 6.0)),
            $mul($sub(odd, even), sixth),
            $add($add(q6, o12), g2_6),
            $add($sub(q6, o12), g2_6),
            g2,
        ]
    }};
}

/// G g Gᵀ of one vector width's lanes of 3×3 taps (`$g[k]`: tap k of every lane) by `$filter_1d`,
/// columns first then rows, the 36 results stored by `$store` at `$dst + ξ·$stride` (ξ = a·6 + b):
/// [`filter_2d_avx512`]'s and [`filter_2d_avx2`]'s one body. No closure in it: inside an inlined
/// helper a closure is compiled without the caller's target features and calls each intrinsic.
#[cfg(target_arch = "x86_64")]
macro_rules! filter_2d_vec {
    ($filter_1d:ident, $store:path, $g:expr, $dst:expr, $stride:expr) => {{
        let (g, dst, stride) = ($g, $dst, $stride);
        let c0 = $filter_1d(g[0], g[3], g[6]);
        let c1 = $filter_1d(g[1], g[4], g[7]);
        let c2 = $filter_1d(g[2], g[5], g[8]);
        for (a, ((&x0, &x1), &x2)) in c0.iter().zip(&c1).zip(&c2).enumerate() {
            for (b, row) in $filter_1d(x0, x1, x2).into_iter().enumerate() {
                $store(dst.add((a * 6 + b) * stride), row);
            }
        }
    }};
}

/// G g Gᵀ of 16 lanes' 3×3 taps (`g[k]`: tap k of every lane), columns first then rows, the 36
/// results stored as vectors at `dst + ξ·stride` (ξ = a·6 + b). The one 2-D filter transform of
/// both AVX-512 paths: [`filters_of_avx512`] (lanes = input channels, stride = cin) and the
/// by-channels path's `fused::filters_by_lanes` (lanes = output channels, stride = its ξ rows').
///
/// # Safety
/// Inlined only into functions compiled for AVX-512F; dst + ξ·stride + 16 is writable for ξ < 36.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn filter_2d_avx512(g: &[std::arch::x86_64::__m512; 9], dst: *mut f32, stride: usize) {
    unsafe { filter_2d_vec!(filter_1d_avx512, std::arch::x86_64::_mm512_storeu_ps, g, dst, stride) }
}

/// [`filter_1d`] on 16 lanes at once, the same operations in the same order (so the same values).
///
/// # Safety
/// Inlined only into functions compiled for AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn filter_1d_avx512(
    g0: std::arch::x86_64::__m512,
    g1: std::arch::x86_64::__m512,
    g2: std::arch::x86_64::__m512,
) -> [std::arch::x86_64::__m512; 6] {
    use std::arch::x86_64::*;
    unsafe { filter_1d_vec!((_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps, _mm512_set1_ps), [g0, g1, g2]) }
}

/// [`filter_2d_avx512`] on 8 lanes (AVX2), for `fused::filters_by_lanes_avx2`: the same operations
/// in the same order.
///
/// # Safety
/// Inlined only into functions compiled for AVX2; dst + ξ·stride + 8 is writable for ξ < 36.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn filter_2d_avx2(g: &[std::arch::x86_64::__m256; 9], dst: *mut f32, stride: usize) {
    unsafe { filter_2d_vec!(filter_1d_avx2, std::arch::x86_64::_mm256_storeu_ps, g, dst, stride) }
}

/// [`filter_1d`] on 8 lanes (AVX2), as [`filter_1d_avx512`].
///
/// # Safety
/// Inlined only into functions compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn filter_1d_avx2(
    g0: std::arch::x86_64::__m256,
    g1: std::arch::x86_64::__m256,
    g2: std::arch::x86_64::__m256,
) -> [std::arch::x86_64::__m256; 6] {
    use std::arch::x86_64::*;
    unsafe { filter_1d_vec!((_mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps, _mm256_set1_ps), [g0, g1, g2]) }
}

simd! {
fn filters_of_from(g: &[f32], dst: &mut [f32], cin: usize, from: usize) {
    for ci0 in (from..cin).step_by(16) {
        let n = (cin - ci0).min(16);
        let mut gt = [[0f32; 16]; 9];
        for l in 0..n {
            for (k, row) in gt.iter_mut().enumerate() {
                row[l] = g[(ci0 + l) * 9 + k];
            }
        }
        // Columns first (G g), then rows ((G g) Gᵀ).
        let [c0, c1, c2] = [0, 1, 2].map(|kx| filter_1d_lanes(&gt[kx], &gt[3 + kx], &gt[6 + kx]));
        for (a, ((c0, c1), c2)) in c0.iter().zip(&c1).zip(&c2).enumerate() {
            for (b, row) in filter_1d_lanes(c0, c1, c2).iter().enumerate() {
                let at = (a * 6 + b) * cin + ci0;
                // A whole vector as one store (CPUs without AVX-512, which take this loop for
                // every group): a copy of variable length is a call to memmove per 16 values.
                if n == 16 {
                    dst[at..at + 16].copy_from_slice(row);
                } else {
                    dst[at..at + n].copy_from_slice(&row[..n]);
                }
            }
        }
    }
}
}

/// `v[ci][ξ][t]` = (Bᵀ d B)_ξ for the input tiles of tile rows `rows` (row r: image r / ty, tile
/// row r % ty), t counting tiles along those rows.
fn transform_input(x: &[f32], sh: Shape, rows: std::ops::Range<usize>, v: &mut [f32]) {
    let (ty, tx) = sh.tiles();
    let (vh, vw) = (sh.ih * sh.up, sh.iw * sh.up);
    let plane = sh.ih * sh.iw;
    let nt = rows.len() * tx;
    v.par_chunks_mut(XI * nt).enumerate().for_each_init(
        || (vec![0f32; 4 * tx + 4], vec![0f32; 36 * tx]),
        |(line, cols), (ci, dst)| {
            for (ri, r) in rows.clone().enumerate() {
                let (bi, ty0) = (r / ty, r % ty);
                let src = &x[(bi * sh.cin + ci) * plane..(bi * sh.cin + ci + 1) * plane];
                // Rows of the tile: each input line padded and transformed along x (d B).
                for i in 0..6 {
                    let y = (4 * ty0 + i) as isize - sh.pad as isize;
                    let dst_i = &mut cols[i * 6 * tx..(i + 1) * 6 * tx];
                    if y < 0 || y >= vh as isize {
                        dst_i.fill(0.0);
                        continue;
                    }
                    let src_line = &src[(y as usize / sh.up) * sh.iw..(y as usize / sh.up + 1) * sh.iw];
                    fill_line(line, src_line, 0, sh.pad, vw, sh.up);
                    rows_1d(line, dst_i, tx, tx);
                }
                // Columns: Bᵀ (d B), written as 36 runs of tx tiles.
                let base = ri * tx;
                cols_1d(cols, dst, tx, nt, base);
            }
        },
    );
}

/// `line[q]` = the (upsampled) input at x = x0 + q − pad, zero outside.
fn fill_line(line: &mut [f32], src: &[f32], x0: usize, pad: usize, vw: usize, up: usize) {
    // Positions q of the line inside the input: x0 + q − pad in [0, vw).
    let lo = pad.saturating_sub(x0).min(line.len());
    let hi = (vw + pad).saturating_sub(x0).clamp(lo, line.len());
    line[..lo].fill(0.0);
    line[hi..].fill(0.0);
    let first = x0 + lo - pad;
    match up {
        1 => line[lo..hi].copy_from_slice(&src[first..first + hi - lo]),
        // (A shift, not a division by a runtime factor per value: 4.5 % of a TAESD pass.)
        2 => line[lo..hi].iter_mut().enumerate().for_each(|(q, d)| *d = src[(first + q) >> 1]),
        _ => line[lo..hi].iter_mut().enumerate().for_each(|(q, d)| *d = src[(first + q) / up]),
    }
}

/// The `N` runs `dst[first + k·stride ..][..len]`, k < N (disjoint when len ≤ stride), without
/// `get_disjoint_mut`'s overlap checks, which cost 5 % of a TAESD pass in the innermost loop.
#[inline(always)]
fn runs<const N: usize>(dst: &mut [f32], first: usize, stride: usize, len: usize) -> [&mut [f32]; N] {
    assert!(len <= stride && first + (N - 1) * stride + len <= dst.len(), "runs inside the buffer");
    let base = dst.as_mut_ptr();
    let mut k = 0;
    [(); N].map(|_| {
        // SAFETY: the runs lie inside dst (asserted) and do not overlap (len ≤ stride).
        let run = unsafe { std::slice::from_raw_parts_mut(base.add(first + k * stride), len) };
        k += 1;
        run
    })
}

/// Tiles per whole group of the vector row transforms on this CPU: 16 with AVX-512
/// ([`avx512`]), 8 with AVX2 ([`avx2`], whose fused products run there), none otherwise.
fn row_group() -> usize {
    if fused::avx512() {
        16
    } else if avx2_fma() {
        8
    } else {
        0
    }
}

/// `dst[ν·stride + t]` = (d B)_ν of the tile starting at `line[4t]`, t < n: whole groups of 16
/// (8) tiles with AVX-512 (AVX2) permutes ([`avx512::rows16`], [`avx2::rows8`]), the rest (and
/// other CPUs) by the compiler's vectorisation, which left up to 16 tiles of every call to a
/// 4-wide loop (its loads of whole groups of four would have read past the line); with AVX2 it
/// was a quarter of TAESD's samples, the permutes halve it (docs/PERFORMANCE.md, round 21).
fn rows_1d(line: &[f32], dst: &mut [f32], stride: usize, n: usize) {
    rows_1d_by(row_group(), line, dst, stride, n)
}

/// `group` if this CPU has its instructions (16: AVX-512F, 8: AVX2 and FMA), 0 otherwise, and how
/// many of `n` tiles fill whole groups of it.
fn whole_groups(group: usize, n: usize) -> (usize, usize) {
    let group = if (group == 16 && fused::avx512()) || (group == 8 && avx2_fma()) { group } else { 0 };
    (group, n.checked_div(group).map_or(0, |g| g * group))
}

/// [`rows_1d`] with whole groups of `group` tiles (16 or 8 where the CPU has the instructions,
/// none otherwise): tests run each.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn rows_1d_by(group: usize, line: &[f32], dst: &mut [f32], stride: usize, n: usize) {
    assert!(line.len() >= 4 * n + 4 && n <= stride && dst.len() >= 5 * stride + n);
    let (group, done) = whole_groups(group, n);
    #[cfg(target_arch = "x86_64")]
    if done > 0 {
        // SAFETY: done ≤ n tiles read line[..4·done + 4] and write dst[ν·stride ..][..done]
        // (asserted); the CPU has AVX-512F (16) or AVX2 and FMA (8).
        unsafe {
            if group == 16 {
                avx512::rows16(line.as_ptr(), dst.as_mut_ptr(), stride, done / 16)
            } else {
                avx2::rows8(line.as_ptr(), dst.as_mut_ptr(), stride, done / 8)
            }
        };
    }
    if done < n {
        rows_1d_any(&line[4 * done..], &mut dst[done..], stride, n - done);
    }
}

/// What each output value gets after the output transform: the bias, then (when given) the value
/// at the same place of a residual tensor, then (under `relu`) max(·, 0) — TAESD's
/// `relu(conv(h) + x)` without a pass of its own.
#[derive(Clone, Copy)]
pub(super) struct Tail<'a> {
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

/// A [`Tail`] for one output row: the channel's bias and the residual's values of that row.
#[derive(Clone, Copy)]
struct RowTail<'a> {
    bias: f32,
    residual: Option<&'a [f32]>,
    relu: bool,
}

impl RowTail<'_> {
    /// The residual (this row's values from `from` on) and the ReLU, on values that got the bias
    /// only: where a row or a tile is cut short of the vector code's whole groups.
    fn finish(&self, values: &mut [f32], from: usize) {
        match self.residual {
            Some(r) => values.iter_mut().zip(&r[from..]).for_each(|(v, r)| *v = join(*v, *r, self.relu)),
            None => values.iter_mut().for_each(|v| *v = relu_if(*v, self.relu)),
        }
    }
}

impl<'a> Tail<'a> {
    /// For the output row starting at `at` (NCHW index) of channel `co`, `len` values.
    fn row(&self, co: usize, at: usize, len: usize) -> RowTail<'a> {
        RowTail {
            bias: self.bias.map_or(0.0, |b| b[co]),
            residual: self.residual.map(|r| &r[at..at + len]),
            relu: self.relu,
        }
    }
}

/// `line[4t + b]` = Σ_ν cols[ν·stride + t] A[ν][b], then its [`RowTail`], t < n: as [`rows_1d`],
/// whole groups of 16 (8) tiles with AVX-512 (AVX2) permutes.
fn out_rows_1d(cols: &[f32], line: &mut [f32], stride: usize, n: usize, tail: RowTail) {
    out_rows_1d_to(cols, line, stride, n, tail, false)
}

/// [`out_rows_1d`], the whole groups written around the caches when `stream` (and `line` is
/// 64-byte aligned): for outputs too large to stay in the caches until the next layer reads them,
/// so that their lines are not first read in to be overwritten. The caller fences
/// (`_mm_sfence`) before others read them.
fn out_rows_1d_to(cols: &[f32], line: &mut [f32], stride: usize, n: usize, tail: RowTail, stream: bool) {
    out_rows_1d_by(row_group(), cols, line, (stride, n), tail, stream)
}

/// [`out_rows_1d_to`] with whole groups of `group` tiles, as [`rows_1d_by`].
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn out_rows_1d_by(
    group: usize,
    cols: &[f32],
    line: &mut [f32],
    (stride, n): (usize, usize),
    tail: RowTail,
    stream: bool,
) {
    assert!(line.len() >= 4 * n && n <= stride && cols.len() >= 5 * stride + n);
    assert!(tail.residual.is_none_or(|r| r.len() >= 4 * n));
    let (group, done) = whole_groups(group, n);
    #[cfg(target_arch = "x86_64")]
    if done > 0 {
        let stream = stream && (line.as_ptr() as usize).is_multiple_of(64);
        let residual = tail.residual.map_or(std::ptr::null(), <[f32]>::as_ptr);
        let (cols, line, tail) = (cols.as_ptr(), line.as_mut_ptr(), (tail.bias, residual, tail.relu));
        // SAFETY: done ≤ n tiles read cols[ν·stride ..][..done] and the residual's [..4·done]
        // (when given) and write line[..4·done] (asserted), aligned to 64 bytes when streamed;
        // the CPU has AVX-512F (16) or AVX2 and FMA (8).
        unsafe {
            if group == 16 {
                avx512::out_rows16(cols, stride, line, done / 16, tail, stream)
            } else {
                avx2::out_rows8(cols, stride, line, done / 8, tail, stream)
            }
        };
    }
    if done < n {
        let rest = RowTail { residual: tail.residual.map(|r| &r[4 * done..]), ..tail };
        out_rows_1d_any(&cols[done..], &mut line[4 * done..], stride, n - done, rest);
    }
}

/// [`input_1d`]'s arithmetic on vectors, operation for operation (so the same values): the
/// vector add, sub and mul, the constants 2, 4, 5 and −4 as vectors, the six positions.
#[cfg(target_arch = "x86_64")]
macro_rules! input_1d_vec {
    (($add:ident, $sub:ident, $mul:ident), ($c2:ident, $c4:ident, $c5:ident, $cm4:ident), [$d0:ident, $d1:ident, $d2:ident, $d3:ident, $d4:ident, $d5:ident]) => {
        [
            $add($sub($mul($c4, $d0), $mul($c5, $d2)), $d4),
            $add($add($mul($cm4, $add($d1, $d2)), $d3), $d4),
            $add($sub($mul($c4, $sub($d1, $d2)), $d3), $d4),
            $add($sub($mul($c2, $sub($d3, $d1)), $d2), $d4),
            $add($sub($mul($c2, $sub($d1, $d3)), $d2), $d4),
            $add($sub($mul($c4, $d1), $mul($c5, $d3)), $d5),
        ]
    };
}

/// [`output_1d`]'s arithmetic on vectors, as [`input_1d_vec`]: the constants 2, 4 and 8.
#[cfg(target_arch = "x86_64")]
macro_rules! output_1d_vec {
    (($add:ident, $sub:ident, $mul:ident), ($c2:ident, $c4:ident, $c8:ident), [$m0:expr, $m1:expr, $m2:expr, $m3:expr, $m4:expr, $m5:expr]) => {{
        let (s12, d12, s34, d34) = ($add($m1, $m2), $sub($m1, $m2), $add($m3, $m4), $sub($m3, $m4));
        [
            $add($add($m0, s12), s34),
            $add(d12, $mul($c2, d34)),
            $add(s12, $mul($c4, s34)),
            $add($add(d12, $mul($c8, d34)), $m5),
        ]
    }};
}

/// The row transforms 16 tiles at a time: the tiles' values sit four (or six) apart along the
/// line, so they are gathered into (or scattered from) one vector per position by permutes. The
/// arithmetic is [`input_1d`]'s and [`output_1d`]'s, operation for operation (the same results).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// See [`super::rows_1d`].
    ///
    /// # Safety
    /// line[..64·blocks + 4] readable, dst[ν·stride + 16·blocks] writable for ν < 6; AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows16(line: *const f32, dst: *mut f32, stride: usize, blocks: usize) {
        // Within two vectors of four tiles each: positions 0, 1 (and 2, 3) of the eight tiles.
        let i01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
        let i23 = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
        let (c4, c5, c2) = (_mm512_set1_ps(4.0), _mm512_set1_ps(5.0), _mm512_set1_ps(2.0));
        let cm4 = _mm512_set1_ps(-4.0);
        for b in 0..blocks {
            // SAFETY: in bounds per the caller.
            unsafe {
                let p = line.add(64 * b);
                let ld = |o: usize| _mm512_loadu_ps(p.add(o));
                // Positions 0-3 of tiles 0-15, and 4-5 (the next tile's 0-1).
                let (q0, q1, q2, q3) = (ld(0), ld(16), ld(32), ld(48));
                let (s0, s1, s2, s3) = (ld(4), ld(20), ld(36), ld(52));
                let split = |a: __m512, b: __m512, c: __m512, d: __m512, idx: __m512i| {
                    let (lo, hi) = (_mm512_permutex2var_ps(a, idx, b), _mm512_permutex2var_ps(c, idx, d));
                    (_mm512_shuffle_f32x4::<0x44>(lo, hi), _mm512_shuffle_f32x4::<0xEE>(lo, hi))
                };
                let (d0, d1) = split(q0, q1, q2, q3, i01);
                let (d2, d3) = split(q0, q1, q2, q3, i23);
                let (d4, d5) = split(s0, s1, s2, s3, i01);
                let (add, sub, mul) = (_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps);
                let o = input_1d_vec!((add, sub, mul), (c2, c4, c5, cm4), [d0, d1, d2, d3, d4, d5]);
                for (nu, o) in o.into_iter().enumerate() {
                    _mm512_storeu_ps(dst.add(nu * stride + 16 * b), o);
                }
            }
        }
    }

    /// See [`super::out_rows_1d`].
    ///
    /// # Safety
    /// cols[ν·stride + 16·blocks] readable for ν < 6, residual[..64·blocks] readable unless
    /// null, line[..64·blocks] writable (64-byte aligned if `stream`); AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn out_rows16(
        cols: *const f32,
        stride: usize,
        line: *mut f32,
        blocks: usize,
        (bias, residual, relu): (f32, *const f32, bool),
        stream: bool,
    ) {
        // Pairs (o0, o1) and (o2, o3) of tiles 0-7 (and 8-15), then the pairs of pairs.
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let (k0, k1) = (_mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15));
        let (c2, c4, c8) = (_mm512_set1_ps(2.0), _mm512_set1_ps(4.0), _mm512_set1_ps(8.0));
        let (bias, zero) = (_mm512_set1_ps(bias), _mm512_setzero_ps());
        for b in 0..blocks {
            // SAFETY: in bounds per the caller.
            unsafe {
                let c = |nu: usize| _mm512_loadu_ps(cols.add(nu * stride + 16 * b));
                let (add, sub, mul) = (_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps);
                let o = output_1d_vec!((add, sub, mul), (c2, c4, c8), [c(0), c(1), c(2), c(3), c(4), c(5)]);
                let o = o.map(|v| add(v, bias));
                // The residual and the ReLU on the values in line order.
                // (max(NaN, 0) is 0 here as in f32::max: the second operand when one is NaN.)
                let tail = |q: __m512d, at: usize| {
                    let q = _mm512_castpd_ps(q);
                    let q = if residual.is_null() { q } else { add(q, _mm512_loadu_ps(residual.add(at))) };
                    _mm512_castps_pd(if relu { _mm512_max_ps(q, zero) } else { q })
                };
                for (h, idx) in [(0, lo), (1, hi)] {
                    let p01 = _mm512_castps_pd(_mm512_permutex2var_ps(o[0], idx, o[1]));
                    let p23 = _mm512_castps_pd(_mm512_permutex2var_ps(o[2], idx, o[3]));
                    let off = 64 * b + 32 * h;
                    let at = line.add(off);
                    let q0 = tail(_mm512_permutex2var_pd(p01, k0, p23), off);
                    let q1 = tail(_mm512_permutex2var_pd(p01, k1, p23), off + 16);
                    if stream {
                        _mm512_stream_pd(at as *mut f64, q0);
                        _mm512_stream_pd(at.add(16) as *mut f64, q1);
                    } else {
                        _mm512_storeu_pd(at as *mut f64, q0);
                        _mm512_storeu_pd(at.add(16) as *mut f64, q1);
                    }
                }
            }
        }
    }
}

/// [`avx512`]'s row transforms 8 tiles at a time in ymm registers (AVX2 has no two-source
/// permutes: 4 × 4 transposes within 128-bit lanes, the tiles loaded into the lanes in order).
/// The same arithmetic, operation for operation: the same results.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// See [`super::rows_1d`].
    ///
    /// # Safety
    /// line[..32·blocks + 4] readable, dst[ν·stride + 8·blocks] writable for ν < 6; AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows8(line: *const f32, dst: *mut f32, stride: usize, blocks: usize) {
        let (c4, c5, c2) = (_mm256_set1_ps(4.0), _mm256_set1_ps(5.0), _mm256_set1_ps(2.0));
        let cm4 = _mm256_set1_ps(-4.0);
        for b in 0..blocks {
            // SAFETY: in bounds per the caller.
            unsafe {
                let p = line.add(32 * b);
                // Tiles t and t + 4 (from `o` values on) in the two lanes.
                let ld = |t: usize, o: usize| _mm256_loadu2_m128(p.add(4 * t + 16 + o), p.add(4 * t + o));
                let (q0, q1, q2, q3) = (ld(0, 0), ld(1, 0), ld(2, 0), ld(3, 0));
                let (s0, s1, s2, s3) = (ld(0, 4), ld(1, 4), ld(2, 4), ld(3, 4));
                // 4 × 4 transposes in each lane: position k of tiles 0-3 | 4-7.
                let (a0, a1) = (_mm256_unpacklo_ps(q0, q1), _mm256_unpackhi_ps(q0, q1));
                let (a2, a3) = (_mm256_unpacklo_ps(q2, q3), _mm256_unpackhi_ps(q2, q3));
                let pd = _mm256_castps_pd;
                let ps = _mm256_castpd_ps;
                let d0 = ps(_mm256_unpacklo_pd(pd(a0), pd(a2)));
                let d1 = ps(_mm256_unpackhi_pd(pd(a0), pd(a2)));
                let d2 = ps(_mm256_unpacklo_pd(pd(a1), pd(a3)));
                let d3 = ps(_mm256_unpackhi_pd(pd(a1), pd(a3)));
                let (e0, e2) = (_mm256_unpacklo_ps(s0, s1), _mm256_unpacklo_ps(s2, s3));
                let d4 = ps(_mm256_unpacklo_pd(pd(e0), pd(e2)));
                let d5 = ps(_mm256_unpackhi_pd(pd(e0), pd(e2)));
                let (add, sub, mul) = (_mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps);
                let o = input_1d_vec!((add, sub, mul), (c2, c4, c5, cm4), [d0, d1, d2, d3, d4, d5]);
                for (nu, o) in o.into_iter().enumerate() {
                    _mm256_storeu_ps(dst.add(nu * stride + 8 * b), o);
                }
            }
        }
    }

    /// See [`super::out_rows_1d`].
    ///
    /// # Safety
    /// cols[ν·stride + 8·blocks] readable for ν < 6, residual[..32·blocks] readable unless null,
    /// line[..32·blocks] writable (32-byte aligned if `stream`); AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn out_rows8(
        cols: *const f32,
        stride: usize,
        line: *mut f32,
        blocks: usize,
        (bias, residual, relu): (f32, *const f32, bool),
        stream: bool,
    ) {
        let (c2, c4, c8) = (_mm256_set1_ps(2.0), _mm256_set1_ps(4.0), _mm256_set1_ps(8.0));
        let (bias, zero) = (_mm256_set1_ps(bias), _mm256_setzero_ps());
        for b in 0..blocks {
            // SAFETY: in bounds per the caller.
            unsafe {
                let c = |nu: usize| _mm256_loadu_ps(cols.add(nu * stride + 8 * b));
                let (add, sub, mul) = (_mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps);
                let o = output_1d_vec!((add, sub, mul), (c2, c4, c8), [c(0), c(1), c(2), c(3), c(4), c(5)]);
                let o = o.map(|v| add(v, bias));
                // Tile t's four values together: 4 × 4 transposes in each lane give tiles
                // (0 | 4), (1 | 5), (2 | 6), (3 | 7), whose lanes are then paired in line order.
                let pd = _mm256_castps_pd;
                let ps = _mm256_castpd_ps;
                let (a0, a1) = (_mm256_unpacklo_ps(o[0], o[1]), _mm256_unpackhi_ps(o[0], o[1]));
                let (a2, a3) = (_mm256_unpacklo_ps(o[2], o[3]), _mm256_unpackhi_ps(o[2], o[3]));
                let t04 = ps(_mm256_unpacklo_pd(pd(a0), pd(a2)));
                let t15 = ps(_mm256_unpackhi_pd(pd(a0), pd(a2)));
                let t26 = ps(_mm256_unpacklo_pd(pd(a1), pd(a3)));
                let t37 = ps(_mm256_unpackhi_pd(pd(a1), pd(a3)));
                let q = [
                    _mm256_permute2f128_ps::<0x20>(t04, t15),
                    _mm256_permute2f128_ps::<0x20>(t26, t37),
                    _mm256_permute2f128_ps::<0x31>(t04, t15),
                    _mm256_permute2f128_ps::<0x31>(t26, t37),
                ];
                for (i, q) in q.into_iter().enumerate() {
                    // The residual and the ReLU on the values in line order.
                    // (max(NaN, 0) is 0 here as in f32::max: the second operand when one is NaN.)
                    let off = 32 * b + 8 * i;
                    let q = if residual.is_null() { q } else { add(q, _mm256_loadu_ps(residual.add(off))) };
                    let q = if relu { _mm256_max_ps(q, zero) } else { q };
                    if stream {
                        _mm256_stream_ps(line.add(off), q);
                    } else {
                        _mm256_storeu_ps(line.add(off), q);
                    }
                }
            }
        }
    }
}

simd! {
fn rows_1d_any(line: &[f32], dst: &mut [f32], stride: usize, n: usize) {
    // dst[ν·stride + t] = (d B)_ν of the tile starting at 4t, t < n.
    let [d0, d1, d2, d3, d4, d5] = runs::<6>(dst, 0, stride, n);
    let (d0, d1, d2, d3, d4, d5) = (&mut d0[..n], &mut d1[..n], &mut d2[..n], &mut d3[..n], &mut d4[..n], &mut d5[..n]);
    // As groups of four (tile t's first four values, then the next group's first two): the
    // compiler vectorises loads of whole groups with shuffles, not single strided ones.
    let (quads, _) = line[..4 * n + 4].as_chunks::<4>();
    let (cur, next) = (&quads[..n], &quads[1..n + 1]);
    for t in 0..n {
        let (a, b) = (cur[t], next[t]);
        let o = input_1d([a[0], a[1], a[2], a[3], b[0], b[1]]);
        d0[t] = o[0];
        d1[t] = o[1];
        d2[t] = o[2];
        d3[t] = o[3];
        d4[t] = o[4];
        d5[t] = o[5];
    }
}
}

simd! {
fn cols_1d(cols: &[f32], dst: &mut [f32], tx: usize, nt: usize, base: usize) {
    // cols[i][ν][t] → dst[(μ·6 + ν)][base + t] = Σ_i Bᵀ[μ][i] cols[i][ν][t].
    for nu in 0..6 {
        let c = |i: usize| &cols[(i * 6 + nu) * tx..(i * 6 + nu + 1) * tx];
        let (c0, c1, c2, c3, c4, c5) = (c(0), c(1), c(2), c(3), c(4), c(5));
        let [o0, o1, o2, o3, o4, o5] = runs::<6>(dst, nu * nt + base, 6 * nt, tx);
        // Lengths the compiler can see (no bounds checks in the loop, so it vectorises).
        let (c0, c1, c2, c3, c4, c5) = (&c0[..tx], &c1[..tx], &c2[..tx], &c3[..tx], &c4[..tx], &c5[..tx]);
        let (o0, o1, o2, o3, o4, o5) = (&mut o0[..tx], &mut o1[..tx], &mut o2[..tx], &mut o3[..tx], &mut o4[..tx], &mut o5[..tx]);
        for t in 0..tx {
            let o = input_1d([c0[t], c1[t], c2[t], c3[t], c4[t], c5[t]]);
            (o0[t], o1[t], o2[t], o3[t], o4[t], o5[t]) = (o[0], o[1], o[2], o[3], o[4], o[5]);
        }
    }
}
}

/// `m[co][ξ][t] = Σ_ci u[co][ξ][ci] · v[ci][ξ][t]` for each ξ, in parallel over ξ.
fn products(u: &[f32], v: &[f32], m: &mut [f32], (nb, cin, nt): (usize, usize, usize)) {
    assert!(u.len() >= nb * XI * cin && v.len() >= cin * XI * nt && m.len() >= nb * XI * nt);
    let (up, vp, mp) = (u.as_ptr() as usize, v.as_ptr() as usize, SendPtr(m.as_mut_ptr()));
    (0..XI).into_par_iter().for_each(|xi| {
        let (u, v) = ((up as *const f32).wrapping_add(xi * cin), (vp as *const f32).wrapping_add(xi * nt));
        // SAFETY: rows co < nb of u (stride 36·cin), rows ci < cin of v and rows co of m (stride
        // 36·nt) hold cin, nt and nt values from these offsets (the lengths asserted above); each
        // ξ writes its own columns of m.
        unsafe {
            sgemm(
                (nb, nt, cin),
                mp.get().wrapping_add(xi * nt),
                (XI * nt) as isize,
                false,
                (u, 1, (XI * cin) as isize),
                (v, 1, (XI * nt) as isize),
                1.0,
                Parallelism::None,
            )
        }
    });
}

/// Output channels `cos`, tile rows `rows`: Aᵀ M A plus the bias, written into `out` (NCHW).
fn transform_output(
    m: &[f32],
    sh: Shape,
    rows: std::ops::Range<usize>,
    cos: std::ops::Range<usize>,
    tail: Tail,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let (oh, ow) = sh.out_size();
    let (ty, tx) = sh.tiles();
    let nt = rows.len() * tx;
    let oplane = oh * ow;
    assert!(out.len() >= sh.batch * sh.cout * oplane);
    let outp = SendPtr(out.as_mut_ptr() as *mut f32);
    let cout = sh.cout;
    m.par_chunks(XI * nt).enumerate().for_each_init(
        || (vec![0f32; 24 * tx], vec![0f32; 4 * tx]),
        |(cols, line), (i, mc)| {
            let co = cos.start + i;
            for (ri, r) in rows.clone().enumerate() {
                let (bi, ty0) = (r / ty, r % ty);
                out_cols_1d(mc, cols, tx, nt, ri * tx);
                for a in 0..4 {
                    let y = 4 * ty0 + a;
                    if y >= oh {
                        break;
                    }
                    let at = (bi * cout + co) * oplane + y * ow;
                    let row = tail.row(co, at, ow);
                    match row.residual {
                        None => out_rows_1d(&cols[a * 6 * tx..(a + 1) * 6 * tx], line, tx, tx, row),
                        // (The line is 4·tx ≥ ow values: the residual, ow of them, added after.)
                        Some(_) => {
                            let plain = RowTail { residual: None, relu: false, ..row };
                            out_rows_1d(&cols[a * 6 * tx..(a + 1) * 6 * tx], line, tx, tx, plain);
                            row.finish(&mut line[..ow], 0);
                        }
                    }
                    // SAFETY: row y of plane (bi, co) is ow floats inside out (asserted above),
                    // written by this output channel only.
                    unsafe { std::ptr::copy_nonoverlapping(line[..ow].as_ptr(), outp.get().add(at), ow) };
                }
            }
        },
    );
}

simd! {
fn out_cols_1d(mc: &[f32], cols: &mut [f32], tx: usize, nt: usize, base: usize) {
    // cols[a][ν][t] = Σ_μ Aᵀ[a][μ] m[(μ·6 + ν)][base + t].
    for nu in 0..6 {
        let r = |mu: usize| &mc[(mu * 6 + nu) * nt + base..(mu * 6 + nu) * nt + base + tx];
        let (r0, r1, r2, r3, r4, r5) = (r(0), r(1), r(2), r(3), r(4), r(5));
        let [o0, o1, o2, o3] = runs::<4>(cols, nu * tx, 6 * tx, tx);
        let (r0, r1, r2, r3, r4, r5) = (&r0[..tx], &r1[..tx], &r2[..tx], &r3[..tx], &r4[..tx], &r5[..tx]);
        let (o0, o1, o2, o3) = (&mut o0[..tx], &mut o1[..tx], &mut o2[..tx], &mut o3[..tx]);
        for t in 0..tx {
            let o = output_1d([r0[t], r1[t], r2[t], r3[t], r4[t], r5[t]]);
            (o0[t], o1[t], o2[t], o3[t]) = (o[0], o[1], o[2], o[3]);
        }
    }
}
}

simd! {
fn out_rows_1d_any(cols: &[f32], line: &mut [f32], stride: usize, n: usize, tail: RowTail) {
    // line[4t + b] = Σ_ν cols[ν·stride + t] A[ν][b] + bias (+ the residual, then max(·, 0) under
    // `relu`), t < n.
    let c = |nu: usize| &cols[nu * stride..nu * stride + n];
    let (c0, c1, c2, c3, c4, c5) = (c(0), c(1), c(2), c(3), c(4), c(5));
    let (quads, _) = line[..4 * n].as_chunks_mut::<4>();
    let (bias, relu) = (tail.bias, tail.relu);
    match tail.residual {
        None => {
            for (t, q) in quads.iter_mut().enumerate() {
                let o = output_1d([c0[t], c1[t], c2[t], c3[t], c4[t], c5[t]]);
                *q = o.map(|v| relu_if(v + bias, relu));
            }
        }
        Some(r) => {
            let (rq, _) = r[..4 * n].as_chunks::<4>();
            for (t, (q, r)) in quads.iter_mut().zip(rq).enumerate() {
                let o = output_1d([c0[t], c1[t], c2[t], c3[t], c4[t], c5[t]]);
                *q = [0, 1, 2, 3].map(|b| join(o[b] + bias, r[b], relu));
            }
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_filter_transform_matches_the_portable_one_bit_for_bit() {
        // Whole groups of 16 channels, a tail, fewer than 16; signed zeros and large values.
        for cin in [16, 37, 64, 5] {
            let g: Vec<f32> = (0..9 * cin)
                .map(|i| match i % 11 {
                    0 => -0.0,
                    1 => 3.0e4,
                    _ => ((i * 7919) % 1013) as f32 / 97.0 - 5.0,
                })
                .collect();
            let (mut fast, mut portable) = (vec![f32::NAN; XI * cin], vec![f32::NAN; XI * cin]);
            filters_of(&g, &mut fast, cin);
            filters_of_from(&g, &mut portable, cin, 0);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&portable), "cin {cin}");
        }
    }

    #[test]
    fn vector_row_transforms_equal_the_compilers() {
        // The AVX-512 groups of 16 tiles and the AVX2 groups of 8 (each where the CPU has it)
        // against the plain loops on the same values, bit for bit (same operations in the same
        // order), for counts with and without a remainder, with and without the ReLU (a NaN kept
        // without it), with and without a residual, through the caches and streamed.
        let values = |n: usize, seed: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * seed).sin() * 3.0).collect() };
        let groups: Vec<usize> = [(16, fused::avx512()), (8, avx2_fma())].iter().filter(|g| g.1).map(|g| g.0).collect();
        eprintln!("groups of tiles with vector permutes here: {groups:?}");
        for (group, n) in groups.iter().flat_map(|&g| [1, 7, 8, 9, 15, 16, 17, 32, 40].map(|n| (g, n))) {
            let stride = n + 3;
            let line = values(4 * n + 4, 0.37);
            let (mut fast, mut plain) = (vec![0f32; 6 * stride], vec![0f32; 6 * stride]);
            rows_1d_by(group, &line, &mut fast, stride, n);
            rows_1d_any(&line, &mut plain, stride, n);
            assert_eq!(fast, plain, "rows_1d, groups of {group}, {n} tiles");
            let mut cols = values(6 * stride, 0.71);
            cols[0] = f32::NAN;
            let residual = values(4 * n, 0.53);
            for (relu, stream, res) in (0..8).map(|i| (i & 1 == 1, i & 2 == 2, i & 4 == 4)) {
                // Streamed stores need a line on a 64-byte boundary: one inside a larger buffer.
                let mut buf = vec![0f32; 4 * n + 16];
                let skip = buf.as_ptr().align_offset(64);
                let fast = &mut buf[skip..skip + 4 * n];
                let mut plain = vec![0f32; 4 * n];
                let tail = RowTail { bias: 0.25, residual: res.then_some(&residual[..]), relu };
                out_rows_1d_by(group, &cols, fast, (stride, n), tail, stream);
                out_rows_1d_any(&cols, &mut plain, stride, n, tail);
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let at = format!(
                    "out_rows_1d, groups of {group}, {n} tiles, relu {relu}, streamed {stream}, residual {res}"
                );
                assert_eq!(bits(fast), bits(&plain), "{at}");
                assert_eq!(fast[..4].iter().any(|v| v.is_nan()), !relu, "NaN in tile 0, {at}");
            }
        }
    }

    #[test]
    fn reentry_takes_fresh_buffers() {
        // As if a stolen job ran a convolution while this thread's buffers were in use.
        let sh = Shape { batch: 1, cin: 3, ih: 9, iw: 7, up: 1, pad: 1, cout: 2 };
        let x: Vec<f32> = (0..3 * 9 * 7).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..2 * 3 * 9).map(|i| (i as f32 * 0.11).cos()).collect();
        let tail = Tail { bias: None, residual: None, relu: false };
        let free = conv(&x, sh, Filters::F32(&w), tail);
        let held = BUFFERS.with_borrow_mut(|_| conv(&x, sh, Filters::F32(&w), tail));
        assert_eq!(free, held);
    }
}
