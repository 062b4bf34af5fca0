//! Matrix products in bf16 with f32 accumulation on CPUs with AVX512_BF16 (`vdpbf16ps`: each f32
//! lane adds the products of one pair of bf16 values per step, twice the multiply-adds of an f32
//! FMA per instruction). What `torch.autocast("cpu", torch.bfloat16)` does for convolutions and
//! linear layers through oneDNN: operands rounded to bf16 (round to nearest even), products summed
//! in f32; unlike autocast, the result stays f32 instead of being rounded to bf16 again.
//!
//! Layout (the usual BLIS/GotoBLAS blocking, van Zee & van de Geijn 2015, "BLIS: A Framework for
//! Rapidly Instantiating BLAS Functionality"): `C[m×n] (+)= scale · A[m×k] · B[k×n]` is cut into
//! blocks of `KC` along k; B is packed per block into slivers of `NR` columns where each 32-bit
//! word holds the pair (B[2p][j], B[2p+1][j]); A is read in pairs (A[i][2p], A[i][2p+1]) broadcast
//! to all lanes, either in place from bf16 weights with an even row length (no copy of the weights,
//! which stay where the loader put them) or from a packed copy of anything else (f32 activations,
//! odd k). The micro-kernel keeps an `MR × NR` tile of C in 24 of the 32 zmm registers.
//!
//! On CPUs with AMX-BF16 (Intel Xeon 4th generation and later) the same packed layouts feed the
//! tile unit instead ([`amx`]): a sliver's [pair][NR] words are exactly the "VNNI" layout a B tile
//! loads (16 pairs × 16 columns, rows NR words apart), and A's [row][pair] words an A tile's (16
//! rows × 16 pairs), so the micro-kernel computes 32 × 48 of C in six tile registers, 16 pairs
//! at a time (`tdpbf16ps`: 8192 multiply-adds per instruction), with the pairs past the last whole
//! 16 and the epilogue in AVX-512. Intel's reference: "Intel Architecture Instruction Set
//! Extensions Programming Reference", ch. 3 (AMX); oneDNN's brgemm kernels use the same blocking.
//!
//! [`available`] says whether the CPU has the instructions; callers fall back to f32 otherwise.

use super::kernels::{f32_to_bf16, with_kept};
use half::bf16;
use rayon::prelude::*;

/// Rows of A per micro-tile.
const MR: usize = 8;
/// Columns of B per micro-tile (three zmm registers of 16 f32).
pub(crate) const NR: usize = 48;
/// Pairs of k per block ([`kc_pairs`]) for the AVX512_BF16 kernel: a packed B sliver (192 × NR
/// words = 36 KB) stays in L1.
const KC_PAIRS: usize = 192;
/// Pairs of k per block on AMX machines: each block's sums go through C once (read, added,
/// written), which at 192 pairs was 14 % of a UNet call in the epilogue; 768 writes C a quarter
/// as often, and the tile loads keep their pace with the 147 KB sliver in L2 (microbenchmark:
/// 950–1000 multiply-adds per ns per core either way). Still the best with the sums going to C
/// straight from the tiles (UNet batch-1 call, bf16, at 192 / 384 / 768 / 1536 pairs; the UNet's
/// linear shapes at 64 / 128 / 768).
const KC_PAIRS_AMX: usize = 768;

/// The k block length this process packs and multiplies with (one value for the whole process,
/// so packed operands and products always agree; [`without_amx`] keeps it).
fn kc_pairs() -> usize {
    if amx_supported() {
        KC_PAIRS_AMX
    } else {
        KC_PAIRS
    }
}
/// Columns per packed B block (a job's unit of work): 8 slivers, 295 KB in L2.
const NC: usize = 8 * NR;
/// Rows of A per AMX micro-tile: two tiles of 16 rows (four panels of MR), times a sliver's three
/// tiles of 16 columns: six of the eight tile registers hold the sums, one A and one B.
pub const AMX_ROWS: usize = 32;
// `amx::products` is written for two tiles of 16 rows.
const _: () = assert!(AMX_ROWS == 32);
const AMX_PANELS: usize = AMX_ROWS / MR;

/// One AMX micro-tile's sums as the tiles store them ([`amx::products`]), 64-byte aligned.
#[repr(C, align(64))]
struct Sums([f32; AMX_ROWS * NR]);

/// Whether this CPU computes bf16 dot products (`avx512_bf16`), detected once.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU multiplies bf16 tiles (AMX-BF16: Intel Xeon 4th generation, Sapphire Rapids,
/// and later) and the kernel lets this process use them (Linux hands out the tile registers' 8 KB
/// of state only on request, `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; a tile
/// instruction without it is SIGILL). Detected and requested once; false elsewhere, and on the
/// calling thread inside [`without_amx`].
pub fn amx() -> bool {
    !NO_AMX.with(|n| n.get()) && amx_supported()
}

/// CPU and OS allow AMX, unless `GHIBLIFY_AMX=0`/`off` (read once: the AVX512_BF16 kernel
/// instead, for comparisons or a system whose AMX misbehaves).
fn amx_supported() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let off = matches!(std::env::var("GHIBLIFY_AMX").as_deref().map(str::trim), Ok("0" | "off"));
        !off && available() && amx::enable()
    })
}

thread_local! {
    static NO_AMX: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether [`without_amx`] holds on this thread.
pub(crate) fn amx_switched_off() -> bool {
    NO_AMX.get()
}

/// Runs `f` as on a CPU without AMX, on this thread (the products it starts take the AVX512_BF16
/// micro-kernel): how the tests reach that kernel on AMX machines, and how benches compare them.
pub fn without_amx<T>(f: impl FnOnce() -> T) -> T {
    let before = NO_AMX.with(|n| n.replace(true));
    let out = f();
    NO_AMX.with(|n| n.set(before));
    out
}

/// Whether bf16 products pay on this CPU: AMX tiles (16 × 16 × 32 multiply-adds per instruction,
/// ~5× the f32 FMAs' rate in practice), or its `vdpbf16ps` (32 multiply-adds) at least 0.75× the
/// multiply-add rate of its f32 FMAs (16 each), timed once (~1 ms: best of five short runs of
/// each, interleaved). Where the instruction has the FMA's rate (AMD Zen 4 and 5) bf16 doubles
/// it; on Intel's Xeon 4th and 5th generation (Sapphire and Emerald Rapids) it ran at a quarter
/// (~0.45 per cycle against two FMAs), so the f32 products win there and bf16 saves memory only.
pub fn pays() -> bool {
    static PAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAYS.get_or_init(|| amx_supported() || (available() && pays_at(rates())))
}

/// [`pays`]' rule on measured instruction rates (per second): bf16 dot products, f32 FMAs.
fn pays_at((dot, fma): (f64, f64)) -> bool {
    2.0 * dot >= 0.75 * fma
}

/// Instructions per second of `vdpbf16ps` and of `vfmadd231ps` on zmm registers, 12 independent
/// sums each (more than either's latency × throughput), best of five interleaved runs.
#[cfg(target_arch = "x86_64")]
fn rates() -> (f64, f64) {
    use std::arch::x86_64::*;
    const ITERS: usize = 4096;
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn dots(x: __m512) -> __m512 {
        let v: __m512bh = unsafe { std::mem::transmute(x) };
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..ITERS {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, v, v);
            }
        }
        acc.iter().fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a))
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn fmas(x: __m512) -> __m512 {
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..ITERS {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(x, x, *a);
            }
        }
        acc.iter().fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a))
    }
    // Small values (bf16 pairs of 2⁻⁸, f32 2⁻⁸): sums stay normal, far from overflow.
    let x = unsafe { _mm512_castsi512_ps(_mm512_set1_epi32(std::hint::black_box(0x3b80_3b80))) };
    let time = |f: unsafe fn(__m512) -> __m512| {
        let t = std::time::Instant::now();
        // SAFETY: available() said the CPU has the instructions.
        std::hint::black_box(unsafe { f(x) });
        (12 * ITERS) as f64 / t.elapsed().as_secs_f64().max(1e-9)
    };
    let (mut dot, mut fma) = (0f64, 0f64);
    for _ in 0..5 {
        dot = dot.max(time(dots));
        fma = fma.max(time(fmas));
    }
    (dot, fma)
}

#[cfg(not(target_arch = "x86_64"))]
fn rates() -> (f64, f64) {
    (0.0, 1.0)
}

/// An element a matrix can be read from, rounded to bf16 bits.
pub trait Elem: Copy + Send + Sync {
    /// Whether a pair of consecutive values is already the word the products read (bf16: its two
    /// values' bits, low half first), so a pair-aligned run can be read as words.
    const WORDS: bool = false;

    fn bf16_bits(self) -> u32;

    /// `out[p] = (src[2p], src[2p + 1])` as bf16 bits, low half first; a missing last half is 0.
    #[inline(always)]
    fn pack_pairs(src: &[Self], out: &mut [u32]) {
        pack_pairs_scalar(src, out)
    }
}

/// [`Elem::pack_pairs`] one pair at a time.
#[inline(always)]
fn pack_pairs_scalar<T: Elem>(src: &[T], out: &mut [u32]) {
    for (p, d) in out.iter_mut().enumerate() {
        let lo = src.get(2 * p).map_or(0, |x| x.bf16_bits());
        let hi = src.get(2 * p + 1).map_or(0, |x| x.bf16_bits());
        *d = lo | (hi << 16);
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn pack_pairs(src: &[f32], out: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the CPU has AVX-512 (and more).
            unsafe { pack_pairs_f32_avx512(src, out) };
            return;
        }
        pack_pairs_scalar(src, out)
    }

    /// Round to nearest even (what `vcvtneps2bf16` and PyTorch's `.to(torch.bfloat16)` do); NaN
    /// stays a quiet NaN instead of being carried into the exponent by the rounding add.
    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        let b = self.to_bits();
        let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
        if self.is_nan() {
            (b >> 16) | 0x40
        } else {
            rounded
        }
    }
}

/// [`Elem::pack_pairs`] for f32, 32 values at a time: each value rounded to nearest even in its
/// 32-bit lane (NaN kept quiet), then the upper 16 bits of every lane gathered ([`pack_lanes`]).
///
/// # Safety
/// The CPU has AVX-512F/BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_pairs_f32_avx512(src: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    pack_lanes(src, out, |p| rounded_lanes(_mm512_loadu_ps(p)))
}

/// 16 f32 values rounded to bf16 in their lanes: the upper 16 bits of each lane are
/// [`Elem::bf16_bits`] of the value (nearest even, NaN kept quiet).
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn rounded_lanes(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let b = _mm512_castps_si512(v);
    let odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    let nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x0040_0000)))
}

/// Packs `src` 32 values at a time: `lanes(p)` gives 16 values from `p` as 32-bit lanes whose upper
/// halves are their bf16 bits, and one two-source word permutation gathers those halves in order;
/// the tail goes one pair at a time.
///
/// # Safety
/// The CPU has AVX-512F/BW; `lanes` reads 16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn pack_lanes<T: Elem>(src: &[T], out: &mut [u32], lanes: impl Fn(*const T) -> std::arch::x86_64::__m512i) {
    use std::arch::x86_64::*;
    let idx = _mm512_set_epi16(
        63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9,
        7, 5, 3, 1,
    );
    let full = (src.len() / 32).min(out.len() / 16);
    for c in 0..full {
        let lo = lanes(src.as_ptr().add(32 * c));
        let hi = lanes(src.as_ptr().add(32 * c + 16));
        _mm512_storeu_si512(out.as_mut_ptr().add(16 * c) as *mut _, _mm512_permutex2var_epi16(lo, idx, hi));
    }
    pack_pairs_scalar(&src[(32 * full).min(src.len())..], &mut out[16 * full..]);
}

impl Elem for bf16 {
    const WORDS: bool = true;

    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        self.to_bits() as u32
    }

    /// Already bf16: the pairs are the values' own bytes (little-endian words, low half first).
    #[inline(always)]
    fn pack_pairs(src: &[bf16], out: &mut [u32]) {
        let whole = (src.len() / 2).min(out.len());
        for (d, pair) in out[..whole].iter_mut().zip(src.chunks_exact(2)) {
            *d = pair[0].to_bits() as u32 | ((pair[1].to_bits() as u32) << 16);
        }
        pack_pairs_scalar(&src[2 * whole..], &mut out[whole..]);
    }
}

/// An int8 weight code stored offset by 128 (`code = q + 128`, q in [-127, 127]): the integer q is
/// exact in bf16 (8 significant bits), so a quantised weight enters the product without rounding
/// and its per-channel scale is applied to the f32 sums ([`Scale`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Q8(pub u8);

impl Elem for Q8 {
    #[inline(always)]
    fn pack_pairs(src: &[Q8], out: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the CPU has AVX-512 (and more).
            unsafe { pack_pairs_q8_avx512(src, out) };
            return;
        }
        pack_pairs_scalar(src, out)
    }

    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        // Exact: |q| ≤ 128 has at most 8 significant bits, so truncating the f32 loses nothing.
        ((self.0 as i32 - 128) as f32).to_bits() >> 16
    }
}

/// [`Elem::pack_pairs`] for int8 codes, 32 at a time: widened to i32, offset removed, converted to
/// f32 (exact), gathered as for f32 ([`pack_lanes`]).
///
/// # Safety
/// The CPU has AVX-512F/BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_pairs_q8_avx512(src: &[Q8], out: &mut [u32]) {
    use std::arch::x86_64::*;
    pack_lanes(src, out, |p| {
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(128))))
    })
}

/// What multiplies the product's f32 sums before they are stored: a constant, times a factor per
/// row of C and/or per column of C when given (the per-channel scales of int8 weights: per row
/// when the weight is A, per column when it is B); then a bias per column of C (a linear layer's),
/// added when the product writes C rather than accumulating into it: the output need not be
/// filled with the bias first and read back (two passes over an output of up to 42 MB in the
/// UNet's feed-forward layers).
#[derive(Clone, Copy, Debug)]
pub struct Scale<'a> {
    pub all: f32,
    pub rows: Option<&'a [f32]>,
    pub cols: Option<&'a [f32]>,
    pub bias: Option<&'a [f32]>,
    /// C holds bf16 values (`c` points at them, `ldc` counts them): each result rounded to
    /// nearest even as [`Elem::bf16_bits`] rounds an f32 operand, for a result whose only reader
    /// is another bf16 product, which then reads the very words it would have packed. Only for
    /// products that write C in one k block ([`one_k_block`]).
    pub bf16_c: bool,
}

impl Scale<'_> {
    pub const ONE: Scale<'static> = Scale { all: 1.0, rows: None, cols: None, bias: None, bf16_c: false };

    pub fn all(all: f32) -> Scale<'static> {
        Scale { all, ..Scale::ONE }
    }
}

/// [`Scale`] as the micro-kernel reads it for one tile: the row and column factors and the bias
/// from the tile's first row and column (null: none).
#[derive(Clone, Copy)]
struct TileScale {
    all: f32,
    rows: *const f32,
    cols: *const f32,
    bias: *const f32,
    bf16_c: bool,
}

impl Scale<'_> {
    /// # Safety
    /// Row i0 and column js lie inside the scaled matrix.
    #[inline(always)]
    unsafe fn tile(&self, i0: usize, js: usize) -> TileScale {
        let at = |v: Option<&[f32]>, i: usize| v.map_or(std::ptr::null(), |v| unsafe { v.as_ptr().add(i) });
        TileScale {
            all: self.all,
            rows: at(self.rows, i0),
            cols: at(self.cols, js),
            bias: at(self.bias, js),
            bf16_c: self.bf16_c,
        }
    }

    /// Where C's element `at` (row-major, in C's elements) lies: C's pointer is to bf16 values
    /// when [`Scale::bf16_c`].
    #[inline(always)]
    fn c_at(&self, c: *mut f32, at: usize) -> *mut f32 {
        if self.bf16_c {
            (c as *mut bf16).wrapping_add(at) as *mut f32
        } else {
            c.wrapping_add(at)
        }
    }
}

/// `len` bf16 values of a bf16 C from its element `at` ([`Scale::bf16_c`]), to be written.
///
/// # Safety
/// C (`c`, pointing at bf16 values) holds them, and nothing else refers to them meanwhile.
unsafe fn bf16_run<'a>(c: *mut f32, at: usize, len: usize) -> &'a mut [std::mem::MaybeUninit<bf16>] {
    unsafe { std::slice::from_raw_parts_mut((c as *mut std::mem::MaybeUninit<bf16>).add(at), len) }
}

/// A read-only matrix view: element (i, j) at `ptr + i·rs + j·cs` (in elements).
#[derive(Clone, Copy)]
pub struct View<T> {
    pub ptr: *const T,
    pub rs: usize,
    pub cs: usize,
}

// SAFETY: a view is only read, from threads that all outlive the call that made it.
unsafe impl<T: Sync> Send for View<T> {}
unsafe impl<T: Sync> Sync for View<T> {}

impl<T: Elem> View<T> {
    /// # Safety
    /// (i, j) must lie inside the viewed matrix.
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> u32 {
        unsafe { (*self.ptr.add(i * self.rs + j * self.cs)).bf16_bits() }
    }
}

/// The left operand: bf16 rows read in place (even k, unit column stride), or any view packed.
#[derive(Clone, Copy)]
pub enum Lhs<T> {
    InPlace { ptr: *const bf16, rs: usize },
    Packed(View<T>),
}

/// Packs rows [i0, i0 + MR) × pairs [k0/2, k0/2 + pairs) of A as [row][pair] words (rows past m
/// and values past k are zero).
///
/// # Safety
/// The view must cover m × k; the CPU has AVX-512 (checked by the caller through [`available`]).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw,avx512vl"))]
unsafe fn pack_a<T: Elem>(a: &View<T>, (m, k): (usize, usize), i0: usize, k0: usize, pairs: usize, out: &mut [u32]) {
    for (r, dst) in out.chunks_mut(pairs).enumerate().take(MR) {
        let i = i0 + r;
        if i >= m {
            dst.fill(0);
        } else if a.cs == 1 {
            let len = (2 * pairs).min(k - k0);
            let src = unsafe { std::slice::from_raw_parts(a.ptr.add(i * a.rs + k0), len) };
            T::pack_pairs(src, dst);
        } else {
            for (p, d) in dst.iter_mut().enumerate() {
                let kk = k0 + 2 * p;
                let lo = if kk < k { unsafe { a.at(i, kk) } } else { 0 };
                let hi = if kk + 1 < k { unsafe { a.at(i, kk + 1) } } else { 0 };
                *d = lo | (hi << 16);
            }
        }
    }
}

/// Packs columns [j0, j0 + cols) × pairs [k0/2, k0/2 + pairs) of B into slivers of NR columns,
/// each [pair][column] words (columns past n and the half-pair past k are zero).
///
/// # Safety
/// The view must cover k × n; the CPU has AVX-512 (checked by the caller through [`available`]), so
/// the f32 → bf16 rounding runs 16 lanes wide.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw,avx512vl"))]
unsafe fn pack_b<T: Elem>(
    b: &View<T>,
    (k, n): (usize, usize),
    j0: usize,
    cols: usize,
    k0: usize,
    pairs: usize,
    out: &mut [u32],
) {
    for (s, sliver) in out.chunks_mut(pairs * NR).take(cols.div_ceil(NR)).enumerate() {
        let js = j0 + s * NR;
        let w = NR.min(n.saturating_sub(js));
        if b.cs == 1 {
            // Rows contiguous: for each pair, two row segments interleaved (vectorises).
            for p in 0..pairs {
                let kk = k0 + 2 * p;
                let dst = &mut sliver[p * NR..(p + 1) * NR];
                if kk >= k {
                    // Padding pairs past k ([`PackedB::new`] on AMX machines).
                    dst.fill(0);
                    continue;
                }
                let lo = unsafe { std::slice::from_raw_parts(b.ptr.add(kk * b.rs + js), w) };
                if kk + 1 < k {
                    let hi = unsafe { std::slice::from_raw_parts(b.ptr.add((kk + 1) * b.rs + js), w) };
                    for ((d, l), h) in dst.iter_mut().zip(lo).zip(hi) {
                        *d = l.bf16_bits() | (h.bf16_bits() << 16);
                    }
                } else {
                    for (d, l) in dst.iter_mut().zip(lo) {
                        *d = l.bf16_bits();
                    }
                }
                dst[w..].fill(0);
            }
        } else if T::WORDS && b.rs == 1 && b.cs.is_multiple_of(2) && k0 + 2 * pairs <= k {
            // Columns contiguous, already pairs of bf16 (a linear layer's weight rows read in
            // place): the sliver is the transpose of the columns' words, 16 × 16 at a time
            // (converting each column into a buffer and spreading it word by word was 7 % of
            // the UNet's linear layers).
            let words = b.ptr as *const u32;
            // SAFETY: columns js.. js + w of the view hold pairs k0/2 .. k0/2 + pairs (k0 is
            // even, cs even, no half pair in this block); the CPU has AVX-512F.
            unsafe { transpose_words(|c| words.add((k0 + (js + c) * b.cs) / 2), w, pairs, sliver) };
        } else {
            // Columns contiguous (a transposed operand): each column's pairs converted in one run
            // (vectorised for f32), then spread into the sliver.
            let mut col = [0u32; KC_PAIRS_AMX];
            for c in 0..NR {
                if c >= w {
                    (0..pairs).for_each(|p| sliver[p * NR + c] = 0);
                    continue;
                }
                let j = js + c;
                if b.rs == 1 {
                    let len = (2 * pairs).min(k - k0);
                    let src = unsafe { std::slice::from_raw_parts(b.ptr.add(k0 + j * b.cs), len) };
                    T::pack_pairs(src, &mut col[..pairs]);
                } else {
                    for (p, d) in col[..pairs].iter_mut().enumerate() {
                        let kk = k0 + 2 * p;
                        let lo = if kk < k { unsafe { b.at(kk, j) } } else { 0 };
                        let hi = if kk + 1 < k { unsafe { b.at(kk + 1, j) } } else { 0 };
                        *d = lo | (hi << 16);
                    }
                }
                for (p, &v) in col[..pairs].iter().enumerate() {
                    sliver[p * NR + c] = v;
                }
            }
        }
    }
}

/// `sliver[p·NR + c]` = word p of column c (from `column(c)`, read unaligned) for c < w, zero for
/// w ≤ c < NR, for p < pairs: 16 × 16 blocks transposed in registers (two rounds of 32- and
/// 64-bit interleaves within 128-bit lanes, two of lane shuffles), partial blocks through masks.
///
/// # Safety
/// `column(c)` points at `pairs` readable words for c < w; the sliver holds pairs × NR words; the
/// CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_words(column: impl Fn(usize) -> *const u32, w: usize, pairs: usize, sliver: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(w <= NR && sliver.len() >= pairs * NR);
    for p0 in (0..pairs).step_by(16) {
        let np = (pairs - p0).min(16);
        let mask: __mmask16 = if np == 16 { 0xFFFF } else { (1u16 << np) - 1 };
        for c0 in (0..NR).step_by(16) {
            // r[i] = words p0.. of column c0 + i (zero past w).
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, ri) in r.iter_mut().enumerate() {
                if c0 + i < w {
                    *ri = unsafe { _mm512_maskz_loadu_epi32(mask, column(c0 + i).add(p0) as *const i32) };
                }
            }
            // u[4g + q], lane L = rows 4g .. 4g + 4 at word 4L + q.
            let mut u = [_mm512_setzero_si512(); 16];
            for g in 0..4 {
                let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
                let (t0, t1) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
                let (t2, t3) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
                u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
                u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
                u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
                u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
            }
            // Word j = 4L + q of every row: lane L of u[q], u[4 + q], u[8 + q], u[12 + q].
            for q in 0..4 {
                let x = _mm512_shuffle_i32x4::<0x44>(u[q], u[4 + q]);
                let y = _mm512_shuffle_i32x4::<0xEE>(u[q], u[4 + q]);
                let x2 = _mm512_shuffle_i32x4::<0x44>(u[8 + q], u[12 + q]);
                let y2 = _mm512_shuffle_i32x4::<0xEE>(u[8 + q], u[12 + q]);
                let out = [
                    _mm512_shuffle_i32x4::<0x88>(x, x2),
                    _mm512_shuffle_i32x4::<0xDD>(x, x2),
                    _mm512_shuffle_i32x4::<0x88>(y, y2),
                    _mm512_shuffle_i32x4::<0xDD>(y, y2),
                ];
                for (l, o) in out.into_iter().enumerate() {
                    let j = 4 * l + q;
                    if j < np {
                        unsafe { _mm512_storeu_si512(sliver.as_mut_ptr().add((p0 + j) * NR + c0) as *mut _, o) };
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose_words(column: impl Fn(usize) -> *const u32, w: usize, pairs: usize, sliver: &mut [u32]) {
    for p in 0..pairs {
        for c in 0..NR {
            sliver[p * NR + c] = if c < w { unsafe { column(c).add(p).read_unaligned() } } else { 0 };
        }
    }
}

/// Where `len` values of `v` start at its first 64-byte boundary, `v` grown (zero-filled) to hold
/// them: AMX tile loads run at a third of their speed on rows that straddle cache lines, and the
/// allocator's small blocks are only 16-byte aligned.
pub(crate) fn align64<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> usize {
    let spare = 64 / std::mem::size_of::<T>() - 1;
    if v.len() < len + spare {
        v.resize(len + spare, T::default());
    }
    v.as_ptr().align_offset(64).min(spare)
}

/// Pairs in k block kb of kp pairs cut into blocks of kc, the last rounded up to a multiple of
/// `pad` (1: unpadded; kc is a multiple of every pad used).
fn block_pairs(kp: usize, kc: usize, pad: usize, kb: usize) -> usize {
    kc.min(kp - kb * kc).next_multiple_of(pad)
}

/// All blocks' pairs, as [`block_pairs`] counts them.
fn padded_pairs(kp: usize, kc: usize, pad: usize) -> usize {
    (0..kp.div_ceil(kc)).map(|kb| block_pairs(kp, kc, pad, kb)).sum()
}

/// B packed once for several products with it (attention's keys and values, reused by every block
/// of queries): [k block][sliver][pair][NR] words.
#[derive(Default)]
pub struct PackedB {
    data: Vec<u32>,
    /// Where the packed words start in `data` (its first 64-byte boundary, see [`align64`]).
    off: usize,
    /// Pairs per k block ([`kc_pairs`] when packed).
    kc: usize,
    /// The last block's pairs rounded up to a multiple of this, zero-filled ([`PackedB::new`]: 16
    /// on AMX machines, so the tiles take whole steps; 1 for [`PackedB::fill_rows`]).
    pad: usize,
    k: usize,
    n: usize,
}

impl PackedB {
    /// B packed in blocks of the process's k block length ([`kc_pairs`]). On AMX machines the last
    /// k block is padded with zero pairs to a whole tile step (attention's head dimensions of 40
    /// and 80 are 20 and 40 pairs: the 4 and 8 past the last 16 ran on `vdpbf16ps`, slower than
    /// the tiles' whole step); [`gemm_packed`] packs A to match.
    ///
    /// # Safety
    /// The view covers k × n; the CPU has [`available`] instructions.
    pub unsafe fn new<T: Elem>(b: View<T>, (k, n): (usize, usize)) -> Self {
        let (kc, pad) = (kc_pairs(), if amx_supported() { 16 } else { 1 });
        let kp = k.div_ceil(2);
        let slivers = n.div_ceil(NR);
        let mut data = Vec::new();
        let len = padded_pairs(kp, kc, pad) * slivers * NR;
        let off = align64(&mut data, len);
        let mut rest = &mut data[off..off + len];
        for kb in 0..kp.div_ceil(kc) {
            let pairs = block_pairs(kp, kc, pad, kb);
            let (block, tail) = rest.split_at_mut(pairs * slivers * NR);
            unsafe { pack_b(&b, (k, n), 0, n, kb * 2 * kc, pairs, block) };
            rest = tail;
        }
        Self { data, off, kc, pad, k, n }
    }

    /// B built row by row straight into the packed layout, in parallel over pairs of rows:
    /// `fill(r, 0, row)` writes row r's n values (a convolution's im2col rows, produced here
    /// instead of into an f32 patch matrix that packing would read again; [`Rows`]). Reuses
    /// `self`'s memory.
    pub fn fill_rows(&mut self, (k, n): (usize, usize), fill: Rows) {
        let kp = k.div_ceil(2);
        let slivers = n.div_ceil(NR);
        self.off = align64(&mut self.data, kp * slivers * NR);
        if cfg!(debug_assertions) {
            // A word the rows miss shows as NaN (bf16 pairs) in every test, not as a stale value
            // from an earlier call with the same buffer.
            self.data[self.off..self.off + kp * slivers * NR].fill(0x7fc0_7fc0);
        }
        (self.kc, self.pad, self.k, self.n) = (kc_pairs(), 1, k, n);
        let kc = self.kc;
        // Pair p's words: block p / kc (whose pairs run kc long except the last), then
        // sliver s at s·pairs·NR, then row p % kc of NR words.
        // SAFETY: off + kp·slivers·NR words lie inside data.
        let words = SendMut(unsafe { self.data.as_mut_ptr().add(self.off) });
        thread_local! {
            static ROWS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        (0..kp).into_par_iter().for_each(|p| {
            ROWS.with_borrow_mut(|(lo, hi)| {
                let words = &words;
                let (kb, pi) = (p / kc, p % kc);
                let pairs = block_pairs(kp, kc, 1, kb);
                let block = kb * kc * slivers * NR;
                // SAFETY: inside data (sized above); pair p's words belong to this task alone.
                let at = |s: usize| unsafe { words.0.add(block + s * pairs * NR + pi * NR) };
                pack_pair(fill, (2 * p, k), (0, n), (lo, hi), at);
            })
        });
    }
}

/// Makes B's values row by row: `fill(r, j0, out)` writes B[r][j0..j0 + out.len()] (a
/// convolution's im2col rows, [`gemm_rows`], [`PackedB::fill_rows`]).
pub type Rows<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// Rows r and r + 1 of B (zero past k), columns j0..j0 + cols, made by `fill` into `lo` and `hi`
/// (grown as needed) and written as one pair's words: sliver s's NR words at `at(s)`.
fn pack_pair(
    fill: Rows,
    (r, k): (usize, usize),
    (j0, cols): (usize, usize),
    (lo, hi): (&mut Vec<f32>, &mut Vec<f32>),
    at: impl Fn(usize) -> *mut u32,
) {
    lo.resize(lo.len().max(cols), 0.0);
    hi.resize(hi.len().max(cols), 0.0);
    let (lo, hi) = (&mut lo[..cols], &mut hi[..cols]);
    fill(r, j0, lo);
    if r + 1 < k {
        fill(r + 1, j0, hi);
    } else {
        hi.fill(0.0);
    }
    for s in 0..cols.div_ceil(NR) {
        let (js, w) = (s * NR, NR.min(cols - s * NR));
        // SAFETY: the caller's `at` gives NR words of this pair for each sliver.
        let dst = unsafe { std::slice::from_raw_parts_mut(at(s), NR) };
        interleave_pairs(&lo[js..js + w], &hi[js..js + w], dst);
    }
}

struct SendMut(*mut u32);
// SAFETY: tasks write disjoint words (see `PackedB::fill_rows`).
unsafe impl Send for SendMut {}
unsafe impl Sync for SendMut {}

/// `dst[j] = (lo[j], hi[j])` as bf16 bits rounded to nearest even, low half first; zero past the
/// rows' length.
fn interleave_pairs(lo: &[f32], hi: &[f32], dst: &mut [u32]) {
    #[inline(always)]
    fn body(lo: &[f32], hi: &[f32], dst: &mut [u32]) {
        for ((d, l), h) in dst.iter_mut().zip(lo).zip(hi) {
            *d = l.bf16_bits() | (h.bf16_bits() << 16);
        }
        dst[lo.len()..].fill(0);
    }
    // The same loop compiled for AVX-512, where LLVM vectorises the rounding.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn avx512(lo: &[f32], hi: &[f32], dst: &mut [u32]) {
        body(lo, hi, dst)
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512 (and more).
        unsafe { avx512(lo, hi, dst) };
        return;
    }
    body(lo, hi, dst)
}

/// A 3 × 3 convolution for [`conv3x3`]: `batch` images of `cin` planes of `ih × iw`,
/// nearest-upsampled `up` times, stride 1, padding 1, `cout` output planes of `ih·up × iw·up`.
#[derive(Clone, Copy, Debug)]
pub struct Conv3x3 {
    pub batch: usize,
    pub cin: usize,
    pub ih: usize,
    pub iw: usize,
    pub up: usize,
    pub cout: usize,
}

/// Words of a band of [`conv3x3`]'s input copies (three shifted copies of every pair of planes),
/// 8 MB: the band's rows stay in L3 while its tiles are multiplied (64 KB in the unit tests, so
/// that their small images take several bands).
const CONV_BAND_WORDS: usize = if cfg!(test) { 1 << 14 } else { 2 << 20 };

thread_local! {
    /// The calling thread's band of [`conv3x3`]'s input copies, kept between calls.
    static CONV_BAND: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out = conv(x, w) · row_scales + bias` for a 3 × 3 convolution ([`Conv3x3`]) on AMX tiles,
/// without a patch matrix (implicit GEMM; cf. oneDNN's AMX convolutions and cuDNN's implicit
/// precomputed GEMM). The input, padded and rounded to bf16 pairs of channels, lies on a grid of
/// rows `wp` words wide (a multiple of 16 at least two past the width); output pixel (y, x) is
/// grid position q = y·wp + x, and tap (ky, kx) reads the grid at q + ky·wp + kx. Three copies of
/// the grid, shifted by kx = 0, 1, 2, each blocked as [16 positions][pair][16 words], make every
/// tap's B tile one contiguous KB (16 pairs × 16 positions from a 64-byte boundary; a layout of
/// whole planes had its 16 rows a plane apart, 16 pages): the input is written 3 times (in bf16:
/// 1.5 times its f32 size) where im2col writes it 9 times, and no tile load straddles cache lines
/// (a third of the speed, see [`align64`]). A tile of 32 output channels × 48 grid positions sums
/// its 9 taps × cin/32 steps in the tiles; the grid's pad columns are dropped as the sums go out.
/// Weights are rearranged per call to [channel][tap][pair] (cout × 9 × cin values, once for all
/// images; the products are that times the pixels, so small images with many channels do better
/// by im2col: see `kernels::Conv`). Processed image by image in bands of rows
/// ([`CONV_BAND_WORDS`]), each band's tiles spread over the threads.
///
/// # Panics
/// Unless AMX is on ([`amx`]), cin is a multiple of 32 and the slices hold the shapes.
pub fn conv3x3<T: Elem>(
    x: &[f32],
    shape: Conv3x3,
    w: &[T],
    row_scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let Conv3x3 { batch, cin, ih, iw, up, cout } = shape;
    let (h, wd) = (ih * up, iw * up);
    assert!(amx() && cin.is_multiple_of(32) && up >= 1, "conv3x3 on tiles: {shape:?}");
    assert!(x.len() >= batch * cin * ih * iw && w.len() >= cout * cin * 9 && out.len() >= batch * cout * h * wd);
    assert!(row_scales.is_none_or(|s| s.len() >= cout) && bias.is_none_or(|b| b.len() >= cout));
    if cout == 0 || h == 0 || wd == 0 {
        return;
    }
    let kp = cin / 2;
    let wp = (wd + 2).next_multiple_of(16);
    let groups = cout.div_ceil(AMX_ROWS);
    // Weights as [channel (whole groups, zero rows past cout)][tap][pair] words.
    let row_words = 9 * kp;
    let mut wbuf = Vec::new();
    let woff = align64(&mut wbuf, groups * AMX_ROWS * row_words);
    wbuf[woff..woff + groups * AMX_ROWS * row_words].par_chunks_mut(row_words).enumerate().for_each(|(co, row)| {
        if co >= cout {
            row.fill(0);
            return;
        }
        let wc = &w[co * cin * 9..(co + 1) * cin * 9];
        for (tap, words) in row.chunks_mut(kp).enumerate() {
            for (pr, word) in words.iter_mut().enumerate() {
                *word = wc[2 * pr * 9 + tap].bf16_bits() | (wc[(2 * pr + 1) * 9 + tap].bf16_bits() << 16);
            }
        }
    });
    let weights = &wbuf[woff..];
    let band_rows = (CONV_BAND_WORDS / (3 * kp * wp)).clamp(1, h);
    with_kept(&CONV_BAND, |band| {
        for (bi, y0) in (0..batch).flat_map(|bi| (0..h).step_by(band_rows).map(move |y0| (bi, y0))) {
            let x = &x[bi * cin * ih * iw..(bi + 1) * cin * ih * iw];
            let out = Out(out[bi * cout * h * wd..].as_mut_ptr() as *mut f32);
            let rows = band_rows.min(h - y0);
            let tiles = (rows * wp).div_ceil(NR);
            // Every tap of every tile inside the plane: the last tile's end plus two rows.
            let plane = (tiles * NR + 2 * wp).next_multiple_of(16);
            let boff = align64(band, 3 * kp * plane);
            let planes = &mut band[boff..boff + 3 * kp * plane];
            let blocks = plane / 16;
            let dst = SendMut(planes.as_mut_ptr());
            // Pair pr's grid rows: padded rows y0 .. y0 + rows + 2 (input rows one above), zero
            // elsewhere; each row's 16-word chunks at offsets 0, 1, 2 into the three copies (a
            // chunk's last words past the row read zeros: they feed only pad columns).
            (0..kp).into_par_iter().for_each(|pr| {
                let dst = &dst;
                let (lo, hi) = (&x[2 * pr * ih * iw..][..ih * iw], &x[(2 * pr + 1) * ih * iw..][..ih * iw]);
                let mut src = vec![0u32; if up > 1 { iw } else { 0 }];
                let mut line = vec![0u32; wp + 16];
                for r in 0..blocks.div_ceil(wp / 16) {
                    let at = y0 + r; // padded row: input row at − 1
                    let data = at > 0 && at <= h && r < rows + 2;
                    if data {
                        let yi = (at - 1) / up;
                        let (l, hh) = (&lo[yi * iw..(yi + 1) * iw], &hi[yi * iw..(yi + 1) * iw]);
                        if up == 1 {
                            interleave_pairs(l, hh, &mut line[1..1 + wd]);
                        } else {
                            interleave_pairs(l, hh, &mut src);
                            for (d, s) in line[1..1 + wd].chunks_mut(up).zip(&src) {
                                d.fill(*s);
                            }
                        }
                    } else {
                        line[1..1 + wd].fill(0);
                    }
                    for c in 0..wp / 16 {
                        let qb = r * wp / 16 + c;
                        if qb >= blocks {
                            break;
                        }
                        for kx in 0..3 {
                            // SAFETY: block qb of copy kx, pair pr: 16 words inside the band,
                            // written by this task alone.
                            unsafe {
                                let to = dst.0.add(((kx * blocks + qb) * kp + pr) * 16);
                                std::ptr::copy_nonoverlapping(line.as_ptr().add(16 * c + kx), to, 16);
                            }
                        }
                    }
                }
            });
            let planes = &*planes;
            // Jobs of 4 tiles × every group of channels (the tiles' input stays in L2 while the
            // weights pass).
            let jobs = tiles.div_ceil(4);
            (0..jobs).into_par_iter().for_each(|job| {
                let out = &out;
                let _config = amx::Tiles::configure();
                let mut sums = Sums([0.0; AMX_ROWS * NR]);
                for t in 4 * job..(4 * job + 4).min(tiles) {
                    let q0 = t * NR;
                    // The tile's positions row by row of the grid, pad columns dropped: (first
                    // sum, length, output offset in the channel's plane).
                    let mut segments = [(0, 0, 0); NR / 16 + 2];
                    let (mut j, mut n) = (0, 0);
                    while j < NR {
                        let (y, xx) = ((q0 + j) / wp, (q0 + j) % wp);
                        if y >= rows {
                            break;
                        }
                        let run = (wp - xx).min(NR - j);
                        if xx < wd {
                            segments[n] = (j, run.min(wd - xx), (y0 + y) * wd + xx);
                            n += 1;
                        }
                        j += run;
                    }
                    let segments = &segments[..n];
                    for g in 0..groups {
                        let taps = (0..9).map(|tap| {
                            let (ky, kx) = (tap / 3, tap % 3);
                            // SAFETY: inside the weights and the band (the plane's extent above).
                            unsafe {
                                (
                                    weights.as_ptr().add(g * AMX_ROWS * row_words + tap * kp),
                                    planes.as_ptr().add(((kx * blocks + (q0 + ky * wp) / 16) * kp) * 16),
                                    kp / 16,
                                )
                            }
                        });
                        let to = (sums.0.as_mut_ptr(), 4 * NR);
                        // SAFETY: tiles configured; A rows and B pair rows inside their buffers.
                        unsafe { amx::products(taps, (4 * row_words, 64, 64 * kp), (std::ptr::null(), 0), to) };
                        for (r, sums) in sums.0.chunks(NR).enumerate().take(cout - g * AMX_ROWS) {
                            let co = g * AMX_ROWS + r;
                            let scale = row_scales.map_or(1.0, |s| s[co]);
                            let add = bias.map_or(0.0, |b| b[co]);
                            // SAFETY: channel co's rows y0 + y of the segments: this job's own.
                            unsafe { scaled_runs(sums, segments, out.0.add(co * h * wd), (scale, add)) };
                        }
                    }
                }
            });
        }
    });
}

/// `out[off + i] = sums[j + i] · scale + add` for each segment (j, len, off) of [`conv3x3`]'s tile.
///
/// # Safety
/// `out` writable at every segment's offsets.
#[inline]
unsafe fn scaled_runs(sums: &[f32], segments: &[(usize, usize, usize)], out: *mut f32, (scale, add): (f32, f32)) {
    #[inline(always)]
    unsafe fn body(sums: &[f32], segments: &[(usize, usize, usize)], out: *mut f32, (scale, add): (f32, f32)) {
        for &(j, len, off) in segments {
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add(off), len) };
            for (d, &s) in dst.iter_mut().zip(&sums[j..j + len]) {
                *d = s * scale + add;
            }
        }
    }
    // Compiled for AVX-512, where LLVM vectorises the runs (with masks for their ends).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn avx512(sums: &[f32], segments: &[(usize, usize, usize)], out: *mut f32, sa: (f32, f32)) {
        unsafe { body(sums, segments, out, sa) }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx512(sums, segments, out, (scale, add))
    }
    #[cfg(not(target_arch = "x86_64"))]
    unsafe {
        body(sums, segments, out, (scale, add))
    }
}

/// `C (+)= scale · A · B` for a pre-packed B, on the calling thread (for callers that are already
/// parallel); the scale per row and column as [`Scale`] says. A in place (bf16 rows, even k) is
/// read where it lies for every whole group of rows whose k blocks B does not pad (attention's
/// probabilities, 64-byte aligned rows: the copy into A's packing was a pass over them), packed
/// otherwise.
///
/// # Safety
/// As [`gemm`], with `a` covering m × b.k.
pub unsafe fn gemm_packed<TA: Elem>(
    m: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: Lhs<TA>,
    b: &PackedB,
    scale: Scale,
) {
    let (n, k, kc) = (b.n, b.k, b.kc);
    // The epilogue reads a factor for every row and column of C, and the bias only when writing.
    assert!(scale.rows.is_none_or(|r| r.len() >= m) && scale.cols.is_none_or(|c| c.len() >= n));
    assert!(scale.bias.is_none_or(|b| b.len() >= n && !accumulate));
    // A bf16 C is written once, never summed into.
    assert!(!scale.bf16_c || (!accumulate && k.div_ceil(2) <= kc));
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let kp = k.div_ceil(2);
    let slivers = n.div_ceil(NR);
    let tiles = amx();
    // Rows per micro-tile, packed from A a panel of MR at a time (zero past m).
    let (rows, micro) = if tiles { (AMX_ROWS, AMX_MICRO) } else { (MR, kernel::<MR> as Micro) };
    let _config = tiles.then(amx::Tiles::configure);
    // A packed with B's padding (zero pairs past k), so the products take whole tile steps.
    let mut abuf = Vec::new();
    let off = align64(&mut abuf, rows * block_pairs(kp, kc, b.pad, 0));
    // SAFETY (both packs): the view covers m × k.
    let pack = |i0: usize, k0: usize, pairs: usize, panel: &mut [u32]| match a {
        Lhs::InPlace { ptr, rs } => unsafe { pack_a(&View { ptr, rs, cs: 1 }, (m, k), i0, k0, pairs, panel) },
        Lhs::Packed(view) => unsafe { pack_a(&view, (m, k), i0, k0, pairs, panel) },
    };
    for kb in 0..kp.div_ceil(kc) {
        let pairs = block_pairs(kp, kc, b.pad, kb);
        let block = &b.data[b.off + kb * kc * slivers * NR..];
        let abuf = &mut abuf[off..off + rows * pairs];
        for i0 in (0..m).step_by(rows) {
            let (ap, a_row) = match a {
                // SAFETY: rows i0.. i0 + rows and this block's pairs lie inside A.
                Lhs::InPlace { ptr, rs } if i0 + rows <= m && pairs == block_pairs(kp, kc, 1, kb) => unsafe {
                    debug_assert!(k.is_multiple_of(2) && rs.is_multiple_of(2));
                    ((ptr as *const u32).add(i0 * rs / 2 + kb * kc), rs / 2)
                },
                _ => {
                    for (q, panel) in abuf.chunks_mut(MR * pairs).enumerate() {
                        pack(i0 + q * MR, kb * 2 * kc, pairs, panel);
                    }
                    (abuf.as_ptr(), pairs)
                }
            };
            for s in 0..slivers {
                let js = s * NR;
                unsafe {
                    micro(
                        pairs,
                        (ap, a_row),
                        block.as_ptr().add(s * pairs * NR),
                        (scale.c_at(c, i0 * ldc + js), ldc),
                        (rows.min(m - i0), NR.min(n - js)),
                        scale.tile(i0, js),
                        accumulate || kb > 0,
                    )
                };
            }
        }
    }
}

/// Where the micro-kernel finds A's words (see [`gemm`]).
#[derive(Clone, Copy)]
struct AWords {
    base: *const u32,
    row: usize,
    packed: bool,
    /// In place: the last panel when m is not a multiple of MR, packed with zero rows ([k block]
    /// [row][pair]), so the kernel never reads past A's last row.
    tail: *const u32,
}
// SAFETY: read only, during the call that owns the memory.
unsafe impl Send for AWords {}
unsafe impl Sync for AWords {}

#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: jobs write disjoint tiles of C.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `C (+)= scale · A · B` with C row-major (row stride `ldc`), bf16 products, f32 sums; the scale
/// per row and column as [`Scale`] says.
/// `parallel`: spread over rayon's threads (false inside an already parallel caller).
///
/// # Safety
/// The views must cover m × k and k × n; C must be valid for m rows of n columns at stride ldc and
/// not overlap A or B. The CPU must have [`available`] instructions.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<TA: Elem, TB: Elem>(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: Lhs<TA>,
    b: View<TB>,
    scale: Scale,
    parallel: bool,
) {
    unsafe { gemm_impl((m, n, k), c, ldc, accumulate, a, Rhs::View(b), scale, parallel, None) }
}

/// What a gated product does with its two halves: `a[i] = a[i] · GELU(g[i])` for every i (the
/// sums of one micro-tile, bias and scales applied), the kernels' GEGLU arithmetic.
pub type Gate = fn(&mut [f32], &[f32]);

/// Whether k fits one block of the products' k blocking, which a gated product ([`gemm_gated`])
/// needs: its halves must be whole sums when they meet.
pub fn one_k_block(k: usize) -> bool {
    k.div_ceil(2) <= kc_pairs()
}

/// A gated product (diffusers' GEGLU on its projection): `C[m×n] = gate(Y[.., ..n], Y[.., n..])`
/// with `Y = scale · A · B + bias` and B of k × 2n, without Y: each micro-tile's two halves are
/// summed into the thread's L1 (B's packing puts the sliver of columns j.. beside the sliver of
/// n + j..) and only the gated values reach C — a fifth of what the product and a separate pass
/// moved through memory (Y written and read back, 2n values a row each way; C written, n). The
/// column scales and the bias cover all 2n columns.
///
/// # Safety
/// As [`gemm`], with B covering k × 2n and C m × n; k within [`one_k_block`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_gated<TA: Elem, TB: Elem>(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    a: Lhs<TA>,
    b: View<TB>,
    scale: Scale,
    gate: Gate,
) {
    unsafe { gemm_impl((m, n, k), c, ldc, false, a, Rhs::View(b), scale, true, Some(gate)) }
}

/// [`gemm`] with B already packed ([`PackedB::fill_rows`], [`PackedB::new`]), on all threads.
///
/// # Safety
/// As [`gemm`], with `a` covering m × b.k.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_prepacked<TA: Elem>(
    m: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: Lhs<TA>,
    b: &PackedB,
    scale: Scale,
) {
    unsafe { gemm_impl::<TA, f32>((m, b.n, b.k), c, ldc, accumulate, a, Rhs::Packed(b), scale, true, None) }
}

/// [`gemm`] with B made by `fill` ([`Rows`]), each job making the rows of its own k block and
/// columns just before it multiplies them, into its packed block: the block is written to and
/// read from the job's L2, where a B packed whole ([`PackedB::fill_rows`], 8 MB and more for a
/// convolution) went out to memory and came back; and with B in one piece the product reads the
/// weights once per column block, not once per tile of B. On all threads; the jobs split the
/// columns only (a split of the rows would make every block of B twice).
///
/// # Safety
/// As [`gemm`], with `fill` writing every value it is asked for.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows<TA: Elem>(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: Lhs<TA>,
    fill: Rows,
    scale: Scale,
) {
    unsafe { gemm_impl::<TA, f32>((m, n, k), c, ldc, accumulate, a, Rhs::Rows(fill), scale, true, None) }
}

/// The right operand: a view packed block by block as the jobs need it, rows made the same way,
/// or packed already.
enum Rhs<'a, T> {
    View(View<T>),
    Rows(Rows<'a>),
    Packed(&'a PackedB),
}

thread_local! {
    /// Each thread's packed block of B, kept between jobs and calls (rayon's `for_each_init` made
    /// one anew, zero-filled, for every piece it split the jobs into).
    static B_BLOCK: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// The calling thread's packed copy of A for parallel products, kept between calls: taken out
    /// for a product (empty if a product on this thread holds it: that one grows its own) and
    /// given back by [`ReturnOnDrop`]. Taken rather than borrowed, as it must outlive the match
    /// arm that packs it.
    static A_BUFFER: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A packed A that goes back to its thread's slot when the product ends (a panic included) if it
/// was taken from there (the flag), unless the slot holds a larger one by then.
struct ReturnOnDrop(Vec<u32>, bool);

impl Drop for ReturnOnDrop {
    fn drop(&mut self) {
        if !self.1 {
            return;
        }
        let buf = std::mem::take(&mut self.0);
        A_BUFFER.with(|cell| {
            let kept = cell.take();
            cell.set(if kept.capacity() >= buf.capacity() { kept } else { buf });
        });
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_impl<TA: Elem, TB: Elem>(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: Lhs<TA>,
    b: Rhs<TB>,
    scale: Scale,
    parallel: bool,
    gate: Option<Gate>,
) {
    // B's columns: twice C's for a gated product ([`gemm_gated`]).
    let bn = if gate.is_some() { 2 * n } else { n };
    // The epilogue reads a factor for every row and column of C.
    assert!(scale.rows.is_none_or(|r| r.len() >= m) && scale.cols.is_none_or(|c| c.len() >= bn));
    // The bias is for products that write C (added once, in the first k block's epilogue).
    assert!(scale.bias.is_none_or(|b| b.len() >= bn && !accumulate));
    // A gated product's halves meet once, as whole sums, in a product that writes C (over k = 0
    // it would be the gate of the biases: its callers take the general path there).
    assert!(gate.is_none() || (!accumulate && k > 0 && one_k_block(k) && matches!(b, Rhs::View(_))));
    if m == 0 || n == 0 {
        return;
    }
    // A bf16 C is written once, never summed into.
    assert!(!scale.bf16_c || (!accumulate && one_k_block(k)));
    if k == 0 {
        for i in 0..m {
            if scale.bf16_c {
                let row = unsafe { bf16_run(c, i * ldc, n) };
                match scale.bias {
                    None => row.fill(std::mem::MaybeUninit::new(bf16::ZERO)),
                    Some(b) => f32_to_bf16(&b[..n], row),
                }
                continue;
            }
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n) };
            if !accumulate {
                match scale.bias {
                    None => row.fill(0.0),
                    Some(b) => row.copy_from_slice(&b[..n]),
                }
            }
        }
        return;
    }
    let kp = k.div_ceil(2);
    // A packed B brings its own block length (the process's, see `kc_pairs`).
    let kc = match &b {
        Rhs::Packed(pb) => pb.kc,
        Rhs::View(_) | Rhs::Rows(_) => kc_pairs(),
    };
    let kblocks = kp.div_ceil(kc);
    let panels = m.div_ceil(MR);
    // A as the micro-kernel reads it: the word of (row r, pair p) of the tile at row i0 and k
    // block kb is at base + (i0 + r)·row + kb·kc + p (in place) or in the packed blocks.
    let packed_a: ReturnOnDrop;
    let packed_tail: Vec<u32>;
    let a_in: AWords = match &a {
        Lhs::InPlace { ptr, rs } => {
            debug_assert!(k.is_multiple_of(2) && rs.is_multiple_of(2));
            let mut tail = Vec::new();
            if !m.is_multiple_of(MR) {
                tail = vec![0u32; MR * kp];
                let view = View { ptr: *ptr, rs: *rs, cs: 1 };
                for kb in 0..kblocks {
                    let pairs = block_pairs(kp, kc, 1, kb);
                    let out = &mut tail[kb * kc * MR..kb * kc * MR + pairs * MR];
                    // SAFETY: the view covers m × k; rows from (panels − 1)·MR, zero past m.
                    unsafe { pack_a(&view, (m, k), (panels - 1) * MR, kb * 2 * kc, pairs, out) };
                }
            }
            packed_tail = tail;
            AWords { base: *ptr as *const u32, row: rs / 2, packed: false, tail: packed_tail.as_ptr() }
        }
        Lhs::Packed(view) => {
            // [k block][panel][row][pair]; blocks are kc long except the last. The calling
            // thread's kept buffer when parallel (not zero-filled per call: the pieces below
            // cover it and pack_a writes every word of its piece; the fill was 3.5 % of the UNet's
            // linear layers); a fresh one inside an already parallel caller, where many threads
            // would each keep one.
            let mut buf = if parallel { A_BUFFER.take() } else { Vec::new() };
            let off = align64(&mut buf, panels * MR * kp);
            let buf = &mut buf;
            let mut pieces = Vec::with_capacity(kblocks * panels);
            let mut rest = &mut buf[off..off + panels * MR * kp];
            for kb in 0..kblocks {
                let pairs = block_pairs(kp, kc, 1, kb);
                for pi in 0..panels {
                    let (piece, tail) = rest.split_at_mut(pairs * MR);
                    pieces.push((kb, pi, piece));
                    rest = tail;
                }
            }
            let pack = |(kb, pi, out): (usize, usize, &mut [u32])| {
                let pairs = out.len() / MR;
                // SAFETY: the view covers m × k (the caller's contract).
                unsafe { pack_a(view, (m, k), pi * MR, kb * 2 * kc, pairs, out) };
            };
            if parallel {
                pieces.into_par_iter().for_each(pack);
            } else {
                pieces.into_iter().for_each(pack);
            }
            packed_a = ReturnOnDrop(std::mem::take(buf), parallel);
            // SAFETY: the packed words start off words into the buffer.
            AWords { base: unsafe { packed_a.0.as_ptr().add(off) }, row: 0, packed: true, tail: std::ptr::null() }
        }
    };
    // Jobs: column blocks × row groups, enough for every thread when n is small. The slivers are
    // shared evenly among the column blocks, and with at least as many blocks as threads their
    // number is a multiple of the threads': blocks of NC columns and a short last one left a
    // thread idle for up to a block (4 jobs of 8, 8, 8 and 3 slivers on 2 threads for the UNet's
    // 1280 → 1280 layers at 256 tokens: 83 % of the time busy).
    let slivers = n.div_ceil(NR);
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    // (A gated product packs two slivers of B per sliver of C: half as many per block.)
    let per_block = if gate.is_some() { NC / NR / 2 } else { NC / NR };
    let mut cblocks = slivers.div_ceil(per_block);
    // Made rows: a block of columns for every thread at least, and no split of the rows where
    // there are (each row group would make the same block of B again).
    let makes = matches!(b, Rhs::Rows(_));
    if makes {
        cblocks = cblocks.max(threads).min(slivers);
    }
    if cblocks >= threads {
        cblocks = cblocks.next_multiple_of(threads).min(slivers);
    }
    let spread = if makes && cblocks >= threads { 1 } else { 2 * threads };
    let mut rgroups = spread.div_ceil(cblocks).clamp(1, panels);
    let mut per_group = panels.div_ceil(rgroups);
    // Decided here, on the calling thread (see `without_amx`), for every job.
    let tiles = amx();
    if tiles {
        // Row groups of whole AMX micro-tiles.
        per_group = per_group.next_multiple_of(AMX_PANELS);
        rgroups = panels.div_ceil(per_group);
    }
    let out = Out(c);
    let job = |jid: usize, bbuf: &mut Vec<u32>| {
        // Whole values, not their raw-pointer fields (which closures would capture on their own).
        let (a_in, out) = (&a_in, &out);
        let _config = tiles.then(amx::Tiles::configure);
        let (cb, rg) = (jid / rgroups, jid % rgroups);
        let (s_lo, s_hi) = (cb * slivers / cblocks, (cb + 1) * slivers / cblocks);
        let j0 = s_lo * NR;
        let cols = (s_hi * NR).min(n) - j0;
        let (p_lo, p_hi) = (rg * per_group, ((rg + 1) * per_group).min(panels));
        // A gated product's two halves of a micro-tile (zeroed once per job: the kernels write
        // the rows they compute, and the gate reads whole rows).
        let zero = || Box::new(Sums([0.0; AMX_ROWS * NR]));
        let mut halves = gate.map(|gate| (gate, zero(), zero()));
        // Made rows' two f32 rows of a pair (the job's columns).
        let mut rows = (Vec::new(), Vec::new());
        for kb in 0..kblocks {
            let pairs = block_pairs(kp, kc, 1, kb);
            // B's pairs in this block: a packed B's last block may be padded past A's pairs.
            let bpairs = match &b {
                Rhs::Packed(pb) => block_pairs(kp, kc, pb.pad, kb),
                Rhs::View(_) | Rhs::Rows(_) => pairs,
            };
            let bwords: *const u32 = match &b {
                Rhs::View(b) if gate.is_some() => {
                    // Slivers in pairs: C's columns js.. of B, then the same of B's second half.
                    let second = View { ptr: unsafe { b.ptr.add(n * b.cs) }, ..*b };
                    let sliver = pairs * NR;
                    let need = 2 * cols.div_ceil(NR) * sliver;
                    let off = align64(bbuf, need);
                    let packed = &mut bbuf[off..off + need];
                    for (s, two) in packed.chunks_mut(2 * sliver).enumerate() {
                        let (js, w) = (j0 + s * NR, NR.min(cols - s * NR));
                        let (first, gated) = two.split_at_mut(sliver);
                        // SAFETY: both views cover k × n (B's halves); the CPU has AVX-512.
                        unsafe {
                            pack_b(b, (k, n), js, w, 0, pairs, first);
                            pack_b(&second, (k, n), js, w, 0, pairs, gated);
                        }
                    }
                    unsafe { bbuf.as_ptr().add(off) }
                }
                Rhs::View(b) => {
                    let need = cols.div_ceil(NR) * pairs * NR;
                    let off = align64(bbuf, need);
                    unsafe { pack_b(b, (k, n), j0, cols, kb * 2 * kc, pairs, &mut bbuf[off..off + need]) };
                    unsafe { bbuf.as_ptr().add(off) }
                }
                Rhs::Rows(fill) => {
                    let need = cols.div_ceil(NR) * pairs * NR;
                    let off = align64(bbuf, need);
                    let words = unsafe { bbuf.as_mut_ptr().add(off) };
                    for p in 0..pairs {
                        // SAFETY: sliver s's words for pair p lie inside the `need` words at off.
                        let at = |s: usize| unsafe { words.add(s * pairs * NR + p * NR) };
                        pack_pair(fill, (2 * (kb * kc + p), k), (j0, cols), (&mut rows.0, &mut rows.1), at);
                    }
                    words as *const u32
                }
                // Block kb, from sliver j0 / NR (NC is a multiple of NR).
                Rhs::Packed(pb) => unsafe {
                    pb.data.as_ptr().add(pb.off + kb * kc * n.div_ceil(NR) * NR + (j0 / NR) * bpairs * NR)
                },
            };
            let load_c = accumulate || kb > 0;
            // One micro-tile: rows from panel pi, the sliver s; returns the panels it covered.
            let mut tile = |s: usize, pi: usize| -> usize {
                let js = j0 + s * NR;
                let i0 = pi * MR;
                // AMX_ROWS rows at once where A holds them: packed (zero rows past m) or in
                // place with every row real (the tail panel is packed apart).
                let amx_rows = tiles && pi + AMX_PANELS <= p_hi && (a_in.packed || i0 + AMX_ROWS <= m);
                // SAFETY: inside A (in place: rows i0.., pairs from kb·kc; packed: this
                // block), inside B's packed block, and C's tile at (i0, js) belongs to this job.
                unsafe {
                    let in_tail = !a_in.packed && i0 + MR > m;
                    let (ap, row) = if a_in.packed {
                        (a_in.base.add(kb * kc * panels * MR + pi * MR * pairs), pairs)
                    } else if in_tail {
                        (a_in.tail.add(kb * kc * MR), pairs)
                    } else {
                        (a_in.base.add(i0 * a_in.row + kb * kc), a_in.row)
                    };
                    let (rows, micro) = if amx_rows { (AMX_ROWS, AMX_MICRO) } else { (MR, kernel::<MR> as Micro) };
                    let (mr, nr) = (rows.min(m - i0), NR.min(n - js));
                    // A product of one or two rows computes only those.
                    let micro = match mr {
                        1 if !amx_rows => kernel::<1> as Micro,
                        2 if !amx_rows => kernel::<2> as Micro,
                        _ => micro,
                    };
                    if let Some((gate, first, second)) = &mut halves {
                        // Both halves' sums into this job's two L1 tiles, gated there, and
                        // the result copied to C.
                        // (The halves are f32 whatever C holds.)
                        let b0 = bwords.add(2 * s * bpairs * NR);
                        let to = (first.0.as_mut_ptr(), NR);
                        let f32_tile = |j| TileScale { bf16_c: false, ..scale.tile(i0, j) };
                        micro(pairs, (ap, row), b0, to, (mr, nr), f32_tile(js), false);
                        let (b1, to) = (b0.add(bpairs * NR), (second.0.as_mut_ptr(), NR));
                        micro(pairs, (ap, row), b1, to, (mr, nr), f32_tile(n + js), false);
                        gate(&mut first.0[..mr * NR], &second.0[..mr * NR]);
                        for r in 0..mr {
                            let from = &first.0[r * NR..r * NR + nr];
                            if scale.bf16_c {
                                f32_to_bf16(from, bf16_run(out.0, (i0 + r) * ldc + js, nr));
                            } else {
                                std::ptr::copy_nonoverlapping(from.as_ptr(), out.0.add((i0 + r) * ldc + js), nr);
                            }
                        }
                    } else {
                        micro(
                            pairs,
                            (ap, row),
                            bwords.add(s * bpairs * NR),
                            (scale.c_at(out.0, i0 * ldc + js), ldc),
                            (mr, nr),
                            scale.tile(i0, js),
                            load_c,
                        );
                    }
                    rows / MR
                }
            };
            let nsl = cols.div_ceil(NR);
            if tiles {
                // On AMX, A's rows outermost: each micro-tile's rows of A are read from memory
                // once while the job's B block (from L2) passes under them, where the BLIS order
                // below read the job's whole A block again for every sliver of B — up to 8
                // times, from L3 or memory at a block of 1 MB or more (a convolution's weights at
                // 8² to 32² pixels; a linear layer's 4096 tokens). UNet batch-1 call, bf16,
                // alternating: 1.41 → 1.36 s.
                let mut pi = p_lo;
                while pi < p_hi {
                    let mut step = 0;
                    for s in 0..nsl {
                        step = tile(s, pi);
                    }
                    pi += step;
                }
            } else {
                // The B sliver stays in L1 while A's panels stream past it from L2 (BLIS' order).
                for s in 0..nsl {
                    let mut pi = p_lo;
                    while pi < p_hi {
                        pi += tile(s, pi);
                    }
                }
            }
        }
    };
    let jobs = cblocks * rgroups;
    if parallel && jobs > 1 {
        (0..jobs).into_par_iter().for_each(|j| with_kept(&B_BLOCK, |buf| job(j, buf)));
    } else {
        with_kept(&B_BLOCK, |buf| (0..jobs).for_each(|j| job(j, buf)));
    }
}

/// One R × NR tile (R = MR, or fewer for a product of fewer rows: the time embedding's one row,
/// two with guidance, whose MR-row tiles were seven eighths zero rows — each row's sums the same
/// either way): `C[..mr, ..nr] = scale · Σ_p A_pair(p) ⊗ B_pair(p) (+ C)`, scale per row
/// and column as [`TileScale`] says. A's pair for row r
/// and pair p is the word at `a + r·a_row + p`; B's sliver is [pair][NR] words.
///
/// # Safety
/// Pointers valid for what the strides and counts describe (R rows of A); the CPU has
/// AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn kernel<const R: usize>(
    pairs: usize,
    (a, a_row): (*const u32, usize),
    b: *const u32,
    (c, ldc): (*mut f32, usize),
    (mr, nr): (usize, usize),
    scale: TileScale,
    load_c: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 3]; R];
    for p in 0..pairs {
        let bp = b.add(p * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32) as *const _));
        let ap = a.add(p);
        for (r, acc) in acc.iter_mut().enumerate() {
            let av: __m512bh =
                std::mem::transmute(_mm512_set1_epi32(std::ptr::read_unaligned(ap.add(r * a_row)) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], b0, av);
            acc[1] = _mm512_dpbf16_ps(acc[1], b1, av);
            acc[2] = _mm512_dpbf16_ps(acc[2], b2, av);
        }
    }
    // What the scaled sums are added to: C itself (row stride ldc) when accumulating, else the
    // bias (the same values for every row), else nothing. One pointer for both keeps the
    // epilogue small enough that the 24 sums stay in registers (a branch for each made LLVM keep
    // them on the stack, a memset and loads in the main loop).
    let (add, add_rs) = if load_c { (c as *const f32, ldc) } else { (scale.bias, 0) };
    for (r, acc) in acc.iter().enumerate().take(mr) {
        store_row(acc, r, (c, ldc), nr, &scale, (add, add_rs));
    }
}

/// Row r of a tile's sums, scaled, plus `add`'s row r (C or the bias), into C's row r.
///
/// # Safety
/// As the micro-kernels'.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn store_row(
    acc: &[std::arch::x86_64::__m512; 3],
    r: usize,
    (c, ldc): (*mut f32, usize),
    nr: usize,
    scale: &TileScale,
    (add, add_rs): (*const f32, usize),
) {
    use std::arch::x86_64::*;
    if scale.bf16_c {
        return store_row_bf16(acc, r, (c as *mut half::bf16, ldc), nr, scale, (add, add_rs));
    }
    let row = c.add(r * ldc);
    for (v, &x) in acc.iter().enumerate() {
        let lanes = nr.saturating_sub(16 * v).min(16);
        if lanes == 0 {
            break;
        }
        let mask: __mmask16 = if lanes == 16 { 0xFFFF } else { (1u16 << lanes) - 1 };
        _mm512_mask_storeu_ps(row.add(16 * v), mask, scaled(x, (r, v, mask), scale, (add, add_rs)));
    }
}

/// Lanes `16·v..` of row r's sums `x`, scaled by row and column and plus `add`'s row r (masked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn scaled(
    x: std::arch::x86_64::__m512,
    (r, v, mask): (usize, usize, std::arch::x86_64::__mmask16),
    scale: &TileScale,
    (add, add_rs): (*const f32, usize),
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let sr = if scale.rows.is_null() { scale.all } else { scale.all * *scale.rows.add(r) };
    let mut y = _mm512_mul_ps(x, _mm512_set1_ps(sr));
    if !scale.cols.is_null() {
        y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(mask, scale.cols.add(16 * v)));
    }
    if !add.is_null() {
        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, add.add(r * add_rs + 16 * v)));
    }
    y
}

/// [`store_row`] into a bf16 C ([`Scale::bf16_c`]): the same f32 value, then rounded to nearest
/// even as [`Elem::bf16_bits`] rounds (NaN quiet). Apart, so that [`kernel`]'s sums stay in registers.
///
/// # Safety
/// As the micro-kernels'.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline(never)]
unsafe fn store_row_bf16(
    acc: &[std::arch::x86_64::__m512; 3],
    r: usize,
    (c, ldc): (*mut bf16, usize),
    nr: usize,
    scale: &TileScale,
    (add, add_rs): (*const f32, usize),
) {
    use std::arch::x86_64::*;
    let row = c.add(r * ldc) as *mut i16;
    for (v, &x) in acc.iter().enumerate() {
        let lanes = nr.saturating_sub(16 * v).min(16);
        if lanes == 0 {
            break;
        }
        let mask: __mmask16 = if lanes == 16 { 0xFFFF } else { (1u16 << lanes) - 1 };
        let bits = rounded_lanes(scaled(x, (r, v, mask), scale, (add, add_rs)));
        _mm256_mask_storeu_epi16(row.add(16 * v), mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
    }
}

/// A micro-kernel: [`kernel`] (MR rows) or [`amx_kernel`] (AMX_ROWS rows).
type Micro = unsafe fn(usize, (*const u32, usize), *const u32, (*mut f32, usize), (usize, usize), TileScale, bool);

/// [`kernel`] for AMX_ROWS × NR: the whole 16-pair steps by AMX tiles into a buffer, the pairs
/// past them by `vdpbf16ps` on the buffer's rows, then the same epilogue — or, for a whole tile
/// of C in whole steps with nothing to scale, from C or the bias to C in the tiles alone (the
/// epilogue's pass was 9 % of a bf16 UNet call). A's rows must all be readable (rows past mr are
/// computed and dropped); the thread's tiles configured ([`amx::Tiles`]).
///
/// # Safety
/// As [`kernel`]; the CPU has AMX-BF16, enabled for the process ([`amx`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn amx_kernel(
    pairs: usize,
    (a, a_row): (*const u32, usize),
    b: *const u32,
    (c, ldc): (*mut f32, usize),
    (mr, nr): (usize, usize),
    scale: TileScale,
    load_c: bool,
) {
    use std::arch::x86_64::*;
    // A whole tile of C, whole tile steps, nothing to scale: the sums start from C itself or the
    // bias (a tile load with row stride 0 repeats it) and go straight back to C, no pass over
    // them in AVX-512.
    let whole_tile = mr == AMX_ROWS && nr == NR && pairs.is_multiple_of(16);
    if whole_tile && direct(&scale) {
        let from = if load_c { (c as *const f32, 4 * ldc) } else { (scale.bias, 0) };
        amx::products(std::iter::once((a, b, pairs / 16)), (4 * a_row, 4 * NR, 64), from, (c, 4 * ldc));
        return;
    }
    // A bf16 C takes the sums through the buffer, from the bias where a direct tile starts from
    // it: the same f32 values as an f32 C gets, then rounded.
    let from_bias = whole_tile && scale.bf16_c && !load_c && direct(&TileScale { bf16_c: false, ..scale });
    let mut sums = std::mem::MaybeUninit::<Sums>::uninit();
    let whole = pairs / 16 * 16;
    // Writes all AMX_ROWS × NR sums (zero when there is no whole step).
    let to = (sums.as_mut_ptr() as *mut f32, 4 * NR);
    let from = if from_bias { (scale.bias, 0) } else { (std::ptr::null(), 0) };
    amx::products(std::iter::once((a, b, whole / 16)), (4 * a_row, 4 * NR, 64), from, to);
    let sums = sums.assume_init_ref();
    let (add, add_rs) = if load_c {
        (c as *const f32, ldc)
    } else if from_bias {
        (std::ptr::null(), 0)
    } else {
        (scale.bias, 0)
    };
    for r in 0..mr {
        let at = sums.0.as_ptr().add(r * NR);
        let mut acc = [_mm512_load_ps(at), _mm512_load_ps(at.add(16)), _mm512_load_ps(at.add(32))];
        for p in whole..pairs {
            let bp = b.add(p * NR);
            let av: __m512bh =
                std::mem::transmute(_mm512_set1_epi32(std::ptr::read_unaligned(a.add(r * a_row + p)) as i32));
            for (v, acc) in acc.iter_mut().enumerate() {
                let bv: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16 * v) as *const _));
                *acc = _mm512_dpbf16_ps(*acc, bv, av);
            }
        }
        store_row(&acc, r, (c, ldc), nr, &scale, (add, add_rs));
    }
}

/// Whether a tile's sums go to C unscaled (see [`amx_kernel`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn direct(scale: &TileScale) -> bool {
    scale.all == 1.0 && scale.rows.is_null() && scale.cols.is_null() && !scale.bf16_c
}

/// The AMX micro-kernel, as the products call it. Off x86_64 neither micro-kernel runs
/// (`available()` is false): the register kernel's stub stands in.
#[cfg(target_arch = "x86_64")]
const AMX_MICRO: Micro = amx_kernel;
#[cfg(not(target_arch = "x86_64"))]
const AMX_MICRO: Micro = kernel::<MR>;

/// The tile unit: enabling it for the process, configuring it per thread, the products.
#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    /// CPUID says AMX-TILE and AMX-BF16, and Linux grants the tile state to the process.
    pub fn enable() -> bool {
        // CPUID.(EAX=7, ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        // SAFETY: CPUID exists on every x86_64 CPU (the intrinsic is unsafe in older Rust).
        #[allow(unused_unsafe)]
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        #[cfg(target_os = "linux")]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a request for permission; fails (nonzero) on kernels without AMX support.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    /// The tile configuration for the products: palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
            t += 1;
        }
        Config(c)
    };

    /// This thread's tiles configured for [`products`] while it lives; released after (the
    /// thread's tile state back to its initial, unsaved state).
    pub struct Tiles(());

    impl Tiles {
        pub fn configure() -> Tiles {
            // SAFETY: AMX enabled for the process (callers check `amx()`); the config is valid.
            unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
            Tiles(())
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: as in configure.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// Where sum tile 3i + j (rows 16i.., columns 16j..) starts in a matrix of f32 rows `stride`
    /// bytes apart at `base`: the six addresses the products load their sums from and store them to.
    #[inline(always)]
    fn sum_tiles(base: *const f32, stride: usize) -> [*const u8; 6] {
        std::array::from_fn(|t| (base as *const u8).wrapping_add(16 * (t / 3) * stride + 64 * (t % 3)))
    }

    /// `out(r, j) = from(r, j) + Σ_segments Σ_{p < 16·steps} A(r, p) · B(p, j)` for r < AMX_ROWS,
    /// j < NR, as bf16 pair products with f32 sums; each segment `(a, b, steps)` has A's word
    /// (r, p) at `a + r·a_stride bytes + 4p` and B's words (p, j) at `b + p·b_stride bytes +
    /// (j / 16)·b_col bytes + 4·(j % 16)` (a packed sliver: strides 4·NR and 64; a convolution's
    /// blocked input, [`conv3x3`]: 64 and a block's bytes), `from`'s and `out`'s value (r, j) at
    /// `+ r·stride bytes + 4j` (`from` null: zero; its stride 0: the same row for all). Sums
    /// C(i, j) live in tile 3i + j ([`sum_tiles`]), A in tile 6, B in tile 7; per step seven loads
    /// for six products (the second A reuses the last B, then walks back).
    ///
    /// # Safety
    /// The rows and pairs readable, `from` readable and `out` writable for AMX_ROWS × NR f32; the
    /// thread's tiles configured ([`Tiles`]).
    #[inline]
    pub unsafe fn products(
        segments: impl Iterator<Item = (*const u32, *const u32, usize)>,
        (a_stride, b_stride, b_col): (usize, usize, usize),
        (from, from_stride): (*const f32, usize),
        (out, out_stride): (*mut f32, usize),
    ) {
        unsafe {
            if from.is_null() {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    "tilezero tmm4",
                    "tilezero tmm5",
                    options(nostack, nomem)
                );
            } else {
                let c = sum_tiles(from, from_stride);
                asm!(
                    "tileloadd tmm0, [{c0} + {s}*1]",
                    "tileloadd tmm1, [{c1} + {s}*1]",
                    "tileloadd tmm2, [{c2} + {s}*1]",
                    "tileloadd tmm3, [{c3} + {s}*1]",
                    "tileloadd tmm4, [{c4} + {s}*1]",
                    "tileloadd tmm5, [{c5} + {s}*1]",
                    c0 = in(reg) c[0],
                    c1 = in(reg) c[1],
                    c2 = in(reg) c[2],
                    c3 = in(reg) c[3],
                    c4 = in(reg) c[4],
                    c5 = in(reg) c[5],
                    s = in(reg) from_stride,
                    options(nostack, readonly)
                );
            }
            for (a, b, steps) in segments {
                for s in 0..steps {
                    let a0 = a.add(16 * s);
                    let a1 = (a0 as *const u8).add(16 * a_stride);
                    let b0 = (b as *const u8).add(16 * s * b_stride);
                    asm!(
                        "tileloadd tmm6, [{a0} + {sa}*1]",
                        "tileloadd tmm7, [{b0} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm6, tmm7",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm1, tmm6, tmm7",
                        "tileloadd tmm7, [{b2} + {sb}*1]",
                        "tdpbf16ps tmm2, tmm6, tmm7",
                        "tileloadd tmm6, [{a1} + {sa}*1]",
                        "tdpbf16ps tmm5, tmm6, tmm7",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm4, tmm6, tmm7",
                        "tileloadd tmm7, [{b0} + {sb}*1]",
                        "tdpbf16ps tmm3, tmm6, tmm7",
                        a0 = in(reg) a0,
                        a1 = in(reg) a1,
                        b0 = in(reg) b0,
                        b1 = in(reg) b0.add(b_col),
                        b2 = in(reg) b0.add(2 * b_col),
                        sa = in(reg) a_stride,
                        sb = in(reg) b_stride,
                        options(nostack, readonly)
                    );
                }
            }
            let c = sum_tiles(out, out_stride);
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                "tilestored [{c4} + {s}*1], tmm4",
                "tilestored [{c5} + {s}*1], tmm5",
                c0 = in(reg) c[0],
                c1 = in(reg) c[1],
                c2 = in(reg) c[2],
                c3 = in(reg) c[3],
                c4 = in(reg) c[4],
                c5 = in(reg) c[5],
                s = in(reg) out_stride,
                options(nostack)
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    pub fn enable() -> bool {
        false
    }
    pub unsafe fn products(
        _: impl Iterator<Item = (*const u32, *const u32, usize)>,
        _: (usize, usize, usize),
        _: (*const f32, usize),
        _: (*mut f32, usize),
    ) {
        unreachable!("gemm_bf16::amx() is false off x86_64")
    }
    pub struct Tiles(());
    impl Tiles {
        pub fn configure() -> Tiles {
            unreachable!("gemm_bf16::amx() is false off x86_64")
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const R: usize>(
    _: usize,
    _: (*const u32, usize),
    _: *const u32,
    _: (*mut f32, usize),
    _: (usize, usize),
    _: TileScale,
    _: bool,
) {
    unreachable!("gemm_bf16::available() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rnd(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal)).collect()
    }

    fn round(x: f32) -> f32 {
        bf16::from_f32(x).to_f32()
    }

    #[test]
    fn bf16_products_pay_where_the_dot_product_keeps_up_with_fmas() {
        // Rates measured (instructions per second, one core): AMD Zen 5 both ~3.6e9; Intel Xeon
        // 5th generation (Emerald Rapids, no AMX) 1.25e9 dot products against 5.4e9 FMAs.
        assert!(pays_at((3.6e9, 3.6e9)));
        assert!(!pays_at((1.25e9, 5.4e9)));
        // Both timed here: positive rates, and the rule decided (printed for the record).
        if available() {
            let (dot, fma) = rates();
            assert!(dot > 0.0 && fma > 0.0 && dot.is_finite() && fma.is_finite());
            eprintln!("vdpbf16ps {dot:.3e}/s, vfmadd231ps {fma:.3e}/s: bf16 products pay: {}", pays());
        }
    }

    /// The f64 product of the bf16-rounded operands: what the kernel must give up to f32 sums.
    fn reference(a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for kk in 0..k {
                let x = round(a[i * k + kk]) as f64;
                for j in 0..n {
                    c[i * n + j] += x * round(b[kk * n + j]) as f64;
                }
            }
        }
        c
    }

    #[cfg(unix)]
    #[test]
    fn in_place_weights_are_not_read_past_their_last_row() {
        if !available() {
            return;
        }
        // A (9 rows: one full panel and a 1-row tail; 33: an AMX micro-tile, 16 pairs by tiles
        // and 4 past them, and a 1-row tail) ends exactly at a page followed by an inaccessible
        // page: any read past its last row faults.
        both_kernels(|| {
            guarded_in_place(9, 20, 8);
            guarded_in_place(33, 20, 40);
        })
    }

    #[cfg(unix)]
    fn guarded_in_place(m: usize, n: usize, k: usize) {
        let page = 4096usize;
        // SAFETY: a private anonymous mapping of two pages, the second made inaccessible.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as *mut u8;
            assert!(base as isize != -1);
            assert_eq!(libc::mprotect(base.add(page) as *mut _, page, libc::PROT_NONE), 0);
            let a = base.add(page - m * k * 2) as *mut bf16;
            let av = rnd(m * k, 5);
            for (i, &x) in av.iter().enumerate() {
                *a.add(i) = bf16::from_f32(x);
            }
            let b = rnd(k * n, 6);
            let mut c = vec![0f32; m * n];
            gemm(
                (m, n, k),
                c.as_mut_ptr(),
                n,
                false,
                Lhs::<bf16>::InPlace { ptr: a, rs: k },
                View { ptr: b.as_ptr(), rs: n, cs: 1 },
                Scale::ONE,
                false,
            );
            let want = reference(&av, &b, (m, n, k));
            assert!(c.iter().zip(&want).all(|(&c, &w)| (c as f64 - w).abs() < 1e-4));
            libc::munmap(base as *mut _, 2 * page);
        }
    }

    #[test]
    fn rounding_matches_half() {
        for x in rnd(10000, 1).into_iter().chain([0.0, -0.0, f32::INFINITY, f32::MAX, 1e-40, f32::NAN]) {
            let ours = x.bf16_bits() as u16;
            let want = bf16::from_f32(x).to_bits();
            assert!(ours == want || (x.is_nan() && bf16::from_bits(ours).is_nan()), "{x}: {ours:#x} vs {want:#x}");
        }
    }

    #[test]
    fn a_rows_sums_do_not_depend_on_the_rows_beside_it() {
        both_kernels(rows_alone)
    }

    /// Rows multiplied alone (one or two: the micro-kernel for that many rows) give the bits the
    /// same rows give inside a larger product's MR-row tiles, with a bias, in one k block and
    /// several, serial and parallel. (On AMX a larger product's first 32 rows take the tiles, whose
    /// sums round otherwise: its tail rows, from 32, are the ones to compare.)
    fn rows_alone() {
        for &(n, k) in &[(100, 40), (1280, 1280), (96, 3080)] {
            let m = 35;
            let a: Vec<bf16> = rnd(m * k, 7).iter().map(|&x| bf16::from_f32(x)).collect();
            let bt: Vec<bf16> = rnd(n * k, 8).iter().map(|&x| bf16::from_f32(x)).collect();
            let bias = rnd(n, 9);
            let scale = Scale { bias: Some(&bias), ..Scale::ONE };
            let b = View { ptr: bt.as_ptr(), rs: 1, cs: k };
            let product = |i0: usize, rows: usize, parallel: bool| {
                let mut c = vec![f32::NAN; rows * n];
                let lhs = Lhs::<bf16>::InPlace { ptr: a[i0 * k..].as_ptr(), rs: k };
                unsafe { gemm((rows, n, k), c.as_mut_ptr(), n, false, lhs, b, scale, parallel) };
                c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let all = product(0, m, true);
            let cases: &[(usize, usize)] =
                if amx() { &[(32, 1), (33, 2), (34, 1)] } else { &[(0, 1), (5, 2), (33, 2)] };
            for &(i0, rows) in cases {
                for parallel in [false, true] {
                    assert_eq!(product(i0, rows, parallel), all[i0 * n..(i0 + rows) * n], "{:?}", (i0, rows, n, k));
                }
            }
        }
    }

    #[test]
    fn a_nested_product_takes_a_fresh_b_block() {
        // The kept block is lent once; a second borrower on the thread gets its own, no panic.
        let inner = with_kept(&B_BLOCK, |outer| {
            outer.push(7);
            with_kept(&B_BLOCK, |inner| {
                inner.push(1);
                inner.clone()
            })
        });
        assert_eq!(inner, vec![1]);
    }

    /// `f` with the AMX micro-kernel where this CPU has it, then with the AVX512_BF16 one; nothing
    /// on a CPU without the instructions.
    fn both_kernels(f: fn()) {
        if !available() {
            eprintln!("skipped: this CPU has no avx512_bf16");
            return;
        }
        eprintln!("AMX: {}", amx());
        f();
        if amx() {
            without_amx(f);
        }
    }

    /// Each `c[i]` within the bf16 products' tolerance (f32 sums of k products) of `want(i)`.
    fn assert_close(c: &[f32], want: impl Fn(usize) -> f64, k: usize, what: impl Fn() -> String) {
        for (i, &got) in c.iter().enumerate() {
            let w = want(i);
            let tol = 1e-5 * (k as f64).sqrt() * 4.0 + 1e-6 * w.abs();
            assert!(((got as f64) - w).abs() < tol, "{} at {i}: {got} vs {w}", what());
        }
    }

    #[test]
    fn implicit_convolutions_match_the_rounded_reference() {
        if !amx() {
            eprintln!("skipped: no AMX here");
            return;
        }
        // Partial channel groups (33, 40, 70 outputs), one and several steps of input pairs and
        // bands of rows (see CONV_BAND_WORDS), pad columns inside tiles, a last tile past the
        // band, upsampled inputs, a 1 × 1 image, batches of two; bf16 and int8 weights (channel
        // scales), with and without a bias; against f64 sums of the bf16-rounded input and weights.
        for &(batch, cin, ih, iw, up, cout) in &[
            (1, 32, 5, 7, 1, 32),
            (2, 64, 17, 50, 1, 40),
            (1, 96, 9, 13, 2, 70),
            (1, 32, 40, 3, 1, 33),
            (2, 64, 1, 1, 2, 32),
        ] {
            let shape = Conv3x3 { batch, cin, ih, iw, up, cout };
            let (h, w) = (ih * up, iw * up);
            let x = rnd(batch * cin * ih * iw, 31);
            let wt = rnd(cout * cin * 9, 32);
            let bias = rnd(cout, 33);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(34);
            let codes: Vec<Q8> = (0..cout * cin * 9).map(|_| Q8(rng.random_range(1..=255))).collect();
            let scales: Vec<f32> = (0..cout).map(|c| 0.01 + 0.001 * c as f32).collect();
            let want =
                |weight: &dyn Fn(usize) -> f64, (bi, co, y, xx): (usize, usize, usize, usize), with_bias: bool| {
                    let mut acc = if with_bias { bias[co] as f64 } else { 0.0 };
                    for ci in 0..cin {
                        for (ky, kx) in (0..3).flat_map(|ky| (0..3).map(move |kx| (ky, kx))) {
                            let (yy, xs) = ((y + ky) as isize - 1, (xx + kx) as isize - 1);
                            if yy < 0 || xs < 0 || yy >= h as isize || xs >= w as isize {
                                continue;
                            }
                            let v = round(x[((bi * cin + ci) * ih + yy as usize / up) * iw + xs as usize / up]) as f64;
                            acc += v * weight(((co * cin + ci) * 3 + ky) * 3 + kx);
                        }
                    }
                    acc
                };
            for (kind, with_bias) in [("bf16", true), ("bf16", false), ("int8", true)] {
                let mut out = vec![std::mem::MaybeUninit::new(f32::NAN); batch * cout * h * w];
                let b = with_bias.then_some(&bias[..]);
                let weight: Box<dyn Fn(usize) -> f64> = if kind == "int8" {
                    conv3x3(&x, shape, &codes, Some(&scales), b, &mut out);
                    Box::new(|i| (codes[i].0 as i32 - 128) as f64 * scales[i / (cin * 9)] as f64)
                } else {
                    let w16: Vec<bf16> = wt.iter().map(|&v| bf16::from_f32(v)).collect();
                    conv3x3(&x, shape, &w16, None, b, &mut out);
                    Box::new(|i| round(wt[i]) as f64)
                };
                // SAFETY: f32 values (NaN where nothing was written).
                let got: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
                let at = |i: usize| (i / (cout * h * w), (i / (h * w)) % cout, (i / w) % h, i % w);
                let factor = if kind == "int8" { 127.0 * 0.08 } else { 1.0 };
                for (i, &g) in got.iter().enumerate() {
                    let e = want(&*weight, at(i), with_bias);
                    let tol = factor * 4e-5 * ((cin * 9) as f64).sqrt() + 1e-6 * e.abs();
                    assert!(
                        ((g as f64) - e).abs() < tol,
                        "{kind} {shape:?} bias {with_bias} at {:?}: {g} vs {e}",
                        at(i)
                    );
                }
            }
        }
    }

    #[test]
    fn products_match_the_rounded_reference() {
        both_kernels(products_match)
    }

    fn products_match() {
        // Tails in every direction, several k blocks, odd k, both B layouts, A packed from f32 and
        // in place from bf16, accumulate and scale, serial and parallel; for AMX: whole 32-row
        // micro-tiles with and without a row tail, pairs in whole steps of 16 and past them, and
        // unscaled whole tiles (variants 1, 2, 4, 5), whose sums start from the bias or C and go
        // back to C from the tiles, over one k block and several.
        for &(m, n, k) in &[
            (1, 1, 1),
            (8, 48, 2),
            (13, 50, 7),
            (17, 100, 400),
            (70, 500, 390),
            (9, 1000, 1024),
            (40, 1281, 34),
            (64, 96, 64),
            (33, 200, 40),
            (96, 130, 421),
            (64, 144, 1600),
        ] {
            let a = rnd(m * k, 2);
            let b = rnd(k * n, 3);
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let a16: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
            let want = reference(&a, &b, (m, n, k));
            let c0 = rnd(m * n, 4);
            let bias = rnd(n, 5);
            let factor = |variant: usize| if variant == 0 || variant == 3 { 0.5 } else { 1.0 };
            let check = |c: &[f32], accumulate: bool, variant: usize| {
                let want = |i: usize| {
                    factor(variant) as f64 * want[i] + if accumulate { c0[i] as f64 } else { bias[i % n] as f64 }
                };
                assert_close(c, want, k, || format!("{:?} variant {variant}", (m, n, k)));
            };
            for variant in 0..4 {
                let mut c = c0.clone();
                let accumulate = variant % 2 == 1;
                // Writing variants add a bias per column in the epilogue.
                let scale = Scale { bias: (!accumulate).then_some(&bias[..]), ..Scale::all(factor(variant)) };
                let bview = if variant < 2 {
                    View { ptr: b.as_ptr(), rs: n, cs: 1 }
                } else {
                    View { ptr: bt.as_ptr(), rs: 1, cs: k }
                };
                let parallel = variant != 1;
                unsafe {
                    if k % 2 == 0 && variant >= 2 {
                        let lhs = Lhs::<bf16>::InPlace { ptr: a16.as_ptr(), rs: k };
                        gemm((m, n, k), c.as_mut_ptr(), n, accumulate, lhs, bview, scale, parallel);
                    } else {
                        let lhs = Lhs::Packed(View { ptr: a.as_ptr(), rs: k, cs: 1 });
                        gemm((m, n, k), c.as_mut_ptr(), n, accumulate, lhs, bview, scale, parallel);
                    }
                }
                check(&c, accumulate, variant);
            }
            // B as bf16 columns (a linear layer's weight rows in place): read as words where a
            // block holds whole pairs, transposed 16 × 16 (odd k: one value at a time).
            let bt16: Vec<bf16> = bt.iter().map(|&x| bf16::from_f32(x)).collect();
            for (variant, accumulate) in [(4, false), (5, true)] {
                let mut c = c0.clone();
                let scale = Scale { bias: (!accumulate).then_some(&bias[..]), ..Scale::all(factor(variant)) };
                let bview = View { ptr: bt16.as_ptr(), rs: 1, cs: k };
                let lhs = Lhs::Packed(View { ptr: a.as_ptr(), rs: k, cs: 1 });
                unsafe { gemm((m, n, k), c.as_mut_ptr(), n, accumulate, lhs, bview, scale, variant == 4) };
                check(&c, accumulate, variant);
            }
        }
    }

    #[test]
    fn pre_packed_products_match_the_rounded_reference() {
        both_kernels(pre_packed)
    }

    /// B packed once ([`PackedB::new`], its last block padded to whole tile steps on AMX machines)
    /// times A packed per call ([`gemm_packed`], attention's products) and A in place or packed
    /// ([`gemm_prepacked`]): k of 40 and 80 (attention's head dimensions: 4 and 8 pairs past the
    /// last whole 16), 154 (77 tokens), odd, one, and several k blocks (A in place read where it
    /// lies: the last block unpadded, 1600, and padded, so packed, 1540).
    fn pre_packed() {
        for &(m, n, k) in &[
            (40, 100, 40),
            (70, 77, 80),
            (33, 50, 154),
            (5, 20, 1),
            (37, 60, 17),
            (34, 49, 1700),
            (64, 96, 1600),
            (64, 100, 1540),
        ] {
            let a = rnd(m * k, 11);
            let b = rnd(k * n, 12);
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let a16: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
            let want = reference(&a, &b, (m, n, k));
            let check =
                |c: &[f32], what: &str| assert_close(c, |i| 0.5 * want[i], k, || format!("{what} {:?}", (m, n, k)));
            // B with rows contiguous (V) and with columns contiguous (Kᵀ read from K's rows).
            for (bview, layout) in
                [(View { ptr: b.as_ptr(), rs: n, cs: 1 }, "rows"), (View { ptr: bt.as_ptr(), rs: 1, cs: k }, "columns")]
            {
                let pb = unsafe { PackedB::new(bview, (k, n)) };
                let aview = View { ptr: a.as_ptr(), rs: k, cs: 1 };
                let mut c = vec![f32::NAN; m * n];
                unsafe { gemm_packed(m, c.as_mut_ptr(), n, false, Lhs::Packed(aview), &pb, Scale::all(0.5)) };
                check(&c, &format!("gemm_packed, B by {layout}"));
                let mut c = vec![f32::NAN; m * n];
                unsafe { gemm_prepacked(m, c.as_mut_ptr(), n, false, Lhs::Packed(aview), &pb, Scale::all(0.5)) };
                check(&c, &format!("gemm_prepacked, A packed, B by {layout}"));
                if k % 2 == 0 {
                    let lhs = Lhs::<bf16>::InPlace { ptr: a16.as_ptr(), rs: k };
                    let mut c = vec![f32::NAN; m * n];
                    unsafe { gemm_prepacked(m, c.as_mut_ptr(), n, false, lhs, &pb, Scale::all(0.5)) };
                    check(&c, &format!("gemm_prepacked, A in place, B by {layout}"));
                    // Unscaled, as attention's scores: whole tiles go from zeroed sums to C.
                    let lhs = Lhs::<bf16>::InPlace { ptr: a16.as_ptr(), rs: k };
                    let mut c = vec![f32::NAN; m * n];
                    unsafe { gemm_packed(m, c.as_mut_ptr(), n, false, lhs, &pb, Scale::ONE) };
                    let what = || format!("gemm_packed, A in place, unscaled, B by {layout} {:?}", (m, n, k));
                    assert_close(&c, |i| want[i], k, what);
                }
            }
        }
    }

    #[test]
    fn int8_codes_enter_exactly_with_their_channel_scales() {
        both_kernels(int8_codes)
    }

    fn int8_codes() {
        let mut r = rand::rngs::StdRng::seed_from_u64(7);
        for &(m, n, k) in &[(3, 5, 1), (13, 50, 37), (70, 130, 401)] {
            // Codes over the whole range, the ends included.
            let mut codes = |len: usize| -> Vec<Q8> {
                (0..len)
                    .map(|i| {
                        Q8(if i % 97 == 0 {
                            1
                        } else if i % 89 == 0 {
                            255
                        } else {
                            r.random_range(1..=255)
                        })
                    })
                    .collect()
            };
            let (qa, qb) = (codes(m * k), codes(n * k));
            let row_s: Vec<f32> = (0..m).map(|i| 0.01 + i as f32 * 1e-3).collect();
            let col_s: Vec<f32> = (0..n).map(|j| 0.02 - j as f32 * 1e-4).collect();
            let val = |q: Q8| (q.0 as i32 - 128) as f64;
            // The int8 weight as A (per-row scales) times f32 activations; and f32 activations
            // times the int8 weight's transpose as B (per-column scales, a linear layer's Wᵀ).
            let x = rnd(k * n, 8);
            let mut c = vec![0f32; m * n];
            let rows = Scale { rows: Some(&row_s), ..Scale::ONE };
            unsafe {
                let lhs = Lhs::Packed(View { ptr: qa.as_ptr(), rs: k, cs: 1 });
                gemm((m, n, k), c.as_mut_ptr(), n, false, lhs, View { ptr: x.as_ptr(), rs: n, cs: 1 }, rows, true);
            }
            for i in 0..m {
                for j in 0..n {
                    let w: f64 = (0..k).map(|kk| val(qa[i * k + kk]) * round(x[kk * n + j]) as f64).sum::<f64>()
                        * row_s[i] as f64;
                    let got = c[i * n + j] as f64;
                    assert!((got - w).abs() < 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt(), "A {i},{j}: {got} vs {w}");
                }
            }
            let xa = rnd(m * k, 9);
            let mut c = vec![0f32; m * n];
            let cols = Scale { cols: Some(&col_s), ..Scale::ONE };
            unsafe {
                let lhs = Lhs::Packed(View { ptr: xa.as_ptr(), rs: k, cs: 1 });
                gemm((m, n, k), c.as_mut_ptr(), n, false, lhs, View { ptr: qb.as_ptr(), rs: 1, cs: k }, cols, false);
            }
            for i in 0..m {
                for j in 0..n {
                    let w: f64 = (0..k).map(|kk| round(xa[i * k + kk]) as f64 * val(qb[j * k + kk])).sum::<f64>()
                        * col_s[j] as f64;
                    let got = c[i * n + j] as f64;
                    assert!((got - w).abs() < 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt(), "B {i},{j}: {got} vs {w}");
                }
            }
        }
        // Every code's bf16 is its integer, in the vector and scalar packers alike.
        let all: Vec<Q8> = (0..=255u8).map(Q8).collect();
        let mut fast = vec![0u32; 128];
        Q8::pack_pairs(&all, &mut fast);
        let mut slow = vec![0u32; 128];
        pack_pairs_scalar(&all, &mut slow);
        assert_eq!(fast, slow);
        for (i, w) in fast.iter().enumerate() {
            assert_eq!(bf16::from_bits(*w as u16).to_f32(), (2 * i) as f32 - 128.0);
            assert_eq!(bf16::from_bits((*w >> 16) as u16).to_f32(), (2 * i + 1) as f32 - 128.0);
        }
    }
}
