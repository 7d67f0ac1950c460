//! Where the engine runs, and how it measures its memory there.
//!
//! - CPU: candle's tensors are `Vec`s on the process heap; the counting allocator
//!   ([`super::alloc`]) gives live bytes and their exact high-water mark.
//! - CUDA (built with the `cuda` feature): candle has no caching allocator; every tensor is
//!   a `cuMemAllocAsync` from the device's default memory pool, whose attributes
//!   `CU_MEMPOOL_ATTR_USED_MEM_CURRENT` and `CU_MEMPOOL_ATTR_USED_MEM_HIGH` are the live
//!   bytes and their high-water mark (resettable), read after synchronizing the stream.

use anyhow::{bail, Result};
use candle_core::Device;

/// `--device`: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl Choice {
    /// Parses `--device`; `None` when the text is none of the accepted forms.
    pub fn parse(s: &str) -> Option<Choice> {
        match s {
            "auto" => Some(Choice::Auto),
            "cpu" => Some(Choice::Cpu),
            "cuda" => Some(Choice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Choice::Cuda),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Why a CUDA device cannot be opened by a binary built without the feature.
pub const NO_CUDA: &str = "this vramplan was built without CUDA: build it with `cargo build --release --features cuda` (see the README), or train with --device cpu";

impl Choice {
    /// `Auto` becomes CUDA 0 when the plan names a GPU and this binary has CUDA, else the
    /// CPU; the others stay.
    pub fn resolve(self, plan_on_gpu: bool) -> Choice {
        match self {
            Choice::Auto if plan_on_gpu && CUDA_BUILT => Choice::Cuda(0),
            Choice::Auto => Choice::Cpu,
            c => c,
        }
    }
}

/// Opens the device (`Auto` as the CPU: resolve it first).
pub fn open(choice: Choice) -> Result<Device> {
    let ordinal = match choice {
        Choice::Cpu | Choice::Auto => return Ok(Device::Cpu),
        Choice::Cuda(n) => n,
    };
    if !CUDA_BUILT {
        bail!(NO_CUDA);
    }
    Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("cannot open CUDA device {ordinal}: {e}"))
}

/// Live bytes and their high-water mark on the engine's device.
pub enum Meter {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(cuda::Pool),
}

impl Meter {
    pub fn new(device: &Device) -> Result<Meter> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Ok(Meter::Cuda(cuda::Pool::new(d)?)),
            Device::Cpu => Ok(Meter::Cpu),
            _ => bail!("the engine measures its memory on the CPU and on CUDA only"),
        }
    }

    /// Live bytes now.
    pub fn current(&self) -> Result<u64> {
        match self {
            Meter::Cpu => Ok(super::alloc::current()),
            #[cfg(feature = "cuda")]
            Meter::Cuda(p) => p.get(cuda::USED_CURRENT),
        }
    }

    /// The most live bytes since the last [`Meter::reset_peak`].
    pub fn peak(&self) -> Result<u64> {
        match self {
            Meter::Cpu => Ok(super::alloc::peak()),
            #[cfg(feature = "cuda")]
            Meter::Cuda(p) => p.get(cuda::USED_HIGH),
        }
    }

    /// Live bytes of tensors alone now: on the CPU without gemm's packing scratch (which a
    /// GPU's matmul does not allocate); on CUDA the pool holds tensors only.
    pub fn tensors_current(&self) -> Result<u64> {
        match self {
            Meter::Cpu => Ok(super::alloc::tensors_current()),
            #[cfg(feature = "cuda")]
            Meter::Cuda(p) => p.get(cuda::USED_CURRENT),
        }
    }

    /// The most live bytes of tensors since the last [`Meter::reset_peak`].
    pub fn tensors_peak(&self) -> Result<u64> {
        match self {
            Meter::Cpu => Ok(super::alloc::tensors_peak()),
            #[cfg(feature = "cuda")]
            Meter::Cuda(p) => p.get(cuda::USED_HIGH),
        }
    }

    /// Starts a new high-water mark at the current level.
    pub fn reset_peak(&self) -> Result<()> {
        match self {
            Meter::Cpu => {
                super::alloc::reset_peak();
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Meter::Cuda(p) => p.reset_high(),
        }
    }

    /// What the numbers count, for the summary.
    pub fn what(&self) -> &'static str {
        match self {
            Meter::Cpu => "heap bytes (counting allocator)",
            #[cfg(feature = "cuda")]
            Meter::Cuda(_) => "CUDA default memory pool, used bytes",
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;
    use std::sync::Arc;

    pub const USED_CURRENT: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;
    pub const USED_HIGH: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;

    /// The default memory pool of candle's device, and the stream to synchronize.
    pub struct Pool {
        pool: sys::CUmemoryPool,
        stream: Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    }

    fn check(r: sys::CUresult, what: &str) -> Result<()> {
        if r != sys::CUresult::CUDA_SUCCESS {
            bail!("{what}: {r:?}");
        }
        Ok(())
    }

    impl Pool {
        pub fn new(d: &CudaDevice) -> Result<Pool> {
            let stream = d.cuda_stream();
            let ctx = stream.context();
            if !ctx.has_async_alloc() {
                bail!("this CUDA device has no stream-ordered allocator (cuMemAllocAsync): the engine cannot measure its memory pool");
            }
            ctx.bind_to_thread()?;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: `pool` is a valid out-pointer and the device handle is the context's.
            check(
                unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) },
                "cuDeviceGetDefaultMemPool",
            )?;
            Ok(Pool { pool, stream })
        }

        /// A pool attribute (bytes), after the stream's work is done.
        pub fn get(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
            self.stream.synchronize()?;
            let mut v: u64 = 0;
            // SAFETY: the USED_MEM attributes are `cuuint64_t`; `v` outlives the call.
            check(
                unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, (&mut v as *mut u64).cast()) },
                "cuMemPoolGetAttribute",
            )?;
            Ok(v)
        }

        /// Resets the used-memory high-water mark (the driver accepts only 0: it restarts
        /// at the current use).
        pub fn reset_high(&self) -> Result<()> {
            self.stream.synchronize()?;
            let mut zero: u64 = 0;
            // SAFETY: as in `get`; setting USED_MEM_HIGH to 0 is the documented reset.
            check(
                unsafe {
                    sys::cuMemPoolSetAttribute(self.pool, USED_HIGH, (&mut zero as *mut u64).cast())
                },
                "cuMemPoolSetAttribute",
            )
        }
    }
}
