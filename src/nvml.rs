//! GPUs seen through NVML. `libnvidia-ml.so.1` is loaded at run time, so the binary runs
//! anywhere and reports "no driver" where there is none.
//!
//! NVML's total is what `nvidia-smi` shows, more than PyTorch can allocate: the presets
//! hold the capacity PyTorch reports (`presets/gpus.toml`). A detected card that matches a
//! preset by name and size takes the preset's capacity; any other takes NVML's total less
//! [`RESERVE`].

use anyhow::{Context as _, Result};
use vramplan_planner::{Bytes, GpuSpec, Presets, MIB};

/// NVML's total less PyTorch's, as a fraction of NVML's, for a card without a preset: the
/// larger of the two cited pairs (RTX 4090: 24,564 MiB in nvidia-smi, 24,207 MiB in
/// PyTorch, 1.45 %; H100 80GB HBM3: 81,559 and 81,009 MiB, 0.67 %; sources in
/// `presets/gpus.toml`), so that a plan errs towards fitting less. Not measured.
pub const RESERVE: f64 = 0.015;

/// A detected GPU with its memory as NVML reports it now.
#[derive(Debug, Clone)]
pub struct Detected {
    pub index: u32,
    pub spec: GpuSpec,
    /// NVML's total (nvidia-smi's); the plan uses `spec.capacity`.
    pub total: Bytes,
    pub used: Bytes,
    pub free: Bytes,
    /// The preset whose memory is closest, for throughput figures.
    pub preset: Option<String>,
    /// Where the capacity came from, in words.
    pub capacity_source: String,
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
        out.push(detected(presets, i, &name, mem.total, mem.used, mem.free));
    }
    Ok(out)
}

/// One detected card from NVML's name and memory figures.
fn detected(
    presets: &Presets,
    index: u32,
    name: &str,
    total: u64,
    used: u64,
    free: u64,
) -> Detected {
    let named = matching_preset(presets, name, total);
    let nearest = named.clone().or_else(|| {
        presets
            .gpus()
            .min_by_key(|g| g.capacity.0.abs_diff(total))
            .cloned()
    });
    let (capacity, capacity_source) = match &named {
        Some(g) => (
            g.capacity,
            format!("preset {} (PyTorch's capacity for this card)", g.name),
        ),
        None => (
            Bytes((total as f64 * (1.0 - RESERVE)) as u64),
            format!(
                "NVML's total less {:.1} % (no preset matches \"{name}\")",
                RESERVE * 100.0
            ),
        ),
    };
    let spec = GpuSpec {
        name: format!("auto:{index}"),
        display: name.to_string(),
        capacity,
        context: nearest
            .as_ref()
            .map(|g| g.context)
            .unwrap_or(Bytes(500 * MIB)),
        bf16_tflops: nearest.as_ref().map(|g| g.bf16_tflops).unwrap_or(100.0),
        bandwidth_gbs: nearest.as_ref().map(|g| g.bandwidth_gbs).unwrap_or(1000.0),
    };
    Detected {
        index,
        spec,
        total: Bytes(total),
        used: Bytes(used),
        free: Bytes(free),
        preset: nearest.map(|g| g.name),
        capacity_source,
    }
}

/// Words that tell cards of one model number apart.
const QUALIFIERS: &[&str] = &["laptop", "ti", "super", "ada", "pro"];

fn words(s: &str) -> Vec<String> {
    s.to_ascii_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The preset of this card: its model number (the display's first word with a digit that
/// is not a size, e.g. `4090`, `a6000`, `h100`) is a word of NVML's name, the two name the
/// same qualifiers (Laptop, Ti, SUPER, Ada, PRO), and its capacity lies within 10 % below
/// NVML's total (so the 40 and 80 GB A100 are told apart). The closest in size wins.
pub fn matching_preset(presets: &Presets, nvml_name: &str, total: u64) -> Option<GpuSpec> {
    let have = words(nvml_name);
    let quals = |w: &[String]| -> Vec<&str> {
        QUALIFIERS
            .iter()
            .copied()
            .filter(|q| w.iter().any(|x| x == q))
            .collect()
    };
    presets
        .gpus()
        .filter(|g| {
            let want = words(&g.display);
            let model = want
                .iter()
                .enumerate()
                .find(|(i, w)| {
                    w.chars().any(|c| c.is_ascii_digit())
                        && want.get(i + 1).map(String::as_str) != Some("gb")
                })
                .map(|(_, w)| w.clone());
            model.is_some_and(|m| have.contains(&m)) && quals(&want) == quals(&have)
        })
        .filter(|g| g.capacity.0 <= total && g.capacity.0 as f64 >= 0.9 * total as f64)
        .min_by_key(|g| total - g.capacity.0)
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn preset_for(name: &str, total_mib: u64) -> Option<String> {
        let p = Presets::builtin().unwrap();
        matching_preset(&p, name, total_mib * MIB).map(|g| g.name)
    }

    /// NVML's names as the driver reports them, with nvidia-smi's totals.
    #[test]
    fn nvml_names_find_their_presets() {
        let cases = [
            ("NVIDIA GeForce RTX 4090", 24564, Some("rtx4090-24gb")),
            (
                "NVIDIA GeForce RTX 4060 Laptop GPU",
                8188,
                Some("rtx4060-laptop-8gb"),
            ),
            ("NVIDIA GeForce RTX 4060 Ti", 16380, Some("rtx4060ti-16gb")),
            (
                "NVIDIA GeForce RTX 4070 Ti SUPER",
                16376,
                Some("rtx4070tisuper-16gb"),
            ),
            ("NVIDIA GeForce RTX 4080", 16376, Some("rtx4080-16gb")),
            ("NVIDIA GeForce RTX 3090", 24576, Some("rtx3090-24gb")),
            ("NVIDIA H100 80GB HBM3", 81559, Some("h100-80gb")),
            ("NVIDIA A100-SXM4-80GB", 81920, Some("a100-80gb")),
            ("NVIDIA A100-SXM4-40GB", 40960, Some("a100-40gb")),
            ("NVIDIA RTX A6000", 49140, Some("rtx-a6000-48gb")),
            (
                "NVIDIA RTX 6000 Ada Generation",
                49140,
                Some("rtx6000ada-48gb"),
            ),
            ("Tesla T4", 15360, Some("t4-16gb")),
            ("NVIDIA L4", 23034, Some("l4-24gb")),
            // A card without a preset, and one whose size no preset of its name has.
            ("NVIDIA GeForce RTX 4070", 12282, None),
            ("NVIDIA H100 NVL", 95830, None),
        ];
        for (name, total, want) in cases {
            assert_eq!(preset_for(name, total).as_deref(), want, "{name}");
        }
    }

    #[test]
    fn a_matched_card_takes_the_presets_capacity_and_another_nvmls_less_the_reserve() {
        let p = Presets::builtin().unwrap();
        let d = detected(
            &p,
            0,
            "NVIDIA GeForce RTX 4090",
            24564 * MIB,
            0,
            24564 * MIB,
        );
        assert_eq!(d.spec.capacity, Bytes(24207 * MIB));
        assert_eq!(
            d.capacity_source,
            "preset rtx4090-24gb (PyTorch's capacity for this card)"
        );
        let d = detected(
            &p,
            1,
            "NVIDIA GeForce RTX 4070",
            12282 * MIB,
            0,
            12282 * MIB,
        );
        assert_eq!(
            d.spec.capacity,
            Bytes((12282.0 * MIB as f64 * 0.985) as u64)
        );
        assert_eq!(
            d.capacity_source,
            "NVML's total less 1.5 % (no preset matches \"NVIDIA GeForce RTX 4070\")"
        );
        assert_eq!(d.spec.name, "auto:1");
    }
}
