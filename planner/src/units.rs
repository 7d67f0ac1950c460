//! Byte counts with one formatter, and the element types tensors are made of.
//!
//! Memory is counted in whole bytes (`u64`). Users read binary GiB with one decimal
//! (what `torch.cuda.max_memory_allocated() / 2**30` prints); GPU makers quote decimal GB,
//! so both are offered. A tensor's bytes are its element count times [`DType::bytes`].

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::{Add, AddAssign, Sub};

/// A number of bytes.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Bytes(pub u64);

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

impl Bytes {
    pub const ZERO: Bytes = Bytes(0);

    pub fn gib(self) -> f64 {
        self.0 as f64 / GIB as f64
    }

    pub fn gb(self) -> f64 {
        self.0 as f64 / 1e9
    }

    /// Saturating product of element count and element size: the planner never overflows.
    pub fn of(elements: u64, bytes_per_element: u64) -> Bytes {
        Bytes(elements.saturating_mul(bytes_per_element))
    }

    pub fn saturating_mul(self, k: u64) -> Bytes {
        Bytes(self.0.saturating_mul(k))
    }

    pub fn saturating_sub(self, other: Bytes) -> Bytes {
        Bytes(self.0.saturating_sub(other.0))
    }

    /// Rounds up to a multiple of `unit` (unit > 0).
    pub fn round_up(self, unit: u64) -> Bytes {
        let unit = unit.max(1);
        Bytes(self.0.div_ceil(unit).saturating_mul(unit))
    }
}

/// An element type, named as PyTorch prints it without the `torch.` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
    F16,
    I64,
    U32,
    /// Also raw byte buffers: a workspace that holds several tensors of mixed types is a
    /// flat `u8` buffer, as PyTorch allocates its own workspaces.
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::U32 => "u32",
            DType::U8 => "u8",
        }
    }

    /// Saturating bytes of a tensor of `shape` (row-major product, then the width).
    pub fn size(self, shape: &[u64]) -> Bytes {
        Bytes::of(
            shape.iter().fold(1, |a, d| a.saturating_mul(*d)),
            self.bytes(),
        )
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A whole number with thousands separators: 65536 → "65,536".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Bytes {
    /// GiB with one decimal for anything of a GiB or more; MiB below; bytes below a KiB.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= GIB {
            write!(f, "{:.1} GiB", self.gib())
        } else if b >= MIB {
            write!(f, "{:.1} MiB", b as f64 / MIB as f64)
        } else if b >= KIB {
            write!(f, "{:.1} KiB", b as f64 / KIB as f64)
        } else {
            write!(f, "{b} B")
        }
    }
}

impl Add for Bytes {
    type Output = Bytes;
    fn add(self, rhs: Bytes) -> Bytes {
        Bytes(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Bytes {
    fn add_assign(&mut self, rhs: Bytes) {
        self.0 = self.0.saturating_add(rhs.0);
    }
}

impl Sub for Bytes {
    type Output = Bytes;
    fn sub(self, rhs: Bytes) -> Bytes {
        self.saturating_sub(rhs)
    }
}

impl std::iter::Sum for Bytes {
    fn sum<I: Iterator<Item = Bytes>>(iter: I) -> Bytes {
        iter.fold(Bytes::ZERO, |a, b| a + b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_binary_units_with_one_decimal() {
        // nanochat's fp32 logits at 20 x 3072 tokens, vocab 65,536 (seed 000): 15.0 GiB.
        assert_eq!(Bytes(20 * 3072 * 65536 * 4).to_string(), "15.0 GiB");
        assert_eq!(Bytes(3 * MIB / 2).to_string(), "1.5 MiB");
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(thousands(65_536), "65,536");
        assert_eq!(thousands(999), "999");
    }

    #[test]
    fn dtypes_have_torch_widths_and_names() {
        // torch.finfo/iinfo bits / 8: float32 4, bfloat16 2, float16 2, int64 8, uint8 1.
        let widths: Vec<(String, u64)> =
            [DType::F32, DType::Bf16, DType::F16, DType::I64, DType::U8]
                .iter()
                .map(|d| (d.to_string(), d.bytes()))
                .collect();
        let expected = [("f32", 4), ("bf16", 2), ("f16", 2), ("i64", 8), ("u8", 1)];
        assert_eq!(widths, expected.map(|(n, b)| (n.to_string(), b)));
        // nanochat's fp32 logits, seed 000: [20, 3072, 65536] f32 = 15.0 GiB.
        assert_eq!(DType::F32.size(&[20, 3072, 65536]).to_string(), "15.0 GiB");
        assert_eq!(DType::F32.size(&[u64::MAX, 2]), Bytes(u64::MAX));
        assert_eq!(DType::I64.size(&[]), Bytes(8));
    }

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Bytes::of(u64::MAX, 4), Bytes(u64::MAX));
        assert_eq!(Bytes(1) - Bytes(2), Bytes(0));
        assert_eq!(Bytes(1000).round_up(512), Bytes(1024));
    }
}
