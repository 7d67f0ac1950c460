//! What the engine can run where: a plan's precision on the device it trains on.
//!
//! - CPU: f32, or f16 compute over f32 master weights. Candle's CPU matmul has no bf16,
//!   so `bf16-autocast` and pure `bf16` run as fp32.
//! - CUDA: f32, bf16 or f16 compute over f32 master weights; pure `bf16` (no f32
//!   masters) runs as `bf16-autocast`. The built-in plan runs in bf16 there.
//! - fp16 runs without loss scaling, which the engine does not have.
//! - CUDA needs a binary built with the `cuda` feature.

use crate::engine::device::NO_CUDA;
use crate::Error;
use candle_core::DType;
use vramplan_planner::Precision;

/// Where and what the engine is asked to train.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The engine trains on a CUDA device (after `--device` is resolved).
    pub on_gpu: bool,
    /// The GPU the plan names, if any.
    pub plan_gpu: Option<&'a str>,
    pub precision: Precision,
    /// The plan is the built-in one, which picks its precision per device.
    pub builtin: bool,
    /// This binary was built with the `cuda` feature.
    pub cuda_built: bool,
}

/// What the engine will run, and what the user should be told about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Runs {
    pub precision: Precision,
    /// The forward's dtype (the weights stay f32).
    pub compute: DType,
    /// One sentence each, without the plan's name.
    pub notes: Vec<String>,
}

/// The compute dtype of a precision the engine runs.
pub fn compute(p: Precision) -> DType {
    match p {
        Precision::Bf16Autocast => DType::BF16,
        Precision::Fp16Autocast => DType::F16,
        Precision::Fp32 | Precision::Bf16 | Precision::Bf16Mixed => DType::F32,
    }
}

/// Decides the precision and compute dtype of `ask`, or refuses it (CUDA without the
/// feature).
pub fn resolve(ask: Ask) -> Result<Runs, Error> {
    if ask.on_gpu && !ask.cuda_built {
        return Err(Error::bad("--device", NO_CUDA));
    }
    let runs = match ask.precision {
        Precision::Fp32 | Precision::Fp16Autocast => true,
        Precision::Bf16Autocast => ask.on_gpu,
        Precision::Bf16 | Precision::Bf16Mixed => false,
    };
    let default = if ask.on_gpu {
        Precision::Bf16Autocast
    } else {
        Precision::Fp32
    };
    let mut notes = Vec::new();
    let precision = if ask.on_gpu && ask.builtin {
        default
    } else if !runs {
        notes.push(format!(
            "precision = \"{}\"; the candle engine trains in {}, so this run is {default}",
            ask.precision,
            if ask.on_gpu {
                "fp32, bf16-autocast or fp16-autocast (f32 master weights)"
            } else {
                "fp32 or fp16-autocast on the CPU (candle's CPU matmul has no bf16)"
            }
        ));
        default
    } else {
        if ask.precision == Precision::Fp16Autocast {
            notes.push(
                "fp16-autocast without loss scaling: gradients under 6e-8 flush to zero".into(),
            );
        }
        ask.precision
    };
    if let (false, Some(gpu)) = (ask.on_gpu, ask.plan_gpu) {
        notes.push(format!(
            "gpu = \"{gpu}\", but {}; training on the CPU",
            if ask.cuda_built {
                "--device cpu"
            } else {
                "this vramplan was built without the `cuda` feature"
            }
        ));
    }
    Ok(Runs {
        precision,
        compute: compute(precision),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Precision::*;

    /// (on GPU, plan's GPU, precision, built-in plan, cuda built) → (precision, compute, notes
    /// that start so).
    type Case<'a> = (
        bool,
        Option<&'a str>,
        Precision,
        bool,
        bool,
        Precision,
        DType,
        &'a [&'a str],
    );

    #[test]
    fn precision_by_device_and_build() {
        let gpu = Some("h100-80gb");
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (false, None, Fp32, false, false, Fp32, DType::F32, &[]),
            (false, None, Fp16Autocast, false, false, Fp16Autocast, DType::F16, &["fp16-autocast without loss scaling"]),
            (false, None, Bf16Autocast, false, false, Fp32, DType::F32, &["precision = \"bf16-autocast\"; the candle engine trains in fp32 or fp16-autocast on the CPU"]),
            (false, None, Bf16, false, false, Fp32, DType::F32, &["precision = \"bf16\";"]),
            (false, gpu, Bf16Autocast, false, false, Fp32, DType::F32, &["precision = \"bf16-autocast\"", "gpu = \"h100-80gb\", but this vramplan was built without the `cuda` feature"]),
            (false, gpu, Fp32, false, true, Fp32, DType::F32, &["gpu = \"h100-80gb\", but --device cpu"]),
            (true, gpu, Bf16Autocast, false, true, Bf16Autocast, DType::BF16, &[]),
            (true, gpu, Fp32, false, true, Fp32, DType::F32, &[]),
            (true, gpu, Fp16Autocast, false, true, Fp16Autocast, DType::F16, &["fp16-autocast without loss scaling"]),
            (true, gpu, Bf16, false, true, Bf16Autocast, DType::BF16, &["precision = \"bf16\"; the candle engine trains in fp32, bf16-autocast or fp16-autocast"]),
            (true, None, Fp32, true, true, Bf16Autocast, DType::BF16, &[]),
            (false, None, Fp32, true, false, Fp32, DType::F32, &[]),
        ];
        for &(on_gpu, plan_gpu, precision, builtin, cuda_built, want, dtype, notes) in cases {
            let ask = Ask {
                on_gpu,
                plan_gpu,
                precision,
                builtin,
                cuda_built,
            };
            let r = resolve(ask).unwrap();
            assert_eq!((r.precision, r.compute), (want, dtype), "{ask:?}");
            assert_eq!(r.notes.len(), notes.len(), "{ask:?}: {:?}", r.notes);
            for (n, start) in r.notes.iter().zip(notes) {
                assert!(
                    n.starts_with(start),
                    "{ask:?}: {n:?} does not start with {start:?}"
                );
            }
        }
    }

    #[test]
    fn cuda_without_the_feature_is_bad_input_on_device() {
        for precision in [Fp32, Bf16Autocast] {
            let ask = Ask {
                on_gpu: true,
                plan_gpu: None,
                precision,
                builtin: false,
                cuda_built: false,
            };
            let e = resolve(ask).unwrap_err();
            assert!(
                matches!(&e, Error::BadInput { file, .. } if file == "--device"),
                "{e:?}"
            );
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
    }
}
