//! Everything that depends on the compute device lives here: which device a run gets (`--device`),
//! why it fell back to the CPU, what the device is (name, memory), and whether the CPU kernels or
//! candle's generic operations run. The models themselves are device-agnostic: on CUDA and Metal
//! they run candle's generic ops, on the CPU our kernels where they are faster
//! (`models::kernels`); `GHIBLIFY_GENERIC_OPS=1` makes the CPU take the generic path too, so the
//! code a GPU runs is tested against diffusers on every CI run.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// `--device`: where to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePreference {
    /// CUDA or Metal when this build has it and a device answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

/// The device a run got, and, for `auto` on the CPU, why no GPU was taken.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub device: Device,
    pub fallback: Option<String>,
}

/// How to get a GPU backend into a build that lacks it.
fn rebuild_hint(feature: &str) -> String {
    match feature {
        "cuda" => "this build has no CUDA support; build it with scripts/build-cuda (or cargo build --release \
                   --features cuda)"
            .into(),
        _ => format!("this build has no {feature} support; build it with cargo build --release --features {feature}"),
    }
}

/// Opens CUDA device 0. The CUDA libraries (driver, cuBLAS, cuRAND) are opened here for the first
/// time when the binary was built by scripts/build-cuda (dynamic loading): a missing one is a
/// panic inside cudarc, turned into an error that names it.
#[cfg(feature = "cuda")]
fn open_cuda() -> std::result::Result<Device, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| Device::new_cuda(0));
    std::panic::set_hook(hook);
    match r {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(crate::error::candle_message(&e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the CUDA libraries could not be loaded".into());
            // cudarc: 'Unable to dynamically load the "cublas" shared library - searched for ...'.
            let lib = msg.split('"').nth(1).map(|l| format!("lib{l}"));
            Err(match lib {
                Some(lib) if msg.contains("Unable to dynamically load") => format!(
                    "{lib} was not found (the NVIDIA driver provides libcuda; cuBLAS and cuRAND come with the CUDA \
                     toolkit or the nvidia-cublas / nvidia-curand wheels: put their lib folders on LD_LIBRARY_PATH)"
                ),
                _ => msg.lines().next().unwrap_or_default().to_string(),
            })
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> std::result::Result<Device, String> {
    Err(rebuild_hint("cuda"))
}

#[cfg(feature = "metal")]
fn open_metal() -> std::result::Result<Device, String> {
    Device::new_metal(0).map_err(|e| crate::error::candle_message(&e))
}

#[cfg(not(feature = "metal"))]
fn open_metal() -> std::result::Result<Device, String> {
    Err(rebuild_hint("metal"))
}

impl DevicePreference {
    /// The device: `cpu`, `cuda` and `metal` as asked (an unavailable GPU is an error saying how
    /// to build for it or what is missing); `auto` takes CUDA, then Metal, when compiled in and
    /// answering, else the CPU with the reason.
    pub fn resolve(self) -> Result<Chosen> {
        let fail = |name: &'static str, why: String| Error::setting("device", format!("{name}: {why}"));
        match self {
            DevicePreference::Cpu => Ok(Chosen { device: Device::Cpu, fallback: None }),
            DevicePreference::Cuda => {
                open_cuda().map(|device| Chosen { device, fallback: None }).map_err(|why| fail("cuda", why))
            }
            DevicePreference::Metal => {
                open_metal().map(|device| Chosen { device, fallback: None }).map_err(|why| fail("metal", why))
            }
            DevicePreference::Auto => {
                let mut why = Vec::new();
                if cfg!(feature = "cuda") {
                    match open_cuda() {
                        Ok(device) => return Ok(Chosen { device, fallback: None }),
                        Err(e) => why.push(format!("CUDA: {e}")),
                    }
                }
                if cfg!(feature = "metal") {
                    match open_metal() {
                        Ok(device) => return Ok(Chosen { device, fallback: None }),
                        Err(e) => why.push(format!("Metal: {e}")),
                    }
                }
                if why.is_empty() {
                    why.push("this build has no GPU support (scripts/build-cuda, or --features metal)".into());
                }
                Ok(Chosen { device: Device::Cpu, fallback: Some(why.join("; ")) })
            }
        }
    }
}

/// The weights' dtype: f32 by default on the CPU, f16 on GPUs. On the CPU f16/bf16 is a storage
/// format (half the memory) and activations stay f32 (see `models::compute_dtype`); bf16 weights
/// are multiplied in bf16 where the CPU can (`models::kernels::bf16_arithmetic`).
pub fn default_dtype(device: &Device, asked: Option<DType>) -> DType {
    match (asked, device.is_cpu()) {
        (Some(d), _) => d,
        (None, true) => DType::F32,
        (None, false) => DType::F16,
    }
}

/// Whether the CPU runs candle's generic operations instead of our kernels (`GHIBLIFY_GENERIC_OPS=1`,
/// read once; tests switch it per thread with [`with_generic_ops`]).
pub fn generic_ops() -> bool {
    GENERIC_OVERRIDE.with(|o| o.get()).unwrap_or_else(|| {
        static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ENV.get_or_init(|| std::env::var("GHIBLIFY_GENERIC_OPS").is_ok_and(|v| !matches!(v.trim(), "" | "0")))
    })
}

thread_local! {
    static GENERIC_OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the generic operations on or off on this thread, whatever the environment says
/// (a model call with a switch set stays on the calling thread: see [`on_cpu_pool`]).
pub fn with_generic_ops<T>(on: bool, f: impl FnOnce() -> T) -> T {
    with_thread_switch(&GENERIC_OVERRIDE, Some(on), f)
}

/// Runs a model call `f` (a UNet, ControlNet, VAE or text-encoder pass) on one of the CPU pool's
/// threads, the calling thread waiting: rayon's global pool, whose threads our kernels and
/// candle's parallel operations use. Called from outside the pool, each of a pass's ~1000
/// parallel operations handed its jobs to the pool and slept until they were done, and each end
/// woke it again (3.5 thousand context switches a second); on a worker, the thread that starts an
/// operation takes part in its jobs and goes on to the next one at once (~430 a second).
/// UNet batch-1 bf16 call on 2 threads, alternating: medians 1.078-1.133 -> 1.028-1.077 s. Where
/// the call is already on a pool thread, the device is not the CPU (GPU queues are bound to
/// their thread), or a test switched a path on this thread ([`with_generic_ops`], the kernels'
/// test switches: thread-local, so they hold on the calling thread alone), `f` runs here.
pub fn on_cpu_pool<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() || thread_switched() {
        return f();
    }
    rayon::scope(|_| f())
}

/// Whether any of the thread-local switches that pick a CPU path is set on this thread.
fn thread_switched() -> bool {
    GENERIC_OVERRIDE.get().is_some() || crate::models::kernels::thread_switched()
}

/// Runs `f` with the thread-local `switch` set to `value`, and puts the value before back after
/// it, also when `f` panics: the scoped switches of the kernels, the loads and the tests.
pub(crate) fn with_thread_switch<V: Copy + 'static, T>(
    switch: &'static std::thread::LocalKey<std::cell::Cell<V>>,
    value: V,
    f: impl FnOnce() -> T,
) -> T {
    struct Restore<V: Copy + 'static>(&'static std::thread::LocalKey<std::cell::Cell<V>>, V);
    impl<V: Copy + 'static> Drop for Restore<V> {
        fn drop(&mut self) {
            self.0.set(self.1);
        }
    }
    let _restore = Restore(switch, switch.replace(value));
    f()
}

/// What the pictures' parameters say about the arithmetic when it is not f32: `bf16` (bf16
/// products on the CPU, or bf16 on a GPU), `f16`, or `f16 weights` / `bf16 weights` where the CPU
/// widens half-precision weights to f32; with `--dtype q8` (`quantize`), `q8 weights` and then the
/// arithmetic (`, bf16 products` on a CPU with AVX512_BF16, `, f16` on a GPU, nothing for f32).
pub fn precision(device: &Device, dtype: DType, quantize: bool) -> Option<String> {
    let bf16_products = device.is_cpu() && crate::models::kernels::bf16_arithmetic();
    if quantize {
        return Some(match (device.is_cpu(), dtype) {
            (true, _) if bf16_products => "q8 weights, bf16 products".to_string(),
            (true, _) | (false, DType::F32) => "q8 weights".to_string(),
            (false, d) => format!("q8 weights, {}", d.as_str()),
        });
    }
    let name = match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => return None,
    };
    if device.is_cpu() && !(dtype == DType::BF16 && bf16_products) {
        Some(format!("{name} weights"))
    } else {
        Some(name.to_string())
    }
}

/// One line for `-v`: the device, its name and memory, the dtype, and which operations run.
pub fn describe(device: &Device, dtype: DType, quantize: bool) -> String {
    let bf16_products = crate::models::kernels::bf16_arithmetic();
    // Which unit multiplies bf16: AMX tiles where the CPU and OS have them, else AVX512_BF16.
    let amx = crate::models::gemm_bf16::amx();
    let unit = if amx { "AMX" } else { "AVX512_BF16" };
    let amx_convs = bf16_products && amx && (quantize || dtype == DType::BF16);
    let ops = if !device.is_cpu() {
        "candle's generic operations"
    } else if generic_ops() {
        "candle's generic operations (GHIBLIFY_GENERIC_OPS)"
    } else if quantize && bf16_products {
        &format!("ghiblify's CPU kernels, int8 weights in bf16 products ({unit})")
    } else if quantize {
        "ghiblify's CPU kernels, int8 weights in f32 products"
    } else if dtype == DType::BF16 && bf16_products {
        &format!("ghiblify's CPU kernels, bf16 products ({unit})")
    } else if dtype == DType::BF16 && crate::models::gemm_bf16::available() && !crate::models::gemm_bf16::pays() {
        "ghiblify's CPU kernels, bf16 weights in f32 products (this CPU's bf16 dot products run slower than its f32 FMAs)"
    } else if dtype == DType::BF16 || dtype == DType::F16 {
        "ghiblify's CPU kernels, half-precision weights in f32 products"
    } else {
        "ghiblify's CPU kernels"
    };
    let what = match device {
        Device::Cpu => {
            let threads = rayon::current_num_threads();
            format!("CPU ({threads} threads{})", cpu_features())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda_name(d),
        other => format!("{:?}", other.location()),
    };
    let dtype = if quantize { format!("q8 (rest {dtype:?})") } else { format!("{dtype:?}") };
    let winograd = if !device.is_cpu() || generic_ops() || !crate::models::kernels::winograd_enabled() {
        String::new()
    } else if amx_convs {
        use crate::models::kernels::{AMX_CONV_MIN_CIN, AMX_IMPLICIT_MIN_CIN, AMX_IMPLICIT_WIDE_MIN_PIXELS};
        let side = AMX_IMPLICIT_WIDE_MIN_PIXELS.isqrt();
        format!(
            ", 3×3 convolutions from {AMX_IMPLICIT_MIN_CIN} channels on AMX tiles (without a patch matrix below \
             {AMX_CONV_MIN_CIN} channels or from {side}² pixels), the smaller by Winograd F(4,3) in f32"
        )
    } else {
        ", large 3×3 convolutions by Winograd F(4,3) in f32".to_string()
    };
    format!("device {what}, dtype {dtype}, {ops}{winograd}")
}

fn cpu_features() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return ", AVX-512";
        }
        if is_x86_feature_detected!("avx2") {
            return ", AVX2";
        }
    }
    ""
}

#[cfg(feature = "cuda")]
fn cuda_name(d: &candle_core::CudaDevice) -> String {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = d.cuda_stream().context().clone();
    let ordinal = ctx.ordinal();
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let total = ctx.total_mem().map(|b| format!(", {:.1} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_default();
    let cc = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .and_then(|ma| {
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).map(|mi| (ma, mi))
        })
        .map(|(ma, mi)| format!(", sm_{ma}{mi}"))
        .unwrap_or_default();
    format!("CUDA:{ordinal} {name}{total}{cc}")
}

/// Whether an error message is a GPU out-of-memory (cudarc's `CUDA_ERROR_OUT_OF_MEMORY`, Metal's
/// allocation failures).
pub fn is_out_of_memory(msg: &str) -> bool {
    msg.contains("OUT_OF_MEMORY") || msg.contains("out of memory") || msg.contains("Failed to create metal resource")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model call from outside the pool runs on a pool thread; one from inside, or with a path
    /// switched on the calling thread (whose switches a pool thread would not see), runs where it
    /// was made; a panic in it reaches the caller.
    #[test]
    fn model_calls_move_to_the_pool_unless_a_switch_holds_them() {
        let cpu = Device::Cpu;
        let worker = || rayon::current_thread_index();
        assert!(rayon::current_thread_index().is_none(), "the test itself runs outside the pool");
        assert!(on_cpu_pool(&cpu, worker).is_some());
        assert!(with_generic_ops(true, || on_cpu_pool(&cpu, worker)).is_none());
        assert!(with_generic_ops(false, || on_cpu_pool(&cpu, worker)).is_none());
        assert!(crate::models::gemm_bf16::without_amx(|| on_cpu_pool(&cpu, worker)).is_none());
        // Inside the pool: the same thread.
        let (outer, inner) = rayon::scope(|_| (worker(), on_cpu_pool(&cpu, worker)));
        assert!(outer.is_some() && outer == inner);
        let caught = std::panic::catch_unwind(|| on_cpu_pool(&cpu, || panic!("inside the pass")));
        assert!(caught.is_err());
    }
}
