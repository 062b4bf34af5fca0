use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// A safetensors file's tensors and its string metadata.
pub fn load_safetensors(path: &Path) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    (tensors, meta)
}

/// max |a - b| / max |b|: the relative error the parity tolerances (tests/parity.rs) are stated in.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    diff / scale.max(1e-12)
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max)
}

/// A temporary working folder holding the test photo as `photo.png`.
pub struct Case {
    pub dir: tempfile::TempDir,
}

impl Case {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixtures().join("photo-64x48.png"), dir.path().join("photo.png")).unwrap();
        Self { dir }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The folder every binary run of the suite uses as `XDG_CONFIG_HOME` (the per-user C2PA signing
/// key is made there, never in the real user's config); one per test process, shared by tests
/// running at once (which also exercises the first-use race between processes).
pub fn test_config_home() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// The binary under test, with its config folder kept inside the test's temporary space.
pub fn ghiblify_cmd() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ghiblify"));
    c.env("XDG_CONFIG_HOME", test_config_home());
    // bf16 products wherever the CPU has the instructions, paying there or not (a run times that
    // once): the bf16 kernels are tested on every such CPU and the pictures' labels are known.
    if ghiblify::models::gemm_bf16::available() {
        c.env("GHIBLIFY_BF16_ARITHMETIC", "1");
    }
    c
}
