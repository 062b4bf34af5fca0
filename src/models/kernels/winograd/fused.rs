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
//! block of products in 24 zmm registers while it sums over the input channels (with AVX2, which
//! has 16 registers of 8 lanes, a 6-channel × 16-tile block in 12 ymm registers, four of them per
//! 12 × 32 block: the same sums in the same order, so the same values).
//!
//! With AVX-512 or AVX2 and FMA; other CPUs take the split path. The jobs over output channels
//! ([`conv_by_channels`]) transform their filters in zmm registers, or with AVX2 (and F16C) in two
//! halves of ymm registers ([`filters_by_lanes_avx2`]).

#[cfg(target_arch = "x86_64")]
use super::filter_2d_avx512;
use super::{
    cols_1d, fill_line, out_cols_1d, out_rows_1d, out_rows_1d_to, rows_1d, transform_filters, Filters, RowTail, Shape,
    Tail, XI,
};
use crate::models::kernels::{avx2_fma, grown, SendPtr};
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

/// Whether this CPU runs the fused path: AVX-512F, or AVX2 and FMA ([`kernel_avx2`]).
pub(super) fn available() -> bool {
    avx512() || avx2_fma()
}

/// Whether this CPU runs [`conv_by_channels`]: AVX-512F, or what [`filters_by_lanes_avx2`] needs.
pub(super) fn by_channels_available() -> bool {
    avx512() || avx2_f16c()
}

/// Whether this CPU has AVX2, FMA and F16C: [`filters_by_lanes_avx2`] (F16C widens the filters of
/// half-precision weights).
fn avx2_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2_fma() && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has AVX-512F (detected once): the micro-kernel in zmm registers, the
/// transforms' AVX-512 permutes and [`conv_by_channels`]' filter transform in zmm registers.
pub(super) fn avx512() -> bool {
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
    /// A job's transformed inputs (or filters), products and transform rows, kept between jobs and
    /// calls.
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
    // Written once ([`written`]; zeroing was a pass over the largest tensor of the layer): the
    // jobs write every value, each output row of each tile once, before the length is set.
    let len = sh.batch * cout * oh * ow;
    let write = |out: &mut [std::mem::MaybeUninit<f32>]| {
        let outp = SendPtr(out.as_mut_ptr() as *mut f32);
        let job = |j: usize, scratch: &mut Vec<f32>| {
            let need = XI * (stride(cin) + stride(cout)) + 36 * T + 8 * T;
            let (v, rest) = grown(scratch, need).split_at_mut(XI * stride(cin));
            let (m, rest) = rest.split_at_mut(XI * stride(cout));
            let (rows, line) = rest.split_at_mut(36 * T);
            let first = j * T;
            let tiles = first..(first + T).min(total);
            transform_inputs(x, sh, tiles.clone(), v, rows, line);
            products(&u, v, m, cin, cout);
            transform_outputs(m, sh, tiles, (0..cout, stride(cout)), tail, rows, line, outp);
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
    };
    // SAFETY: the tiles cover the output plane (4·ty ≥ oh, 4·tx ≥ ow), so the jobs wrote all
    // `len` values of every (image, channel) plane.
    unsafe { crate::models::kernels::written(len, write) }
}

/// Input channels per step of [`conv_by_channels`]: a job's transformed filters for them
/// (36 × KC × 16 floats, 147 KB per micro-tile of channels) stay in the L2 cache while every tile
/// passes them.
const KC: usize = 64;

/// Floats from one position ξ of a job's transformed filters to the next (kc rows of 16 lanes):
/// one cache line more, so that the 36 rows written for one input channel do not all fall into
/// one L1 set (with 64 channels they were 4 KB apart).
fn ustride(kc: usize) -> usize {
    kc * 16 + 16
}

/// Whether a wide layer with few tiles (the UNet's 32² layers at batch 1; with AVX2 its 16² ones
/// too, `winograd::worthwhile`) gains from
/// [`conv_by_channels`]: its products are then too small to pay for the split path's passes over
/// the transformed filters (36 × cin × cout f32 values written, packed again by the gemm crate and
/// read, on every call: 236 MB for a 1280 → 1280 layer whose products are 64 tiles wide); the
/// transformed inputs of all tiles, read by every job, within the kept buffer.
pub(super) fn suits_by_channels(sh: &Shape) -> bool {
    let (ty, tx) = sh.tiles();
    let tiles = sh.batch * ty * tx;
    tiles <= MAX_TILES_BY_CHANNELS && tiles.div_ceil(T) * XI * stride(sh.cin) <= 2 * super::BUDGET
}

/// See [`suits_by_channels`] (measured, docs/PERFORMANCE.md).
const MAX_TILES_BY_CHANNELS: usize = 64;

/// The convolution with the jobs over blocks of output channels instead of tiles, for wide layers
/// with few tiles: all tiles' inputs are transformed once (in parallel over blocks of tiles); each
/// job transforms its channels' filters [`KC`] input channels at a time into its own L2-sized
/// buffer and runs the products for every tile against them, each tile block's transformed inputs
/// read once from the shared buffer for all the job's micro-tiles, summing over the input channels
/// in its products (in the L2 cache), and transforms those back to its channels' output rows. The
/// transformed filters never pass through memory. The same result as the split path up to the
/// summation order of the products.
pub(super) fn conv_by_channels(x: &[f32], sh: Shape, w: Filters, tail: Tail) -> Vec<f32> {
    let (oh, ow) = sh.out_size();
    let (ty, tx) = sh.tiles();
    let (cin, cout) = (sh.cin, sh.cout);
    let total = sh.batch * ty * tx;
    let tblocks = total.div_ceil(T);
    let vlen = XI * stride(cin);
    let len = sh.batch * cout * oh * ow;
    // Micro-tiles per job: four where that leaves several jobs per thread, fewer otherwise.
    let threads = rayon::current_num_threads();
    let micros = [4, 2, 1].into_iter().find(|&n| cout.div_ceil(CO * n) >= 4 * threads).unwrap_or(1);
    let per_job = CO * micros;
    let write = |out: &mut [std::mem::MaybeUninit<f32>]| {
        let outp = SendPtr(out.as_mut_ptr() as *mut f32);
        crate::models::kernels::with_kept(&super::BUFFERS, |[_, v, _]| {
            // The split path's kept buffer for its transformed inputs (not zeroed: every value read
            // is written first; slots past the last tile hold stale values whose products are never
            // read back).
            super::kept_at_least(v, tblocks * vlen, 2 * super::BUDGET);
            v[..tblocks * vlen].par_chunks_mut(vlen).enumerate().for_each(|(tb, vb)| {
                crate::models::kernels::with_kept(&SCRATCH, |s| {
                    let (rows, line) = grown(s, 44 * T).split_at_mut(36 * T);
                    transform_inputs(x, sh, tb * T..((tb + 1) * T).min(total), vb, rows, line);
                })
            });
            let v = &v[..tblocks * vlen];
            let job = |jb: usize, scratch: &mut Vec<f32>| {
                let cos = jb * per_job..((jb + 1) * per_job).min(cout);
                let chans_of = |i: usize| cos.start + i * CO..(cos.start + (i + 1) * CO).min(cos.end);
                let mine = cos.len().div_ceil(CO);
                let (ulen, mlen) = (XI * ustride(KC), XI * stride(CO));
                let need = micros * ulen + micros * tblocks * mlen + 44 * T;
                let (u, rest) = grown(scratch, need).split_at_mut(micros * ulen);
                let (m, rest) = rest.split_at_mut(micros * tblocks * mlen);
                let (cols, line) = rest.split_at_mut(36 * T);
                for ci0 in (0..cin).step_by(KC) {
                    let kc = KC.min(cin - ci0);
                    for i in 0..mine {
                        let cs = chans_of(i);
                        // SAFETY: rows cs of the weight hold cin input channels; u's part holds
                        // 36 ξ rows of ustride(kc); conv only runs this where
                        // by_channels_available() said so (AVX-512F, or AVX2, FMA and F16C).
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            let (taps, u) = (Taps { w, co0: cs.start, cin }, &mut u[i * ulen..(i + 1) * ulen]);
                            match avx512() {
                                true => filters_by_lanes(taps, cs.len(), ci0, kc, u),
                                false => filters_by_lanes_avx2(taps, cs.len(), ci0, kc, u),
                            }
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let _ = (w, cs);
                    }
                    for tb in 0..tblocks {
                        let vb = &v[tb * vlen..];
                        // The tiles this block holds (a last block may hold fewer than T: batch
                        // 1's 16² layers have 16 in all).
                        let live = total - tb * T;
                        for xi in 0..XI {
                            // A tile block's inputs for ξ (kc rows of T, 8 KB) stay in L1 for the
                            // job's micro-tiles.
                            for i in 0..mine {
                                // SAFETY: u's ξ rows hold kc rows of 16 (≥ r) values; v's rows ci0 ..
                                // ci0 + kc of ξ hold T values; m's rows < r of ξ hold T values.
                                unsafe {
                                    tile(
                                        (chans_of(i).len(), live),
                                        u.as_ptr().add(i * ulen + xi * ustride(kc)),
                                        16,
                                        vb.as_ptr().add(xi * stride(cin) + ci0 * T),
                                        kc,
                                        m.as_mut_ptr().add((i * tblocks + tb) * mlen + xi * stride(CO)),
                                        ci0 > 0,
                                    )
                                };
                            }
                        }
                    }
                }
                for i in 0..mine {
                    for tb in 0..tblocks {
                        let tiles = tb * T..((tb + 1) * T).min(total);
                        let m = &m[(i * tblocks + tb) * mlen..][..mlen];
                        transform_outputs(m, sh, tiles, (chans_of(i), stride(CO)), tail, cols, line, outp);
                    }
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as in `conv`.
                unsafe {
                    std::arch::x86_64::_mm_sfence()
                };
            };
            (0..cout.div_ceil(per_job))
                .into_par_iter()
                .for_each(|jb| crate::models::kernels::with_kept(&SCRATCH, |kept| job(jb, kept)));
        });
    };
    // SAFETY: every channel's job wrote all its output planes (the tiles cover them).
    unsafe { crate::models::kernels::written(len, write) }
}

/// The 16 × 16 transpose of `rows` (row i's lane j → row j's lane i), in 64 shuffles.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    unsafe {
        // Pairs of rows interleaved by single values, then by pairs, then 128-bit lanes twice.
        let mut a = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut b = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            for h in 0..2 {
                let (x, y) = (_mm512_castps_pd(a[4 * i + h]), _mm512_castps_pd(a[4 * i + 2 + h]));
                // Element 2h and 2h + 1 of each 128-bit lane of rows 4i .. 4i + 4.
                b[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(x, y));
                b[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(x, y));
            }
        }
        let mut c = [_mm512_setzero_ps(); 16];
        for i in 0..2 {
            for q in 0..4 {
                c[8 * i + q] = _mm512_shuffle_f32x4::<0b10_00_10_00>(b[8 * i + q], b[8 * i + 4 + q]);
                c[8 * i + 4 + q] = _mm512_shuffle_f32x4::<0b11_01_11_01>(b[8 * i + q], b[8 * i + 4 + q]);
            }
        }
        let mut d = [_mm512_setzero_ps(); 16];
        for q in 0..8 {
            d[q] = _mm512_shuffle_f32x4::<0b10_00_10_00>(c[q], c[8 + q]);
            d[8 + q] = _mm512_shuffle_f32x4::<0b11_01_11_01>(c[q], c[8 + q]);
        }
        d
    }
}

/// The 8 × 8 transpose of `rows` (row i's lane j → row j's lane i), in 24 shuffles.
///
/// # Safety
/// Inlined only into functions compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    unsafe {
        // Pairs of rows interleaved by single values, then by pairs (columns q and q + 4 of four
        // rows in b[q]), then the 128-bit halves of rows 0–3 and 4–7 joined.
        let mut a = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut b = [_mm256_setzero_ps(); 8];
        for i in 0..2 {
            for h in 0..2 {
                let (x, y) = (_mm256_castps_pd(a[4 * i + h]), _mm256_castps_pd(a[4 * i + 2 + h]));
                b[4 * i + 2 * h] = _mm256_castpd_ps(_mm256_unpacklo_pd(x, y));
                b[4 * i + 2 * h + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(x, y));
            }
        }
        let mut d = [_mm256_setzero_ps(); 8];
        for q in 0..4 {
            d[q] = _mm256_permute2f128_ps::<0x20>(b[q], b[4 + q]);
            d[4 + q] = _mm256_permute2f128_ps::<0x31>(b[q], b[4 + q]);
        }
        d
    }
}

/// Where a job's filters come from: the weight as stored (OIHW), read from output channel `co0`'s
/// row on, one lane per output channel.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Taps<'a> {
    w: Filters<'a>,
    co0: usize,
    cin: usize,
}

/// `u[ξ][ci][lane]` (ξ rows [`ustride`] apart) = (G g Gᵀ)_ξ of the filters of input channels ci0 + ci (ci < kc) for `lanes`
/// output channels, 16 lanes per row (those past `lanes` zero): [`super::filter_2d_avx512`], as
/// in `filters_of_avx512`, across output channels instead of input channels, on the same widened values
/// (bf16 shifted, int8 codes less 128 times the channel's scale, as `dequantize_row`), so the
/// same results. The taps of 16 input channels come in as each lane's 144 consecutive values,
/// transposed in registers (gathers, one per tap, took longer than the products on a CPU where
/// they are microcoded); a last group of fewer channels is read value by value.
///
/// # Safety
/// The CPU has AVX-512F; rows co0 .. co0 + lanes of the weight hold input channels ci0 .. ci0 + kc.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn filters_by_lanes(src: Taps, lanes: usize, ci0: usize, kc: usize, u: &mut [f32]) {
    use std::arch::x86_64::*;
    let scales = src.checked(lanes, ci0, kc, u);
    let (w, row) = (src.w, |l: usize| src.row(l, ci0));
    let scale = _mm512_loadu_ps(scales.as_ptr());
    let q8 = matches!(w, Filters::Q8 { .. });
    // 16 consecutive values of a row from `at`, widened as `dequantize_row` / the bf16 shift /
    // the f16 conversion.
    #[inline(always)]
    unsafe fn load16(w: Filters, at: usize) -> __m512 {
        // SAFETY: the caller keeps at + 16 inside the weight.
        unsafe {
            match w {
                Filters::F32(w) => _mm512_loadu_ps(w.as_ptr().add(at)),
                Filters::F16(w) => _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(at) as *const __m256i)),
                Filters::Bf16(w) => {
                    let h = _mm256_loadu_si256(w.as_ptr().add(at) as *const __m256i);
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
                Filters::Q8 { codes, .. } => {
                    let b = _mm_loadu_si128(codes.as_ptr().add(at) as *const __m128i);
                    _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(128)))
                }
            }
        }
    }
    let full = kc / 16 * 16;
    let mut gt = [[_mm512_setzero_ps(); 9]; 16];
    for c0 in (0..full).step_by(16) {
        // Lane l's taps of channels c0 .. c0 + 16: 144 values, 9 vectors; block j of 16 of them
        // transposed gives the values (ci, k) = divmod(16j + t, 9) across the lanes.
        for j in 0..9 {
            let mut rows = [_mm512_setzero_ps(); 16];
            for (l, r) in rows.iter_mut().enumerate().take(lanes) {
                // SAFETY: 9·c0 + 16j + 16 ≤ 9·kc values of row l (asserted).
                *r = unsafe { load16(w, row(l) + 9 * c0 + 16 * j) };
            }
            let cols = unsafe { transpose16(rows) };
            for (t, &col) in cols.iter().enumerate() {
                let c = 16 * j + t;
                gt[c / 9][c % 9] = if q8 { _mm512_mul_ps(col, scale) } else { col };
            }
        }
        for (i, g) in gt.iter().enumerate() {
            unsafe { filter_2d_avx512(g, u.as_mut_ptr().add((c0 + i) * 16), ustride(kc)) };
        }
    }
    for ci in full..kc {
        let mut vals = [[0f32; 16]; 9];
        for (k, v) in vals.iter_mut().enumerate() {
            for (l, v) in v.iter_mut().enumerate().take(lanes) {
                *v = src.tap(row(l) + 9 * ci + k, scales[l]);
            }
        }
        let g = vals.map(|v| unsafe { _mm512_loadu_ps(v.as_ptr()) });
        unsafe { filter_2d_avx512(&g, u.as_mut_ptr().add(ci * 16), ustride(kc)) };
    }
}

/// [`filters_by_lanes`] with AVX2 (F16C for half-precision weights): each row's 16 lanes as two
/// halves of 8 output channels, the taps of 8 input channels read as each lane's 72 consecutive
/// values and transposed 8 × 8 in registers, then [`super::filter_2d_avx2`]: the same widened
/// values and the same operations in the same order, so the same results.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; rows co0 .. co0 + lanes of the weight hold input channels
/// ci0 .. ci0 + kc.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn filters_by_lanes_avx2(src: Taps, lanes: usize, ci0: usize, kc: usize, u: &mut [f32]) {
    use std::arch::x86_64::*;
    let scales = src.checked(lanes, ci0, kc, u);
    let (w, row) = (src.w, |l: usize| src.row(l, ci0));
    let q8 = matches!(w, Filters::Q8 { .. });
    // 8 consecutive values of a row from `at`, widened as in `filters_by_lanes`.
    #[inline(always)]
    unsafe fn load8(w: Filters, at: usize) -> __m256 {
        // SAFETY: the caller keeps at + 8 inside the weight.
        unsafe {
            match w {
                Filters::F32(w) => _mm256_loadu_ps(w.as_ptr().add(at)),
                Filters::F16(w) => _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(at) as *const __m128i)),
                Filters::Bf16(w) => {
                    let h = _mm_loadu_si128(w.as_ptr().add(at) as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                }
                Filters::Q8 { codes, .. } => {
                    let b = _mm_loadl_epi64(codes.as_ptr().add(at) as *const __m128i);
                    _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(128)))
                }
            }
        }
    }
    let full = kc / 8 * 8;
    for l0 in [0, 8] {
        // The lanes of this half that hold channels (none: zeros, as past `lanes` in any row).
        let live = lanes.saturating_sub(l0).min(8);
        let scale = _mm256_loadu_ps(scales.as_ptr().add(l0));
        let mut gt = [[_mm256_setzero_ps(); 9]; 8];
        for c0 in (0..full).step_by(8) {
            for j in 0..9 {
                let mut rows = [_mm256_setzero_ps(); 8];
                for (l, r) in rows.iter_mut().enumerate().take(live) {
                    // SAFETY: 9·c0 + 8j + 8 ≤ 9·kc values of row l0 + l (checked).
                    *r = unsafe { load8(w, row(l0 + l) + 9 * c0 + 8 * j) };
                }
                let cols = unsafe { transpose8(rows) };
                for (t, &col) in cols.iter().enumerate() {
                    let c = 8 * j + t;
                    gt[c / 9][c % 9] = if q8 { _mm256_mul_ps(col, scale) } else { col };
                }
            }
            for (i, g) in gt.iter().enumerate() {
                unsafe { super::filter_2d_avx2(g, u.as_mut_ptr().add((c0 + i) * 16 + l0), ustride(kc)) };
            }
        }
        for ci in full..kc {
            let mut vals = [[0f32; 8]; 9];
            for (k, v) in vals.iter_mut().enumerate() {
                for (l, v) in v.iter_mut().enumerate().take(live) {
                    *v = src.tap(row(l0 + l) + 9 * ci + k, scales[l0 + l]);
                }
            }
            let g = vals.map(|v| unsafe { _mm256_loadu_ps(v.as_ptr()) });
            unsafe { super::filter_2d_avx2(&g, u.as_mut_ptr().add(ci * 16 + l0), ustride(kc)) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Taps<'_> {
    /// Where lane `l`'s taps of input channel `ci0` start in the weight.
    fn row(&self, l: usize, ci0: usize) -> usize {
        (self.co0 + l) * self.cin * 9 + ci0 * 9
    }

    /// Checks what [`filters_by_lanes`] reads and writes (panics otherwise); the int8 codes'
    /// scales, one per lane (1 for the others: the same products as no scaling).
    fn checked(&self, lanes: usize, ci0: usize, kc: usize, u: &[f32]) -> [f32; 16] {
        assert!((1..=16).contains(&lanes) && u.len() >= XI * ustride(kc) && ci0 + kc <= self.cin);
        let len = match self.w {
            Filters::F32(w) => w.len(),
            Filters::F16(w) => w.len(),
            Filters::Bf16(w) => w.len(),
            Filters::Q8 { codes, .. } => codes.len(),
        };
        assert!(self.row(lanes - 1, ci0) + 9 * kc <= len);
        let mut scales = [1f32; 16];
        if let Filters::Q8 { scales: s, .. } = self.w {
            scales[..lanes].copy_from_slice(&s[self.co0..self.co0 + lanes]);
        }
        scales
    }

    /// The weight's value at `at` widened (an int8 code less 128, times `scale`).
    fn tap(&self, at: usize, scale: f32) -> f32 {
        match self.w {
            Filters::F32(w) => w[at],
            Filters::F16(w) => w[at].to_f32(),
            Filters::Bf16(w) => w[at].to_f32(),
            Filters::Q8 { codes, .. } => (codes[at].0 as i32 - 128) as f32 * scale,
        }
    }
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

/// Output rows of the tiles `tiles` for the channels `cos` (m's rows from `cos.start`, its ξ rows
/// `mstride` apart): Aᵀ M A plus the bias (and the ReLU), into `out` (NCHW, the whole
/// layer's output; each job writes its own tiles' rows of its own channels).
#[allow(clippy::too_many_arguments)]
fn transform_outputs(
    m: &[f32],
    sh: Shape,
    tiles: std::ops::Range<usize>,
    (cos, mstride): (std::ops::Range<usize>, usize),
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
    for co in cos.clone() {
        out_cols_1d(m, cols, T, mstride, (co - cos.start) * T);
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
            // available() said the CPU has AVX-512F or AVX2 and FMA.
            unsafe {
                tile((cout - co0, T), ux.as_ptr().add(co0), cout, vx.as_ptr(), cin, mx.as_mut_ptr().add(co0 * T), false)
            }
        }
    }
}

/// One micro-tile of `min(rest, CO)` output channels; `add`: onto the products already in `m`;
/// `live`: the tiles among the T that hold values (the AVX2 kernel leaves a block of 16 with none
/// alone: its products would never be read).
///
/// # Safety
/// As in [`products`]; [`available`] is true.
unsafe fn tile(
    (rest, live): (usize, usize),
    u: *const f32,
    ustride: usize,
    v: *const f32,
    cin: usize,
    m: *mut f32,
    add: bool,
) {
    // SAFETY: the caller's; avx512() picks the kernel the CPU has.
    unsafe { tile_on(avx512(), (rest, live), (u, ustride), v, cin, m, add) }
}

/// [`tile`] with the AVX-512 kernel (`zmm`) or the AVX2 one: tests run both where the CPU has them.
///
/// # Safety
/// As in [`products`]; the CPU has AVX-512F (`zmm`) or AVX2 and FMA.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_macros))]
unsafe fn tile_on(
    zmm: bool,
    (rest, live): (usize, usize),
    (u, ustride): (*const f32, usize),
    v: *const f32,
    cin: usize,
    m: *mut f32,
    add: bool,
) {
    macro_rules! by_rows {
        ($rows:expr, $kernel:ident $args:tt; $($r:literal)*) => {
            match $rows {
                $($r => $kernel::<$r> $args,)*
                _ => unreachable!("1 ≤ rows ≤ CO"),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's; the blocks of the AVX2 kernel lie inside the micro-tile.
    unsafe {
        if zmm {
            by_rows!(rest.min(CO), kernel(u, ustride, v, cin, m, add); 1 2 3 4 5 6 7 8 9 10 11 12)
        } else {
            let rows = rest.min(CO);
            for r0 in (0..rows).step_by(CO2) {
                for h in (0..live.min(T)).step_by(16) {
                    let (u, v, m) = (u.add(r0), v.add(h), m.add(r0 * T + h));
                    by_rows!((rows - r0).min(CO2), kernel_avx2(u, ustride, v, cin, m, add); 1 2 3 4 5 6)
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false off x86-64")
}

/// `m[r][0..T] (+)= Σ_ci u[ci·ustride + r] · v[ci·T + 0..T]` for r < R, the R × T block in
/// registers (`add`: this block's sum added to the values in m, as a blocked sum: continuing one
/// chain over 1200 input channels put the result 2.4e-5 from f64 where the split path's gemm is
/// 8e-6).
///
/// # Safety
/// As in [`products`]; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const R: usize>(u: *const f32, ustride: usize, v: *const f32, cin: usize, m: *mut f32, add: bool) {
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
            let (mut a0, mut a1) = (acc[0], acc[1]);
            if add {
                a0 = _mm512_add_ps(_mm512_loadu_ps(m.add(r * T)), a0);
                a1 = _mm512_add_ps(_mm512_loadu_ps(m.add(r * T + 16)), a1);
            }
            _mm512_storeu_ps(m.add(r * T), a0);
            _mm512_storeu_ps(m.add(r * T + 16), a1);
        }
    }
}

/// Output channels per block of [`kernel_avx2`] (with 16 tiles: 12 accumulators of the 16 ymm
/// registers, two for the inputs and one for the broadcast filter value).
#[cfg(target_arch = "x86_64")]
const CO2: usize = 6;

/// [`kernel`] for 16 of the T tiles (`v` and `m` point at the first; rows still T apart) in ymm
/// registers: `m[r][0..16] (+)= Σ_ci u[ci·ustride + r] · v[ci·T + 0..16]` for r < R ≤ [`CO2`], each
/// value summed in the same order with the same fused multiply-adds as [`kernel`].
///
/// # Safety
/// As in [`products`] for the 16 tiles; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<const R: usize>(
    u: *const f32,
    ustride: usize,
    v: *const f32,
    cin: usize,
    m: *mut f32,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for ci in 0..cin {
        // SAFETY: in bounds per the caller.
        unsafe {
            let (v0, v1) = (_mm256_loadu_ps(v.add(ci * T)), _mm256_loadu_ps(v.add(ci * T + 8)));
            let ur = u.add(ci * ustride);
            for (r, acc) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(*ur.add(r));
                acc[0] = _mm256_fmadd_ps(b, v0, acc[0]);
                acc[1] = _mm256_fmadd_ps(b, v1, acc[1]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: in bounds per the caller.
        unsafe {
            let (mut a0, mut a1) = (acc[0], acc[1]);
            if add {
                a0 = _mm256_add_ps(_mm256_loadu_ps(m.add(r * T)), a0);
                a1 = _mm256_add_ps(_mm256_loadu_ps(m.add(r * T + 8)), a1);
            }
            _mm256_storeu_ps(m.add(r * T), a0);
            _mm256_storeu_ps(m.add(r * T + 8), a1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_filter_transforms_match_the_portable_one_bit_for_bit() {
        // Each by-channels filter transform the CPU has (AVX-512's 16 lanes, AVX2's two halves
        // of 8) against filter_1d over columns then rows, value by value, bit for bit, on f32,
        // f16, bf16 and int8 weights: whole groups of input channels with a tail and without,
        // a step of them from an offset, 1 to 16 lanes from an offset output channel, the lanes
        // past them zero. Signed zeros and large values among the taps.
        #[cfg(target_arch = "x86_64")]
        {
            type Transform = unsafe fn(Taps, usize, usize, usize, &mut [f32]);
            let mut transforms: Vec<(&str, Transform)> = Vec::new();
            if avx512() {
                transforms.push(("avx512", filters_by_lanes));
            }
            if avx2_f16c() {
                transforms.push(("avx2", filters_by_lanes_avx2));
            }
            eprintln!("filter transforms here: {:?}", transforms.iter().map(|t| t.0).collect::<Vec<_>>());
            let (cout, cin) = (19, 37);
            let raw: Vec<f32> = (0..cout * cin * 9)
                .map(|i| match i % 13 {
                    0 => -0.0,
                    1 => 3.0e4,
                    _ => ((i * 7919) % 1013) as f32 / 97.0 - 5.0,
                })
                .collect();
            let f16: Vec<half::f16> = raw.iter().map(|&v| half::f16::from_f32(v)).collect();
            let bf16: Vec<half::bf16> = raw.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let codes: Vec<crate::models::gemm_bf16::Q8> =
                (0..raw.len()).map(|i| crate::models::gemm_bf16::Q8(((i * 37) % 256) as u8)).collect();
            let scales: Vec<f32> = (0..cout).map(|c| 0.01 + c as f32 * 1.7e-3).collect();
            let kinds = [
                ("f32", Filters::F32(&raw)),
                ("f16", Filters::F16(&f16)),
                ("bf16", Filters::Bf16(&bf16)),
                ("q8", Filters::Q8 { codes: &codes, scales: &scales }),
            ];
            for ((name, transform), (kind, w)) in transforms.iter().flat_map(|t| kinds.iter().map(move |k| (t, k))) {
                for (lanes, co0) in [(1, 0), (7, 3), (8, 0), (9, 10), (12, 7), (16, 2)] {
                    for (ci0, kc) in [(0, 37), (0, 32), (5, 16), (3, 11)] {
                        let taps = Taps { w: *w, co0, cin };
                        let mut u = vec![f32::NAN; XI * ustride(kc)];
                        let scales = taps.checked(lanes, ci0, kc, &u);
                        // SAFETY: the CPU has the transform's instructions (filtered above); rows
                        // co0 .. co0 + lanes hold cin input channels, u 36 rows of ustride(kc).
                        unsafe { transform(taps, lanes, ci0, kc, &mut u) };
                        for ci in 0..kc {
                            for l in 0..16 {
                                let want = if l < lanes {
                                    let g = |k: usize| taps.tap(taps.row(l, ci0) + 9 * ci + k, scales[l]);
                                    let [c0, c1, c2] =
                                        [0, 1, 2].map(|kx| super::super::filter_1d([g(kx), g(3 + kx), g(6 + kx)]));
                                    (0..XI)
                                        .map(|xi| super::super::filter_1d([c0[xi / 6], c1[xi / 6], c2[xi / 6]])[xi % 6])
                                        .collect()
                                } else {
                                    vec![0.0; XI]
                                };
                                for (xi, want) in want.iter().enumerate() {
                                    let got = u[xi * ustride(kc) + ci * 16 + l];
                                    let at = format!("{name} {kind}: lanes {lanes} from {co0}, ci {ci} of {kc} from {ci0}, lane {l}, ξ {xi}");
                                    // (Lanes past the channels: zero of either sign.)
                                    let same = if l < lanes { got.to_bits() == want.to_bits() } else { got == 0.0 };
                                    assert!(same, "{at}: {got} against {want}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn micro_kernels_sum_in_order_with_fused_multiply_adds() {
        // Each kernel the CPU has (AVX-512's 12 × 32 block, AVX2's four 6 × 16 ones) against a
        // plain chain of f32::mul_add over the input channels, bit for bit: the fused path's
        // results do not depend on which of them ran. Every row count of a micro-tile, written
        // and added onto, with the rows past it left alone.
        let kernels: Vec<bool> = [(true, avx512()), (false, avx2_fma())].iter().filter(|k| k.1).map(|k| k.0).collect();
        eprintln!("micro-kernels here (zmm?): {kernels:?}");
        let values = |n: usize, seed: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * seed).sin() * 2.0).collect() };
        let ustride = CO + 3;
        for (zmm, cin, rest, add) in kernels.iter().flat_map(|&z| {
            [1, 5, 70]
                .into_iter()
                .flat_map(move |c| (1..=CO + 1).flat_map(move |r| [(z, c, r, false), (z, c, r, true)]))
        }) {
            let (u, v) = (values(cin * ustride, 0.37), values(cin * T, 0.71));
            let before = values(CO * T + T, 0.53);
            let mut m = before.clone();
            // SAFETY: u holds cin rows of ustride ≥ CO, v cin rows of T, m CO + 1 rows of T; the
            // CPU has the kernel's instructions (filtered above).
            unsafe { tile_on(zmm, (rest, T), (u.as_ptr(), ustride), v.as_ptr(), cin, m.as_mut_ptr(), add) };
            for r in 0..CO + 1 {
                for t in 0..T {
                    let sum = (0..cin).fold(0f32, |a, ci| u[ci * ustride + r].mul_add(v[ci * T + t], a));
                    let want = match (r < rest.min(CO), add) {
                        (false, _) => before[r * T + t],
                        (true, false) => sum,
                        (true, true) => before[r * T + t] + sum,
                    };
                    let at = format!("zmm {zmm}, {cin} channels, {rest} rows, add {add}: row {r}, tile {t}");
                    assert_eq!(m[r * T + t].to_bits(), want.to_bits(), "{at}");
                }
            }
        }
    }
}
