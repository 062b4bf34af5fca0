//! safetensors weights read through a memory map: the large layer weights used where they lie in
//! the file when the run keeps their stored dtype ([`View`]), everything else copied out one
//! tensor at a time, each tensor's pages handed back to the page cache once it is copied.
//!
//! A [`View`] costs no copy and no fresh memory: the page cache holds the file once for every
//! process that maps it (a folder of photos converted by parallel jobs, a Slurm array on one node),
//! and the kernel can drop clean file pages under memory pressure instead of swapping them. It is
//! what diffusers gets from safetensors' `safe_open` (tensors stay in the map) and what
//! stable-diffusion.cpp and llama.cpp do with `mmap`.
//!
//! For the tensors that are copied, candle's `MmapedSafetensors` leaves every page it touched
//! resident until the map is dropped, so loading a component costs its file size *plus* the loaded
//! copy (5.8 GB peak for SD1.5 stored in f16 from f32 files). Releasing each tensor's range after
//! the copy keeps the peak at the loaded weights plus one tensor; the page cache still holds the
//! file for the next run.

use crate::error::Error;
use candle_core::{DType, Device, Result, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Contiguous float values as stored: a [`View`]'s, or a CPU tensor's storage (`kernels`).
#[derive(Clone, Copy)]
pub enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    Bf16(&'a [half::bf16]),
}

impl<'a> Values<'a> {
    /// `n` values of `dtype` lying in `bytes` (little-endian, as safetensors and torch write), if
    /// they can be read there: f32/f16/bf16, a little-endian CPU, exactly `n` of them, aligned.
    pub fn of_bytes(bytes: &'a [u8], dtype: DType, n: usize) -> Option<Self> {
        let es = dtype.size_in_bytes();
        let ok = cfg!(target_endian = "little")
            && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
            && n.checked_mul(es) == Some(bytes.len())
            && (bytes.as_ptr() as usize).is_multiple_of(es);
        let p = bytes.as_ptr();
        // SAFETY: length, alignment, byte order and dtype checked above; f16 and bf16 are plain
        // 16-bit values; the slices borrow `bytes`.
        ok.then(|| unsafe {
            match dtype {
                DType::F32 => Values::F32(std::slice::from_raw_parts(p as *const f32, n)),
                DType::F16 => Values::F16(std::slice::from_raw_parts(p as *const half::f16, n)),
                _ => Values::Bf16(std::slice::from_raw_parts(p as *const half::bf16, n)),
            }
        })
    }
}

/// A tensor read in place from a read-only memory map: little-endian f32, f16 or bf16, aligned to
/// its element size (checked when made). Keeps the map alive.
#[derive(Clone)]
pub struct View {
    map: Arc<Mmap>,
    start: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "View({:?}, {:?})", self.dtype, self.shape)
    }
}

impl View {
    /// A view of `bytes` of `map` holding `shape` as `dtype`, if the kernels can read it there:
    /// a CPU with the file's byte order, f32/f16/bf16, the exact length, aligned.
    pub(crate) fn new(map: &Arc<Mmap>, (start, end): (usize, usize), dtype: DType, shape: &[usize]) -> Option<Self> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        Values::of_bytes(map.get(start..end)?, dtype, n)?;
        Some(View { map: map.clone(), start, dtype, shape: shape.to_vec() })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    fn elems(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes_of(&self) -> &[u8] {
        // In range: checked in `new`.
        &self.map[self.start..self.start + self.bytes()]
    }

    /// The values as they lie in the file.
    pub fn values(&self) -> Values<'_> {
        Values::of_bytes(self.bytes_of(), self.dtype, self.elems()).expect("a View's bytes are checked when it is made")
    }

    /// The tensor copied out as `dtype` onto `device` (the generic, non-CPU paths).
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        tensor_from_bytes(self.bytes_of(), self.dtype, &self.shape, dtype, device)
    }

    /// The same values seen as `shape` (as many elements).
    pub fn reshaped(mut self, shape: &[usize]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), self.elems());
        self.shape = shape.to_vec();
        self
    }

    /// Rows `[start, start + len)` along the first dimension (a contiguous slice of the values).
    pub fn rows(&self, start: usize, len: usize) -> Option<Self> {
        let (&rows, rest) = self.shape.split_first()?;
        if start.checked_add(len)? > rows {
            return None;
        }
        let row_bytes = rest.iter().product::<usize>() * self.dtype.size_in_bytes();
        let mut shape = self.shape.clone();
        shape[0] = len;
        Some(View { map: self.map.clone(), start: self.start + start * row_bytes, dtype: self.dtype, shape })
    }

    /// Bytes of the file this view reads.
    pub fn bytes(&self) -> usize {
        self.elems() * self.dtype.size_in_bytes()
    }
}

struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    range: (usize, usize),
}

pub struct Weights {
    maps: Vec<Arc<Mmap>>,
    index: HashMap<String, Entry>,
}

impl Weights {
    /// Maps `paths` (one file or the shards of one) and reads their headers; a truncated or
    /// foreign file is named in the error.
    ///
    /// # Safety
    /// As for any mmap: the files must not be truncated or rewritten while the maps live.
    pub unsafe fn open(paths: &[impl AsRef<Path>]) -> crate::error::Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let p = p.as_ref();
            let file = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
            // SAFETY: forwarded to the caller.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(p, e))?;
            let (header, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::Weights {
                path: p.to_path_buf(),
                msg: format!("not a valid safetensors file: {e}"),
            })?;
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let range = (base + info.data_offsets.0, base + info.data_offsets.1);
                index.insert(name, Entry { file: i, dtype: info.dtype, shape: info.shape.clone(), range });
            }
            maps.push(Arc::new(map));
        }
        Ok(Self { maps, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The tensor read in place, if stored as `dtype` in a form the kernels read ([`View`]).
    pub fn view(&self, name: &str, dtype: DType) -> Option<View> {
        let e = self.index.get(name)?;
        (stored_dtype(e.dtype) == Some(dtype)).then(|| View::new(&self.maps[e.file], e.range, dtype, &e.shape))?
    }

    /// The tensor as `dtype`, copied (and converted) out of the map.
    pub fn load_as(&self, name: &str, dtype: Option<DType>, device: &Device) -> Result<Tensor> {
        let e =
            self.index.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let map = &self.maps[e.file];
        let bytes = &map[e.range.0..e.range.1];
        let Some(stored) = stored_dtype(e.dtype) else { candle_core::bail!("{name}: unsupported dtype {:?}", e.dtype) };
        let elems = e.shape.iter().product::<usize>();
        if elems * stored.size_in_bytes() != bytes.len() {
            candle_core::bail!("{name}: {} bytes for shape {:?} of {stored:?}", bytes.len(), e.shape);
        }
        let t = tensor_from_bytes(bytes, stored, &e.shape, dtype.unwrap_or(stored), device)?;
        // SAFETY: the map is private and read-only, so dropping its pages loses nothing: a later
        // read of the same range (a page shared with the next tensor) faults them back in.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, e.range.0, e.range.1 - e.range.0) };
        Ok(t)
    }
}

/// candle's name for a safetensors dtype it can hold.
fn stored_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        _ => return None,
    })
}

/// A tensor stored as `stored` in `bytes` (little-endian, as safetensors and torch write), as
/// `dtype` on `device`. On the CPU, f32/f16/bf16 → f32 is one parallel pass from the file's bytes
/// into the tensor's own buffer (the kernels' widening, [`Values::to_f32_vec`]). candle's route (a
/// stored-dtype copy, then a serial conversion) loaded the default preset's f16 checkpoint in 4.3 s
/// warm against 2.4 s for its f32 folders; this one in 1.1 s against 0.5 s (benches/first_download.sh,
/// 2 cores; the README's Models section). Narrowing to bf16 or f16 (`--dtype bf16`/`f16` on f32
/// files) is likewise one pass ([`Values::to_bf16_vec`]): candle's f32 copy cost 4 bytes of fresh
/// memory per value before the 2 of the result, and fresh memory is what a load pays for
/// (full-size SD1.5 f32 folder, 2 threads: 5.4–18.1 → 1.2–1.3 s, peak 2.31 → 2.20 GB).
pub fn tensor_from_bytes(
    bytes: &[u8],
    stored: DType,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    // Converted on all threads, written once; a half-precision tensor kept as stored is a plain
    // copy of its bytes (below).
    if let Some(v) =
        Values::of_bytes(bytes, stored, n).filter(|_| device.is_cpu() && (dtype == DType::F32 || stored != dtype))
    {
        if let Some(t) = v.to_tensor(dtype, shape, device) {
            return t;
        }
    }
    Tensor::from_raw_buffer(bytes, stored, shape, device)?.to_dtype(dtype)
}

/// Named tensors a model's weights come from: safetensors files ([`Weights`]), a PyTorch `.ckpt`
/// (`models::ckpt`), or a single-file checkpoint seen under diffusers' names
/// (`models::single_file`). Tensors come in their stored dtype.
pub trait TensorSource: Send + Sync {
    fn contains(&self, name: &str) -> bool;
    /// The stored shape of a tensor.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    fn names(&self) -> Vec<String>;
    /// The tensor as `dtype` (`None`: as stored). Sources convert while copying out of the file
    /// where they can ([`tensor_from_bytes`]).
    fn load_as(&self, name: &str, dtype: Option<DType>, device: &Device) -> Result<Tensor>;
    /// The tensor as stored.
    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.load_as(name, None, device)
    }
    /// The tensor read in place where it is stored as `dtype` in a form the CPU kernels read
    /// ([`View`]); `None` where it must be copied (another dtype, a packed or converted tensor).
    fn view(&self, _name: &str, _dtype: DType) -> Option<View> {
        None
    }
}

impl TensorSource for Weights {
    fn contains(&self, name: &str) -> bool {
        Weights::contains(self, name)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index.get(name).map(|e| e.shape.clone())
    }
    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }
    fn load_as(&self, name: &str, dtype: Option<DType>, device: &Device) -> Result<Tensor> {
        Weights::load_as(self, name, dtype, device)
    }
    fn view(&self, name: &str, dtype: DType) -> Option<View> {
        Weights::view(self, name, dtype)
    }
}

/// A VarBuilder backend over any [`TensorSource`], converting to the requested dtype.
pub struct SourceBackend(pub std::sync::Arc<dyn TensorSource>);

impl candle_nn::var_builder::SimpleBackend for SourceBackend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        expect_shape(name, self.get_unchecked(name, dtype, dev)?, &s)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.load_as(name, Some(dtype), dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// The tensor, if it has the shape the model asks for (the check every weight backend makes).
pub fn expect_shape(name: &str, t: Tensor, s: &candle_core::Shape) -> Result<Tensor> {
    if t.shape() != s {
        candle_core::bail!("shape mismatch for {name}: expected {s:?}, got {:?}", t.shape())
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The load path's own conversions ([`Values::to_f32_vec`], `to_bf16_vec`, `to_f16_vec`:
    /// parallel, 64K-value chunks, output written once) against candle's (`to_dtype`), bit for
    /// bit: f32, f16 and bf16 files into f32, bf16 and f16, a length that ends inside a chunk and
    /// inside a 4096-value block, values from f16 subnormals to infinity, exact bf16 ties, NaNs
    /// with payloads; and bytes the fast path cannot read in place (misaligned) take candle's
    /// route to the same values.
    #[test]
    fn weights_converted_out_of_a_file_equal_candles_conversion_bit_for_bit() {
        let n = (1 << 16) * 2 + 12_345;
        let mut state = 0x9e37_79b9_u32;
        let values: Vec<f32> = (0..n)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let x = (state >> 8) as f32 / (1 << 24) as f32 - 0.5;
                match i % 9 {
                    0 => x * 1e-6,                                                     // f16 subnormals
                    1 => x * 1e5,                                                      // beyond f16's range: infinity
                    2 => f32::from_bits((state & 0xbfff_0000) | 0x8000),               // a tie halfway between two bf16
                    3 if i % 4 == 0 => f32::from_bits(0x7f80_0000 | (state >> 9) | 1), // NaN, some signalling
                    _ => x * 4.0,
                }
            })
            .collect();
        let t = Tensor::from_vec(values, n, &Device::Cpu).unwrap();
        let bits = crate::models::kernels::float_bits;
        for stored in [DType::F32, DType::F16, DType::BF16] {
            let s = t.to_dtype(stored).unwrap();
            let es = stored.size_in_bytes();
            // One spare element ahead, so the bytes can be taken aligned and misaligned.
            let mut bytes = vec![0u8; es];
            match stored {
                DType::F32 => s.to_vec1::<f32>().unwrap().iter().for_each(|v| bytes.extend(v.to_le_bytes())),
                DType::F16 => s.to_vec1::<half::f16>().unwrap().iter().for_each(|v| bytes.extend(v.to_le_bytes())),
                _ => s.to_vec1::<half::bf16>().unwrap().iter().for_each(|v| bytes.extend(v.to_le_bytes())),
            }
            let mut buf = vec![0u64; bytes.len().div_ceil(8) + 1];
            // SAFETY: u64 storage viewed as bytes (8-aligned), as long as `bytes` plus one.
            let mem = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, bytes.len() + 1) };
            for shift in [0, 1] {
                let at = &mut mem[shift..shift + bytes.len()];
                at.copy_from_slice(&bytes);
                let at = &at[es..];
                assert_eq!(Values::of_bytes(at, stored, n).is_some(), shift == 0, "{stored:?} shifted {shift}");
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    let want = bits(&s.to_dtype(dtype).unwrap());
                    let got = tensor_from_bytes(at, stored, &[n], dtype, &Device::Cpu).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    let got = bits(&got);
                    let diff = got.iter().zip(&want).position(|(a, b)| a != b);
                    assert!(diff.is_none(), "{stored:?} → {dtype:?} shifted {shift}: value {diff:?} differs");
                }
            }
        }
    }
}
