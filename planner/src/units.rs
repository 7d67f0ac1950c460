//! Byte counts with one formatter.
//!
//! Memory is counted in whole bytes (`u64`). Users read binary GiB with one decimal
//! (what `torch.cuda.max_memory_allocated() / 2**30` prints); GPU makers quote decimal GB,
//! so both are offered.

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
    fn arithmetic_saturates() {
        assert_eq!(Bytes::of(u64::MAX, 4), Bytes(u64::MAX));
        assert_eq!(Bytes(1) - Bytes(2), Bytes(0));
        assert_eq!(Bytes(1000).round_up(512), Bytes(1024));
    }
}
