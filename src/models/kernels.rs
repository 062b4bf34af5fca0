//! CPU kernels for the hot operations of the UNet and the VAE, as candle custom ops (f32
//! activations; weights in f32, f16 or bf16 storage, widened on the fly).
//!
//! Why they exist (profile of one full-size SD1.5 UNet step at 512², see README "CPU speed"):
//! candle 0.11's CPU convolution repacks the weights and transposes the input to NHWC on every
//! call, single-threaded, then scatters the output; GroupNorm is ten separate tensor passes; the
//! attention softmax over 4096 × 4096 scores runs glibc's scalar `expf`. Here:
//! - [`conv2d`]: im2col straight from NCHW (each row a shifted copy of one input plane), tiled so the
//!   buffer stays ≤ 16 MB, and one GEMM per tile writing NCHW output in place, bias included; with
//!   bf16 products and stride 1, no buffer: the product's jobs make the rows of their own blocks
//!   (`gemm_bf16::gemm_rows`).
//!   PyTorch/oneDNN and stable-diffusion.cpp (ggml_conv_2d = im2col + mul_mat) do the same. The
//!   large 3×3 stride-1 ones take Winograd F(4×4, 3×3) instead (`kernels/winograd.rs`: a quarter
//!   of the multiplications, as oneDNN and OpenVINO do on CPUs), in f32 whatever the weights.
//! - [`group_norm`]: one read for the statistics (f64 sums, two-pass like PyTorch's) and one write,
//!   SiLU fused, in parallel over (batch, group).
//! - [`attention`]: memory-efficient attention (Rabe & Staats 2021, "Self-attention Does Not Need
//!   O(n²) Memory"; the chunking diffusers' `AttnProcessor2_0` gets from torch's SDPA): per (batch,
//!   head, block of queries) one GEMM for the scores, a vectorised exact-row softmax, one GEMM
//!   into the output, reading the (B, L, heads·d) projections in place (no head transposes).
//! - [`geglu`]: diffusers' GEGLU `a · GELU(gate)` (erf form) in one pass; [`linear_geglu`] its
//!   projection and the gate in one op (inside the bf16 products where k is one block of them).
//!
//! - bf16-stored weights on a CPU with AVX512_BF16 ([`bf16_arithmetic`]): the convolutions, linear
//!   layers and both attention products run `gemm_bf16` (bf16 products, f32 sums; activations
//!   stay f32 between operations and are rounded to bf16 only inside a product's packing — except
//!   those read by bf16 products alone, which their producer writes already rounded so:
//!   [`layer_norm_bf16`], [`linear_bf16`], [`linear_geglu_bf16`], [`attention_bf16`]), the way
//!   `torch.autocast("cpu", torch.bfloat16)` treats these operations; GroupNorm, softmax and GEGLU
//!   compute in f32.
//!
//! Non-CPU devices and other dtypes fall back to the plain candle ops these are tested against.

use super::weights::Values;
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use gemm::Parallelism;
use rayon::prelude::*;

/// Runs `f` with every 3×3 stride-1 convolution on this thread computed by Winograd F(4×4, 3×3)
/// (`true`) or by im2col (`false`) whatever its size (by default the size decides; see
/// `kernels/winograd.rs`): lets the parity tests run the tiny fixtures' small layers through it.
pub fn with_winograd<T>(on: bool, f: impl FnOnce() -> T) -> T {
    winograd::forced(on, f)
}

/// Whether large 3×3 convolutions run Winograd F(4×4, 3×3) (unless `GHIBLIFY_WINOGRAD=0`).
pub fn winograd_enabled() -> bool {
    winograd::enabled()
}

/// Runs `$body` (an expression over `$args`) compiled for AVX-512 or AVX2+FMA when the CPU has them
/// (detected once, at run time), else for the baseline target: the loops are written so LLVM
/// vectorises them at whatever width the features allow.
macro_rules! simd {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        #[inline(always)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                    // SAFETY: the CPU has the features v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features v3 is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body
        }
    };
}

/// An op on (input, weight, optional bias): `fwd` does the work on the weight as the matrix
/// products read it. [`Stored`] runs it with the weight as a tensor operand, [`InPlaceOp`] with a
/// weight read in place from its file (carried by the op; candle tensors own their memory).
trait WeightedOp: Send + Sync {
    const NAME: &'static str;
    const NAME_BIAS: &'static str;
    /// Names the weight in errors.
    const WHAT: &'static str;
    /// The weight's per-output-channel scales when it is int8 ([`Weight::Q8`]).
    fn scales(&self) -> Option<&[f32]>;
    fn fwd(
        &self,
        x: (&CpuStorage, &Layout),
        w: &Wt,
        wdims: &[usize],
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)>;
}

/// A [`WeightedOp`] on (input, weight tensor): `CustomOp2` without the bias, `CustomOp3` with it.
struct Stored<Op>(Op);

impl<Op: WeightedOp> CustomOp2 for Stored<Op> {
    fn name(&self) -> &'static str {
        Op::NAME
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = Wt::new(s2, l2, self.0.scales(), Op::WHAT)?;
        self.0.fwd((s1, l1), &w, l2.shape().dims(), None)
    }
}

impl<Op: WeightedOp> CustomOp3 for Stored<Op> {
    fn name(&self) -> &'static str {
        Op::NAME_BIAS
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w = Wt::new(s2, l2, self.0.scales(), Op::WHAT)?;
        self.0.fwd((s1, l1), &w, l2.shape().dims(), Some((s3, l3)))
    }
}

/// A [`WeightedOp`] with its weight read in place ([`Weight::InPlace`]): `CustomOp1` on the
/// input, `CustomOp2` on (input, bias).
struct InPlaceOp<'a, Op> {
    op: Op,
    view: &'a super::weights::View,
}

impl<Op: WeightedOp> CustomOp1 for InPlaceOp<'_, Op> {
    fn name(&self) -> &'static str {
        Op::NAME
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        self.op.fwd((s1, l1), &Wt::dense(self.view.values()), self.view.dims(), None)
    }
}

impl<Op: WeightedOp> CustomOp2 for InPlaceOp<'_, Op> {
    fn name(&self) -> &'static str {
        Op::NAME_BIAS
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.op.fwd((s1, l1), &Wt::dense(self.view.values()), self.view.dims(), Some((s2, l2)))
    }
}

mod winograd;

fn threads() -> usize {
    rayon::current_num_threads()
}

fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !crate::device::generic_ops()
}

/// Whether `t` is an activation our CPU kernels read: f32, or bf16 written for a reader with bf16
/// products ([`layer_norm_bf16`], [`linear_geglu_bf16`]).
fn is_cpu_act(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::BF16) && !crate::device::generic_ops()
}

/// A bf16 activation on the CPU widened to f32 (exactly) for a path that is not ours: what it
/// would have computed on had the producer written f32. Anything else as it is.
fn widened(t: &Tensor) -> Result<std::borrow::Cow<'_, Tensor>> {
    Ok(if t.device().is_cpu() && t.dtype() == DType::BF16 {
        std::borrow::Cow::Owned(t.to_dtype(DType::F32)?)
    } else {
        std::borrow::Cow::Borrowed(t)
    })
}

/// The data of a contiguous f32 storage.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected contiguous f32, got {:?}", s.dtype()),
    }
}

/// A contiguous f32, f16 or bf16 storage's values.
fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Values<'a>> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: weight not contiguous")))?;
    Ok(match s {
        CpuStorage::F32(v) => Values::F32(&v[a..b]),
        CpuStorage::F16(v) => Values::F16(&v[a..b]),
        CpuStorage::BF16(v) => Values::Bf16(&v[a..b]),
        other => candle_core::bail!("{what}: unsupported weight dtype {:?}", other.dtype()),
    })
}

impl<'a> Values<'a> {
    /// As f32: borrowed when stored as f32, widened once per call from f16/bf16 storage (half the
    /// resident memory; the copy is small next to the GEMM it feeds).
    fn to_f32(self) -> std::borrow::Cow<'a, [f32]> {
        match self {
            Values::F32(v) => std::borrow::Cow::Borrowed(v),
            _ => std::borrow::Cow::Owned(self.to_f32_vec()),
        }
    }

    /// A copy as f32, on all threads, written once: the load path's conversion out of a file
    /// ([`super::weights::tensor_from_bytes`]) and the per-call widening alike.
    pub fn to_f32_vec(self) -> Vec<f32> {
        match self {
            Values::F32(v) => widen(v, write_copy),
            Values::F16(v) => widen(v, f16_to_f32),
            Values::Bf16(v) => widen(v, bf16_to_f32),
        }
    }

    /// A copy as bf16, on all threads, written once, each value rounded as candle's `to_dtype`
    /// rounds it (half's `from_f32` of the value as f32): the load path's conversion out of a
    /// file for `--dtype bf16`, where candle's route copied the file's f32 out first (4 bytes of
    /// fresh memory per value, then read again) and narrowed on one thread.
    pub fn to_bf16_vec(self) -> Vec<half::bf16> {
        narrowed(self, half::bf16::NAN, f32_to_bf16)
    }

    /// [`Values::to_bf16_vec`] for f16 (`--dtype f16`).
    pub fn to_f16_vec(self) -> Vec<half::f16> {
        narrowed(self, half::f16::NAN, f32_to_f16)
    }

    /// A CPU tensor of `dtype` and `shape` holding the values converted ([`Values::to_f32_vec`],
    /// [`Values::to_bf16_vec`], [`Values::to_f16_vec`]); `None` for other dtypes. What the loader
    /// and [`to_dtype`] both build.
    pub fn to_tensor(self, dtype: DType, shape: &[usize], device: &candle_core::Device) -> Option<Result<Tensor>> {
        Some(match dtype {
            DType::F32 => Tensor::from_vec(self.to_f32_vec(), shape, device),
            DType::BF16 => Tensor::from_vec(self.to_bf16_vec(), shape, device),
            DType::F16 => Tensor::from_vec(self.to_f16_vec(), shape, device),
            _ => return None,
        })
    }

    fn len(self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }
}

/// `t` as `dtype`: between f32, f16 and bf16 on the CPU (contiguous) one parallel pass written
/// once, with candle's rounding ([`Values::to_f32_vec`], [`Values::to_bf16_vec`]); anything else
/// candle's `to_dtype` (one thread on the CPU, from a copy). For the LoRA merge, which widens each
/// half-precision weight it touches to f32 and narrows the sum again (272 layers for LCM-LoRA).
pub fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype || !t.device().is_cpu() || !t.is_contiguous() {
        return t.to_dtype(dtype);
    }
    let (storage, layout) = t.storage_and_layout();
    let v = match &*storage {
        candle_core::Storage::Cpu(s) => match values(s, layout, "to_dtype") {
            Ok(v) => v,
            Err(_) => {
                drop(storage);
                return t.to_dtype(dtype);
            }
        },
        _ => unreachable!("checked on the CPU above"),
    };
    match v.to_tensor(dtype, t.dims(), t.device()) {
        Some(converted) => converted,
        None => {
            drop(storage);
            t.to_dtype(dtype)
        }
    }
}

/// A float tensor's values (f32, f16 or bf16; flattened) as bit patterns, for tests that compare
/// conversions bit for bit, NaN payloads included.
#[cfg(test)]
pub(crate) fn float_bits(t: &Tensor) -> Vec<u32> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect(),
        DType::F16 => t.to_vec1::<half::f16>().unwrap().iter().map(|v| v.to_bits() as u32).collect(),
        _ => t.to_vec1::<half::bf16>().unwrap().iter().map(|v| v.to_bits() as u32).collect(),
    }
}

/// `v` narrowed to a 16-bit float by `narrow` (f32 values into as many), on all threads, the
/// output written once; f16/bf16 sources are widened 4096 values at a time into a buffer on the
/// stack first, so no f32 copy of the tensor is made.
fn narrowed<T: Copy + Send>(
    v: Values,
    nan: T,
    narrow: impl Fn(&[f32], &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    const CHUNK: usize = 1 << 16;
    const BLOCK: usize = 4096;
    let chunk = |at: usize, out: &mut [std::mem::MaybeUninit<T>]| {
        let mut wide = [std::mem::MaybeUninit::<f32>::uninit(); BLOCK];
        for (j, o) in out.chunks_mut(BLOCK).enumerate() {
            let (lo, hi) = (at + j * BLOCK, at + j * BLOCK + o.len());
            let w = &mut wide[..o.len()];
            match v {
                Values::F32(x) => {
                    narrow(&x[lo..hi], o);
                    continue;
                }
                Values::F16(x) => f16_to_f32(&x[lo..hi], w),
                Values::Bf16(x) => bf16_to_f32(&x[lo..hi], w),
            }
            // SAFETY: the converter wrote all o.len() values of w just above.
            narrow(unsafe { &*(w as *const [std::mem::MaybeUninit<f32>] as *const [f32]) }, o);
        }
    };
    // SAFETY: the chunks cover all v.len() values, and `narrow` writes each block whole.
    unsafe {
        written_as(v.len(), nan, |out| out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| chunk(i * CHUNK, o)))
    }
}

simd! {
pub(crate) fn f32_to_bf16(v: &[f32], out: &mut [std::mem::MaybeUninit<half::bf16>]) {
    // half's rounding (nearest even, NaN kept quiet), the one candle's to_dtype applies — bit for
    // bit the bf16 products' own (`gemm_bf16::Elem::bf16_bits`), so a tensor written through here
    // is what those products would have packed.
    for (o, &x) in out.iter_mut().zip(v) {
        o.write(half::bf16::from_f32(x));
    }
}
}

fn f32_to_f16(v: &[f32], out: &mut [std::mem::MaybeUninit<half::f16>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { f32_to_f16_avx512(v, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX.
        return unsafe { f32_to_f16_f16c(v, out) };
    }
    for (o, &x) in out.iter_mut().zip(v) {
        o.write(half::f16::from_f32(x));
    }
}

/// [`f32_to_f16`] 16 values per `vcvtps2ph` (round to nearest even): the instruction half's
/// `from_f32` uses one value at a time on a CPU with F16C (which every AVX-512 CPU has), so the
/// same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f32_to_f16_avx512(v: &[f32], out: &mut [std::mem::MaybeUninit<half::f16>]) {
    use std::arch::x86_64::*;
    let n = v.len().min(out.len());
    let full = n / 16 * 16;
    for i in (0..full).step_by(16) {
        // SAFETY: i + 16 ≤ n values of both.
        unsafe {
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_loadu_ps(
                v.as_ptr().add(i),
            ));
            _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, h);
        }
    }
    for (o, &x) in out[full..n].iter_mut().zip(&v[full..n]) {
        o.write(half::f16::from_f32(x));
    }
}

/// [`f32_to_f16_avx512`] 8 values per `vcvtps2ph` ymm, for CPUs with F16C but not AVX-512 (AVX2
/// laptops and Zen 3): half's `from_f32` asks for F16C and calls the instruction on each value
/// (round to nearest even both ways, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f32_to_f16_f16c(v: &[f32], out: &mut [std::mem::MaybeUninit<half::f16>]) {
    use std::arch::x86_64::*;
    let n = v.len().min(out.len());
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 ≤ n values of both.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(v.as_ptr().add(i)));
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, h);
        }
    }
    for (o, &x) in out[full..n].iter_mut().zip(&v[full..n]) {
        o.write(half::f16::from_f32(x));
    }
}

/// A contiguous weight (or bias, or norm parameter) as f32 ([`Values::to_f32`]).
fn weight_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<std::borrow::Cow<'a, [f32]>> {
    Ok(values(s, l, what)?.to_f32())
}

/// Runs `$body` with a bf16 or int8 [`Wt`] as the bf16 products' left operand (`$lhs`: bf16 read in
/// place when k is even, else packed; int8 codes packed) and the scales their sums take (`$scale`:
/// int8 per row); the two element types make two instances of the body.
macro_rules! with_bf16_lhs {
    ($w:expr, $k:expr, |$lhs:ident, $scale:ident| $body:expr) => {{
        use super::gemm_bf16::{Lhs, Scale, View};
        let k = $k;
        match $w {
            Wt::Bf16(w) => {
                let $lhs = if k.is_multiple_of(2) {
                    Lhs::InPlace { ptr: w.as_ptr(), rs: k }
                } else {
                    Lhs::Packed(View { ptr: w.as_ptr(), rs: k, cs: 1 })
                };
                let $scale = Scale::ONE;
                $body
            }
            Wt::Q8 { codes, scales } => {
                let $lhs = Lhs::Packed(View { ptr: codes.as_ptr(), rs: k, cs: 1 });
                let $scale = Scale { rows: Some(scales), ..Scale::ONE };
                $body
            }
            Wt::F32(_) | Wt::F16(_) => unreachable!("f32 and f16 weights take the f32 product"),
        }
    }};
}

/// A weight matrix as stored: f32, f16 or bf16, or int8 codes with their channel scales.
/// Winograd reads every form in place (its products are f32 whatever the storage); the other
/// products take [`Wt::for_products`]: bf16 and int8 as they lie where the CPU multiplies bf16
/// ([`bf16_arithmetic`]), f32 as it lies, the rest widened to f32 for the call.
#[derive(Clone)]
enum Wt<'a> {
    /// Borrowed from the storage, or widened for the call ([`Wt::for_products`]).
    F32(std::borrow::Cow<'a, [f32]>),
    F16(&'a [half::f16]),
    Bf16(&'a [half::bf16]),
    Q8 {
        codes: &'a [Q8],
        scales: &'a [f32],
    },
}

impl<'a> Wt<'a> {
    /// `scales`: the per-row scales when the storage holds int8 codes ([`Weight::Q8`]).
    fn new(s: &'a CpuStorage, l: &Layout, scales: Option<&'a [f32]>, what: &str) -> Result<Self> {
        let range =
            || l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{what}: weight not contiguous")));
        match (s, scales) {
            (CpuStorage::U8(v), Some(scales)) => {
                let (a, b) = range()?;
                let codes = q8_codes(&v[a..b]);
                if !q8_rows_fit(codes.len(), scales) {
                    candle_core::bail!("{what}: {} int8 codes for {} channel scales", codes.len(), scales.len());
                }
                Ok(Wt::Q8 { codes, scales })
            }
            (_, None) => Ok(Wt::dense(values(s, l, what)?)),
            (other, Some(_)) => candle_core::bail!("{what}: int8 scales with a {:?} weight", other.dtype()),
        }
    }

    /// Stored values (a tensor's storage, or a weight read in place from its file), as they lie.
    fn dense(v: Values<'a>) -> Self {
        match v {
            Values::F32(w) => Wt::F32(std::borrow::Cow::Borrowed(w)),
            Values::F16(w) => Wt::F16(w),
            Values::Bf16(w) => Wt::Bf16(w),
        }
    }

    /// The weight as the im2col, 1×1 and linear products read it: as stored where they multiply
    /// it so (f32; bf16 and int8 where the CPU multiplies bf16), else widened or dequantised to
    /// f32 for this call — the copy Winograd's convolutions do without.
    fn for_products(&self) -> std::borrow::Cow<'_, Wt<'a>> {
        use std::borrow::Cow;
        match self {
            Wt::F16(w) => Cow::Owned(Wt::F32(Values::F16(w).to_f32())),
            Wt::Bf16(w) if !bf16_arithmetic() => Cow::Owned(Wt::F32(Values::Bf16(w).to_f32())),
            Wt::Q8 { codes, scales } if !bf16_arithmetic() => {
                Cow::Owned(Wt::F32(Cow::Owned(dequantize_rows(codes, scales))))
            }
            w => Cow::Borrowed(w),
        }
    }

    /// `dst[m×n] (row stride dst_rs) (+)= W[m×k] · rhs[k×n]` (rhs row-major, row stride rhs_rs),
    /// on all threads; bf16 weights are read in place when k is even, packed otherwise; int8 codes
    /// are packed as bf16 integers and scaled per row in the product's epilogue.
    ///
    /// # Safety
    /// As [`sgemm`]; W holds m × k values.
    unsafe fn times(
        &self,
        (m, n, k): (usize, usize, usize),
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        (rhs, rhs_rs): (*const f32, usize),
    ) {
        use super::gemm_bf16::gemm;
        let b = super::gemm_bf16::View { ptr: rhs, rs: rhs_rs, cs: 1 };
        match self {
            Wt::F32(w) => unsafe {
                sgemm(
                    (m, n, k),
                    dst,
                    dst_rs as isize,
                    accumulate,
                    (w.as_ptr(), 1, k as isize),
                    (rhs, 1, rhs_rs as isize),
                    1.0,
                    rayon_par(),
                )
            },
            Wt::Bf16(_) | Wt::Q8 { .. } => with_bf16_lhs!(self, k, |lhs, scale| unsafe {
                gemm((m, n, k), dst, dst_rs, accumulate, lhs, b, scale, true)
            }),
            Wt::F16(_) => unreachable!("f16 weights are widened first (Wt::for_products)"),
        }
    }

    /// [`Wt::times`] for a bf16 or int8 weight and a right operand packed already.
    ///
    /// # Safety
    /// As [`Wt::times`], with `rhs` covering k × m's columns.
    unsafe fn times_packed(
        &self,
        m: usize,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        rhs: &super::gemm_bf16::PackedB,
        k: usize,
    ) {
        use super::gemm_bf16::gemm_prepacked;
        with_bf16_lhs!(self, k, |lhs, scale| unsafe { gemm_prepacked(m, dst, dst_rs, accumulate, lhs, rhs, scale) })
    }

    /// [`Wt::times`] for a bf16 or int8 weight and a right operand made row by row by the product's
    /// jobs ([`super::gemm_bf16::gemm_rows`]).
    ///
    /// # Safety
    /// As [`Wt::times`], with `fill` writing every value of k × n it is asked for.
    unsafe fn times_rows(
        &self,
        (m, n, k): (usize, usize, usize),
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        fill: super::gemm_bf16::Rows,
    ) {
        use super::gemm_bf16::gemm_rows;
        with_bf16_lhs!(self, k, |lhs, scale| unsafe { gemm_rows((m, n, k), dst, dst_rs, accumulate, lhs, fill, scale) })
    }
}

// ---------------------------------------------------------------------------------------------
// Int8 weights

/// A layer's weight: a tensor (f32, f16 or bf16), or per-output-channel int8 (`--dtype q8`): codes
/// `q + 128` (u8, the tensor's shape) with one f32 scale per output channel, `w ≈ q · scale`.
/// The products widen the codes inside their packing (exactly, as bf16 integers, on a CPU with
/// AVX512_BF16) and apply the scales to the f32 sums; elsewhere they are dequantised per call.
/// Or (CPU) read in place from the model file (`weights::View`, f32/f16/bf16 as stored): the
/// kernels read it there; other paths copy it out per call.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Q8 { codes: Tensor, scales: std::sync::Arc<[f32]> },
    InPlace(Box<super::weights::View>),
}

impl Weight {
    /// Quantises `w` (output channels first) to int8 per output channel: scale = max|w| / 127 over
    /// the channel, q = round(w / scale) (symmetric, the zero point at 0; a channel of zeros gets
    /// scale 0). Non-finite weights are refused.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let rows = w.dim(0)?;
        let w32 = w.to_device(&candle_core::Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = w32.storage_and_layout();
        let v = match &*storage {
            candle_core::Storage::Cpu(s) => f32_slice(s, layout, "quantize")?,
            _ => candle_core::bail!("quantize: the weight is not on the CPU"),
        };
        let k = v.len() / rows.max(1);
        let mut codes = vec![0u8; v.len()];
        let scales: Vec<f32> =
            codes.par_chunks_mut(k.max(1)).zip(v.par_chunks(k.max(1))).map(|(q, w)| quantize_row(w, q)).collect();
        // A non-finite weight makes its channel's scale NaN (found here, after the fast pass).
        if scales.iter().any(|s| !s.is_finite()) {
            let i = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
            candle_core::bail!("value {} at index {i} is not finite: {NOT_QUANTISABLE}", v[i]);
        }
        drop(storage);
        let codes = Tensor::from_vec(codes, w.shape(), w.device())?;
        Ok(Weight::Q8 { codes, scales: scales.into() })
    }

    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(w) => w.dims(),
            Weight::Q8 { codes, .. } => codes.dims(),
            Weight::InPlace(v) => v.dims(),
        }
    }

    /// Whether the products multiply in bf16 with this weight (bf16 or int8 storage on a CPU with
    /// AVX512_BF16): the layer's neighbours (attention) then do too.
    pub fn bf16_products(&self) -> bool {
        match self {
            Weight::Dense(w) => w.dtype() == DType::BF16 && bf16_arithmetic(),
            Weight::Q8 { .. } => bf16_arithmetic(),
            Weight::InPlace(v) => v.dtype() == DType::BF16 && bf16_arithmetic(),
        }
    }

    /// The weight as a `dtype` tensor: widened or narrowed, or dequantised (`q · scale`), or
    /// copied out of its file.
    pub fn dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => w.to_dtype(dtype),
            Weight::InPlace(v) => v.to_tensor(dtype, &candle_core::Device::Cpu),
            Weight::Q8 { codes, scales } => {
                let rows = codes.dim(0)?;
                if codes.device().is_cpu() && !crate::device::generic_ops() {
                    let (storage, layout) = codes.storage_and_layout();
                    let v = match (&*storage, layout.contiguous_offsets()) {
                        (candle_core::Storage::Cpu(CpuStorage::U8(v)), Some((a, b))) if q8_rows_fit(b - a, scales) => {
                            dequantize_rows(q8_codes(&v[a..b]), scales)
                        }
                        _ => candle_core::bail!("int8 weight: codes are not contiguous u8, one row per channel scale"),
                    };
                    return Tensor::from_vec(v, codes.shape(), codes.device())?.to_dtype(dtype);
                }
                let mut shape = vec![rows];
                shape.resize(codes.rank(), 1);
                let s = Tensor::from_slice(scales, rows, codes.device())?.reshape(shape)?;
                ((codes.to_dtype(DType::F32)? - 128.0)?.broadcast_mul(&s)?).to_dtype(dtype)
            }
        }
    }

    fn scales(&self) -> Option<std::sync::Arc<[f32]>> {
        match self {
            Weight::Dense(_) | Weight::InPlace(_) => None,
            Weight::Q8 { scales, .. } => Some(scales.clone()),
        }
    }
}

use super::gemm_bf16::Q8;

/// How [`Weight::quantize`]'s refusals end (`models::weights_err` tells them from shape errors).
pub const NOT_QUANTISABLE: &str = "cannot be quantised to int8 (--dtype q8)";

fn q8_codes(v: &[u8]) -> &[Q8] {
    // SAFETY: Q8 is a transparent wrapper of u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const Q8, v.len()) }
}

// One output channel to int8 codes (`q + 128`, q = w / scale rounded to nearest even); returns
// the scale, max|w| / 127, or NaN when a weight is not finite.
simd! {
fn quantize_row(w: &[f32], q: &mut [u8]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut finite = [true; 16];
    let mut it = w.chunks_exact(16);
    let lane = |m: &mut f32, f: &mut bool, x: f32| {
        *m = if x.abs() > *m { x.abs() } else { *m };
        *f &= x.is_finite();
    };
    for c in &mut it {
        for ((m, f), &x) in lanes.iter_mut().zip(finite.iter_mut()).zip(c) {
            lane(m, f, x);
        }
    }
    for ((m, f), &x) in lanes.iter_mut().zip(finite.iter_mut()).zip(it.remainder()) {
        lane(m, f, x);
    }
    if finite.contains(&false) {
        return f32::NAN;
    }
    let max = lanes.iter().fold(0f32, |a, &b| if b > a { b } else { a });
    let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
    for (q, &x) in q.iter_mut().zip(w) {
        // 1.5·2^23 added to a value in [1, 255] leaves it rounded to an integer in the low
        // mantissa bits (no float → int conversion, which does not vectorise).
        let y = (x * inv + 128.0).clamp(1.0, 255.0) + 12_582_912.0;
        *q = y.to_bits() as u8;
    }
    max / 127.0
}
}

/// Whether `n` int8 codes make one equal row per channel scale (at least one): what every reader
/// of [`Weight::Q8`] codes relies on, checked once where the codes enter ([`Wt::new`],
/// [`Weight::dense`]) and asserted where the rows are written ([`dequantize_rows`]).
fn q8_rows_fit(n: usize, scales: &[f32]) -> bool {
    !scales.is_empty() && n.is_multiple_of(scales.len())
}

/// `(code − 128) · scale[row]` as f32, row by row, on all threads.
fn dequantize_rows(codes: &[Q8], scales: &[f32]) -> Vec<f32> {
    let n = codes.len();
    // Every caller has checked this (Wt::new, Weight::dense); the writes below rely on it.
    assert!(q8_rows_fit(n, scales), "int8 weight: {n} codes for {} channel scales", scales.len());
    let k = n / scales.len();
    // SAFETY: scales.len() rows of k values cover all n (n = rows · k, asserted above), and
    // dequantize_row writes each row whole.
    unsafe {
        written(n, |out| {
            out.par_chunks_mut(k.max(1)).zip(codes.par_chunks(k.max(1))).zip(scales.par_iter()).for_each(
                |((o, q), &s)| {
                    dequantize_row(q, o, s);
                },
            )
        })
    }
}

/// An op's output: `n` f32 that `write` is handed uninitialised and sets, every one, once; not
/// zeroed first. A zeroed allocation of memory the allocator reuses is a memset on the calling
/// thread alone, the other waiting: 2.3 % of a CFG UNet call's samples went there, and widening
/// a weight took twice as long. Builds with debug assertions (the tests) fill it with NaN first,
/// so that a value left unwritten, or read before it is written, shows in every test that reads
/// the output.
///
/// # Safety
/// `write` must write all `n` values, and read none it has not written.
unsafe fn written(n: usize, write: impl FnOnce(&mut [std::mem::MaybeUninit<f32>])) -> Vec<f32> {
    // SAFETY: the caller's promise.
    unsafe { written_as(n, f32::NAN, write) }
}

/// [`written`] for any element type, `nan` the fill of debug builds.
///
/// # Safety
/// As [`written`].
#[cfg_attr(not(debug_assertions), allow(unused_variables))]
unsafe fn written_as<T: Copy>(n: usize, nan: T, write: impl FnOnce(&mut [std::mem::MaybeUninit<T>])) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    let o = &mut out.spare_capacity_mut()[..n];
    #[cfg(debug_assertions)]
    o.fill(std::mem::MaybeUninit::new(nan));
    write(o);
    // SAFETY: the caller's promise.
    unsafe { out.set_len(n) };
    out
}

/// An f32 slice as one to be written ([`dequantize_row`] serves both).
fn as_uninit(v: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: same layout; the caller writes only initialised f32 values through it.
    unsafe { &mut *(v as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

simd! {
fn dequantize_row(q: &[Q8], out: &mut [std::mem::MaybeUninit<f32>], scale: f32) {
    for (o, &q) in out.iter_mut().zip(q) {
        o.write((q.0 as i32 - 128) as f32 * scale);
    }
}
}

/// Input channels from which a 3×3 convolution's bf16 im2col products on AMX tiles beat f32
/// Winograd ([`Conv`]'s rule, and what `-v` says).
pub const AMX_CONV_MIN_CIN: usize = 320;

/// Input channels (multiples of 32) from which a stride-1 3×3 convolution runs on AMX tiles
/// without a patch matrix ([`super::gemm_bf16::conv3x3`]) rather than by f32 Winograd: the KL
/// VAE's 128- and 256-channel layers (128 → 128 at 512²: 133–153 → 82–85 ms; 256 → 256 at 256²:
/// 92–94 → 58–61 ms); at TAESD's 64 the two were level, and Winograd's f32 products stay. From
/// [`AMX_CONV_MIN_CIN`] channels only on large images ([`AMX_IMPLICIT_WIDE_MIN_PIXELS`]).
pub const AMX_IMPLICIT_MIN_CIN: usize = 128;

/// Output pixels per image from which convolutions of [`AMX_CONV_MIN_CIN`] channels or more take
/// the implicit product rather than the im2col one: the VAE's 512-channel layers at 128² and 256²
/// (62 → 51 ms, 225–240 → 199 ms; level at 64²); the UNet's, at 64² and below, were up to 3×
/// slower (weights rearranged per call and few tiles to share them: batch 1 1280 → 1280 at 16²,
/// 6.2 → 16.7 ms; 2 × 2560 → 1280 at 16², 23 → 73 ms).
pub const AMX_IMPLICIT_WIDE_MIN_PIXELS: usize = 128 * 128;

/// Whether bf16-stored weights are multiplied in bf16 rather than widened to f32 first: the
/// kernels on, AVX512_BF16 present and paying here ([`super::gemm_bf16::pays`]: on Intel's Xeon 4th
/// and 5th generation its dot products run at half the f32 rate), unless `GHIBLIFY_BF16_ARITHMETIC`
/// says `0`/`off` (never) or `1`/`on` (wherever the instructions exist). The library's unit tests
/// take the instructions wherever they exist, so the bf16 kernels are tested on every such CPU.
pub fn bf16_arithmetic() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !crate::device::generic_ops()
        && !NO_BF16.with(|o| o.get())
        && *ON.get_or_init(|| {
            super::gemm_bf16::available()
                && match std::env::var("GHIBLIFY_BF16_ARITHMETIC").as_deref().map(str::trim) {
                    Ok("0" | "off") => false,
                    Ok("1" | "on") => true,
                    _ => cfg!(test) || super::gemm_bf16::pays(),
                }
        })
}

thread_local! {
    static NO_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a thread-local switch of the kernels' paths is set on this thread (no bf16
/// arithmetic, no AMX, a Winograd path forced): see [`crate::device::on_cpu_pool`].
pub(crate) fn thread_switched() -> bool {
    NO_BF16.get() || super::gemm_bf16::amx_switched_off() || winograd::switched()
}

/// Runs `f` as on a CPU without bf16 arithmetic (the f32 paths every other CPU takes), on this
/// thread: how the tests reach those paths here.
#[cfg(test)]
fn without_bf16_arithmetic<T>(f: impl FnOnce() -> T) -> T {
    let before = NO_BF16.with(|o| o.replace(true));
    let out = f();
    NO_BF16.with(|o| o.set(before));
    out
}

/// `v` into `out`, as long (`[MaybeUninit]::write_copy_of_slice`, newer than the crate's MSRV).
fn write_copy(v: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
    assert_eq!(v.len(), out.len(), "write_copy: lengths differ");
    for (o, &x) in out.iter_mut().zip(v) {
        o.write(x);
    }
}

/// `v` as f32 by `f` (a chunk of `v` into as many values), on all threads, the output written
/// once (not zeroed first: that memset, on one thread, took as long as the conversion).
fn widen<T: Copy + Sync>(v: &[T], f: impl Fn(&[T], &mut [std::mem::MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    // SAFETY: the chunks cover all v.len() values, and `f` (one of this module's converters)
    // writes each chunk whole.
    unsafe { written(v.len(), |out| out.par_chunks_mut(1 << 16).zip(v.par_chunks(1 << 16)).for_each(|(o, i)| f(i, o))) }
}

simd! {
fn bf16_to_f32(v: &[half::bf16], out: &mut [std::mem::MaybeUninit<f32>]) {
    // bf16 is the high half of an f32: a shift, which vectorises (half's to_f32 is the same).
    for (o, &x) in out.iter_mut().zip(v) {
        o.write(f32::from_bits((x.to_bits() as u32) << 16));
    }
}
}

fn f16_to_f32(v: &[half::f16], out: &mut [std::mem::MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { f16_to_f32_avx512(v, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX.
        return unsafe { f16_to_f32_f16c(v, out) };
    }
    for (o, &x) in out.iter_mut().zip(v) {
        o.write(x.to_f32());
    }
}

/// [`f16_to_f32`] 16 values per `vcvtph2ps`. Written by hand although half converts slices with
/// F16C: its slice conversion (8 values per call through a function pointer) widened a 64K-value
/// chunk in 24 µs against 7 µs here, 4M values in 1.8 ms against 1.0 ms (one thread, Intel Xeon
/// Emerald Rapids), and it writes only initialised f32 (through a block on the stack: 20 µs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f16_to_f32_avx512(v: &[half::f16], out: &mut [std::mem::MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    let n = v.len().min(out.len());
    let full = n / 16 * 16;
    for i in (0..full).step_by(16) {
        // SAFETY: i + 16 ≤ n values of both.
        unsafe {
            let h = _mm256_loadu_si256(v.as_ptr().add(i) as *const __m256i);
            _mm512_storeu_ps(out.as_mut_ptr().add(i) as *mut f32, _mm512_cvtph_ps(h));
        }
    }
    for (o, &x) in out[full..n].iter_mut().zip(&v[full..n]) {
        o.write(x.to_f32());
    }
}

/// [`f16_to_f32_avx512`] 8 values per `vcvtph2ps` ymm, for CPUs with F16C but not AVX-512: half's
/// `to_f32` checks for F16C and calls the instruction once per value, which made `--dtype f16`'s
/// widening 15 % of a UNet call's samples on such a CPU (docs/PERFORMANCE.md, round twenty).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(v: &[half::f16], out: &mut [std::mem::MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    let n = v.len().min(out.len());
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        // SAFETY: i + 8 ≤ n values of both.
        unsafe {
            let h = _mm_loadu_si128(v.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i) as *mut f32, _mm256_cvtph_ps(h));
        }
    }
    for (o, &x) in out[full..n].iter_mut().zip(&v[full..n]) {
        o.write(x.to_f32());
    }
}

/// `dst[m×n] (row stride dst_rs) (+)= lhs[m×k] (row stride lhs_rs) · rhs[k×n] (row stride rhs_rs)`,
/// all with unit column stride except where the `*_cs` say otherwise.
///
/// # Safety
/// Pointers and strides must describe valid, non-overlapping (dst) memory.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    (lhs, lhs_cs, lhs_rs): (*const f32, isize, isize),
    (rhs, rhs_cs, rhs_rs): (*const f32, isize, isize),
    scale: f32,
    par: Parallelism,
) {
    gemm::gemm(
        m, n, k, dst, 1, dst_rs, accumulate, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 1.0, scale, false, false, false,
        par,
    )
}

pub(crate) fn rayon_par() -> Parallelism {
    match threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

// ---------------------------------------------------------------------------------------------
// Convolution

#[derive(Debug, Clone)]
struct Conv {
    /// The weight's per-output-channel scales when it is int8 ([`Weight::Q8`]).
    scales: Option<std::sync::Arc<[f32]>>,
    stride: usize,
    padding: usize,
    /// Nearest-neighbour ×2 upsampling of the input first, read through the indices (diffusers'
    /// Upsample2D) instead of materialised: at the VAE decoder's last stage that copy is 256
    /// channels × the full image, the largest tensor of a run.
    upsample: bool,
    /// Extra zero rows/columns after the input (bottom, right): diffusers' VAE `Downsample2D` pads
    /// (0, 1, 0, 1) before its stride-2 convolution; read as zeros instead of copying the input.
    pad_end: usize,
    /// ReLU applied to the output (TAESD's conv + ReLU pairs): in Winograd's output transform, or
    /// one parallel pass, instead of candle's separate single-threaded pass and copy.
    relu: bool,
    /// A tensor of the output's shape added before the ReLU (TAESD's residual join,
    /// `relu(conv(h) + x)`): in Winograd's output transform, or the im2col path's last pass.
    residual: Option<Tensor>,
}

impl Conv {
    /// A plain convolution by `weight` (no upsampling, end padding or ReLU).
    fn plain(weight: &Weight, stride: usize, padding: usize) -> Self {
        Conv { scales: weight.scales(), stride, padding, upsample: false, pad_end: 0, relu: false, residual: None }
    }

    /// Output (height, width) for an input of (ih, iw) before upsampling.
    fn out_size(&self, (ih, iw): (usize, usize), (kh, kw): (usize, usize)) -> (usize, usize) {
        let f = if self.upsample { 2 } else { 1 };
        let span = |i: usize, k: usize| (f * i + 2 * self.padding + self.pad_end - k) / self.stride + 1;
        (span(ih, kh), span(iw, kw))
    }
}

impl Conv {
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        x: &[f32],
        (b, cin, ih, iw): (usize, usize, usize, usize),
        w: &Wt,
        (cout, kh, kw): (usize, usize, usize),
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let (s, p) = (self.stride, self.padding);
        let (plane, src_w) = (ih * iw, iw);
        // Sizes of the (virtual, if upsampled) input the convolution sees.
        let f = if self.upsample { 2 } else { 1 };
        let (oh, ow) = self.out_size((ih, iw), (kh, kw));
        // Large 3×3 convolutions: Winograd in f32 whatever the weight's storage. Its products are
        // always f32 (rounding its transformed operands to bf16 costs too much accuracy), and it is
        // still faster than the AVX512_BF16 im2col path on every layer where it applies (a quarter
        // of the multiplications against twice the rate; docs/PERFORMANCE.md), and closer to f32;
        // not than AMX tiles (~6× the f32 rate), which take the layers whose rows fill them and
        // whose patch rows are long enough for the products to outweigh writing the patches (9 ×
        // the input, rounded to bf16): cin ≥ 320, the UNet's and the VAE's 512-channel layers
        // (VAE 512 → 512 at 256²: 315 → 223 ms); at 256 channels it was a wash, at TAESD's 64
        // twice as slow (64 → 64 at 512²: 26 → 51 ms; docs/PERFORMANCE.md, round thirteen).
        let tiles = matches!(w, Wt::Bf16(_) | Wt::Q8 { .. })
            && bf16_arithmetic()
            && super::gemm_bf16::amx()
            && cout >= super::gemm_bf16::AMX_ROWS;
        let amx_products = tiles && cin >= AMX_CONV_MIN_CIN;
        let implicit = tiles
            && (kh, kw, s, p, self.pad_end) == (3, 3, 1, 1, 0)
            && cin.is_multiple_of(32)
            && cin >= AMX_IMPLICIT_MIN_CIN
            && (cin < AMX_CONV_MIN_CIN || oh * ow >= AMX_IMPLICIT_WIDE_MIN_PIXELS)
            && !winograd::is_forced();
        let shape = winograd::Shape { batch: b, cin, ih, iw, up: f, pad: p, cout };
        if !implicit && (kh, kw, s, self.pad_end) == (3, 3, 1, 0) && winograd::worthwhile(&shape, amx_products) {
            let filters = match w {
                Wt::F32(w) => winograd::Filters::F32(w),
                Wt::F16(w) => winograd::Filters::F16(w),
                Wt::Bf16(w) => winograd::Filters::Bf16(w),
                Wt::Q8 { codes, scales } => winograd::Filters::Q8 { codes, scales },
            };
            return winograd::conv(x, shape, filters, winograd::Tail { bias, residual, relu: self.relu });
        }
        let w = &*w.for_products();
        let (ih, iw) = (ih * f, iw * f);
        let (oplane, k) = (oh * ow, cin * kh * kw);
        // Written once ([`written`]): the bias first where there is one, which the products then
        // accumulate onto, or the products alone; each image's cout × oplane values, the pointwise
        // product in one, the patch products in tiles of rows covering oh.
        let write = |out: &mut [std::mem::MaybeUninit<f32>]| {
            if implicit {
                let shape = super::gemm_bf16::Conv3x3 { batch: b, cin, ih: ih / f, iw: iw / f, up: f, cout };
                match w {
                    Wt::Bf16(w) => super::gemm_bf16::conv3x3(x, shape, w, None, bias, out),
                    Wt::Q8 { codes, scales } => super::gemm_bf16::conv3x3(x, shape, codes, Some(scales), bias, out),
                    Wt::F32(_) | Wt::F16(_) => unreachable!("implicit convolutions take bf16 or int8 weights"),
                }
                return;
            }
            if let Some(bias) = bias {
                out.par_chunks_mut(oplane.max(1))
                    .enumerate()
                    .for_each(|(i, row)| row.fill(std::mem::MaybeUninit::new(bias[i % cout])));
            }
            let acc = bias.is_some();
            let pointwise = kh == 1 && kw == 1 && s == 1 && p == 0 && f == 1 && self.pad_end == 0;
            // bf16 products: the patch rows go straight into the packed bf16 operand (no f32 patch
            // matrix for packing to read again).
            let direct = !matches!(w, Wt::F32(_));
            // Output rows per tile: the im2col buffer (k × tile pixels) stays within 16 MB, 4 Mi
            // f32 values or 8 Mi packed bf16 ones. Every tile's product reads all the weights
            // again (22 MB at 1920 → 640 channels, five tiles of 4 Mi values at 32²): the bf16
            // tiles take the whole budget (UNet batch-1 3×3 shapes, speed_probe conv-shapes,
            // alternating: 0.129–0.133 → 0.118–0.120 s).
            let budget = if direct { 1 << 23 } else { 1 << 22 };
            let rows = (budget / (k * ow).max(1)).clamp(1, oh);
            // Stride 1 with output lines as wide as the (upsampled) input's: every patch row is
            // its input plane shifted ([`shifted_plane`], [`upsampled_plane`]). With bf16
            // products the product's jobs make the rows of their own blocks ([`Wt::times_rows`])
            // where every thread can take two slivers of columns at least; other shapes fill a
            // tile of rows first.
            let planes = s == 1 && ow == iw;
            let makes_rows = planes && direct && oplane >= 2 * super::gemm_bf16::NR * rayon::current_num_threads();
            // This thread's kept packed operand (a fresh one per call was zero-filled by one thread
            // and faulted in again: the UNet's 640 → 640 at 32² 5.7 → 4.9 ms).
            let mut packed = PACKED_PATCHES.take();
            for bi in 0..b {
                let xb = &x[bi * cin * plane..(bi + 1) * cin * plane];
                let ob = &mut out[bi * cout * oplane..(bi + 1) * cout * oplane];
                if pointwise {
                    // SAFETY: ob is cout × oplane, w is cout × cin, xb is cin × plane (= oplane).
                    unsafe {
                        w.times((cout, oplane, cin), ob.as_mut_ptr() as *mut f32, oplane, acc, (xb.as_ptr(), plane))
                    };
                    continue;
                }
                // Row r = (ci, ky, kx) of the patch matrix, for shifted planes: input plane ci
                // shifted by (ky − p, kx − p); its values j0.. (output pixels j0..).
                let shifted = |r: usize, j0: usize, out: &mut [f32]| {
                    let (ci, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
                    let src = &xb[ci * plane..(ci + 1) * plane];
                    let shift = (ky as isize - p as isize, kx as isize - p as isize);
                    match f {
                        1 => shifted_plane(src, out, j0, iw, shift),
                        _ => upsampled_plane(src, out, j0, (ih, iw), shift),
                    }
                };
                if makes_rows {
                    // SAFETY: ob is cout × oplane; `shifted` writes every value it is asked for.
                    unsafe { w.times_rows((cout, oplane, k), ob.as_mut_ptr() as *mut f32, oplane, acc, &shifted) };
                    continue;
                }
                for oy0 in (0..oh).step_by(rows) {
                    let tr = rows.min(oh - oy0);
                    let tp = tr * ow;
                    // Row r = (ci, ky, kx) of the patch matrix: input plane ci shifted by (ky, kx).
                    let fill = |r: usize, crow: &mut [f32]| {
                        if planes {
                            return shifted(r, oy0 * ow, crow);
                        }
                        let (ci, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
                        let src = &xb[ci * plane..(ci + 1) * plane];
                        for (ty, seg) in crow.chunks_mut(ow).enumerate() {
                            let iy = ((oy0 + ty) * s + ky) as isize - p as isize;
                            if iy < 0 || iy >= ih as isize {
                                seg.fill(0.0);
                                continue;
                            }
                            let sy = iy as usize / f;
                            let line = &src[sy * src_w..(sy + 1) * src_w];
                            // ix = ox + kx - p: one contiguous copy between the zero edges.
                            let lo = p.saturating_sub(kx).min(ow);
                            let hi = (iw + p).saturating_sub(kx).min(ow);
                            if s == 1 && f == 1 && hi > lo {
                                seg[..lo].fill(0.0);
                                seg[lo..hi].copy_from_slice(&line[lo + kx - p..hi + kx - p]);
                                seg[hi..].fill(0.0);
                            } else if s == 2 && f == 1 {
                                // ix = 2·ox + kx − p: a strided copy between the zero edges (the
                                // general loop below divides per value; TAESD's and the VAE's
                                // downsampling convolutions spent as long here as in their products).
                                let lo = p.saturating_sub(kx).div_ceil(2).min(ow);
                                let hi = ((iw + p).saturating_sub(kx).div_ceil(2)).clamp(lo, ow);
                                seg[..lo].fill(0.0);
                                seg[hi..].fill(0.0);
                                if hi > lo {
                                    let first = 2 * lo + kx - p;
                                    let src = &line[first..first + 2 * (hi - lo) - 1];
                                    for (v, x) in seg[lo..hi].iter_mut().zip(src.iter().step_by(2)) {
                                        *v = *x;
                                    }
                                }
                            } else if s == 1 && f == 2 {
                                // ×2 nearest upsampling: ix = ox + kx − p on the doubled line,
                                // each source value twice, between the zero edges (the general
                                // loop below divides by f per value: the UNet's three upsampling
                                // convolutions spent more time here than in their products).
                                let hi = hi.max(lo);
                                seg[..lo].fill(0.0);
                                seg[hi..].fill(0.0);
                                for (ox, v) in (lo..hi).zip(&mut seg[lo..hi]) {
                                    *v = line[(ox + kx - p) / 2];
                                }
                            } else {
                                for (ox, v) in seg.iter_mut().enumerate() {
                                    let ix = (ox * s + kx) as isize - p as isize;
                                    *v = if ix >= 0 && (ix as usize) < iw { line[ix as usize / f] } else { 0.0 };
                                }
                            }
                        }
                    };
                    let dst = ob[oy0 * ow..].as_mut_ptr() as *mut f32;
                    if direct {
                        packed.fill_rows((k, tp), &|r, _, row| fill(r, row));
                        // SAFETY: the destination is columns [oy0·ow, oy0·ow + tp) of ob's cout rows.
                        unsafe { w.times_packed(cout, dst, oplane, acc, &packed, k) };
                    } else {
                        // The patch matrix in this thread's kept buffer (a zeroed allocation of up
                        // to 16 MB per call before, cleared by the allocator on one thread); `fill`
                        // writes every value of it.
                        with_kept(&PATCHES, |col| {
                            let col = grown(col, k * tp);
                            if cfg!(debug_assertions) {
                                // As `written`'s outputs: a value the fill missed shows as NaN in
                                // every test, not as a stale value from an earlier call.
                                col.fill(f32::NAN);
                            }
                            col.par_chunks_mut(tp).enumerate().for_each(|(r, crow)| fill(r, crow));
                            // SAFETY: as above.
                            unsafe { w.times((cout, tp, k), dst, oplane, acc, (col.as_ptr(), tp)) };
                        });
                    }
                }
            }
            PACKED_PATCHES.set(packed);
        };
        // SAFETY: `write` writes every value before reading any (above).
        let mut out = unsafe { written(b * cout * oplane, write) };
        let relu = self.relu;
        match residual {
            Some(r) => out.par_chunks_mut(1 << 16).zip(r.par_chunks(1 << 16)).for_each(|(c, r)| {
                c.iter_mut().zip(r).for_each(|(v, r)| *v = join(*v, *r, relu));
            }),
            None if relu => out.par_chunks_mut(1 << 16).for_each(|c| c.iter_mut().for_each(|v| *v = relu_if(*v, true))),
            None => {}
        }
        out
    }
}

impl WeightedOp for Conv {
    const NAME: &'static str = "ghiblify-conv2d";
    const NAME_BIAS: &'static str = "ghiblify-conv2d-bias";
    const WHAT: &'static str = "conv2d weight";

    fn scales(&self) -> Option<&[f32]> {
        self.scales.as_deref()
    }

    fn fwd(
        &self,
        xs: (&CpuStorage, &Layout),
        w: &Wt,
        wdims: &[usize],
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs.0, xs.1, "conv2d input")?;
        let (b, cin, ih, iw) = xs.1.shape().dims4()?;
        let &[cout, wcin, kh, kw] = wdims else { candle_core::bail!("conv2d: weight of shape {wdims:?}") };
        if wcin != cin {
            candle_core::bail!("conv2d: input has {cin} channels, weight expects {wcin}");
        }
        if ih + 2 * self.padding + self.pad_end < kh || iw + 2 * self.padding + self.pad_end < kw || self.stride == 0 {
            candle_core::bail!("conv2d: a {kh}×{kw} kernel does not fit a {ih}×{iw} input padded by {}", self.padding);
        }
        let bias = bias.map(|(s, l)| weight_f32(s, l, "conv2d bias")).transpose()?;
        let (oh, ow) = self.out_size((ih, iw), (kh, kw));
        let held = self.residual.as_ref().map(Tensor::storage_and_layout);
        let residual = residual_values(&held, &[b, cout, oh, ow], "conv2d residual")?;
        let out = self.run(x, (b, cin, ih, iw), w, (cout, kh, kw), bias.as_deref(), residual);
        Ok((CpuStorage::F32(out), Shape::from((b, cout, oh, ow))))
    }
}

/// Values `j0..j0 + out.len()` of one im2col row of a stride-1 convolution whose output lines are
/// as wide as its input's (`iw`): output pixel q reads the input plane `src` at q + dy·iw + dx,
/// zero where that lies outside the plane. So a whole run of output lines is one copy of `src`:
/// reads above the first line or below the last fall outside `src` (zero), and the columns that
/// would wrap to the next or the previous line are set to zero after (a copy per output line, a
/// call each on runs of 32 to 64 values, filled the UNet's 640 → 640 rows at 32² in 1.9 ms, the
/// one copy in 1.4).
fn shifted_plane(src: &[f32], out: &mut [f32], j0: usize, iw: usize, (dy, dx): (isize, isize)) {
    let len = out.len() as isize;
    let start = j0 as isize + dy * iw as isize + dx;
    let lo = (-start).clamp(0, len) as usize;
    let hi = (src.len() as isize - start).clamp(lo as isize, len) as usize;
    out[..lo].fill(0.0);
    out[hi..].fill(0.0);
    if lo < hi {
        // (Else the whole run reads outside the plane, possibly wholly before it.)
        out[lo..hi].copy_from_slice(&src[(start + lo as isize) as usize..(start + hi as isize) as usize]);
    }
    if dx == 0 {
        return;
    }
    // The columns that read past the left edge (dx < 0: the first |dx|) or the right (the last
    // dx) of each output line the run touches.
    let edge = dx.unsigned_abs().min(iw);
    let (cols_lo, cols_hi) = if dx < 0 { (0, edge) } else { (iw - edge, iw) };
    let end = j0 + out.len();
    for line in j0 / iw..end.div_ceil(iw) {
        let a = (line * iw + cols_lo).max(j0);
        let b = (line * iw + cols_hi).min(end);
        if a < b {
            out[a - j0..b - j0].fill(0.0);
        }
    }
}

/// [`shifted_plane`] on the input upsampled twice (nearest; `ih × iw` the upsampled size, `src` the
/// plane before): output pixel q = (oy, ox) reads the upsampled plane at (oy + dy, ox + dx), that
/// is `src` at ((oy + dy) / 2, (ox + dx) / 2), zero outside: line by line, each source value
/// twice between the zero edges.
fn upsampled_plane(src: &[f32], out: &mut [f32], j0: usize, (ih, iw): (usize, usize), (dy, dx): (isize, isize)) {
    let (sw, end) = (iw / 2, j0 + out.len());
    for oy in j0 / iw..end.div_ceil(iw) {
        // Columns a..b of output line oy, and the ones among them that read inside the line.
        let (a, b) = ((oy * iw).max(j0) - oy * iw, ((oy + 1) * iw).min(end) - oy * iw);
        let seg = &mut out[oy * iw + a - j0..oy * iw + b - j0];
        let iy = oy as isize + dy;
        if iy < 0 || iy >= ih as isize {
            seg.fill(0.0);
            continue;
        }
        let line = &src[iy as usize / 2 * sw..(iy as usize / 2 + 1) * sw];
        let lo = (-dx).clamp(a as isize, b as isize) as usize;
        let hi = (iw as isize - dx).clamp(lo as isize, b as isize) as usize;
        seg[..lo - a].fill(0.0);
        seg[hi - a..].fill(0.0);
        for (ox, v) in (lo..hi).zip(&mut seg[lo - a..hi - a]) {
            *v = line[(ox as isize + dx) as usize / 2];
        }
    }
}

/// A residual an op carries ([`Conv`], [`LinearOp`]) as f32 values, read under `held` (its
/// storage's read lock, beside the one candle holds on the input's: the callers pass a different
/// tensor, and nothing writes either while the op runs); it must have the output's shape `dims`,
/// as candle's add would insist.
fn residual_values<'a, G: std::ops::Deref<Target = candle_core::Storage>>(
    held: &'a Option<(G, &Layout)>,
    dims: &[usize],
    what: &str,
) -> Result<Option<&'a [f32]>> {
    let Some((storage, layout)) = held else { return Ok(None) };
    match &**storage {
        candle_core::Storage::Cpu(s) if layout.shape().dims() == dims => Ok(Some(f32_slice(s, layout, what)?)),
        _ => candle_core::bail!("{what}: expected a CPU f32 tensor of {dims:?}, got {:?}", layout.shape().dims()),
    }
}

/// 2-D convolution (NCHW, OIHW weight, square stride and zero padding, no dilation or groups),
/// with the bias added: what `torch.nn.Conv2d` computes.
pub fn conv2d(x: &Tensor, weight: &Weight, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        let w = weight.dense(x.dtype())?;
        let cfg_out = x.conv2d(&w, padding, stride, 1, 1)?;
        return match bias {
            Some(b) => cfg_out.broadcast_add(&b.to_dtype(x.dtype())?.reshape((1, (), 1, 1))?),
            None => Ok(cfg_out),
        };
    }
    apply_weighted(x, weight, bias, Conv::plain(weight, stride, padding))
}

/// `conv2d(upsample_nearest2d(x, 2h, 2w), …)` without the upsampled copy.
pub fn upsample2x_conv2d(
    x: &Tensor,
    weight: &Weight,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        let (_, _, h, w) = x.dims4()?;
        return conv2d(&x.upsample_nearest2d(2 * h, 2 * w)?, weight, bias, stride, padding);
    }
    apply_weighted(x, weight, bias, Conv { upsample: true, ..Conv::plain(weight, stride, padding) })
}

/// `relu(conv2d(x, …))` with the ReLU in the convolution's last pass.
pub fn conv2d_relu(
    x: &Tensor,
    weight: &Weight,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        return conv2d(x, weight, bias, stride, padding)?.relu();
    }
    apply_weighted(x, weight, bias, Conv { relu: true, ..Conv::plain(weight, stride, padding) })
}

/// `conv2d(x, …) + residual`, then under `relu` the ReLU, inside the convolution's last pass:
/// TAESD's residual join (with the ReLU) and the UNet transformer's residual around its 1×1
/// `proj_out` without a pass of their own over three tensors. Elsewhere than our CPU kernels the
/// convolution, then the sum (and ReLU) as their own operation.
pub fn conv2d_add(
    x: &Tensor,
    weight: &Weight,
    bias: Option<&Tensor>,
    residual: &Tensor,
    (stride, padding): (usize, usize),
    relu: bool,
) -> Result<Tensor> {
    if !is_cpu_f32(x) || !is_cpu_f32(residual) {
        let y = conv2d(x, weight, bias, stride, padding)?;
        return if relu { add_relu(&y, residual) } else { y + residual };
    }
    let conv = Conv { relu, residual: Some(residual.contiguous()?), ..Conv::plain(weight, stride, padding) };
    apply_weighted(x, weight, bias, conv)
}

/// max(v, 0) under `relu` (f32::max: a NaN becomes 0 under it), v unchanged otherwise (a branch,
/// not a max with −∞: a NaN must stay NaN without the ReLU).
#[inline(always)]
fn relu_if(v: f32, relu: bool) -> f32 {
    if relu {
        v.max(0.0)
    } else {
        v
    }
}

/// A residual join: `v + r`, then the ReLU under `relu` — the one rule of add_relu, the
/// convolutions' last pass and Winograd's output transforms.
#[inline(always)]
fn join(v: f32, r: f32, relu: bool) -> f32 {
    relu_if(v + r, relu)
}

/// `relu(a + b)` (same shapes) in one parallel pass: TAESD's residual join.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(a) || !is_cpu_f32(b) || a.dims() != b.dims() {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &AddRelu)
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "ghiblify-add-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1, "add_relu")?, f32_slice(s2, l2, "add_relu")?);
        if a.len() != b.len() {
            candle_core::bail!("add_relu: {} and {} values", a.len(), b.len());
        }
        let write = |out: &mut [std::mem::MaybeUninit<f32>]| {
            out.par_chunks_mut(1 << 16).zip(a.par_chunks(1 << 16).zip(b.par_chunks(1 << 16))).for_each(|(o, (a, b))| {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    o.write(join(*a, *b, true));
                }
            })
        };
        // SAFETY: a, b and the output are as long, chunked alike: every value written.
        Ok((CpuStorage::F32(unsafe { written(a.len(), write) }), l1.shape().clone()))
    }
}

/// `conv2d(x zero-padded by one row below and one column right, …)` without the padded copy.
pub fn pad_end_conv2d(x: &Tensor, weight: &Weight, bias: Option<&Tensor>, stride: usize) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        let x = x.pad_with_zeros(candle_core::D::Minus1, 0, 1)?.pad_with_zeros(candle_core::D::Minus2, 0, 1)?;
        return conv2d(&x, weight, bias, stride, 0);
    }
    apply_weighted(x, weight, bias, Conv { pad_end: 1, ..Conv::plain(weight, stride, 0) })
}

/// Runs a [`WeightedOp`] on contiguous operands: a weight tensor as an operand ([`Stored`]), a
/// weight read in place carried by the op ([`InPlaceOp`]); the bias as the last operand if any.
fn apply_weighted<Op: WeightedOp>(x: &Tensor, weight: &Weight, bias: Option<&Tensor>, op: Op) -> Result<Tensor> {
    let x = x.contiguous()?;
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let w = match weight {
        Weight::Dense(w) | Weight::Q8 { codes: w, .. } => w.contiguous()?,
        Weight::InPlace(view) => {
            let op = InPlaceOp { op, view };
            return match bias {
                Some(b) => x.apply_op2_no_bwd(&b, &op),
                None => x.apply_op1_no_bwd(&op),
            };
        }
    };
    match bias {
        Some(b) => x.apply_op3_no_bwd(&w, &b, &Stored(op)),
        None => x.apply_op2_no_bwd(&w, &Stored(op)),
    }
}

// ---------------------------------------------------------------------------------------------
// Linear layers

/// `x · Wᵀ + b` on the CPU: bf16 products for a bf16 or int8 weight on a CPU with AVX512_BF16, one
/// f32 product otherwise (a weight read in place, f32 or widened for the call).
#[derive(Debug, Clone)]
struct LinearOp {
    /// The weight's per-output-channel scales when it is int8 ([`Weight::Q8`]).
    scales: Option<std::sync::Arc<[f32]>>,
    /// A tensor of the output's shape added to it ([`linear_add`]: a transformer block's residual).
    residual: Option<Tensor>,
    /// GEGLU on the product ([`linear_geglu`]): the output is `Y[.., :n/2] · GELU(Y[.., n/2:])`.
    geglu: bool,
    /// The output written in bf16 where bf16 products write it in one k block with no residual
    /// ([`linear_bf16`], and [`linear_geglu_bf16`] where the gate runs inside the product); f32
    /// elsewhere.
    bf16_out: bool,
}

/// A linear layer's input as stored: f32, or bf16 from a producer that rounded it as the bf16
/// products would ([`layer_norm_bf16`], [`linear_geglu_bf16`]).
#[derive(Clone, Copy)]
enum Act<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl<'a> Act<'a> {
    fn new(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Self> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::BF16(v), Some((a, b))) => Ok(Act::Bf16(&v[a..b])),
            _ => f32_slice(s, l, what).map(Act::F32),
        }
    }

    fn len(&self) -> usize {
        match self {
            Act::F32(x) => x.len(),
            Act::Bf16(x) => x.len(),
        }
    }

    /// The values as f32 (bf16 widened, exactly).
    fn to_f32(self) -> std::borrow::Cow<'a, [f32]> {
        match self {
            Act::F32(x) => std::borrow::Cow::Borrowed(x),
            Act::Bf16(x) => Values::Bf16(x).to_f32(),
        }
    }
}

/// Rows of k bf16 values as the left operand of bf16 products: read in place where the product
/// can (an even k; rows 64-byte aligned, as AMX tile loads want them, else those loads run at a
/// third of their speed), else packed — a copy, the values already rounded.
fn bf16_lhs(x: &[half::bf16], k: usize) -> super::gemm_bf16::Lhs<half::bf16> {
    use super::gemm_bf16::{Lhs, View};
    if k.is_multiple_of(32) && (x.as_ptr() as usize).is_multiple_of(64) {
        Lhs::InPlace { ptr: x.as_ptr(), rs: k }
    } else {
        Lhs::Packed(View { ptr: x.as_ptr(), rs: k, cs: 1 })
    }
}

/// Runs `$body` with `$lhs`, the [`Act`] `$x` (rows of `$k`) as the bf16 products' left operand:
/// f32 packed (rounded once), bf16 as [`bf16_lhs`] takes it; the two element types make two
/// instances of the body.
macro_rules! with_act_lhs {
    ($x:expr, $k:expr, |$lhs:ident| $body:expr) => {{
        use super::gemm_bf16::{Lhs, View};
        match $x {
            Act::F32(x) => {
                let $lhs = Lhs::Packed(View { ptr: x.as_ptr(), rs: $k, cs: 1 });
                $body
            }
            Act::Bf16(x) => {
                let $lhs = bf16_lhs(x, $k);
                $body
            }
        }
    }};
}

impl WeightedOp for LinearOp {
    const NAME: &'static str = "ghiblify-linear";
    const NAME_BIAS: &'static str = "ghiblify-linear-bias";
    const WHAT: &'static str = "linear weight";

    fn scales(&self) -> Option<&[f32]> {
        self.scales.as_deref()
    }

    fn fwd(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        w: &Wt,
        wdims: &[usize],
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        use super::gemm_bf16::{Scale, View};
        let x = Act::new(xs, xl, "linear input")?;
        let &[n, k] = wdims else { candle_core::bail!("linear: weight of shape {wdims:?}") };
        let dims = xl.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear: input {dims:?} for a weight of {n}×{k}");
        }
        let rows = x.len() / k.max(1);
        if self.geglu && (n == 0 || !n.is_multiple_of(2) || self.residual.is_some()) {
            candle_core::bail!("geglu: a projection of width {n} (two equal halves needed)");
        }
        let bias = bias.map(|(bs, bl)| weight_f32(bs, bl, "linear bias")).transpose()?;
        if let Some(b) = &bias {
            if b.len() != n {
                candle_core::bail!("linear: {} bias values for {n} outputs", b.len());
            }
        }
        // Y = X · Wᵀ: X's rows packed (rounded to bf16 once), Wᵀ read from W's rows; an int8 W's
        // scales are per output channel, so per column of Y, and so is the bias, which the bf16
        // products add in their epilogue (the output is written once, not zeroed, filled with the
        // bias and read back).
        let mut od = dims.to_vec();
        *od.last_mut().unwrap() = n;
        let held = self.residual.as_ref().map(Tensor::storage_and_layout);
        let residual = residual_values(&held, &od, "linear residual")?;
        // With a residual the output starts as residual (+ bias) and every product accumulates
        // onto it: the sum costs no pass and no tensor of its own (it was candle's add, a fresh
        // output read back). Without one the bias is written first for the f32 product, and is the
        // bf16 products' epilogue.
        let start = |out: &mut [std::mem::MaybeUninit<f32>]| match (&bias, residual) {
            (Some(b), None) => out.par_chunks_mut(n.max(1)).for_each(|r| write_copy(b, r)),
            (None, Some(res)) => {
                out.par_chunks_mut(1 << 16).zip(res.par_chunks(1 << 16)).for_each(|(o, r)| write_copy(r, o))
            }
            (Some(b), Some(res)) => out.par_chunks_mut(n.max(1)).zip(res.par_chunks(n.max(1))).for_each(|(o, r)| {
                for ((o, &r), &b) in o.iter_mut().zip(r).zip(b.iter()) {
                    o.write(b + r);
                }
            }),
            (None, None) => {}
        };
        let onto = residual.is_some();
        // GEGLU inside the bf16 product where k is one block of it: only the gated half of Y is
        // ever written (Y was 42 MB per call of the UNet's widest projection, written, read back
        // by the GEGLU pass, and the result written again); elsewhere Y, then the GEGLU pass.
        let gated = self.geglu && k > 0 && super::gemm_bf16::one_k_block(k);
        let h = n / 2;
        // SAFETY (both): x is rows × k, the weight n × k (both halves), the output rows × h, the
        // bias and the int8 scales n long.
        let bf16_out = self.bf16_out;
        // A plain product's output in bf16 where asked and it is written in one k block.
        let bf16_c = bf16_out && !self.geglu && !onto && super::gemm_bf16::one_k_block(k);
        let out = match &*w.for_products() {
            Wt::Bf16(w) if gated && w.len() == n * k => {
                let scale = Scale { bias: bias.as_deref(), ..Scale::ONE };
                let w = View { ptr: w.as_ptr(), rs: 1, cs: k };
                Some(with_act_lhs!(x, k, |a| unsafe { gated_product(a, (rows, h, k), w, scale, bf16_out) }))
            }
            Wt::Q8 { codes, scales } if gated && scales.len() == n && codes.len() == n * k => {
                let scale = Scale { cols: Some(scales), bias: bias.as_deref(), ..Scale::ONE };
                let w = View { ptr: codes.as_ptr(), rs: 1, cs: k };
                Some(with_act_lhs!(x, k, |a| unsafe { gated_product(a, (rows, h, k), w, scale, bf16_out) }))
            }
            _ => None,
        };
        if let Some(out) = out {
            *od.last_mut().unwrap() = h;
            return Ok((out, Shape::from(od)));
        }
        // The output is written once ([`written`]): the bf16 products write every one of the
        // rows × n values (not accumulating) or accumulate onto the residual written first; the
        // f32 product writes them (the gemm crate reads no output value when told not to
        // accumulate) or accumulates onto the bias and/or residual written first.
        // SAFETY (all three): x is rows × k, w is n × k, the output and the residual (if any)
        // rows × n, scales and bias (if any) n long.
        let out = match &*w.for_products() {
            Wt::F32(w) if w.len() == n * k => unsafe {
                // (A bf16 input widened for the f32 product: what it would have read as f32.)
                let x = x.to_f32();
                written(rows * n, |out| {
                    start(out);
                    sgemm(
                        (rows, n, k),
                        out.as_mut_ptr() as *mut f32,
                        n as isize,
                        bias.is_some() || onto,
                        (x.as_ptr(), 1, k as isize),
                        (w.as_ptr(), k as isize, 1),
                        1.0,
                        rayon_par(),
                    )
                })
            },
            Wt::Bf16(w) if w.len() == n * k => {
                let b = View { ptr: w.as_ptr(), rs: 1, cs: k };
                let scale = Scale { bias: bias.as_deref().filter(|_| !onto), ..Scale::ONE };
                // SAFETY (both): as above.
                match unsafe { plain_product(x, (rows, n, k), b, scale, bf16_c, onto.then_some(&start)) } {
                    CpuStorage::F32(out) => out,
                    bf16 => return Ok((bf16, Shape::from(od))),
                }
            }
            Wt::Q8 { codes, scales } if scales.len() == n && codes.len() == n * k => {
                let b = View { ptr: codes.as_ptr(), rs: 1, cs: k };
                let scale = Scale { cols: Some(scales), bias: bias.as_deref().filter(|_| !onto), ..Scale::ONE };
                match unsafe { plain_product(x, (rows, n, k), b, scale, bf16_c, onto.then_some(&start)) } {
                    CpuStorage::F32(out) => out,
                    bf16 => return Ok((bf16, Shape::from(od))),
                }
            }
            _ => candle_core::bail!("linear: the weight does not hold {n}×{k} values"),
        };
        if self.geglu {
            *od.last_mut().unwrap() = h;
            return Ok((CpuStorage::F32(geglu_pass(&out, h)), Shape::from(od)));
        }
        Ok((CpuStorage::F32(out), Shape::from(od)))
    }
}

/// What a product's output starts as before the product sums into it (a residual, written whole).
type Start<'a> = dyn Fn(&mut [std::mem::MaybeUninit<f32>]) + Sync + 'a;

/// A linear layer's bf16 products, `X · B` scaled as `scale` says (X the rows × k activations):
/// written in bf16 when `bf16_c` ([`super::gemm_bf16::Scale::bf16_c`]), else in f32 — onto what
/// `onto` writes first (the residual) where it is given.
///
/// # Safety
/// `b` views k × n; the scale's columns and bias cover n; with `bf16_c`, k within one block of the
/// products and no `onto`; `onto` writes every value it is handed.
unsafe fn plain_product<T: super::gemm_bf16::Elem>(
    x: Act,
    (rows, n, k): (usize, usize, usize),
    b: super::gemm_bf16::View<T>,
    scale: super::gemm_bf16::Scale,
    bf16_c: bool,
    onto: Option<&Start<'_>>,
) -> CpuStorage {
    use super::gemm_bf16::{gemm, Scale};
    let scale = Scale { bf16_c, ..scale };
    // SAFETY: the caller's promise; every value of the rows × n output is written by the product
    // (or first by `onto`, then summed into: an f32 output, as `onto` comes only without bf16_c,
    // which `gemm` asserts by refusing to sum into a bf16 C).
    unsafe {
        written_storage(rows * n, bf16_c, |c| {
            if let Some(start) = onto {
                start(std::slice::from_raw_parts_mut(c as *mut std::mem::MaybeUninit<f32>, rows * n));
            }
            let acc = onto.is_some();
            with_act_lhs!(x, k, |a| gemm((rows, n, k), c, n, acc, a, b, scale, true))
        })
    }
}

/// [`written`] in f32, or (`bf16`) in bf16: `write` is handed where the n values start (f32 or
/// bf16 ones, as the products' C pointer is with [`super::gemm_bf16::Scale::bf16_c`]).
///
/// # Safety
/// As [`written`].
unsafe fn written_storage(n: usize, bf16: bool, write: impl FnOnce(*mut f32)) -> CpuStorage {
    // SAFETY: the caller's promise.
    unsafe {
        if bf16 {
            CpuStorage::BF16(written_as(n, half::bf16::NAN, |o| write(o.as_mut_ptr() as *mut f32)))
        } else {
            CpuStorage::F32(written(n, |o| write(o.as_mut_ptr() as *mut f32)))
        }
    }
}

/// Whether a weight can go to our CPU kernels (on the CPU, or read in place from its file).
fn ours(weight: &Weight) -> bool {
    match weight {
        Weight::Dense(w) => w.device().is_cpu(),
        Weight::Q8 { codes, .. } => codes.device().is_cpu(),
        Weight::InPlace(_) => true,
    }
}

/// `linear(x, …) + residual` (the residual of the output's shape): on our CPU kernels the product
/// accumulates onto the residual (and bias) written first — a transformer block's three residual
/// sums without a pass and a tensor of their own. Elsewhere the two operations.
pub fn linear_add(x: &Tensor, weight: &Weight, bias: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
    if is_cpu_act(x) && is_cpu_f32(residual) && ours(weight) {
        let op =
            LinearOp { scales: weight.scales(), residual: Some(residual.contiguous()?), geglu: false, bf16_out: false };
        return apply_weighted(x, weight, bias, op);
    }
    linear(x, weight, bias)? + residual
}

/// `torch.nn.Linear`: `x · Wᵀ + b` over the last dimension, any leading dimensions. For f32
/// activations on the CPU: bf16 products with f32 sums when the weight is bf16 or int8 and the
/// CPU multiplies bf16 ([`Weight::bf16_products`]), otherwise one f32 product on the weight as it
/// lies (in its file, [`Weight::InPlace`], or a tensor) or widened or dequantised for the call on
/// all threads, onto the bias filled in first (candle's `to_dtype` widens on one thread, its
/// bias add is another pass on one: 0.1–0.2 s of a bf16 UNet call each). Elsewhere candle's
/// product in the activations' dtype.
pub fn linear(x: &Tensor, weight: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    if is_cpu_act(x) && ours(weight) {
        let op = LinearOp { scales: weight.scales(), residual: None, geglu: false, bf16_out: false };
        return apply_weighted(x, weight, bias, op);
    }
    let x = widened(x)?;
    let x = x.as_ref();
    let w = weight.dense(x.dtype())?;
    let (n, k) = w.dims2()?;
    let lead = &x.dims()[..x.rank() - 1];
    // One (rows × k)·(k × n) product over all leading dimensions, on the transposed view.
    let rows = lead.iter().product::<usize>();
    let y = x.contiguous()?.reshape((rows, k))?.matmul(&w.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
        None => y,
    };
    let mut shape = lead.to_vec();
    shape.push(n);
    y.reshape(shape)
}

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU)

#[derive(Debug, Clone, Copy)]
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

simd! {
fn norm_chunk(x: &[f32], out: &mut [std::mem::MaybeUninit<f32>], per: usize, gamma: &[f32], beta: &[f32], eps: f64, silu: bool) {
    // Two passes in f64 (mean, then squared deviations), as PyTorch's CPU group_norm: no
    // cancellation for large activations.
    let (m, rstd) = moments(x, eps);
    if per == 1 && !silu {
        // A LayerNorm row (`layer_norm`): a factor per value, one vectorisable loop.
        for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
            o.write((v - m) * (g * rstd) + b);
        }
        return;
    }
    for ((xc, oc), (&g, &b)) in x.chunks(per).zip(out.chunks_mut(per)).zip(gamma.iter().zip(beta)) {
        // (v − mean)·a + b, not v·a + (b − mean·a): the latter cancels badly when |mean| ≫ std.
        let a = g * rstd;
        if silu {
            for (o, &v) in oc.iter_mut().zip(xc) {
                let y = (v - m) * a + b;
                o.write(y / (1.0 + exp(-y)));
            }
        } else {
            for (o, &v) in oc.iter_mut().zip(xc) {
                o.write((v - m) * a + b);
            }
        }
    }
}
}

/// The mean of `x` and 1/√(var + eps), both passes in f64 ([`norm_chunk`]).
#[inline(always)]
fn moments(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = lane_sum(x) / n;
    let m = mean as f32;
    let var = lane_sum_by(x, |v| {
        let d = (v - m) as f64;
        d * d
    }) / n;
    (m, (1.0 / (var + eps).sqrt()) as f32)
}

simd! {
fn layer_norm_rows_bf16(x: &[f32], out: &mut [std::mem::MaybeUninit<half::bf16>], gamma: &[f32], beta: &[f32], eps: f64) {
    // norm_chunk's LayerNorm row, value for value, then rounded as the bf16 products round an f32
    // operand (so a product reading these rows gets the very words it would have packed).
    use super::gemm_bf16::Elem;
    let c = gamma.len();
    for (xr, or) in x.chunks(c).zip(out.chunks_mut(c)) {
        let (m, rstd) = moments(xr, eps);
        for (((o, &v), &g), &b) in or.iter_mut().zip(xr).zip(gamma).zip(beta) {
            o.write(half::bf16::from_bits(((v - m) * (g * rstd) + b).bf16_bits() as u16));
        }
    }
}
}

/// [`layer_norm`] written in bf16 for readers that round it so anyway (linear layers with bf16
/// products, [`linear`]).
#[derive(Debug, Clone, Copy)]
struct LayerNormBf16Op {
    eps: f64,
}

impl CustomOp3 for LayerNormBf16Op {
    fn name(&self) -> &'static str {
        "ghiblify-layer-norm-bf16"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm input")?;
        let gamma = weight_f32(s2, l2, "layer_norm weight")?;
        let beta = weight_f32(s3, l3, "layer_norm bias")?;
        let c = gamma.len();
        if c == 0 || beta.len() != c || l1.shape().dims().last() != Some(&c) {
            candle_core::bail!("layer_norm: {:?} with {c} weights and {} biases", l1.shape(), beta.len());
        }
        // Blocks of rows per task (a row is 320 to 1280 values in the UNet).
        let per = ((1 << 14) / c).max(1) * c;
        let write = |out: &mut [std::mem::MaybeUninit<half::bf16>]| {
            out.par_chunks_mut(per)
                .zip(x.par_chunks(per))
                .for_each(|(o, xr)| layer_norm_rows_bf16(xr, o, &gamma, &beta, self.eps))
        };
        // SAFETY: the output and x are chunked alike by whole rows, each written whole.
        let out = unsafe { written_as(x.len(), half::bf16::NAN, write) };
        Ok((CpuStorage::BF16(out), l1.shape().clone()))
    }
}

/// [`layer_norm`], its output rounded to bf16 (nearest even) where our CPU kernels run: for a
/// norm whose only readers are linear layers with bf16 products, which round their f32 input so
/// and then read these rows in place — the same products, half the bytes written and read, no
/// packing pass. Elsewhere [`layer_norm`] itself.
pub fn layer_norm_bf16(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        return layer_norm(x, gamma, beta, eps);
    }
    x.contiguous()?.apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &LayerNormBf16Op { eps })
}

/// Sum in f64 over 8 interleaved lanes (vectorisable; the order is fixed, so results repeat).
#[inline(always)]
fn lane_sum(x: &[f32]) -> f64 {
    lane_sum_by(x, |v| v as f64)
}

/// Σ f(x) in f64 over 8 interleaved lanes: whole chunks, then the tail into the first lanes (see
/// [`row_max`] for why the tail is apart).
#[inline(always)]
fn lane_sum_by(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(it.remainder()) {
        *a += f(v);
    }
    acc.iter().sum()
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ghiblify-group-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "group_norm input")?;
        let gamma = weight_f32(s2, l2, "group_norm weight")?;
        let beta = weight_f32(s3, l3, "group_norm bias")?;
        let dims = l1.shape().dims();
        let c = dims[1];
        let per = dims[2..].iter().product::<usize>();
        let cg = c / self.groups;
        let group = (cg * per).max(1);
        let write = |out: &mut [std::mem::MaybeUninit<f32>]| {
            out.par_chunks_mut(group).zip(x.par_chunks(group)).enumerate().for_each(|(i, (o, xc))| {
                let g0 = (i % self.groups) * cg;
                norm_chunk(xc, o, per, &gamma[g0..g0 + cg], &beta[g0..g0 + cg], self.eps, self.silu);
            })
        };
        // SAFETY: the output and x are chunked alike, and norm_chunk writes its chunk whole.
        Ok((CpuStorage::F32(unsafe { written(x.len(), write) }), l1.shape().clone()))
    }
}

/// `torch.nn.GroupNorm` over (B, C, …), optionally followed by SiLU in the same pass.
pub fn group_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    let c = x.dim(1)?;
    if c % groups != 0 {
        candle_core::bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    if !is_cpu_f32(x) {
        let y = candle_nn::GroupNorm::new(gamma.to_dtype(x.dtype())?, beta.to_dtype(x.dtype())?, c, groups, eps)?;
        let y = candle_core::Module::forward(&y, x)?;
        return if silu { candle_nn::ops::silu(&y) } else { Ok(y) };
    }
    x.contiguous()?.apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &GroupNormOp { groups, eps, silu })
}

/// `torch.nn.LayerNorm` over the last dimension (weight and bias of that length): on the CPU the
/// group norm's kernel with each row one group of one-value channels (two passes in f64, as
/// there; candle's kernel took 0.80 ms for the UNet's 4096 × 320 rows, this one 0.34 ms).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims();
    let c = *dims.last().ok_or_else(|| candle_core::Error::Msg("layer_norm: a 0-D input".into()))?;
    if !is_cpu_f32(x) {
        let x = x.contiguous()?;
        return candle_nn::ops::layer_norm(&x, &gamma.to_dtype(x.dtype())?, &beta.to_dtype(x.dtype())?, eps as f32);
    }
    let rows = x.elem_count() / c.max(1);
    group_norm(&x.reshape((rows, c, 1))?, gamma, beta, 1, eps, false)?.reshape(dims)
}

// ---------------------------------------------------------------------------------------------
// exp and erf, branch-free so the loops above vectorise.

/// e^x for f32 (Cephes' expf: range reduction by ln 2 in two parts, degree-5 polynomial;
/// ≤ 2 ulp on [-87, 88]; below, e^-87.3 ≈ 1e-38, which is 0 next to a softmax row's maximum).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n without a float→int conversion (Rust's saturating `as` does not vectorise): adding
    // 1.5·2^23 leaves n, as an integer, in the low mantissa bits.
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    f32::from_bits(n_bits.wrapping_add(127) << 23) * y
}

/// erf(x) = sign(x)·(1 − erfc|x|), erfc(z) = t·exp(−z² + P(t)) with t = 1/(1 + z/2): Numerical
/// Recipes' `erfcc` Chebyshev fit (fractional error < 1.2e-7 everywhere; Abramowitz & Stegun
/// 7.1.26's 1.5e-7 absolute is close but this one has no branch either).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * exp(-z * z + poly);
    (1.0 - erfc).copysign(x)
}

// ---------------------------------------------------------------------------------------------
// Token layout

#[derive(Debug, Clone, Copy)]
struct SwapLastTwoOp;

impl CustomOp1 for SwapLastTwoOp {
    fn name(&self) -> &'static str {
        "ghiblify-swap-last-two"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "transpose input")?;
        let &[b, m, n] = l.shape().dims() else { candle_core::bail!("transpose: {:?} is not 3-D", l.shape()) };
        // Blocks of 32 × 32 through a local tile: each input row piece read once, in order, and
        // each output row piece written once (candle's strided copy reads one value per input
        // line; reading 32 lines 4096 floats apart straight from the input put them all in one L1
        // set).
        const T: usize = 32;
        let write = |out: &mut [std::mem::MaybeUninit<f32>]| {
            if m * n == 0 {
                return;
            }
            out.par_chunks_mut(m * n).zip(x.par_chunks(m * n)).for_each(|(o, x)| {
                o.par_chunks_mut(T * m).enumerate().for_each(|(jb, o)| {
                    let j0 = jb * T;
                    let jn = T.min(n - j0);
                    let mut tile = [[0f32; T]; T];
                    for i0 in (0..m).step_by(T) {
                        let im = T.min(m - i0);
                        for (i, t) in tile.iter_mut().enumerate().take(im) {
                            t[..jn].copy_from_slice(&x[(i0 + i) * n + j0..(i0 + i) * n + j0 + jn]);
                        }
                        for j in 0..jn {
                            for (i, v) in o[j * m + i0..j * m + i0 + im].iter_mut().enumerate() {
                                v.write(tile[i][j]);
                            }
                        }
                    }
                })
            });
        };
        // SAFETY: x holds b·m·n values; each image's blocks of T output rows (m values each)
        // cover its n rows, and every row's m values are written, T at a time.
        Ok((CpuStorage::F32(unsafe { written(x.len(), write) }), Shape::from((b, n, m))))
    }
}

/// `x` (b, m, n) as (b, n, m), contiguous: the UNet's transformers between image layout (b, c, h·w)
/// and token layout (b, h·w, c), both ways.
pub fn swap_last_two(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        return x.transpose(1, 2)?.contiguous();
    }
    x.contiguous()?.apply_op1_no_bwd(&SwapLastTwoOp)
}

// ---------------------------------------------------------------------------------------------
// GEGLU

#[derive(Debug, Clone, Copy)]
struct GegluOp;

simd! {
fn geglu_rows(h: &[f32], out: &mut [std::mem::MaybeUninit<f32>], half: usize) {
    for (hr, or) in h.chunks(2 * half).zip(out.chunks_mut(half)) {
        let (a, g) = hr.split_at(half);
        for ((o, &a), &g) in or.iter_mut().zip(a).zip(g) {
            o.write(a * (0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2))));
        }
    }
}
}

/// GEGLU over rows of 2·half values (half ≥ 1) on all threads: rows × half values.
fn geglu_pass(h: &[f32], half: usize) -> Vec<f32> {
    let rows = h.len() / (2 * half);
    let per = (1 << 14) / half + 1;
    let write = |out: &mut [std::mem::MaybeUninit<f32>]| {
        out.par_chunks_mut(per * half).zip(h.par_chunks(per * 2 * half)).for_each(|(o, h)| geglu_rows(h, o, half))
    };
    // SAFETY: per rows of the output (half values each) from per rows of h (2·half each);
    // geglu_rows writes every value of each output row.
    unsafe { written(rows * half, write) }
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "ghiblify-geglu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(s, l, "geglu input")?;
        let dims = l.shape().dims();
        let half = dims[dims.len() - 1] / 2;
        if half == 0 || !dims[dims.len() - 1].is_multiple_of(2) {
            candle_core::bail!("geglu: an input of width {} (two equal halves needed)", dims[dims.len() - 1]);
        }
        let out = geglu_pass(h, half);
        let mut od = dims.to_vec();
        *od.last_mut().unwrap() = half;
        Ok((CpuStorage::F32(out), Shape::from(od)))
    }
}

/// GEGLU's gate inside the gated product ([`gated_product`]): `a = a · GELU(g)`, exact (erf) GELU.
fn geglu_gate(a: &mut [f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { geglu_gate_avx512(a, g) };
    }
    geglu_gate_scalar(a, g)
}

simd! {
fn geglu_gate_scalar(a: &mut [f32], g: &[f32]) {
    // geglu_rows' arithmetic, value for value (the gated product and the pass differ only where
    // the bias enters the sums).
    for (a, &g) in a.iter_mut().zip(g) {
        *a *= 0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
    }
}
}

/// [`geglu_gate_scalar`]'s [`erf`] and [`exp`] 16 lanes at a time, with erf's 1 / (1 + z/2) from
/// `vrcp14ps` and one Newton step (relative error ~1e-8, under f32's own rounding) instead of
/// `vdivps`, whose one divider per core made it a third of the gate's time; FMAs where the scalar
/// form rounds twice (within 5e-7, relative, of the scalar form's values).
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn geglu_gate_avx512(a: &mut [f32], g: &[f32]) {
    use std::arch::x86_64::*;
    let set = _mm512_set1_ps;
    let n = a.len().min(g.len());
    let mut i = 0;
    while i < n {
        let k: __mmask16 = if n - i >= 16 { 0xFFFF } else { (1u16 << (n - i)) - 1 };
        let gv = _mm512_maskz_loadu_ps(k, g.as_ptr().add(i));
        let av = _mm512_maskz_loadu_ps(k, a.as_ptr().add(i));
        let x = _mm512_mul_ps(gv, set(std::f32::consts::FRAC_1_SQRT_2));
        // |x| held at 10 (erf is 1 in f32 from 4 on), so that ±∞ gives ±1, not 0 · ∞ = NaN in
        // the Newton step; NaN comes through g.
        let z = _mm512_min_ps(_mm512_abs_ps(x), set(10.0));
        let d = _mm512_fmadd_ps(z, set(0.5), set(1.0));
        let r = _mm512_rcp14_ps(d);
        let t = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, set(2.0)));
        let mut poly = set(0.170_872_77);
        for c in [
            -0.822_152_23,
            1.488_515_9,
            -1.135_204,
            0.278_868_07,
            -0.186_288_06,
            0.096_784_18,
            0.374_091_96,
            1.000_023_7,
            -1.265_512_2,
        ] {
            poly = _mm512_fmadd_ps(poly, t, set(c));
        }
        // exp(−z² + P(t)) as `exp` computes it: n = ⌊x·log₂e + ½⌋, the reduction by ln 2 in two
        // parts, the degree-5 polynomial, then 2^n.
        let e = _mm512_min_ps(_mm512_max_ps(_mm512_fnmadd_ps(z, z, poly), set(-87.3)), set(88.3));
        let m = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
            e,
            set(std::f32::consts::LOG2_E),
            set(0.5),
        ));
        let rr = _mm512_fmadd_ps(m, set(2.121_944_4e-4), _mm512_fnmadd_ps(m, set(0.693_359_4), e));
        let mut p = set(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, rr, set(c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, rr), rr, rr), set(1.0));
        let erfc = _mm512_mul_ps(t, _mm512_scalef_ps(y, m));
        // (1 − erfc) with x's sign: erfc of |x| is in (0, 1], so 1 − erfc ≥ 0.
        let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
        let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(_mm512_sub_ps(set(1.0), erfc)), sign));
        let gelu = _mm512_mul_ps(_mm512_mul_ps(set(0.5), gv), _mm512_add_ps(set(1.0), erf));
        _mm512_mask_storeu_ps(a.as_mut_ptr().add(i), k, _mm512_mul_ps(av, gelu));
        i += 16;
    }
}

/// [`gemm_bf16::gemm_gated`](super::gemm_bf16::gemm_gated) with [`geglu_gate`]: `X · Wᵀ + b`'s
/// halves gated, written once as rows × h.
///
/// # Safety
/// x holds rows × k values, `w` views k × 2h (a weight's 2h rows of k, transposed), the scale's
/// columns and bias cover 2h; the CPU multiplies bf16.
unsafe fn gated_product<TA: super::gemm_bf16::Elem, T: super::gemm_bf16::Elem>(
    a: super::gemm_bf16::Lhs<TA>,
    (rows, h, k): (usize, usize, usize),
    w: super::gemm_bf16::View<T>,
    scale: super::gemm_bf16::Scale,
    bf16_out: bool,
) -> CpuStorage {
    use super::gemm_bf16::{gemm_gated, Scale};
    let scale = Scale { bf16_c: bf16_out, ..scale };
    // SAFETY: the caller's promise; the output is rows × h, every value written by the product.
    unsafe { written_storage(rows * h, bf16_out, |c| gemm_gated((rows, h, k), c, h, a, w, scale, geglu_gate)) }
}

/// [`linear`] with its output in bf16 where bf16 products write it in one k block (rounded as the
/// bf16 products round an f32 operand: for a result read only by bf16 products — attention's
/// queries, keys and values, [`attention`]); f32 elsewhere.
pub fn linear_bf16(x: &Tensor, weight: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    if is_cpu_act(x) && ours(weight) {
        let op = LinearOp { scales: weight.scales(), residual: None, geglu: false, bf16_out: true };
        return apply_weighted(x, weight, bias, op);
    }
    linear(x, weight, bias)
}

/// diffusers' GEGLU on its projection, `geglu(linear(x, weight, bias))` in one op: on our CPU
/// kernels with bf16 or int8 products the gate is applied inside the product
/// ([`gemm_bf16::gemm_gated`](super::gemm_bf16::gemm_gated)), else on the projection's output
/// before it leaves the op. The same values, up to where the bias enters the sums (within 1e-6 of
/// the largest).
pub fn linear_geglu(x: &Tensor, weight: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    if is_cpu_act(x) && ours(weight) {
        let op = LinearOp { scales: weight.scales(), residual: None, geglu: true, bf16_out: false };
        return apply_weighted(x, weight, bias, op);
    }
    geglu(&linear(x, weight, bias)?)
}

/// [`linear_geglu`] with its output in bf16 where the gate runs inside bf16 products (rounded as
/// the bf16 products round an f32 operand: for a result read only by a linear layer with bf16
/// products, [`linear`], which then reads it in place); f32 elsewhere.
pub fn linear_geglu_bf16(x: &Tensor, weight: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    if is_cpu_act(x) && ours(weight) {
        let op = LinearOp { scales: weight.scales(), residual: None, geglu: true, bf16_out: true };
        return apply_weighted(x, weight, bias, op);
    }
    linear_geglu(x, weight, bias)
}

/// diffusers' GEGLU on the output of its projection: `h[..., :n] · GELU(h[..., n:])`, exact GELU.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(candle_core::D::Minus1)? / 2;
    if !is_cpu_f32(h) {
        let d = h.rank() - 1;
        return h.narrow(d, 0, half)? * h.narrow(d, half, half)?.gelu_erf()?;
    }
    h.contiguous()?.apply_op1_no_bwd(&GegluOp)
}

// ---------------------------------------------------------------------------------------------
// Attention

simd! {
fn softmax_rows_generic(s: &mut [f32], lk: usize, inv: &mut [f32]) -> () {
    for (row, inv) in s.chunks_mut(lk).zip(inv.iter_mut()) {
        let m = row_max(row);
        let mut acc = [0f32; 16];
        let mut it = row.chunks_exact_mut(16);
        for c in &mut it {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v = exp(*v - m);
                *a += *v;
            }
        }
        for (a, v) in acc.iter_mut().zip(it.into_remainder()) {
            *v = exp(*v - m);
            *a += *v;
        }
        *inv = 1.0 / acc.iter().sum::<f32>();
    }
}
}

/// Each row of `s` (rows of `lk` scores) replaced by `exp(s − max)`, unnormalised, and `inv[r]` =
/// 1 / the row's sum: the product with V divides its rows × d result instead of the rows × lk
/// probabilities (one pass over the scores fewer), as flash attention does.
fn softmax_rows(s: &mut [f32], lk: usize, inv: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { softmax_rows_avx512(s, lk, inv) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { softmax_rows_avx2(s, lk, inv) };
    }
    softmax_rows_generic(s, lk, inv)
}

/// Whether this CPU has AVX2 and FMA: the hand-written paths for CPUs without AVX-512 (this
/// softmax, the fused Winograd kernel and row transforms).
fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Cephes' exp2f polynomial for 2^f on |f| ≤ ½, highest degree first (Horner): the softmaxes'
/// exponentials, [`exp_shifted_avx512`] and [`exp_shifted_avx2`].
#[cfg(target_arch = "x86_64")]
const EXP2_FRACTION: [f32; 7] =
    [1.535_336_2e-4, 1.339_887_4e-3, 9.618_437e-3, 5.550_332_5e-2, 2.402_264_8e-1, 6.931_472e-1, 1.0];

/// [`exp_shifted_avx512`] for 8 scores with AVX2, which has no `vscalefps`: the same 2^f
/// polynomial, and 2^n put together in the exponent bits, with t held at −127 or above: n = −127
/// gives exponent bits 0, so values below ~2^−126.5 (1e-38, nothing next to a row's maximum of 1)
/// are 0 where `vscalefps` gives subnormals. −∞ − max gives 0; a NaN stays NaN (the max keeps its
/// second operand, and NaN times any 2^n is NaN).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_shifted_avx2(
    x: std::arch::x86_64::__m256,
    log2e: std::arch::x86_64::__m256,
    max: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let t = _mm256_max_ps(_mm256_set1_ps(-127.0), _mm256_mul_ps(_mm256_sub_ps(x, max), log2e));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm256_sub_ps(t, n);
    let mut y = _mm256_set1_ps(EXP2_FRACTION[0]);
    for c in &EXP2_FRACTION[1..] {
        y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(*c));
    }
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
}

/// [`softmax_rows`] with AVX2 and FMA: [`row_max`], then [`exp_shifted_avx2`] in place with two
/// sums in flight (the portable loop's Cephes `exp`, vectorised by the compiler, was a quarter of
/// an f32 attention's time on a CPU without AVX-512, docs/PERFORMANCE.md).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(s: &mut [f32], lk: usize, inv: &mut [f32]) {
    use std::arch::x86_64::*;
    let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
    for (row, inv) in s.chunks_mut(lk).zip(inv.iter_mut()) {
        let max = _mm256_set1_ps(row_max(row));
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let rp = row.as_mut_ptr();
        // SAFETY: 16·i + 16 ≤ lk values of the row.
        for i in 0..lk / 16 {
            unsafe {
                let lo = exp_shifted_avx2(_mm256_loadu_ps(rp.add(16 * i)), log2e, max);
                let hi = exp_shifted_avx2(_mm256_loadu_ps(rp.add(16 * i + 8)), log2e, max);
                _mm256_storeu_ps(rp.add(16 * i), lo);
                _mm256_storeu_ps(rp.add(16 * i + 8), hi);
                acc0 = _mm256_add_ps(acc0, lo);
                acc1 = _mm256_add_ps(acc1, hi);
            }
        }
        // The last values through a buffer, −∞ (an exponential of 0) in the lanes past the row.
        for tail in row[lk / 16 * 16..].chunks_mut(8) {
            let mut buf = [f32::NEG_INFINITY; 8];
            buf[..tail.len()].copy_from_slice(tail);
            // SAFETY: buf holds 8 values.
            let e = unsafe { exp_shifted_avx2(_mm256_loadu_ps(buf.as_ptr()), log2e, max) };
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), e) };
            tail.copy_from_slice(&buf[..tail.len()]);
            acc0 = _mm256_add_ps(acc0, e);
        }
        let mut sums = [0f32; 8];
        // SAFETY: sums holds 8 values.
        unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), _mm256_add_ps(acc0, acc1)) };
        *inv = 1.0 / sums.iter().sum::<f32>();
    }
}

/// `exp(x − max)` for 16 scores as 2^t, t = (x − max)·log₂e: `vscalefps(2^f, n)` with n = round(t)
/// and 2^f from Cephes' exp2f polynomial on |f| ≤ ½ (relative error ~2e-7, as the scalar
/// [`exp`]'s), a third of `exp`'s instructions: `vscalefps` does its clamp and its exponent bit
/// work (2^n below the f32 range is 0). The difference first, then the product: x·log₂e −
/// max·log₂e in one FMA put max·log₂e's rounding (4e-6 at max = 80) into every value. t is held at
/// −200 or above, where every result is 0 already, so that −∞ − max gives 0, not NaN; a NaN stays
/// NaN.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_shifted_avx512(
    x: std::arch::x86_64::__m512,
    log2e: std::arch::x86_64::__m512,
    max: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let t = _mm512_max_ps(_mm512_set1_ps(-200.0), _mm512_mul_ps(_mm512_sub_ps(x, max), log2e));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let mut y = _mm512_set1_ps(EXP2_FRACTION[0]);
    for c in &EXP2_FRACTION[1..] {
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(*c));
    }
    _mm512_scalef_ps(y, n)
}

/// The last `len` (≤ 16) values of a row at `p` and their lanes' mask; −∞ in the other lanes (an
/// exponential of 0, no effect on a maximum).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_tail(p: *const f32, len: usize) -> (u16, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let k = ((1u32 << len.min(16)) - 1) as u16;
    (k, _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), k, p))
}

/// [`softmax_rows`] on AVX-512: [`row_max_avx512`], then [`exp_shifted_avx512`] in place with two
/// sums in flight.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_rows_avx512(s: &mut [f32], lk: usize, inv: &mut [f32]) {
    use std::arch::x86_64::*;
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    for (row, inv) in s.chunks_mut(lk).zip(inv.iter_mut()) {
        let max = _mm512_set1_ps(row_max_avx512(row));
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let rp = row.as_mut_ptr();
        for i in 0..lk / 32 {
            let lo = exp_shifted_avx512(_mm512_loadu_ps(rp.add(32 * i)), log2e, max);
            let hi = exp_shifted_avx512(_mm512_loadu_ps(rp.add(32 * i + 16)), log2e, max);
            _mm512_storeu_ps(rp.add(32 * i), lo);
            _mm512_storeu_ps(rp.add(32 * i + 16), hi);
            acc0 = _mm512_add_ps(acc0, lo);
            acc1 = _mm512_add_ps(acc1, hi);
        }
        let mut at = lk / 32 * 32;
        while at < lk {
            let (k, x) = load_tail(rp.add(at), lk - at);
            let e = exp_shifted_avx512(x, log2e, max);
            _mm512_mask_storeu_ps(rp.add(at), k, e);
            acc0 = _mm512_add_ps(acc0, e);
            at += 16;
        }
        *inv = 1.0 / _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
}

/// The largest value of a row, 16 lanes at a time. Whole chunks first and the tail apart (here and
/// in the softmaxes): a loop over `chunks(16)`, whose last chunk may be short, kept the 16 lanes in
/// memory, a store-to-load round trip per 16 values that made the softmax half of the attention.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 16];
    let mut it = row.chunks_exact(16);
    for c in &mut it {
        for (m, &v) in mx.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    for (m, &v) in mx.iter_mut().zip(it.remainder()) {
        *m = m.max(v);
    }
    mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// The bf16 attention's [`softmax_rows`] of `scale · s` (scale > 0: the products store the scores
/// unscaled; rows of lk scores `ld` apart in `s`, of lk probabilities in `p`): each row's `exp(scale · (s − max))` rounded to bf16
/// (`vcvtne2ps2bf16`, nearest even) into `p`, the operand the product with V reads, and `inv[r]` =
/// 1 / the sum of the rounded row, for that product to apply to its f32 sums (the rows of P·V are
/// then weighted means of V's rows, with the probabilities rounded to bf16). The sum is taken on
/// the rounded pairs by `vdpbf16ps` against ones, the instruction the product with V multiplies
/// them with (it reads values below f32's normal range as 0, as that product does).
///
/// # Safety
/// The CPU has AVX512_BF16 (the bf16 attention runs only then).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn softmax_rows_bf16(s: &[f32], (lk, ld): (usize, usize), scale: f32, p: &mut [half::bf16], inv: &mut [f32]) {
    use std::arch::x86_64::*;
    let log2e = _mm512_set1_ps(scale * std::f32::consts::LOG2_E);
    let ones: __m512bh = std::mem::transmute(_mm512_set1_epi16(half::bf16::ONE.to_bits() as i16));
    for ((row, prow), inv) in s.chunks(ld).map(|r| &r[..lk]).zip(p.chunks_mut(lk)).zip(inv.iter_mut()) {
        let max = _mm512_set1_ps(row_max_avx512(row));
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (rp, pp) = (row.as_ptr(), prow.as_mut_ptr());
        for i in 0..lk / 32 {
            let lo = exp_shifted_avx512(_mm512_loadu_ps(rp.add(32 * i)), log2e, max);
            let hi = exp_shifted_avx512(_mm512_loadu_ps(rp.add(32 * i + 16)), log2e, max);
            let r = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(pp.add(32 * i) as *mut _, std::mem::transmute::<__m512bh, __m512i>(r));
            // Summed as rounded, so that the weights P·V applies sum to one; two sums for two
            // chains of additions in flight (four were no faster).
            if i % 2 == 0 {
                acc0 = _mm512_dpbf16_ps(acc0, r, ones);
            } else {
                acc1 = _mm512_dpbf16_ps(acc1, r, ones);
            }
        }
        let mut at = lk / 32 * 32;
        while at < lk {
            let (k, x) = load_tail(rp.add(at), lk - at);
            let e = exp_shifted_avx512(x, log2e, max);
            let r: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_mask_storeu_epi16(pp.add(at) as *mut i16, k, r);
            acc0 = _mm512_add_ps(acc0, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16)));
            at += 16;
        }
        *inv = 1.0 / _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
}

/// [`row_max`] on four vectors in flight (`vmaxps`, whose chain of one vector was the softmax's
/// slowest part); a NaN in the row may or may not be the result, the row's output is NaN either way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_max_avx512(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
    let mut it = row.chunks_exact(64);
    for c in &mut it {
        for (j, m) in m.iter_mut().enumerate() {
            *m = _mm512_max_ps(*m, _mm512_loadu_ps(c.as_ptr().add(16 * j)));
        }
    }
    let mut rest = it.remainder();
    while !rest.is_empty() {
        m[0] = _mm512_max_ps(m[0], load_tail(rest.as_ptr(), rest.len()).1);
        rest = &rest[rest.len().min(16)..];
    }
    _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])))
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn softmax_rows_bf16(_: &[f32], _: (usize, usize), _: f32, _: &mut [half::bf16], _: &mut [f32]) {
    unreachable!("bf16 arithmetic needs x86_64's AVX512_BF16")
}

#[derive(Debug, Clone, Copy)]
struct AttentionOp {
    heads: usize,
    /// Both products in bf16 (f32 sums, softmax in f32), as SDPA under bf16 autocast.
    bf16: bool,
    /// With `bf16`: the output written in bf16 ([`attention_bf16`]).
    out_bf16: bool,
}

/// Queries per block for scores of `bytes` at most (block × lk f32).
fn query_block(bytes: usize, lq: usize, lk: usize) -> usize {
    (bytes / 4 / lk.max(1)).clamp(16, 256).min(lq)
}

impl AttentionOp {
    /// The attention with bf16 products on q, k, v (all f32 or all bf16), its output f32 or
    /// (`out_bf16`) bf16; None where the op multiplies in f32 ([`AttentionOp::run`]).
    fn run_any<T: super::gemm_bf16::Elem>(
        &self,
        (q, k, v): (&[T], &[T], &[T]),
        dims: (usize, usize, usize, usize),
    ) -> Option<CpuStorage> {
        if !self.bf16 {
            return None;
        }
        let (b, lq, lk, c) = dims;
        let n = b * lq * c;
        // Queries per block: with bf16 products (K and V packed once per head) the block's scores
        // (block × lk f32) stay near 512 KB, so that they, the block's bf16 probabilities and the
        // head's packed K and V share one core's L2 (2 MB here): at 1 MB (64 queries of 4096
        // keys) the probabilities' stores were a third of the softmax's samples, their lines
        // fetched back from L3 (attention at 2 × 4096 tokens, 8 heads, alternating: 0.092-0.097
        // -> 0.079-0.087 s). Past 4096 keys that would leave fewer queries than an AMX
        // micro-tile's 32 rows: there the 1 MB rule's count, up to 32, as before.
        let block = query_block(1 << 19, lq, lk).max(query_block(1 << 20, lq, lk).min(32));
        // SAFETY: every job writes its rows × d block of the output, which the blocks and heads
        // cover (c = h·d, checked in `attention` and `attention_bf16`).
        let bf16 = self.out_bf16;
        Some(unsafe { written_storage(n, bf16, |out| self.run_bf16((q, k, v), dims, block, (SendPtr(out), bf16))) })
    }

    /// The attention with f32 products (the gemm crate's).
    fn run(&self, q: &[f32], k: &[f32], v: &[f32], (b, lq, lk, c): (usize, usize, usize, usize)) -> Vec<f32> {
        let h = self.heads;
        let d = c / h;
        let scale = 1.0 / (d as f32).sqrt();
        // The output is written once ([`written`]): every job's block of rows × d, the heads
        // covering c = h·d (checked in `attention`) and the blocks lq, written by the product
        // with V before it is scaled.
        let n = b * lq * c;
        // The gemm crate packs K (and V where d is not a multiple of 16) again on every call, so
        // in f32 the block's scores may reach 4 MB: at 4096 tokens 256 queries share a packing
        // where 64 did (the packing was 28 % of the attention; 2 × 4096 × 320, 8 heads, on an
        // Intel Xeon: 0.283 → 0.233 s).
        let block = query_block(1 << 22, lq, lk);
        let nblk = lq.div_ceil(block);
        let write = |out: &mut [std::mem::MaybeUninit<f32>]| {
            let out_ptr = SendPtr(out.as_mut_ptr() as *mut f32);
            (0..b * h * nblk).into_par_iter().for_each(|job| {
                with_kept(&SCRATCH, |(scores, _, inv)| {
                    let (bh, blk) = (job / nblk, job % nblk);
                    let (bi, hi) = (bh / h, bh % h);
                    let q0 = blk * block;
                    let rows = block.min(lq - q0);
                    let (s, inv) = (grown(scores, rows * lk), grown(inv, rows));
                    let qp = q[(bi * lq + q0) * c + hi * d..].as_ptr();
                    let kp = k[bi * lk * c + hi * d..].as_ptr();
                    let vp = v[bi * lk * c + hi * d..].as_ptr();
                    // SAFETY: all reads stay inside q/k/v (row stride c, d columns from hi·d); the
                    // destination rows × d block of `out` belongs to this job alone.
                    unsafe {
                        // scores = scale · Q_blk · Kᵀ (K read transposed through its strides).
                        sgemm(
                            (rows, lk, d),
                            s.as_mut_ptr(),
                            lk as isize,
                            false,
                            (qp, 1, c as isize),
                            (kp, c as isize, 1),
                            scale,
                            Parallelism::None,
                        );
                        softmax_rows(s, lk, inv);
                        let op = out_ptr.get().add((bi * lq + q0) * c + hi * d);
                        sgemm(
                            (rows, d, lk),
                            op,
                            c as isize,
                            false,
                            (s.as_ptr(), 1, lk as isize),
                            (vp, 1, c as isize),
                            1.0,
                            Parallelism::None,
                        );
                        // The rows of the unnormalised product divided by their sums.
                        for (r, &inv) in inv.iter().enumerate() {
                            std::slice::from_raw_parts_mut(op.add(r * c), d).iter_mut().for_each(|v| *v *= inv);
                        }
                    }
                })
            });
        };
        // SAFETY: as above.
        unsafe { written(n, write) }
    }
}

impl AttentionOp {
    /// [`AttentionOp::run`] with bf16 products: each head's Kᵀ and V packed once (bf16 pairs), then
    /// per block of queries the scores, an f32 softmax written as bf16 (unnormalised), and the
    /// product with V, divided by each row's sum in its epilogue (one pass over the scores fewer).
    /// # Safety
    /// `out` holds b × lq × c values, f32 or (`bf16_out`) bf16, every one of which this writes.
    unsafe fn run_bf16<T: super::gemm_bf16::Elem>(
        &self,
        (q, k, v): (&[T], &[T], &[T]),
        (b, lq, lk, c): (usize, usize, usize, usize),
        block: usize,
        (out, bf16_out): (SendPtr, bool),
    ) {
        use super::gemm_bf16::{align64, gemm_packed, Lhs, PackedB, Scale, View};
        let h = self.heads;
        let d = c / h;
        let scale = 1.0 / (d as f32).sqrt();
        let nblk = lq.div_ceil(block);
        // SAFETY (both packs): head hi of batch bi is d columns from hi·d, row stride c, inside k/v.
        let packed: Vec<(PackedB, PackedB)> = (0..b * h)
            .into_par_iter()
            .map(|bh| {
                let off = (bh / h) * lk * c + (bh % h) * d;
                unsafe {
                    (
                        PackedB::new(View { ptr: k[off..].as_ptr(), rs: 1, cs: c }, (d, lk)),
                        PackedB::new(View { ptr: v[off..].as_ptr(), rs: c, cs: 1 }, (lk, d)),
                    )
                }
            })
            .collect();
        (0..b * h * nblk).into_par_iter().for_each(|job| {
            with_kept(&SCRATCH, |(scores, probs, inv)| {
                let (bh, blk) = (job / nblk, job % nblk);
                let (bi, hi) = (bh / h, bh % h);
                let q0 = blk * block;
                let rows = block.min(lq - q0);
                // The scores' rows `ld` apart, not lk: at 4096 keys the rows lay 16 KB apart, so a
                // tile's 16 rows all fell in one L1 set as the products stored them (attention at
                // 2 × 4096 tokens, 8 heads, alternating: 0.087–0.093 → 0.079–0.086 s). The buffer
                // also takes the rows × d output before it is rounded to bf16.
                let ld = lk.next_multiple_of(16) + 16;
                let (s, inv) = (grown(scores, rows * ld.max(d)), grown(inv, rows));
                // The probabilities from a 64-byte boundary: P·V reads them in place, as tiles
                // where lk is a multiple of 32 (every row on a boundary).
                let at = align64(probs, rows * lk);
                let p = &mut probs[at..at + rows * lk];
                let (kt, vv) = &packed[bh];
                let qv = View { ptr: q[(bi * lq + q0) * c + hi * d..].as_ptr(), rs: c, cs: 1 };
                // SAFETY: as in `run`: reads inside q and the packs, this job's rows × d block of out.
                unsafe {
                    // The scores unscaled, so that the AMX products store them straight from the
                    // tiles; the softmax applies the scale.
                    gemm_packed(rows, s.as_mut_ptr(), ld, false, Lhs::Packed(qv), kt, Scale::ONE);
                    softmax_rows_bf16(&s[..rows * ld], (lk, ld), scale, p, inv);
                    let pv = if lk.is_multiple_of(2) {
                        Lhs::InPlace { ptr: p.as_ptr(), rs: lk }
                    } else {
                        Lhs::Packed(View { ptr: p.as_ptr(), rs: lk, cs: 1 })
                    };
                    let at = (bi * lq + q0) * c + hi * d;
                    let by_sums = Scale { rows: Some(inv), ..Scale::ONE };
                    if !bf16_out {
                        gemm_packed(rows, out.get().add(at), c, false, pv, vv, by_sums);
                        return;
                    }
                    // In bf16: the product (over k blocks, summed in f32) into the rows' f32
                    // scores, no longer read, then each row rounded as a product would round it.
                    gemm_packed(rows, s.as_mut_ptr(), d, false, pv, vv, by_sums);
                    let o = out.get() as *mut std::mem::MaybeUninit<half::bf16>;
                    for (r, row) in s.chunks(d.max(1)).take(rows).enumerate() {
                        f32_to_bf16(row, std::slice::from_raw_parts_mut(o.add(at + r * c), d));
                    }
                }
            })
        });
    }
}

thread_local! {
    /// The attention's per-thread scores, bf16 probabilities and row factors, kept between jobs and
    /// calls (rayon's `for_each_init` made them anew for every piece it split the jobs into: a
    /// zeroed 1.5 MB per piece, 8 % of a bf16 attention in `memset` and page clearing).
    static SCRATCH: std::cell::RefCell<Scratch> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

type Scratch = (Vec<f32>, Vec<half::bf16>, Vec<f32>);

thread_local! {
    /// The im2col convolution's patch matrix (up to 4 Mi values), kept between calls.
    static PATCHES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The same rows packed for bf16 products (up to 8 Mi values, 16 MB), kept between calls;
    /// taken by a call and put back after it.
    static PACKED_PATCHES: std::cell::Cell<super::gemm_bf16::PackedB> = std::cell::Cell::new(Default::default());
}

/// Runs `f` with this thread's kept buffers from `key` (the attention's scratch, the Winograd
/// buffers, the bf16 product's B block), or fresh ones if they are in use: a rayon worker that,
/// waiting inside one job, steals another running the same code would otherwise hit the
/// `RefCell`'s panic.
pub(crate) fn with_kept<T: Default + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut kept) => f(&mut kept),
        Err(_) => f(&mut T::default()),
    })
}

/// The first `len` elements of `v`, grown (zero-filled) to that length first if shorter.
fn grown<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every job writes a disjoint block (see AttentionOp::run).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ghiblify-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = Act::new(s1, l1, "attention q")?;
        let k = Act::new(s2, l2, "attention k")?;
        let v = Act::new(s3, l3, "attention v")?;
        let (b, lq, c) = l1.shape().dims3()?;
        let lk = l2.shape().dims3()?.1;
        let dims = (b, lq, lk, c);
        // bf16 inputs (from linear layers with bf16 products, [`linear_bf16`]) as they are where
        // all three are; otherwise f32, a bf16 one widened.
        if let (Act::Bf16(q), Act::Bf16(k), Act::Bf16(v)) = (q, k, v) {
            if let Some(out) = self.run_any((q, k, v), dims) {
                return Ok((out, l1.shape().clone()));
            }
        }
        let (q, k, v) = (q.to_f32(), k.to_f32(), v.to_f32());
        let out = match self.run_any((&q[..], &k[..], &v[..]), dims) {
            Some(out) => out,
            None => CpuStorage::F32(self.run(&q, &k, &v, dims)),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Scaled dot-product attention over (B, L, heads·d) projections → (B, Lq, heads·d), softmax in
/// f32 (diffusers' `upcast_softmax`). `bf16`: the model's weights are bf16, so on a CPU that
/// multiplies bf16 ([`bf16_arithmetic`]) both products are bf16 too, as under autocast.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, bf16: bool) -> Result<Tensor> {
    let (b, _, c) = q.dims3()?;
    if c % heads != 0 || k.dims3()? != v.dims3()? || k.dim(0)? != b || k.dim(2)? != c {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} with {heads} heads", q.dims(), k.dims(), v.dims());
    }
    attention_op(q, k, v, AttentionOp { heads, bf16: bf16 && bf16_arithmetic(), out_bf16: false })
}

/// [`attention`] with bf16 products and its output in bf16 (rounded as the bf16 products round
/// an f32 operand) where our CPU kernels multiply in bf16: for a result read only by a linear layer
/// with bf16 products (the attention's output projection, [`linear`]). Elsewhere [`attention`].
/// q, k and v may be bf16 ([`linear_bf16`]).
pub fn attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, _, c) = q.dims3()?;
    if c % heads != 0 || k.dims3()? != v.dims3()? || k.dim(0)? != b || k.dim(2)? != c {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} with {heads} heads", q.dims(), k.dims(), v.dims());
    }
    let on = bf16_arithmetic();
    attention_op(q, k, v, AttentionOp { heads, bf16: on, out_bf16: on })
}

fn attention_op(q: &Tensor, k: &Tensor, v: &Tensor, op: AttentionOp) -> Result<Tensor> {
    if is_cpu_act(q) && is_cpu_act(k) && is_cpu_act(v) {
        return q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
    }
    reference_attention(&*widened(q)?, &*widened(k)?, &*widened(v)?, op.heads)
}

/// The plain candle formulation, query-chunked so the score matrix stays below ~128 MB (GPU
/// devices and the kernel tests).
pub fn reference_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, lq, c) = q.dims3()?;
    let lk = k.dim(1)?;
    let d = c / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let split = |t: &Tensor, l: usize| t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous();
    let q = split(q, lq)?;
    let k = split(k, lk)?;
    let v = split(v, lk)?;
    let kt = k.t()?.contiguous()?;
    let budget = 32 * 1024 * 1024; // f32 elements per chunk of scores
    let chunk = (budget / (b * heads * lk).max(1)).clamp(1, lq);
    let mut outs = Vec::with_capacity(lq.div_ceil(chunk));
    for start in (0..lq).step_by(chunk) {
        let len = chunk.min(lq - start);
        let qc = q.narrow(2, start, len)?;
        let scores = (qc.matmul(&kt)? * scale)?;
        let in_dtype = scores.dtype();
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(in_dtype)?;
        outs.push(probs.matmul(&v)?);
    }
    let out = if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(&outs, 2)? };
    out.transpose(1, 2)?.reshape((b, lq, c))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// [`to_dtype`] (the LoRA merge's conversions) gives candle's bits for every pair of f32, f16
    /// and bf16, contiguous or not (a transposed view takes candle's route), NaN and infinities
    /// included.
    #[test]
    fn parallel_dtype_conversion_equals_candles() {
        // Past one 64K-value chunk, ending inside a 4096-value block.
        let n = 7 * 9_999;
        let v: Vec<f32> = (0..n)
            .map(|i| match i % 11 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => 1e5 + i as f32,
                3 => 1e-6 / (1 + i) as f32,
                _ => ((i as f32) * 0.618_034).sin() * 3.0,
            })
            .collect();
        let base = Tensor::from_vec(v, (n / 7, 7), &Device::Cpu).unwrap();
        let bits = float_bits;
        for from in [DType::F32, DType::F16, DType::BF16] {
            for t in [base.to_dtype(from).unwrap(), base.to_dtype(from).unwrap().t().unwrap()] {
                for to in [DType::F32, DType::F16, DType::BF16] {
                    let got = to_dtype(&t, to).unwrap();
                    assert_eq!((got.dtype(), got.dims()), (to, t.dims()));
                    assert!(bits(&got) == bits(&t.to_dtype(to).unwrap()), "{from:?} → {to:?}, {:?}", t.layout());
                }
            }
        }
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        diff / scale
    }

    /// Standard-normal values from `seed` (the layer tests in `nn` use them too).
    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn dense(t: &Tensor) -> Weight {
        Weight::Dense(t.clone())
    }

    /// The convolution's paths: Winograd's three (AVX-512 takes each where told) and im2col.
    const CONV_PATHS: [&str; 4] = ["fused", "split", "by channels", "im2col"];

    /// `f` with its convolutions on `path` (one of [`CONV_PATHS`]).
    fn on_path(path: &str, f: &dyn Fn() -> Tensor) -> Tensor {
        match path {
            "fused" => winograd::forced(true, f),
            "by channels" => winograd::by_channels(|| winograd::forced(true, f)),
            "split" => winograd::split(|| winograd::forced(true, f)),
            _ => winograd::forced(false, f),
        }
    }

    /// A tensor's values as their bits (bit-for-bit comparisons: NaN, −0).
    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn generic_ops_switch_takes_candles_own_path() {
        // With the switch on, each fused op is exactly candle's generic composition (what CUDA and
        // Metal run), bit for bit; with it off, our kernels run and differ in the last bits.
        let x = randn(&[1, 8, 12, 10], 1);
        let wt = randn(&[6, 8, 3, 3], 2);
        let generic = x.upsample_nearest2d(24, 20).unwrap().conv2d(&wt, 1, 1, 1, 1).unwrap();
        let switched =
            crate::device::with_generic_ops(true, || upsample2x_conv2d(&x, &dense(&wt), None, 1, 1).unwrap());
        assert_eq!(max_rel(&switched, &generic), 0.0);
        let ours = crate::device::with_generic_ops(false, || upsample2x_conv2d(&x, &dense(&wt), None, 1, 1).unwrap());
        assert!(max_rel(&ours, &generic) > 0.0, "the CPU kernel ran");
        assert!(crate::device::with_generic_ops(true, crate::device::generic_ops));
    }

    #[test]
    fn conv2d_matches_candle() {
        // The im2col path (small shapes would take it anyway; Winograd has its own test).
        winograd::forced(false, || {
            // 3×3 stride 1 pad 1, stride 2 pad 1, stride 2 pad 0 (VAE downsample after its own pad),
            // 1×1, odd sizes, and a tall input that needs several im2col tiles.
            for &(b, cin, cout, h, w, k, s, p) in &[
                (2, 5, 7, 9, 11, 3, 1, 1),
                (1, 4, 6, 10, 7, 3, 2, 1),
                (1, 3, 4, 9, 9, 3, 2, 0),
                (2, 6, 5, 8, 3, 1, 1, 0),
                (1, 2, 3, 5, 6, 3, 1, 0),
                (1, 96, 8, 300, 160, 3, 1, 1),
            ] {
                let x = randn(&[b, cin, h, w], 1);
                let wt = randn(&[cout, cin, k, k], 2);
                let bias = randn(&[cout], 3);
                let want =
                    x.conv2d(&wt, p, s, 1, 1).unwrap().broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap()).unwrap();
                let got = conv2d(&x, &dense(&wt), Some(&bias), s, p).unwrap();
                assert_eq!(got.dims(), want.dims());
                assert!(
                    max_rel(&got, &want) < 1e-5,
                    "conv {:?}: {}",
                    (b, cin, cout, h, w, k, s, p),
                    max_rel(&got, &want)
                );
                let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap().conv2d(&wt, p, s, 1, 1).unwrap();
                let got_up = upsample2x_conv2d(&x, &dense(&wt), None, s, p).unwrap();
                assert!(max_rel(&got_up, &up) < 1e-5, "upsampled conv {:?}", (b, cin, cout, h, w, k, s, p));
                let padded = x.pad_with_zeros(3, 0, 1).unwrap().pad_with_zeros(2, 0, 1).unwrap();
                let want_end = padded.conv2d(&wt, 0, s, 1, 1).unwrap();
                assert!(
                    max_rel(&pad_end_conv2d(&x, &dense(&wt), None, s).unwrap(), &want_end) < 1e-5,
                    "pad-end conv {:?}",
                    (b, cin, cout, h, w, k, s)
                );
                let nob = conv2d(&x, &dense(&wt), None, s, p).unwrap();
                assert!(max_rel(&nob, &x.conv2d(&wt, p, s, 1, 1).unwrap()) < 1e-5);
                // f16 weight storage computes in f32 on the widened weights.
                let w16 = wt.to_dtype(DType::F16).unwrap();
                let want16 = x.conv2d(&w16.to_dtype(DType::F32).unwrap(), p, s, 1, 1).unwrap();
                assert!(max_rel(&conv2d(&x, &dense(&w16), None, s, p).unwrap(), &want16) < 1e-5);
            }
        })
    }

    /// Direct convolution in f64 (3×3, stride 1, `up`× nearest upsampling first), bias added.
    fn conv3x3_f64(
        x: &[f32],
        (b, cin, h, w): (usize, usize, usize, usize),
        wt: &[f32],
        bias: &[f32],
        up: usize,
        p: usize,
    ) -> Vec<f64> {
        let cout = bias.len();
        let (vh, vw) = (h * up, w * up);
        let (oh, ow) = (vh + 2 * p - 2, vw + 2 * p - 2);
        let mut out = vec![0f64; b * cout * oh * ow];
        for bi in 0..b {
            for co in 0..cout {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[co] as f64;
                        for ci in 0..cin {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (y, xx) = ((oy + ky) as isize - p as isize, (ox + kx) as isize - p as isize);
                                    if y < 0 || xx < 0 || y >= vh as isize || xx >= vw as isize {
                                        continue;
                                    }
                                    let v = x[((bi * cin + ci) * h + y as usize / up) * w + xx as usize / up];
                                    acc += v as f64 * wt[((co * cin + ci) * 3 + ky) * 3 + kx] as f64;
                                }
                            }
                        }
                        out[((bi * cout + co) * oh + oy) * ow + ox] = acc;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn winograd_matches_f64_direct_convolution() {
        // Partial tiles at the right and bottom edges, padding 0 and 1, upsampled input, batch 2,
        // several tile-row chunks (many tile rows) and output-channel blocks (many channels), with
        // f32, f16, bf16 and int8 weights; against the convolution in f64 on the weights as stored,
        // next to the im2col path's distance from it (printed).
        type Make = fn(&Tensor) -> Weight;
        let kinds: [(&str, Make); 4] = [
            ("f32", |w| Weight::Dense(w.clone())),
            ("f16", |w| Weight::Dense(w.to_dtype(DType::F16).unwrap())),
            ("bf16", |w| Weight::Dense(w.to_dtype(DType::BF16).unwrap())),
            ("q8", |w| Weight::quantize(w).unwrap()),
        ];
        for &(b, cin, cout, h, w, up, p) in &[
            (2, 5, 7, 9, 11, 1, 1),
            (1, 3, 4, 8, 8, 1, 0),
            (1, 4, 6, 5, 7, 2, 1),
            (1, 16, 3, 1, 2, 1, 1),
            (2, 8, 9, 130, 70, 1, 1),
            (1, 1200, 70, 6, 5, 1, 1),
            // The fused path's jobs of 32 tiles: runs across tile rows and images, both edges
            // padded within one job, partial last tiles, more channels than a micro-tile, an
            // upsampled input, one input or output channel (TAESD's first and last layers).
            (2, 20, 29, 37, 141, 1, 1),
            (1, 13, 12, 21, 9, 2, 1),
            (1, 1, 25, 33, 35, 1, 1),
            (1, 64, 3, 30, 30, 1, 0),
            // Jobs over output channels: two steps of input channels (128 + 2), a last block of
            // one channel, tile blocks cut by the image's edge.
            (1, 130, 25, 14, 40, 1, 1),
        ] {
            let x = randn(&[b, cin, h, w], 21);
            let bias = randn(&[cout], 23);
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bv = bias.to_vec1::<f32>().unwrap();
            for (kind, make) in kinds {
                let weight = make(&randn(&[cout, cin, 3, 3], 22));
                let wv = weight.dense(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want = conv3x3_f64(&xv, (b, cin, h, w), &wv, &bv, up, p);
                let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
                let err = |t: Tensor| {
                    let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(got.len(), want.len());
                    got.iter().zip(&want).fold(0f64, |a, (g, w)| a.max((*g as f64 - w).abs())) / scale
                };
                let conv = || {
                    if up == 1 {
                        conv2d(&x, &weight, Some(&bias), 1, p)
                    } else {
                        upsample2x_conv2d(&x, &weight, Some(&bias), 1, p)
                    }
                    .unwrap()
                };
                let run = |wino: bool| winograd::forced(wino, conv);
                // The fused path where it applies (few channels, AVX-512), the split one, and jobs
                // over output channels (AVX-512; several steps of input channels at 1200 and 130).
                let (wino, split, direct) = (err(run(true)), err(winograd::split(|| run(true))), err(run(false)));
                let chans = err(winograd::by_channels(|| run(true)));
                let at = (b, cin, cout, h, w, up, p);
                eprintln!("winograd {kind} {at:?}: {wino:.2e}, split {split:.2e}, by channels {chans:.2e} (im2col {direct:.2e})");
                // Measured up to 8.4e-6 (1200 input channels; im2col in f32 4e-7 there). Products
                // stay f32 for half-precision and int8 weights too (bf16 im2col: ~1.5e-3).
                assert!(wino < 2e-5, "winograd {kind} {at:?}: {wino:.2e} from f64");
                assert!(split < 2e-5, "split winograd {kind} {at:?}: {split:.2e} from f64");
                assert!(chans < 2e-5, "winograd by channels {kind} {at:?}: {chans:.2e} from f64");
            }
        }
    }

    #[test]
    fn implicit_amx_convolutions_match_f64_direct_convolution() {
        if !(bf16_arithmetic() && super::super::gemm_bf16::amx()) {
            eprintln!("skipped: no AMX bf16 products here");
            return;
        }
        // The layers the implicit product takes (3×3, stride 1, padding 1, ≥ 128 input channels
        // in multiples of 32, ≥ 32 outputs; 320 and more only on large images, too slow for the
        // f64 reference here): batch 2, an upsampled input, a partial group of output channels,
        // bf16 and int8 weights, the bias, and the residual + ReLU pass after it; against the f64
        // convolution of the weights as stored, within the bf16 rounding of the input (measured
        // 1.6e-3 of the largest value).
        for &(b, cin, cout, h, w, up) in &[(2, 128, 40, 9, 11, 1), (1, 256, 32, 6, 5, 2)] {
            let x = randn(&[b, cin, h, w], 51);
            let bias = randn(&[cout], 53);
            let (oh, ow) = (h * up, w * up);
            let residual = randn(&[b, cout, oh, ow], 54);
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bv = bias.to_vec1::<f32>().unwrap();
            let rv = residual.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (kind, weight) in [
                ("bf16", Weight::Dense(randn(&[cout, cin, 3, 3], 52).to_dtype(DType::BF16).unwrap())),
                ("q8", Weight::quantize(&randn(&[cout, cin, 3, 3], 52)).unwrap()),
            ] {
                let wv = weight.dense(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want = conv3x3_f64(&xv, (b, cin, h, w), &wv, &bv, up, 1);
                let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
                let err = |t: Tensor, add: bool| {
                    let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(got.len(), want.len());
                    let want = |i: usize| if add { (want[i] + rv[i] as f64).max(0.0) } else { want[i] };
                    got.iter().enumerate().fold(0f64, |a, (i, g)| a.max((*g as f64 - want(i)).abs())) / scale
                };
                let at = (b, cin, cout, h, w, up);
                let plain = if up == 1 {
                    conv2d(&x, &weight, Some(&bias), 1, 1).unwrap()
                } else {
                    upsample2x_conv2d(&x, &weight, Some(&bias), 1, 1).unwrap()
                };
                let e = err(plain, false);
                eprintln!("implicit {kind} {at:?}: {e:.2e} from f64");
                // Above 0: the input went through bf16 (f32 Winograd and im2col stay below 1e-5).
                assert!(e > 1e-5 && e < 5e-3, "implicit {kind} {at:?}: {e:.2e} from f64");
                if up == 1 {
                    let joined = conv2d_add(&x, &weight, Some(&bias), &residual, (1, 1), true).unwrap();
                    let e = err(joined, true);
                    assert!(e > 1e-5 && e < 5e-3, "implicit {kind} + residual + relu {at:?}: {e:.2e}");
                }
            }
        }
    }

    #[test]
    fn fused_relu_and_residual_join_match_candle() {
        // conv + ReLU through both convolution paths (its ReLU in Winograd's output transform or
        // in the im2col path's last pass), and relu(a + b); a NaN stays NaN without the ReLU.
        let x = randn(&[1, 16, 20, 18], 31);
        let wt = randn(&[16, 16, 3, 3], 32);
        let bias = randn(&[16], 33);
        let want = x.conv2d(&wt, 1, 1, 1, 1).unwrap().broadcast_add(&bias.reshape((1, 16, 1, 1)).unwrap()).unwrap();
        for wino in [false, true] {
            let got = winograd::forced(wino, || conv2d_relu(&x, &dense(&wt), Some(&bias), 1, 1).unwrap());
            assert!(max_rel(&got, &want.relu().unwrap()) < 2e-5, "conv + relu (winograd {wino})");
            let plain = winograd::forced(wino, || conv2d(&x, &dense(&wt), Some(&bias), 1, 1).unwrap());
            let negatives = plain.lt(0f32).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap();
            assert!(negatives.to_scalar::<f32>().unwrap() > 0.0, "without the ReLU, negatives stay");
        }
        let mut nan = vec![0f32; 16 * 16 * 9];
        nan[0] = f32::NAN;
        let wn = Tensor::from_vec(nan, (16, 16, 3, 3), &Device::Cpu).unwrap();
        for wino in [false, true] {
            let got = winograd::forced(wino, || conv2d(&x, &dense(&wn), None, 1, 1).unwrap());
            let v = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().any(|v| v.is_nan()), "NaN propagates (winograd {wino})");
        }
        let (a, b) = (randn(&[2, 3, 70, 300], 34), randn(&[2, 3, 70, 300], 35));
        let got = add_relu(&a, &b).unwrap();
        assert_eq!(max_rel(&got, &(&a + &b).unwrap().relu().unwrap()), 0.0);
    }

    #[test]
    fn residual_join_in_the_convolution_equals_the_separate_pass() {
        // relu(conv(x) + r) inside the convolution's last pass, through the fused and the split
        // Winograd paths and im2col, against the convolution then add_relu: the same operations
        // in the same order, so bit for bit. Widths with whole groups of 16 tiles, a remainder and
        // a cut last tile; batch 2; NaN and −∞ in the residual.
        let x = randn(&[2, 16, 21, 70], 41);
        let wt = dense(&randn(&[12, 16, 3, 3], 42));
        let bias = randn(&[12], 43);
        let mut r = randn(&[2, 12, 21, 70], 44).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (r[5], r[300]) = (f32::NAN, f32::NEG_INFINITY);
        let r = Tensor::from_vec(r, (2, 12, 21, 70), &Device::Cpu).unwrap();
        for path in CONV_PATHS {
            let run = |f: &dyn Fn() -> Tensor| on_path(path, f);
            let want = run(&|| add_relu(&conv2d(&x, &wt, Some(&bias), 1, 1).unwrap(), &r).unwrap());
            let got = run(&|| conv2d_add(&x, &wt, Some(&bias), &r, (1, 1), true).unwrap());
            assert_eq!(bits(&got), bits(&want), "{path}");
        }
        let wrong = randn(&[2, 12, 21, 69], 45);
        let err = conv2d_add(&x, &wt, Some(&bias), &wrong, (1, 1), true).unwrap_err().to_string();
        assert!(err.contains("residual"), "{err}");
    }

    #[test]
    fn residual_sums_inside_the_last_layer_equal_the_separate_add() {
        // linear_add on each weight storage (f32; bf16, multiplied in bf16 where the CPU can; int8)
        // and each path (our kernels, the f32 kernels, candle's generic ops), with and without a
        // bias, against the layer then candle's add: the same terms summed in another order on
        // our kernels (within 1e-6 of the largest value), bit for bit on candle's path. Rows that
        // do not fill a block, a NaN in the residual (it stays NaN there alone), a residual of the
        // wrong shape refused by name. conv2d_add through every convolution path (3×3 and 1×1)
        // against the convolution then the add: the same operations in the same order.
        type Path = fn(&dyn Fn() -> Tensor) -> Tensor;
        let paths: [(&str, Path); 3] = [
            ("kernels", |f| f()),
            ("f32 kernels", |f| without_bf16_arithmetic(f)),
            ("generic", |f| crate::device::with_generic_ops(true, f)),
        ];
        let (x, w32, b) = (randn(&[2, 37, 96], 51), randn(&[80, 96], 52), randn(&[80], 53));
        let r = randn(&[2, 37, 80], 54);
        let mut rn = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        rn[1000] = f32::NAN;
        let rn = Tensor::from_vec(rn, (2, 37, 80), &Device::Cpu).unwrap();
        let weights = weight_forms(&w32);
        for (wname, w) in &weights {
            for (pname, run) in paths {
                for bias in [None, Some(&b)] {
                    let what = format!("{wname} {pname} bias {}", bias.is_some());
                    let want = run(&|| (linear(&x, w, bias).unwrap() + &r).unwrap());
                    let got = run(&|| linear_add(&x, w, bias, &r).unwrap());
                    assert_eq!(got.dims(), want.dims(), "{what}");
                    if pname == "generic" {
                        assert_eq!(bits(&got), bits(&want), "{what}");
                    } else {
                        assert!(max_rel(&got, &want) < 1e-6, "{what}: {}", max_rel(&got, &want));
                    }
                    let got = run(&|| linear_add(&x, w, bias, &rn).unwrap()).flatten_all().unwrap();
                    let nan: Vec<usize> = (0..got.elem_count())
                        .filter(|&i| got.get(i).unwrap().to_scalar::<f32>().unwrap().is_nan())
                        .collect();
                    assert_eq!(nan, [1000], "{what}: the residual's NaN");
                }
            }
        }
        for wrong in [randn(&[2, 37, 79], 55), randn(&[37, 2, 80], 55)] {
            let err = linear_add(&x, &weights[0].1, Some(&b), &wrong).unwrap_err().to_string();
            assert!(err.contains("linear residual") && err.contains(&format!("{:?}", wrong.dims())), "{err}");
        }
        let x = randn(&[2, 16, 21, 70], 56);
        let r = randn(&[2, 12, 21, 70], 57);
        for (k, p) in [(3, 1), (1, 0)] {
            let wt = dense(&randn(&[12, 16, k, k], 58));
            let bias = randn(&[12], 59);
            for path in CONV_PATHS {
                let want = on_path(path, &|| (conv2d(&x, &wt, Some(&bias), 1, p).unwrap() + &r).unwrap());
                let got = on_path(path, &|| conv2d_add(&x, &wt, Some(&bias), &r, (1, p), false).unwrap());
                assert_eq!(bits(&got), bits(&want), "conv2d_add {k}×{k} {path}");
            }
        }
    }

    /// A weight as each storage the kernels take for it: f32, bf16, per-channel int8.
    fn weight_forms(w32: &Tensor) -> [(&'static str, Weight); 3] {
        [
            ("f32", dense(w32)),
            ("bf16", dense(&w32.to_dtype(DType::BF16).unwrap())),
            ("int8", Weight::quantize(w32).unwrap()),
        ]
    }

    /// `t` rounded to bf16 and back: the operands the bf16 products see.
    fn bf16_rounded(t: &Tensor) -> Tensor {
        t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
    }

    #[test]
    fn bf16_products_match_f32_on_rounded_operands() {
        // The im2col path (small shapes would take it anyway; Winograd has its own test).
        winograd::forced(false, || {
            if !bf16_arithmetic() {
                eprintln!("skipped: no bf16 arithmetic on this CPU");
                return;
            }
            // Convolutions (3×3 with even and odd k, strided, 1×1, upsampled), linear layers with and
            // without bias: the same sums as f32 on the bf16-rounded operands, up to summation order;
            // and visibly not the f32 result on the unrounded ones (the bf16 path ran).
            for &(b, cin, cout, h, w, k, s, p) in &[
                (2, 6, 7, 9, 11, 3, 1, 1),
                (1, 3, 5, 10, 7, 3, 2, 1),
                (2, 40, 24, 8, 9, 1, 1, 0),
                (1, 64, 96, 33, 20, 3, 1, 1),
                // Several im2col tiles, odd k (the rows made by the product's jobs: column blocks
                // that start and end inside a line).
                (1, 97, 8, 300, 160, 3, 1, 1),
                // Made rows over two k blocks, a partial AMX panel; a 5×5 kernel (shifts by 2); one
                // line (the rows shifted up or down read nothing) and one column (every shifted
                // column wraps).
                (1, 200, 40, 20, 24, 3, 1, 1),
                (1, 12, 20, 23, 19, 5, 1, 2),
                (1, 40, 8, 1, 400, 3, 1, 1),
                (1, 40, 8, 400, 1, 3, 1, 1),
            ] {
                let x = randn(&[b, cin, h, w], 11);
                let wt = randn(&[cout, cin, k, k], 12).to_dtype(DType::BF16).unwrap();
                let bias = randn(&[cout], 13);
                let wf = wt.to_dtype(DType::F32).unwrap();
                let want = bf16_rounded(&x)
                    .conv2d(&wf, p, s, 1, 1)
                    .unwrap()
                    .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                    .unwrap();
                let got = conv2d(&x, &dense(&wt), Some(&bias), s, p).unwrap();
                assert!(max_rel(&got, &want) < 1e-5, "bf16 conv {:?}: {}", (cin, cout, k, s), max_rel(&got, &want));
                let exact =
                    x.conv2d(&wf, p, s, 1, 1).unwrap().broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap()).unwrap();
                assert!(max_rel(&got, &exact) > 1e-4, "bf16 conv {:?} rounded its input", (cin, cout, k, s));
                let up = bf16_rounded(&x).upsample_nearest2d(2 * h, 2 * w).unwrap().conv2d(&wf, p, s, 1, 1).unwrap();
                assert!(max_rel(&upsample2x_conv2d(&x, &dense(&wt), None, s, p).unwrap(), &up) < 1e-5);
            }
            for &(rows, k, n, bias) in
                &[(5, 8, 3, true), (300, 320, 70, false), (1100, 96, 640, true), (7, 77, 9, true)]
            {
                let x = randn(&[1, rows, k], 14);
                let wt = randn(&[n, k], 15).to_dtype(DType::BF16).unwrap();
                let b = randn(&[n], 16);
                let got = linear(&x, &dense(&wt), bias.then_some(&b)).unwrap();
                let mut want = bf16_rounded(&x)
                    .matmul(&wt.to_dtype(DType::F32).unwrap().t().unwrap().unsqueeze(0).unwrap())
                    .unwrap();
                if bias {
                    want = want.broadcast_add(&b).unwrap();
                }
                assert_eq!(got.dims(), &[1, rows, n]);
                assert!(max_rel(&got, &want) < 1e-5, "bf16 linear {:?}: {}", (rows, k, n), max_rel(&got, &want));
            }
        })
    }

    #[test]
    fn half_conversions_are_halfs_own_bit_for_bit() {
        // Every f16 widened, and f32 values of every kind narrowed (halfway cases, subnormals,
        // overflow, infinities, NaN), by each vector path this CPU runs, against half's one
        // value at a time; lengths that leave a tail.
        type Widen = unsafe fn(&[half::f16], &mut [std::mem::MaybeUninit<f32>]);
        type Narrow = unsafe fn(&[f32], &mut [std::mem::MaybeUninit<half::f16>]);
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut paths: Vec<(&str, Widen, Narrow)> =
            vec![("dispatch", |v, o| f16_to_f32(v, o), |v, o| f32_to_f16(v, o))];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                paths.push(("avx512", f16_to_f32_avx512, f32_to_f16_avx512));
            }
            if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
                paths.push(("f16c", f16_to_f32_f16c, f32_to_f16_f16c));
            }
        }
        let halves: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let mut wides: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
        // Halfway between neighbouring f16 values (ties to even), just off them, and beyond range.
        for h in (0..0x7c00u16).step_by(7) {
            let (a, b) = (half::f16::from_bits(h).to_f32(), half::f16::from_bits(h + 1).to_f32());
            let mid = (a as f64 + b as f64) / 2.0;
            wides.extend([mid as f32, f32::from_bits((mid as f32).to_bits() + 1), -(mid as f32)]);
        }
        wides.extend([65520.0, 65519.99, 1e10, -1e10, 1e-10, f32::MIN_POSITIVE, f32::INFINITY, f32::NAN]);
        wides.extend((0..20_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        for (name, widen, narrow) in paths {
            for len in [halves.len(), 13] {
                let mut out = vec![std::mem::MaybeUninit::uninit(); len];
                // SAFETY: the path is one this CPU runs (checked above).
                unsafe { widen(&halves[..len], &mut out) };
                for (h, o) in halves.iter().zip(&out) {
                    // SAFETY: the converter wrote every value.
                    let got = unsafe { o.assume_init() };
                    assert_eq!(got.to_bits(), h.to_f32().to_bits(), "{name} widening {:#06x}", h.to_bits());
                }
            }
            for len in [wides.len(), 11] {
                let mut out = vec![std::mem::MaybeUninit::uninit(); len];
                // SAFETY: as above.
                unsafe { narrow(&wides[..len], &mut out) };
                for (w, o) in wides.iter().zip(&out) {
                    // SAFETY: the converter wrote every value.
                    let got = unsafe { o.assume_init() };
                    let want = half::f16::from_f32(*w);
                    assert!(
                        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                        "{name} narrowing {w:e}: {:#06x} vs {:#06x}",
                        got.to_bits(),
                        want.to_bits()
                    );
                }
            }
        }
    }

    #[test]
    fn narrow_weights_multiplied_in_f32_equal_the_widened_weights_bit_for_bit() {
        // Where the CPU does not multiply bf16 (or is told not to), f16, bf16 and int8 weights are
        // read as stored by Winograd and widened or dequantised per call for the other products:
        // the same f32 operations as on the widened weight, so the same bits, on every path.
        without_bf16_arithmetic(|| {
            for &(b, cin, cout, h, w, k, s, p) in &[
                (2, 6, 7, 9, 11, 3, 1, 1),
                (1, 20, 33, 17, 12, 3, 1, 1),
                (1, 130, 25, 14, 40, 3, 1, 1),
                (1, 9, 20, 10, 7, 3, 2, 1),
                (2, 40, 24, 8, 9, 1, 1, 0),
            ] {
                let x = randn(&[b, cin, h, w], 31);
                let wt = randn(&[cout, cin, k, k], 32);
                let bias = randn(&[cout], 33);
                let narrow = [
                    ("f16", dense(&wt.to_dtype(DType::F16).unwrap())),
                    ("bf16", dense(&wt.to_dtype(DType::BF16).unwrap())),
                    ("int8", Weight::quantize(&wt).unwrap()),
                ];
                for (name, wn) in &narrow {
                    let wide = dense(&wn.dense(DType::F32).unwrap());
                    for path in CONV_PATHS {
                        let conv = |w: &Weight| on_path(path, &|| conv2d(&x, w, Some(&bias), s, p).unwrap());
                        let at = (cin, cout, k, s);
                        assert!(bits(&conv(wn)) == bits(&conv(&wide)), "{name} conv {at:?} {path}");
                        let r = conv(&wide);
                        let join =
                            |w: &Weight| on_path(path, &|| conv2d_add(&x, w, Some(&bias), &r, (s, p), true).unwrap());
                        assert!(bits(&join(wn)) == bits(&join(&wide)), "{name} conv + join {at:?} {path}");
                    }
                }
            }
            for &(rows, k, n) in &[(5, 8, 3), (300, 320, 70), (7, 77, 90)] {
                let x = randn(&[1, rows, k], 34);
                let wt = randn(&[n, k], 35);
                let bias = randn(&[n], 36);
                for wn in [
                    dense(&wt.to_dtype(DType::F16).unwrap()),
                    dense(&wt.to_dtype(DType::BF16).unwrap()),
                    Weight::quantize(&wt).unwrap(),
                ] {
                    let wide = dense(&wn.dense(DType::F32).unwrap());
                    let got = linear(&x, &wn, Some(&bias)).unwrap();
                    assert!(bits(&got) == bits(&linear(&x, &wide, Some(&bias)).unwrap()), "linear {:?}", (rows, k, n));
                }
            }
        })
    }

    #[test]
    fn bf16_attention_is_close_to_f32() {
        if !bf16_arithmetic() {
            eprintln!("skipped: no bf16 arithmetic on this CPU");
            return;
        }
        // Both products in bf16 (the probabilities rounded too): within bf16's 2⁻⁸ of the f32
        // result on the same rounded q, k, v, and not equal to it.
        for &(b, lq, lk, c, heads) in &[(2, 300, 300, 40, 5), (2, 1100, 77, 64, 8), (1, 3, 5, 8, 1)] {
            let (q, k, v) = (randn(&[b, lq, c], 17), randn(&[b, lk, c], 18), randn(&[b, lk, c], 19));
            let want = reference_attention(&bf16_rounded(&q), &bf16_rounded(&k), &bf16_rounded(&v), heads).unwrap();
            let got = attention(&q, &k, &v, heads, true).unwrap();
            let e = max_rel(&got, &want);
            assert!(e < 8e-3 && e > 0.0, "bf16 attention {:?}: {e}", (b, lq, lk, c, heads));
            let f32_path = attention(&q, &k, &v, heads, false).unwrap();
            assert!(max_rel(&f32_path, &reference_attention(&q, &k, &v, heads).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn attention_inside_a_job_holding_the_scratch_takes_its_own() {
        // As if an attention job started another attention: the inner one gets fresh scratch and
        // the same result.
        let (q, k, v) = (randn(&[1, 40, 16], 50), randn(&[1, 24, 16], 51), randn(&[1, 24, 16], 52));
        let free = attention(&q, &k, &v, 2, false).unwrap();
        // One worker: the thread holding the scratch runs the inner attention's jobs itself.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let nested = pool.install(|| with_kept(&SCRATCH, |_| attention(&q, &k, &v, 2, false).unwrap()));
        assert_eq!(max_rel(&nested, &free), 0.0);
    }

    #[test]
    fn swap_last_two_is_candles_transpose() {
        // Blocks of 32 cut short in either direction, one row or column, two batches.
        for &(b, m, n) in &[(2, 33, 70), (1, 320, 4096), (1, 4096, 320), (1, 1, 5), (3, 7, 1), (1, 64, 64)] {
            let x = randn(&[b, m, n], 30);
            let got = swap_last_two(&x).unwrap();
            let want = x.transpose(1, 2).unwrap().contiguous().unwrap();
            assert_eq!(got.dims(), &[b, n, m]);
            assert_eq!(max_rel(&got, &want), 0.0, "{:?}", (b, m, n));
        }
    }

    #[test]
    fn layer_norm_matches_f64_with_an_offset_mean() {
        // Rows whose mean is far from zero next to their spread (a single f32 pass over Σx and Σx²
        // cancels there), f32 and bf16-stored weights, against f64.
        for &(rows, c) in &[(7, 320), (3, 77), (2, 1)] {
            let x = (randn(&[1, rows, c], 31) + 300.0).unwrap();
            let (g, b) = (randn(&[c], 32), randn(&[c], 33));
            for g_store in [g.clone(), g.to_dtype(DType::BF16).unwrap()] {
                let got = layer_norm(&x, &g_store, &b, 1e-5).unwrap();
                let g = g_store.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                let bv = b.to_vec1::<f32>().unwrap();
                let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let gv = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got.dims(), x.dims());
                for (r, (row, out)) in xv.chunks(c).zip(gv.chunks(c)).enumerate() {
                    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
                    for j in 0..c {
                        let want = (row[j] as f64 - mean) / (var + 1e-5).sqrt() * g[j] as f64 + bv[j] as f64;
                        assert!(
                            (out[j] as f64 - want).abs() < 2e-4,
                            "{:?} row {r} col {j}: {} vs {want}",
                            (rows, c),
                            out[j]
                        );
                    }
                }
            }
        }
    }

    /// Rows of scores with the shapes the softmaxes must handle: lengths around their 16- and
    /// 32-lane steps, large magnitudes, −∞ entries (exp 0), a row all of one value.
    fn score_rows() -> Vec<(usize, Vec<f32>)> {
        let mut rows = Vec::new();
        for (i, &lk) in [1usize, 5, 15, 16, 17, 31, 32, 33, 64, 77, 300, 4096].iter().enumerate() {
            let mut v = randn(&[lk], 40 + i as u64).to_vec1::<f32>().unwrap();
            v.iter_mut().for_each(|x| *x *= 8.0);
            if lk > 3 {
                v[lk / 2] = f32::NEG_INFINITY;
                v[1] = 80.0;
            }
            rows.push((lk, v));
        }
        rows.push((40, vec![-3.5; 40]));
        // Equal scores in a row whose last values fill part of a vector (its other lanes must add
        // nothing to the sum).
        rows.push((13, vec![-3.5; 13]));
        rows
    }

    #[test]
    fn softmax_rows_match_f64_and_leave_the_division_to_the_caller() {
        // exp(s − max) in place (unnormalised) within 1e-6 of f64 relative to the row's largest
        // (1), and inv the reciprocal of the row's sum; the AVX-512 and AVX2 versions (where the
        // CPU has them) and the portable one.
        for (lk, row) in score_rows() {
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let exact: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
            let sum: f64 = exact.iter().sum();
            let mut versions = vec![("portable", {
                let (mut s, mut inv) = (row.clone(), [0f32]);
                softmax_rows_generic(&mut s, lk, &mut inv);
                (s, inv[0])
            })];
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let (mut s, mut inv) = (row.clone(), [0f32]);
                unsafe { softmax_rows_avx512(&mut s, lk, &mut inv) };
                versions.push(("avx512", (s, inv[0])));
            }
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                let (mut s, mut inv) = (row.clone(), [0f32]);
                unsafe { softmax_rows_avx2(&mut s, lk, &mut inv) };
                versions.push(("avx2", (s, inv[0])));
            }
            for (name, (got, inv)) in versions {
                for (j, (&g, &e)) in got.iter().zip(&exact).enumerate() {
                    assert!((g as f64 - e).abs() < 1e-6, "{name} lk {lk} at {j}: {g} vs {e}");
                }
                assert!((inv as f64 * sum - 1.0).abs() < 1e-6, "{name} lk {lk}: inv {inv}, sum {sum}");
            }
        }
        // A NaN score makes its row NaN (as torch's softmax), whatever the max took.
        let mut nan = vec![1.0f32; 40];
        nan[7] = f32::NAN;
        let mut inv = [0f32];
        softmax_rows(&mut nan, 40, &mut inv);
        assert!(inv[0].is_nan());
    }

    #[test]
    fn bf16_softmax_rounds_each_probability_and_sums_the_rounded() {
        if !bf16_arithmetic() {
            eprintln!("skipped: no bf16 arithmetic on this CPU");
            return;
        }
        // Each value exp(scale · (s − max)) rounded to bf16 (within half a bf16 step of f64 —
        // 2⁻⁸ of the value's binade, so at most 2⁻⁸ of the value — plus the f32 exponential's
        // 1e-6), and inv = 1 / the sum of the rounded values (what P·V then divides by: the
        // weights it applies sum to one); the scale as attention's 1/√d.
        for ((lk, row), scale) in score_rows().into_iter().zip([1.0f32, 0.158_113_88, 0.111_803_4].into_iter().cycle())
        {
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let (mut p, mut inv) = (vec![half::bf16::ZERO; lk], [0f32]);
            unsafe { softmax_rows_bf16(&row, (lk, lk), scale, &mut p, &mut inv) };
            let mut sum = 0f64;
            for (j, (&g, &x)) in p.iter().zip(&row).enumerate() {
                let e = (scale as f64 * (x as f64 - m)).exp();
                let g = g.to_f64();
                // vdpbf16ps reads values below f32's normal range as 0; none here are that small
                // but not 0 after rounding, apart from exact zeros.
                assert!((g - e).abs() <= e * 2f64.powi(-8) + 1e-6, "lk {lk} at {j}: {g} vs {e}");
                sum += g;
            }
            assert!((inv[0] as f64 * sum - 1.0).abs() < 1e-6, "lk {lk}: inv {} for a sum of {sum}", inv[0]);
        }
    }

    #[test]
    fn int8_weights_quantize_per_channel_and_refuse_non_finite() {
        // Channel 1 all zero, channel 2 with one large value: each channel its own scale.
        let mut v = randn(&[4, 3, 3, 3], 20).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[27..54].fill(0.0);
        v[60] = 40.0;
        let w = Tensor::from_vec(v.clone(), (4, 3, 3, 3), &Device::Cpu).unwrap();
        let Weight::Q8 { codes, scales } = Weight::quantize(&w).unwrap() else { panic!("not int8") };
        assert_eq!((codes.dims(), codes.dtype()), (w.dims(), DType::U8));
        let codes = codes.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert!(codes.iter().all(|&c| (1..=255).contains(&c)), "codes stay within ±127");
        assert_eq!(scales[1], 0.0);
        assert!((scales[2] - 40.0 / 127.0).abs() < 1e-7);
        for row in 0..4 {
            let max = v[row * 27..(row + 1) * 27].iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(codes[row * 27..(row + 1) * 27].iter().any(|&c| c == 1 || c == 255) || max == 0.0);
        }
        let q = Weight::quantize(&w).unwrap();
        for generic in [false, true] {
            let d = crate::device::with_generic_ops(generic, || q.dense(DType::F32).unwrap());
            let d = d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, (&a, &b)) in d.iter().zip(&v).enumerate() {
                assert!((a - b).abs() <= scales[i / 27] / 2.0 + 1e-6, "{i}: {a} vs {b} (generic {generic})");
            }
        }
        for bad in [f32::NAN, f32::INFINITY] {
            let mut v = v.clone();
            v[5] = bad;
            let w = Tensor::from_vec(v, (4, 3, 3, 3), &Device::Cpu).unwrap();
            let e = Weight::quantize(&w).unwrap_err().to_string();
            assert!(e.contains("not finite") && e.contains("index 5"), "{e}");
        }
    }

    #[test]
    fn int8_products_match_f32_on_the_dequantised_weights() {
        // The im2col path (small shapes would take it anyway; Winograd has its own test).
        winograd::forced(false, || {
            // Convolutions (3×3 even and odd k, strided, 1×1, upsampled, padded at the end) and linear
            // layers with int8 weights: on this CPU's bf16 path the codes enter exactly, so the result
            // is f32's on the dequantised weight and bf16-rounded input; on the f32 path (every other
            // CPU) and candle's generic ops it is f32's on the dequantised weight.
            type Path = fn(&dyn Fn() -> Tensor) -> Tensor;
            let paths: [(&str, Path, bool); 3] = [
                ("kernels", |f| f(), true),
                ("f32 kernels", |f| without_bf16_arithmetic(f), false),
                ("generic", |f| crate::device::with_generic_ops(true, f), false),
            ];
            for &(b, cin, cout, h, w, k, s, p) in &[
                (2, 6, 17, 9, 11, 3, 1, 1),
                (1, 9, 20, 10, 7, 3, 2, 1),
                (2, 70, 24, 8, 9, 1, 1, 0),
                (1, 40, 16, 200, 120, 3, 1, 1),
            ] {
                let x = randn(&[b, cin, h, w], 21);
                let q = Weight::quantize(&randn(&[cout, cin, k, k], 22)).unwrap();
                let wf = q.dense(DType::F32).unwrap();
                let bias = randn(&[cout], 23);
                for (name, run, rounded) in paths {
                    let rounded = rounded && bf16_arithmetic();
                    let xr = if rounded { bf16_rounded(&x) } else { x.clone() };
                    let want = xr
                        .conv2d(&wf, p, s, 1, 1)
                        .unwrap()
                        .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                        .unwrap();
                    let got = run(&|| conv2d(&x, &q, Some(&bias), s, p).unwrap());
                    assert!(
                        max_rel(&got, &want) < 1e-5,
                        "{name} int8 conv {:?}: {}",
                        (cin, cout, k, s),
                        max_rel(&got, &want)
                    );
                    if rounded {
                        let exact = x.conv2d(&wf, p, s, 1, 1).unwrap();
                        let exact = exact.broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap()).unwrap();
                        assert!(max_rel(&got, &exact) > 1e-4, "the bf16 path ran");
                    }
                    let up = xr.upsample_nearest2d(2 * h, 2 * w).unwrap().conv2d(&wf, p, s, 1, 1).unwrap();
                    let got = run(&|| upsample2x_conv2d(&x, &q, None, s, p).unwrap());
                    assert!(max_rel(&got, &up) < 1e-5, "{name} int8 upsampled conv");
                    let padded = xr.pad_with_zeros(3, 0, 1).unwrap().pad_with_zeros(2, 0, 1).unwrap();
                    let got = run(&|| pad_end_conv2d(&x, &q, None, s).unwrap());
                    assert!(max_rel(&got, &padded.conv2d(&wf, 0, s, 1, 1).unwrap()) < 1e-5, "{name} int8 pad-end conv");
                }
            }
            for &(rows, k, n, bias) in &[(5, 8, 3, true), (300, 320, 70, false), (7, 77, 90, true)] {
                let x = randn(&[1, rows, k], 24);
                let q = Weight::quantize(&randn(&[n, k], 25)).unwrap();
                let wf = q.dense(DType::F32).unwrap();
                let bv = randn(&[n], 26);
                for (name, run, rounded) in paths {
                    let xr = if rounded && bf16_arithmetic() { bf16_rounded(&x) } else { x.clone() };
                    let mut want = xr.matmul(&wf.t().unwrap().unsqueeze(0).unwrap()).unwrap();
                    if bias {
                        want = want.broadcast_add(&bv).unwrap();
                    }
                    let got = run(&|| linear(&x, &q, bias.then_some(&bv)).unwrap());
                    assert_eq!(got.dims(), &[1, rows, n]);
                    assert!(
                        max_rel(&got, &want) < 1e-5,
                        "{name} int8 linear {:?}: {}",
                        (rows, k, n),
                        max_rel(&got, &want)
                    );
                }
            }
        })
    }

    #[test]
    fn group_norm_matches_candle() {
        for &(b, c, h, w, g, silu) in &[(2, 64, 9, 7, 32, false), (1, 12, 5, 5, 3, true), (2, 32, 1, 1, 32, true)] {
            // An offset mean makes a one-pass variance visibly wrong.
            let x = (randn(&[b, c, h, w], 4) * 3.0).unwrap().affine(1.0, 40.0).unwrap();
            let gamma = randn(&[c], 5);
            let beta = randn(&[c], 6);
            let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, g, 1e-6).unwrap();
            let mut want = gn.forward(&x).unwrap();
            if silu {
                want = candle_nn::ops::silu(&want).unwrap();
            }
            let got = group_norm(&x, &gamma, &beta, g, 1e-6, silu).unwrap();
            assert!(max_rel(&got, &want) < 1e-5, "group_norm {:?}: {}", (b, c, h, w, g, silu), max_rel(&got, &want));
        }
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        for i in -8000..=8000 {
            let x = i as f32 * 0.01;
            let e = exp(x) as f64;
            let want = (x as f64).exp();
            assert!(((e - want) / want).abs() < 3e-7, "exp({x}) = {e}, want {want}");
            let got = erf(x) as f64;
            let want = libm_erf(x as f64);
            assert!((got - want).abs() < 2e-7, "erf({x}) = {got}, want {want}");
        }
        assert!(exp(-200.0) < 2e-38);
    }

    /// erf in f64 by its Taylor series (|x| < 3) and continued fraction for erfc beyond.
    fn libm_erf(x: f64) -> f64 {
        let z = x.abs();
        let r = if z < 3.0 {
            let (mut term, mut sum, mut n) = (z, z, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -z * z / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (z + f);
            }
            1.0 - (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f)
        };
        r.copysign(x)
    }

    #[test]
    fn geglu_gate_on_avx512_is_the_scalar_one_within_rounding() {
        // Over the range GELU's erf changes in and far past it, and the specials: within 5e-7 of
        // the larger of |a·GELU(g)| and |a| (the FMAs and the reciprocal's step against the scalar
        // form's two roundings and its division).
        let g: Vec<f32> = (-3000..=3000)
            .map(|i| i as f32 / 200.0)
            .chain([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, f32::INFINITY, f32::NEG_INFINITY])
            .collect();
        let a: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let (mut want, mut got) = (a.clone(), a.clone());
        geglu_gate_scalar(&mut want, &g);
        geglu_gate(&mut got, &g);
        for ((w, v), (&gi, &ai)) in want.iter().zip(&got).zip(g.iter().zip(&a)) {
            if w.is_finite() {
                assert!((w - v).abs() <= 5e-7 * w.abs().max(ai), "g = {gi}: {v}, want {w}");
            } else {
                assert!(w.to_bits() == v.to_bits() || (w.is_nan() && v.is_nan()), "g = {gi}: {v}, want {w}");
            }
        }
        let mut nan = [1.0f32; 3];
        geglu_gate(&mut nan, &[f32::NAN, 1.0, f32::NAN]);
        assert!(nan[0].is_nan() && !nan[1].is_nan() && nan[2].is_nan());
    }

    type Path = fn(&dyn Fn() -> Tensor) -> Tensor;

    /// The ways a product runs on this CPU: as it chooses (AMX tiles where there are), on the
    /// AVX512_BF16 kernel, in f32, and candle's generic composition.
    const PRODUCT_PATHS: [(&str, Path); 4] = [
        ("kernels", |f| f()),
        ("AVX512_BF16 kernel", |f| super::super::gemm_bf16::without_amx(f)),
        ("f32 kernels", |f| without_bf16_arithmetic(f)),
        ("generic", |f| crate::device::with_generic_ops(true, f)),
    ];

    /// Whether `question` holds on the path `run` (asked inside it: the paths are this thread's
    /// switches, and they pass only tensors through).
    fn holds_on(run: Path, question: &dyn Fn() -> bool) -> bool {
        run(&|| Tensor::new(u8::from(question()), &Device::Cpu).unwrap()).to_scalar::<u8>().unwrap() == 1
    }

    #[test]
    fn geglu_matches_candle() {
        let h = (randn(&[2, 7, 2 * 45], 7) * 2.0).unwrap();
        let want = (h.narrow(2, 0, 45).unwrap() * h.narrow(2, 45, 45).unwrap().gelu_erf().unwrap()).unwrap();
        assert!(max_rel(&geglu(&h).unwrap(), &want) < 1e-6);
        // An odd width has no two halves (its rows would not cover the output): an error naming it.
        let odd = randn(&[1, 3, 91], 7);
        let err = geglu(&odd).unwrap_err().to_string();
        assert!(err.contains("width 91"), "{err}");
    }

    #[test]
    fn geglu_inside_the_product_equals_the_separate_pass() {
        // linear_geglu against geglu(linear) on every weight storage and path: the same values
        // where the products multiply in f32 (the pass runs inside the op); with the gate inside
        // the bf16 products, the same terms with the bias entering the sums at another place
        // where a tile of the halves and of Y differ (within 1e-6 of the largest value, as the
        // residual's sum). Tiles that do not fill (rows, halves not a multiple of 48), odd k,
        // several AMX tiles, and a k beyond one block of the products (the pass after the product
        // there), with and without bias.
        let paths = PRODUCT_PATHS;
        for &(rows, k, h) in &[(37, 96, 40), (300, 320, 100), (70, 33, 24), (64, 1600, 48)] {
            let x = randn(&[1, rows, k], 61);
            let w32 = (randn(&[2 * h, k], 62) * 0.2).unwrap();
            let b = randn(&[2 * h], 63);
            for (wname, w) in &weight_forms(&w32) {
                for (pname, run) in paths {
                    for bias in [None, Some(&b)] {
                        let what = format!("{:?} {wname} {pname} bias {}", (rows, k, h), bias.is_some());
                        let want = run(&|| geglu(&linear(&x, w, bias).unwrap()).unwrap());
                        let got = run(&|| linear_geglu(&x, w, bias).unwrap());
                        assert_eq!(got.dims(), &[1, rows, h], "{what}");
                        if *wname == "f32" || pname == "f32 kernels" || pname == "generic" {
                            assert!(bits(&got) == bits(&want), "{what}: not the same bits");
                        } else {
                            assert!(max_rel(&got, &want) < 1e-6, "{what}: {}", max_rel(&got, &want));
                        }
                    }
                }
            }
        }
        // An odd projection has no two halves: an error naming its width.
        let err = linear_geglu(&randn(&[1, 3, 8], 64), &dense(&randn(&[91, 8], 65)), None).unwrap_err().to_string();
        assert!(err.contains("width 91"), "{err}");
    }

    /// `t` (f32) as bf16 rows whose storage starts at a 64-byte boundary (`aligned`) or 32 bytes
    /// past one: a view into a larger tensor, so both ways the linear layers read bf16 rows (in
    /// place, packed) are taken whatever the allocator hands out.
    fn bf16_rows_at(t: &Tensor, aligned: bool) -> Tensor {
        let vals = t.flatten_all().unwrap().to_dtype(DType::BF16).unwrap().to_vec1::<half::bf16>().unwrap();
        let n = vals.len();
        let mut v = vec![half::bf16::ZERO; n + 64];
        let to64 = (64 - v.as_ptr() as usize % 64) % 64 / 2;
        let at = if aligned { to64 } else { to64 + 16 };
        v[at..at + n].copy_from_slice(&vals);
        let placed = Tensor::from_vec(v, n + 64, &Device::Cpu).unwrap().narrow(0, at, n).unwrap();
        let (storage, layout) = placed.storage_and_layout();
        if let candle_core::Storage::Cpu(CpuStorage::BF16(v)) = &*storage {
            let p = v[layout.start_offset()..].as_ptr() as usize;
            assert_eq!(p.is_multiple_of(64), aligned, "placed at {at}");
        }
        drop(storage);
        placed.reshape(t.dims()).unwrap()
    }

    #[test]
    fn bf16_activations_are_what_the_products_read() {
        // layer_norm_bf16 and linear_geglu_bf16 write what the bf16 products would have rounded
        // their f32 results to, so a linear layer with bf16 products reading them (in place where
        // the rows are aligned, packed where not) gives the same bits as on the f32 results; on
        // the f32 products and the generic path a bf16 input is widened.
        let paths = PRODUCT_PATHS;
        for &(rows, k, n) in &[(37, 96, 40), (300, 320, 100), (70, 34, 24), (5, 64, 8)] {
            let x = ((randn(&[1, rows, k], 71) * 3.0).unwrap() + 1.0).unwrap();
            let (gamma, beta) = (randn(&[k], 72), randn(&[k], 73));
            let w32 = (randn(&[n, k], 74) * 0.2).unwrap();
            let wg32 = (randn(&[2 * k, k], 75) * 0.2).unwrap();
            let (b, bg) = (randn(&[n], 76), randn(&[2 * k], 77));
            let residual = randn(&[1, rows, n], 78);
            for ((wname, w), (_, wg)) in weight_forms(&w32).iter().zip(&weight_forms(&wg32)) {
                for (pname, run) in paths {
                    let what = format!("{:?} {wname} {pname}", (rows, k, n));
                    let bf16 = holds_on(run, &|| w.bf16_products());
                    let ln32 = run(&|| layer_norm(&x, &gamma, &beta, 1e-5).unwrap());
                    let ln16 = run(&|| layer_norm_bf16(&x, &gamma, &beta, 1e-5).unwrap());
                    if pname == "generic" {
                        assert_eq!(ln16.dtype(), DType::F32, "{what}");
                    } else {
                        assert_eq!(ln16.dtype(), DType::BF16, "{what}");
                        assert!(bits(&ln16.to_dtype(DType::F32).unwrap()) == bits(&bf16_rounded(&ln32)), "{what}");
                    }
                    for aligned in [true, false] {
                        let what = format!("{what} aligned {aligned}");
                        let h16 = if ln16.dtype() == DType::BF16 { bf16_rows_at(&ln16, aligned) } else { ln16.clone() };
                        // Read in bf16 by the products (same bits as from f32), or widened (the
                        // rounded values), or f32 all along (generic).
                        let rounded = ln16.dtype() == DType::BF16 && !bf16;
                        let (got, want) = (h16.clone(), if rounded { bf16_rounded(&ln32) } else { ln32.clone() });
                        let pairs = [
                            (run(&|| linear(&got, w, Some(&b)).unwrap()), run(&|| linear(&want, w, Some(&b)).unwrap())),
                            (
                                run(&|| linear_add(&got, w, None, &residual).unwrap()),
                                run(&|| linear_add(&want, w, None, &residual).unwrap()),
                            ),
                        ];
                        for (g, e) in pairs {
                            assert_eq!(g.dtype(), DType::F32, "{what}");
                            assert!(bits(&g) == bits(&e), "{what}: {}", max_rel(&g, &e));
                        }
                    }
                    // Plain products written in bf16: the f32 results' bits rounded (the bias
                    // entering where it does for f32).
                    for (xname, xin) in [("f32", &x), ("bf16", &bf16_rows_at(&x, true))] {
                        for bias in [None, Some(&b)] {
                            let what = format!("{what} linear_bf16 from {xname} bias {}", bias.is_some());
                            let l32 = run(&|| linear(xin, w, bias).unwrap());
                            let l16 = run(&|| linear_bf16(xin, w, bias).unwrap());
                            if bf16 && pname != "generic" {
                                assert_eq!(l16.dtype(), DType::BF16, "{what}");
                                assert!(
                                    bits(&l16.to_dtype(DType::F32).unwrap()) == bits(&bf16_rounded(&l32)),
                                    "{what}"
                                );
                            } else {
                                assert!(l16.dtype() == DType::F32 && bits(&l16) == bits(&l32), "{what}");
                            }
                        }
                    }
                    let g32 = run(&|| linear_geglu(&x, wg, Some(&bg)).unwrap());
                    let g16 = run(&|| linear_geglu_bf16(&x, wg, Some(&bg)).unwrap());
                    if holds_on(run, &|| wg.bf16_products()) && pname != "generic" {
                        assert_eq!(g16.dtype(), DType::BF16, "{what}");
                        assert!(bits(&g16.to_dtype(DType::F32).unwrap()) == bits(&bf16_rounded(&g32)), "{what}");
                    } else {
                        assert!(g16.dtype() == DType::F32 && bits(&g16) == bits(&g32), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_attention_reads_and_writes_what_its_products_round() {
        // attention_bf16 on bf16 queries, keys and values writes the bits of the bf16-product
        // attention on their f32 originals, rounded (its products round their operands so); with
        // f32 products or on the generic path it is the f32 attention on the widened inputs.
        // Several query blocks, odd key counts, a head wider than the keys (the output's f32
        // rows before rounding outgrow the scores).
        let paths = PRODUCT_PATHS;
        for &(b, lq, lk, c, heads) in &[(2, 300, 300, 40, 5), (1, 100, 77, 64, 8), (1, 50, 7, 160, 1)] {
            let q = bf16_rounded(&randn(&[b, lq, c], 81));
            let k = bf16_rounded(&randn(&[b, lk, c], 82));
            let v = bf16_rounded(&randn(&[b, lk, c], 83));
            let half = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            for (pname, run) in paths {
                let what = format!("{:?} {pname}", (b, lq, lk, c, heads));
                // Asked, not read off the path's name: a CPU without AVX512_BF16 runs
                // "kernels" in f32.
                let bf16 = holds_on(run, &bf16_arithmetic);
                let want = run(&|| attention(&q, &k, &v, heads, true).unwrap());
                let got = run(&|| attention_bf16(&half(&q), &half(&k), &half(&v), heads).unwrap());
                if bf16 {
                    assert_eq!(got.dtype(), DType::BF16, "{what}");
                    assert!(bits(&got.to_dtype(DType::F32).unwrap()) == bits(&bf16_rounded(&want)), "{what}");
                } else {
                    assert!(got.dtype() == DType::F32 && bits(&got) == bits(&want), "{what}");
                }
                // Mixed inputs: the bf16 one widened, the output as above.
                let mixed = run(&|| attention_bf16(&q, &half(&k), &v, heads).unwrap());
                assert!(
                    bits(&mixed.to_dtype(DType::F32).unwrap()) == bits(&got.to_dtype(DType::F32).unwrap()),
                    "{what} mixed"
                );
            }
        }
    }

    #[test]
    fn bf16_attention_rows_do_not_depend_on_the_query_block() {
        // The block of queries sharing a pass is tuning (L2's size): each row's scores, softmax and
        // product with V are the same bits whatever block it falls in, whole micro-tiles or not.
        if !bf16_arithmetic() {
            eprintln!("skipped: no bf16 arithmetic here");
            return;
        }
        let (b, lq, lk, c, heads) = (1, 200, 1030, 80, 2);
        let [q, k, v] = [91, 92, 93].map(|seed| randn(&[b, lq.max(lk), c], seed).flatten_all().unwrap());
        let (q, k, v) = (q.to_vec1::<f32>().unwrap(), k.to_vec1::<f32>().unwrap(), v.to_vec1::<f32>().unwrap());
        let op = AttentionOp { heads, bf16: true, out_bf16: false };
        let run = |block: usize| {
            let mut out = vec![f32::NAN; b * lq * c];
            // SAFETY: out holds b × lq × c f32 values; q, k and v cover their shapes.
            unsafe { op.run_bf16((&q[..], &k[..], &v[..]), (b, lq, lk, c), block, (SendPtr(out.as_mut_ptr()), false)) };
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let want = run(64);
        assert!(want.iter().all(|&x| f32::from_bits(x).is_finite()));
        for block in [16, 32, 48, 100, 256] {
            assert!(run(block) == want, "block {block}");
        }
    }

    #[test]
    fn attention_matches_candle() {
        // Self-attention with several query blocks and an odd tail, cross-attention with 77 keys.
        for &(b, lq, lk, c, heads) in &[(2, 300, 300, 40, 5), (2, 1100, 77, 64, 8), (1, 3, 5, 8, 1)] {
            let q = randn(&[b, lq, c], 8);
            let k = randn(&[b, lk, c], 9);
            let v = randn(&[b, lk, c], 10);
            let want = reference_attention(&q, &k, &v, heads).unwrap();
            let got = attention(&q, &k, &v, heads, false).unwrap();
            assert!(max_rel(&got, &want) < 1e-5, "attention {:?}: {}", (b, lq, lk, c, heads), max_rel(&got, &want));
        }
    }
}
