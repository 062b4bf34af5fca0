//! safetensors weights read through a memory map, one tensor at a time, each tensor's pages handed
//! back to the page cache once it is copied out.
//!
//! candle's `MmapedSafetensors` leaves every page it touched resident until the map is dropped, so
//! loading a component costs its file size *plus* the loaded copy (5.8 GB peak for SD1.5 stored
//! in f16 from f32 files). Releasing each tensor's range after the copy keeps the peak at the
//! loaded weights plus one tensor; the page cache still holds the file for the next run.

use crate::error::Error;
use candle_core::{DType, Device, Result, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use std::collections::HashMap;
use std::path::Path;

struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    range: (usize, usize),
}

pub struct Weights {
    maps: Vec<Mmap>,
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
            maps.push(map);
        }
        Ok(Self { maps, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The tensor as stored (its file dtype), copied out of the map.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let e =
            self.index.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let map = &self.maps[e.file];
        let bytes = &map[e.range.0..e.range.1];
        use safetensors::Dtype as S;
        let dtype = match e.dtype {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F64 => DType::F64,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::U32 => DType::U32,
            S::U8 => DType::U8,
            other => candle_core::bail!("{name}: unsupported dtype {other:?}"),
        };
        let elems = e.shape.iter().product::<usize>();
        if elems * dtype.size_in_bytes() != bytes.len() {
            candle_core::bail!("{name}: {} bytes for shape {:?} of {dtype:?}", bytes.len(), e.shape);
        }
        let t = Tensor::from_raw_buffer(bytes, dtype, &e.shape, device)?;
        // SAFETY: the map is private and read-only, so dropping its pages loses nothing: a later
        // read of the same range (a page shared with the next tensor) faults them back in.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, e.range.0, e.range.1 - e.range.0) };
        Ok(t)
    }
}

/// The tensor, if it has the shape the model asks for (the check every weight backend makes).
pub fn expect_shape(name: &str, t: Tensor, s: &candle_core::Shape) -> Result<Tensor> {
    if t.shape() != s {
        candle_core::bail!("shape mismatch for {name}: expected {s:?}, got {:?}", t.shape())
    }
    Ok(t)
}

/// A VarBuilder backend over [`Weights`] that converts to the requested dtype.
impl candle_nn::var_builder::SimpleBackend for Weights {
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
        self.load(name, dev)?.to_dtype(dtype)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}
