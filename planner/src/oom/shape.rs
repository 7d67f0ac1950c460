//! Tensor shapes a log prints next to an out-of-memory error: inductor's generated code
//! (`buf706 = empty_strided_cuda((65536, 65536), (65536, 1), torch.bfloat16)`, symbolic
//! sizes such as `s10` included) and a printed `torch.Size([30688, 151936])`.

use serde::Serialize;

/// A shape as printed; `None` for a symbolic size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrintedShape {
    pub dims: Vec<Option<u64>>,
    /// `float32`, `bfloat16`, … when the line names one.
    pub dtype: Option<String>,
}

/// Vocabularies of today's models are 32,000 to 262,144 tokens; hidden sizes stay below.
pub const VOCAB_LIKE: u64 = 32_000;

impl PrintedShape {
    /// Bytes per element of the named dtype.
    pub fn width(&self) -> Option<u64> {
        Some(match self.dtype.as_deref()? {
            "float64" | "double" | "int64" | "long" => 8,
            "float32" | "float" | "int32" | "int" => 4,
            "bfloat16" | "float16" | "half" | "int16" => 2,
            "int8" | "uint8" | "bool" | "float8_e4m3fn" | "float8_e5m2" => 1,
            _ => return None,
        })
    }

    /// The tensor's bytes when every size and the dtype are known.
    pub fn bytes(&self) -> Option<u64> {
        self.dims
            .iter()
            .try_fold(self.width()?, |acc, d| acc.checked_mul((*d)?))
    }

    /// The last size is vocabulary-sized: a `(tokens, vocab)` tensor is logits.
    pub fn vocab_like(&self) -> bool {
        self.dims
            .last()
            .copied()
            .flatten()
            .is_some_and(|v| v >= VOCAB_LIKE)
    }

    /// `[65536, 65536] bfloat16`, `[s, 1, 76032] float32`.
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|d| d.map_or("s".to_string(), |n| n.to_string()))
            .collect();
        match &self.dtype {
            Some(t) => format!("[{}] {t}", dims.join(", ")),
            None => format!("[{}]", dims.join(", ")),
        }
    }
}

/// The shape a line prints, if it prints one.
pub fn find(line: &str) -> Option<PrintedShape> {
    for key in ["empty_strided_cuda((", "empty_strided((", "torch.Size(["] {
        if let Some(p) = line.find(key) {
            let rest = &line[p + key.len()..];
            let end = rest.find([')', ']'])?;
            let dims: Vec<Option<u64>> = rest[..end]
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .take(8)
                .map(|d| d.parse().ok())
                .collect();
            if dims.is_empty() {
                return None;
            }
            let dtype = line.find("torch.").and_then(|q| {
                let t = &line[q + "torch.".len()..];
                let n = t
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                    .count();
                let name = &t[..n];
                (name != "Size" && !name.is_empty()).then(|| name.to_string())
            });
            return Some(PrintedShape { dims, dtype });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inductor_buffers_and_sizes() {
        let s = find("    buf706 = empty_strided_cuda((65536, 65536), (65536, 1), torch.bfloat16)")
            .unwrap();
        assert_eq!(s.bytes(), Some(8 << 30));
        assert!(s.vocab_like());
        assert_eq!(s.describe(), "[65536, 65536] bfloat16");
        let s = find(
            "buf9 = empty_strided_cuda((s10, 1, 76032), (76032, 76032*s10, 1), torch.float32)",
        )
        .unwrap();
        assert_eq!(s.dims, vec![None, Some(1), Some(76032)]);
        assert_eq!(s.bytes(), None);
        let s = find("it's with the shape of `torch.Size([30688, 151936])`.").unwrap();
        assert_eq!((s.dtype, s.dims.len()), (None, 2));
        assert!(find("torch.Size([").is_none());
        assert!(find("torch.Size([])").is_none());
    }
}
