//! PyTorch `.ckpt` / `.pt` files (`torch.save`'s zip format: `*/data.pkl` + one entry per storage)
//! read without executing anything: a pickle reader that understands only what a state dict needs
//! — dicts, lists, tuples, numbers, strings, tensor rebuilds and storages — and refuses any other
//! global by name, the way torch's own `weights_only` unpickler (`torch/_weights_only_unpickler.py`)
//! restricts `torch.load`. It is bounded: a lying size, a huge string or a "pickle bomb" (deep
//! nesting, references fanned out) is a one-line error, never an allocation the file chose.
//! Tensors are then read straight from the memory-mapped archive (stored entries, as torch
//! writes them).

use super::weights::{tensor_from_bytes, TensorSource};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Limits on what a pickle may make us do.
const MAX_OPS: usize = 20_000_000;
const MAX_STACK: usize = 100_000;
const MAX_MEMO: usize = 10_000_000;
const MAX_STRING: usize = 1 << 20;
const MAX_TENSORS: usize = 1_000_000;

/// The globals a state dict needs; anything else is refused by name.
const ALLOWED: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    ("torch", "Size"),
    // Bytes in protocol 2 pickles, and numpy scalars (a `global_step` saved as numpy.int64).
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
];

#[derive(Debug, Clone)]
struct TensorRef {
    storage: String,
    dtype: DType,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    /// Whether its elements lie in row-major order (dimensions of one may have any stride).
    fn contiguous(&self) -> bool {
        let mut expect = 1;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expect {
                return false;
            }
            expect *= d;
        }
        true
    }
}

#[derive(Debug)]
enum Obj {
    None,
    Int(i64),
    Str(String),
    /// A bool, float or bytes value: accepted, never needed.
    Scalar,
    Tuple(Vec<Rc<Obj>>),
    List(std::cell::RefCell<Vec<Rc<Obj>>>),
    Dict(std::cell::RefCell<Vec<(Rc<Obj>, Rc<Obj>)>>),
    Global(String, String),
    Storage {
        key: String,
        dtype: DType,
        numel: usize,
    },
    Tensor(TensorRef),
    /// A value we accept but do not need (a numpy scalar, a dtype).
    Opaque,
    Mark,
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Rc<Obj>>,
    memo: HashMap<u32, Rc<Obj>>,
    tensors: usize,
    path: &'a Path,
}

impl Unpickler<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Weights { path: self.path.to_path_buf(), msg: format!("pickle at byte {}: {}", self.pos, msg.into()) }
    }
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if n > self.data.len() - self.pos {
            return Err(self.err(format!("asks for {n} bytes past the end (truncated?)")));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end =
            rest.iter().take(MAX_STRING).position(|&b| b == b'\n').ok_or_else(|| self.err("a line without its end"))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<String> {
        if n > MAX_STRING {
            return Err(self.err(format!("a string of {n} bytes (at most {MAX_STRING})")));
        }
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn push(&mut self, o: Obj) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err("the stack grows past its limit (a pickle bomb?)"));
        }
        self.stack.push(Rc::new(o));
        Ok(())
    }
    fn pop(&mut self) -> Result<Rc<Obj>> {
        self.stack.pop().ok_or_else(|| self.err("pops an empty stack"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Rc<Obj>>> {
        let at = self.stack.iter().rposition(|o| matches!(**o, Obj::Mark)).ok_or_else(|| self.err("no mark"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn memoize(&mut self, key: u32) -> Result<()> {
        if self.memo.len() >= MAX_MEMO {
            return Err(self.err("too many memo entries"));
        }
        let top = self.stack.last().ok_or_else(|| self.err("memoizes an empty stack"))?.clone();
        self.memo.insert(key, top);
        Ok(())
    }
    fn get(&mut self, key: u32) -> Result<()> {
        let o = self.memo.get(&key).cloned().ok_or_else(|| self.err(format!("memo {key} is unset")))?;
        if self.stack.len() >= MAX_STACK {
            return Err(self.err("the stack grows past its limit (a pickle bomb?)"));
        }
        self.stack.push(o);
        Ok(())
    }

    fn run(mut self) -> Result<Rc<Obj>> {
        for _ in 0..MAX_OPS {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'}' => self.push(Obj::Dict(Default::default()))?,
                b']' => self.push(Obj::List(Default::default()))?,
                b')' => self.push(Obj::Tuple(Vec::new()))?,
                b'(' => self.push(Obj::Mark)?,
                b'N' => self.push(Obj::None)?,
                0x88 | 0x89 => self.push(Obj::Scalar)?,
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Obj::Int(v as i64))?
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Obj::Int(v as i64))?
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    if n > 8 {
                        return Err(self.err(format!("an integer of {n} bytes")));
                    }
                    let mut v: i64 = 0;
                    for (i, byte) in b.iter().enumerate() {
                        v |= (*byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Obj::Int(v))?
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Obj::Scalar)?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s))?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s))?
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s))?
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(Obj::Str(s))?
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    self.take(n)?;
                    self.push(Obj::Scalar)?
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    if n > MAX_STRING {
                        return Err(self.err(format!("bytes of {n} (at most {MAX_STRING})")));
                    }
                    self.take(n)?;
                    self.push(Obj::Scalar)?
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memoize(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memoize(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memoize(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.get(k)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(m), Obj::Str(n)) = (&*module, &*name) else {
                        return Err(self.err("STACK_GLOBAL without two strings"));
                    };
                    self.global(m.clone(), n.clone())?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items))?
                }
                0x85 => {
                    let a = self.pop()?;
                    self.push(Obj::Tuple(vec![a]))?
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Obj::Tuple(vec![a, b]))?
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Obj::Tuple(vec![a, b, c]))?
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.stack.last().map(|o| &**o) {
                        Some(Obj::List(l)) => l.borrow_mut().push(v),
                        _ => return Err(self.err("APPEND to something that is not a list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.stack.last().map(|o| &**o) {
                        Some(Obj::List(l)) => l.borrow_mut().extend(items),
                        _ => return Err(self.err("APPENDS to something that is not a list")),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.stack.last().map(|o| &**o) {
                        Some(Obj::Dict(d)) => d.borrow_mut().push((k, v)),
                        _ => return Err(self.err("SETITEM on something that is not a dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    match self.stack.last().map(|o| &**o) {
                        Some(Obj::Dict(d)) => {
                            let mut d = d.borrow_mut();
                            for kv in items.chunks(2) {
                                d.push((kv[0].clone(), kv[1].clone()));
                            }
                        }
                        _ => return Err(self.err("SETITEMS on something that is not a dict")),
                    }
                }
                b'Q' => {
                    // BINPERSID: ('storage', <Storage class>, key, location, numel)
                    let pid = self.pop()?;
                    let o = self.storage(&pid)?;
                    self.push(o)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let o = self.reduce(&f, &args)?;
                    self.push(o)?
                }
                b'b' => {
                    // BUILD: an OrderedDict's (empty) state; nothing to do for what we accept.
                    self.pop()?;
                }
                b'.' => return self.pop(),
                other => return Err(self.err(format!("opcode 0x{other:02x} is not one a state dict needs"))),
            }
        }
        Err(self.err(format!("more than {MAX_OPS} operations (a pickle bomb?)")))
    }

    fn global(&mut self, module: String, name: String) -> Result<()> {
        if !ALLOWED.iter().any(|(m, n)| *m == module && *n == name) {
            return Err(self.err(format!(
                "refers to '{module}.{name}', which a weights file does not need; refusing it (no code from the file is run)"
            )));
        }
        self.push(Obj::Global(module, name))
    }

    fn storage(&self, pid: &Obj) -> Result<Obj> {
        let Obj::Tuple(t) = pid else { return Err(self.err("a persistent id that is not a tuple")) };
        let (Some(tag), Some(class), Some(key), Some(numel)) = (t.first(), t.get(1), t.get(2), t.get(4)) else {
            return Err(self.err("a persistent id of the wrong length"));
        };
        let (Obj::Str(tag), Obj::Global(_, class), Obj::Str(key), Obj::Int(numel)) =
            (&**tag, &**class, &**key, &**numel)
        else {
            return Err(self.err("a persistent id that is not ('storage', class, key, location, numel)"));
        };
        if tag != "storage" || *numel < 0 {
            return Err(self.err("a persistent id that is not a storage"));
        }
        let dtype = match class.as_str() {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ByteStorage" | "BoolStorage" | "CharStorage" => DType::U8,
            "ShortStorage" => DType::I16,
            other => return Err(self.err(format!("storage type {other} is not supported"))),
        };
        Ok(Obj::Storage { key: key.clone(), dtype, numel: *numel as usize })
    }

    fn ints(&self, o: &Obj) -> Result<Vec<usize>> {
        let Obj::Tuple(t) = o else { return Err(self.err("a size or stride that is not a tuple")) };
        if t.len() > 8 {
            return Err(self.err(format!("a tensor of {} dimensions", t.len())));
        }
        t.iter()
            .map(|x| match **x {
                Obj::Int(v) if (0..1 << 40).contains(&v) => Ok(v as usize),
                _ => Err(self.err("a size or stride that is not a small non-negative integer")),
            })
            .collect()
    }

    fn reduce(&mut self, f: &Obj, args: &Obj) -> Result<Obj> {
        let Obj::Global(module, name) = f else { return Err(self.err("REDUCE of something that is not a global")) };
        let Obj::Tuple(a) = args else { return Err(self.err("REDUCE arguments that are not a tuple")) };
        Ok(match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => Obj::Dict(Default::default()),
            ("torch._utils", "_rebuild_tensor_v2") => {
                let (Some(storage), Some(offset), Some(size), Some(stride)) = (a.first(), a.get(1), a.get(2), a.get(3))
                else {
                    return Err(self.err("_rebuild_tensor_v2 with too few arguments"));
                };
                let Obj::Storage { key, dtype, numel } = &**storage else {
                    return Err(self.err("_rebuild_tensor_v2 of something that is not a storage"));
                };
                let Obj::Int(offset) = **offset else { return Err(self.err("a tensor offset that is not an integer")) };
                let shape = self.ints(size)?;
                let stride = self.ints(stride)?;
                if shape.len() != stride.len() || offset < 0 {
                    return Err(self.err("a tensor whose size and stride do not match"));
                }
                // The furthest element it reads must be inside its storage.
                let last = shape.iter().zip(&stride).try_fold(offset as usize, |acc, (&d, &s)| {
                    if d == 0 {
                        Some(acc)
                    } else {
                        (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
                    }
                });
                let empty = shape.contains(&0);
                if !empty && last.is_none_or(|l| l >= *numel) {
                    return Err(self.err(format!("a tensor {shape:?} that reads past its storage of {numel} elements")));
                }
                self.tensors += 1;
                if self.tensors > MAX_TENSORS {
                    return Err(self.err("too many tensors"));
                }
                Obj::Tensor(TensorRef { storage: key.clone(), dtype: *dtype, offset: offset as usize, shape, stride })
            }
            ("torch._utils", "_rebuild_parameter") => match a.first().map(|t| &**t) {
                Some(Obj::Tensor(t)) => Obj::Tensor(t.clone()),
                _ => return Err(self.err("_rebuild_parameter of something that is not a tensor")),
            },
            ("torch", "Size") => match a.first().map(|t| &**t) {
                Some(Obj::Tuple(t)) => Obj::Tuple(t.clone()),
                _ => Obj::Opaque,
            },
            _ => Obj::Opaque,
        })
    }
}

/// A `.ckpt` file's tensors, read from its memory-mapped zip entries.
pub struct Ckpt {
    map: std::sync::Arc<Mmap>,
    tensors: HashMap<String, TensorRef>,
    /// Storage key → (byte offset in the file, byte length).
    storages: HashMap<String, (usize, usize)>,
    path: PathBuf,
}

impl Ckpt {
    /// Opens and reads the state dict of a `torch.save` zip file.
    ///
    /// # Safety
    /// As for any mmap: the file must not be truncated or rewritten while this lives.
    pub unsafe fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Weights { path: path.to_path_buf(), msg };
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: forwarded to the caller.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if !map.starts_with(b"PK\x03\x04") {
            return Err(bad(
                "not a zip-format PyTorch checkpoint (files saved by torch older than 1.6 are not read; convert it to safetensors)"
                    .into(),
            ));
        }
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&map[..]))
            .map_err(|e| bad(format!("not a readable PyTorch checkpoint (zip: {e})")))?;
        let names: Vec<String> = zip.file_names_raw().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
        let pkl = names
            .iter()
            .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
            .cloned()
            .ok_or_else(|| bad("no data.pkl inside (not a torch.save checkpoint)".into()))?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let mut storages = HashMap::new();
        let mut pickle = None;
        for i in 0..zip.len() {
            let f = zip.by_index_raw(i).map_err(|e| bad(format!("zip entry {i}: {e}")))?;
            let name = String::from_utf8_lossy(f.name_raw()).into_owned();
            let start = f.data_start().unwrap_or(0) as usize;
            let size = f.size() as usize;
            let stored = f.compression() == zip::CompressionMethod::Stored;
            if start.checked_add(size).is_none_or(|end| end > map.len()) {
                return Err(bad(format!("zip entry '{name}' reaches past the end of the file (truncated?)")));
            }
            if name == pkl {
                if !stored {
                    return Err(bad("its data.pkl is compressed; torch writes it stored".into()));
                }
                pickle = Some((start, size));
            } else if let Some(key) = name.strip_prefix(&format!("{prefix}data/")) {
                if stored {
                    storages.insert(key.to_string(), (start, size));
                }
            }
        }
        let (ps, pl) = pickle.ok_or_else(|| bad("its data.pkl is listed but cannot be found".into()))?;
        let root =
            Unpickler { data: &map[ps..ps + pl], pos: 0, stack: Vec::new(), memo: HashMap::new(), tensors: 0, path }
                .run()?;
        // `{"state_dict": {...}, "global_step": ...}` (Lightning) or the state dict itself.
        let dict = match &*root {
            Obj::Dict(d) => d
                .borrow()
                .iter()
                .find(|(k, _)| matches!(&**k, Obj::Str(s) if s == "state_dict"))
                .map(|(_, v)| v.clone())
                .unwrap_or(root.clone()),
            _ => return Err(bad("its pickle is not a dict (not a state dict)".into())),
        };
        let Obj::Dict(entries) = &*dict else { return Err(bad("its 'state_dict' is not a dict".into())) };
        let mut tensors = HashMap::new();
        for (k, v) in entries.borrow().iter() {
            if let (Obj::Str(name), Obj::Tensor(t)) = (&**k, &**v) {
                let (_, bytes) = storages.get(&t.storage).ok_or_else(|| {
                    bad(format!(
                        "tensor '{name}' refers to storage '{}', which the archive lacks or compresses",
                        t.storage
                    ))
                })?;
                let needed =
                    t.shape.iter().zip(&t.stride).map(|(&d, &s)| if d == 0 { 0 } else { (d - 1) * s }).sum::<usize>()
                        + t.offset
                        + 1;
                if !t.shape.contains(&0) && needed * t.dtype.size_in_bytes() > *bytes {
                    return Err(bad(format!("tensor '{name}' reads past its storage (truncated or lying file)")));
                }
                tensors.insert(name.clone(), t.clone());
            }
        }
        if tensors.is_empty() {
            return Err(bad("no tensors in its state dict".into()));
        }
        Ok(Self { map: std::sync::Arc::new(map), tensors, storages, path: path.to_path_buf() })
    }
}

impl TensorSource for Ckpt {
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape.clone())
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn load_as(&self, name: &str, dtype: Option<DType>, device: &Device) -> candle_core::Result<Tensor> {
        let dtype = dtype.unwrap_or(self.tensors.get(name).map(|t| t.dtype).unwrap_or(DType::F32));
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        let (start, len) = self.storages[&t.storage];
        let bytes = &self.map[start..start + len];
        let es = t.dtype.size_in_bytes();
        let contiguous = t.contiguous();
        let count: usize = t.shape.iter().product();
        // Each tensor's pages go back to the page cache once copied out, as in `weights::Weights`:
        // otherwise the whole archive stays resident beside the loaded weights (+2.1 GB peak for
        // an SD1.5 checkpoint, measured by benches/first_download.sh).
        // SAFETY: the map is private and read-only; a later read of a released page (one shared
        // with the next tensor) faults it back in.
        let release = |from: usize, len: usize| {
            let _ = unsafe { self.map.unchecked_advise_range(UncheckedAdvice::DontNeed, start + from, len) };
        };
        if contiguous {
            let from = t.offset * es;
            let out = tensor_from_bytes(&bytes[from..from + count * es], t.dtype, &t.shape, dtype, device);
            release(from, count * es);
            return out;
        }
        // A strided view (a transposed weight saved as is): gather its elements in order.
        let mut out = Vec::with_capacity(count * es);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..count {
            let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&bytes[at * es..(at + 1) * es]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        release(0, len);
        tensor_from_bytes(&out, t.dtype, &t.shape, dtype, device)
    }
    fn view(&self, name: &str, dtype: DType) -> Option<super::weights::View> {
        let t = self.tensors.get(name)?;
        if t.dtype != dtype || !t.contiguous() {
            return None;
        }
        let (start, _) = self.storages.get(&t.storage)?;
        // In bounds: `open` checked that every tensor's elements lie inside its storage.
        let from = start + t.offset * t.dtype.size_in_bytes();
        let len = t.shape.iter().product::<usize>() * t.dtype.size_in_bytes();
        super::weights::View::new(&self.map, (from, from + len), dtype, &t.shape)
    }
}

impl std::fmt::Debug for Ckpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ckpt({}, {} tensors)", self.path.display(), self.tensors.len())
    }
}
