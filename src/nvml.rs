//! GPUs seen through NVML. `libnvidia-ml.so.1` is loaded at run time, so the binary runs
//! anywhere and reports "no driver" where there is none.

use anyhow::{Context as _, Result};
use vramplan_planner::{Bytes, GpuSpec, Presets, MIB};

/// A detected GPU with its memory as NVML reports it now.
#[derive(Debug, Clone)]
pub struct Detected {
    pub index: u32,
    pub spec: GpuSpec,
    pub used: Bytes,
    pub free: Bytes,
    /// The preset whose memory is closest, for throughput figures.
    pub preset: Option<String>,
}

/// Every GPU NVML can see.
pub fn detect(presets: &Presets) -> Result<Vec<Detected>> {
    let nvml = nvml_wrapper::Nvml::init().context("NVML is not available (no NVIDIA driver?)")?;
    let n = nvml.device_count().context("NVML device count")?;
    let mut out = Vec::new();
    for i in 0..n {
        let dev = nvml.device_by_index(i).context("NVML device")?;
        let name = dev.name().unwrap_or_else(|_| format!("GPU {i}"));
        let mem = dev.memory_info().context("NVML memory info")?;
        let nearest = presets
            .gpus()
            .min_by_key(|g| g.capacity.0.abs_diff(mem.total))
            .cloned();
        let spec = GpuSpec {
            name: format!("auto:{i}"),
            display: name,
            capacity: Bytes(mem.total),
            context: nearest
                .as_ref()
                .map(|g| g.context)
                .unwrap_or(Bytes(500 * MIB)),
            bf16_tflops: nearest.as_ref().map(|g| g.bf16_tflops).unwrap_or(100.0),
            bandwidth_gbs: nearest.as_ref().map(|g| g.bandwidth_gbs).unwrap_or(1000.0),
        };
        out.push(Detected {
            index: i,
            spec,
            used: Bytes(mem.used),
            free: Bytes(mem.free),
            preset: nearest.map(|g| g.name),
        });
    }
    Ok(out)
}
