//! The working sets with 16-bit compute over f32 master weights (`precision =
//! "bf16-autocast"` on CUDA, `"fp16-autocast"`), fitted against the counting allocator
//! with the engine in f16 on the CPU (candle's CPU matmul has no bf16; both are 2-byte
//! dtypes through the same graph): 240 configurations, `docs/data/candle_f16_stages.tsv`,
//! `python3 tools/calibrate_candle.py fit docs/data/candle_f16_stages.tsv --rust`.
//!
//! The fits are looser than the f32 ones: gemm's 16-bit matmul on the CPU packs its
//! operands into f32 buffers sized by its cache blocking, which no linear form in the
//! step's sizes follows closely. Relative rms (worst) per stage over the calibration set:
//! - fwd_attn: nanochat 2.06 % rms (worst 11.96 %), llama 1.38 % (worst 4.08 %)
//! - fwd_mlp: nanochat 0.10 % rms (worst 0.22 %), llama 0.08 % (worst 0.17 %)
//! - bwd_attn: nanochat 8.73 % rms (worst 17.55 %), llama 8.04 % (worst 22.47 %)
//! - bwd_mlp: nanochat 9.97 % rms (worst 23.90 %), llama 0.15 % (worst 0.69 %)
//! - loss: nanochat 6.42 % rms (worst 21.47 %), llama 1.14 % (worst 5.56 %)
//! - emb: nanochat 8.72 % rms (worst 17.78 %), llama 6.31 % (worst 13.48 %)
//! - graph: nanochat 1.89 % rms (worst 7.11 %), llama 1.22 % (worst 2.84 %)
//! - fwd_peak: nanochat 3.11 % rms (worst 8.61 %), llama 2.30 % (worst 7.16 %)
//! - bwd_peak: nanochat 16.76 % rms (worst 48.66 %), llama 11.26 % (worst 27.26 %)
//! - opt: nanochat 34.83 % rms (worst 105.94 %), llama 3.92 % (worst 18.58 %)
//!
//! On CUDA these CPU packing buffers do not exist (cuBLAS packs nothing on the heap), so the
//! prediction there errs high by about them; it has not been measured on a GPU.

use super::{lin, Units, WorkingSets};
use crate::spec::Arch;

/// The working sets of one step with 16-bit compute; `w` and `pmax` are the parameters'
/// total and largest bytes (f32 master weights).
pub(super) fn working_sets(arch: Arch, u: &Units, layers: f64, w: f64, pmax: f64) -> WorkingSets {
    let l = layers;
    let l1 = (layers - 1.0).max(0.0);
    match arch {
        Arch::Nanochat => WorkingSets {
            fwd_attn: lin(
                &[
                    (2.123, u.nc),
                    (14.422, u.nq),
                    (6.370, u.s),
                    (-59.795, u.n),
                    (51.616, u.bht),
                    (5.578, u.td),
                    (-0.023, u.cq),
                ],
                26920.2,
            ),
            fwd_mlp: lin(&[(0.998, u.nc), (2.501, u.ni), (2.011, u.ci)], 2382.7)
                .max(lin(&[(0.997, u.nc), (2.506, u.ni), (2.009, u.ci)], 2426.6)),
            bwd_mlp: lin(&[(10.825, u.nc), (5.141, u.ni), (1.547, u.ci)], 66582.6).max(lin(
                &[(12.908, u.nc), (5.665, u.ni), (-0.229, u.ci)],
                126171.2,
            )),
            bwd_attn: lin(
                &[
                    (13.391, u.nc),
                    (19.496, u.nq),
                    (13.046, u.s),
                    (-77.946, u.n),
                    (-13.739, u.bht),
                    (-16.794, u.td),
                    (0.419, u.cq),
                ],
                253037.1,
            )
            .max(lin(
                &[
                    (15.609, u.nc),
                    (24.982, u.nq),
                    (14.434, u.s),
                    (-250.664, u.n),
                    (-34.762, u.bht),
                    (-11.822, u.td),
                    (-4.782, u.cq),
                ],
                406063.8,
            )),
            graph: lin(
                &[
                    (9.600 * l, u.nc),
                    (15.276 * l, u.nq),
                    (1.550 * l, u.ni),
                    (6.496 * l, u.s),
                    (4.328, u.nc),
                ],
                109971.9,
            ),
            fwd_peak: lin(
                &[
                    (8.232 * l, u.nc),
                    (15.434 * l, u.nq),
                    (2.242 * l, u.ni),
                    (6.335 * l, u.s),
                    (6.239, u.nc),
                ],
                124194.2,
            ),
            bwd_peak: lin(
                &[
                    (10.227, u.nc),
                    (0.390, u.nq),
                    (2.202, u.ni),
                    (5.802, u.s),
                    (1.360 * l1, u.nc),
                    (9.467 * l1, u.nq),
                    (-0.671 * l1, u.ni),
                    (1.232 * l1, u.s),
                ],
                816511.6,
            ),
            loss: lin(
                &[
                    (16.016, u.rv),
                    (3.674, u.rc),
                    (1.292, u.vc),
                    (0.823, u.multi * u.vc),
                    (0.416, u.nc),
                    (5.515, u.n),
                ],
                -8162.6,
            )
            .max(lin(
                &[
                    (16.222, u.rv),
                    (4.395, u.rc),
                    (1.881, u.vc),
                    (1.748, u.multi * u.vc),
                    (-0.177, u.nc),
                    (42.909, u.n),
                ],
                -103784.0,
            )),
            embedding: lin(&[(1.130, u.vc), (15.414, u.nc), (4.623, u.n)], -3077.4),
            optimizer: lin(&[(-0.3657, w), (3.8715, pmax)], -7145.3),
        },
        _ => WorkingSets {
            fwd_attn: lin(
                &[
                    (2.397, u.nc),
                    (6.502, u.nq),
                    (1.819, u.nkv),
                    (6.551, u.s),
                    (-39.704, u.n),
                    (5.198, u.bht),
                    (-2.175, u.td),
                    (1.210, u.cq),
                    (1.234, u.ckv),
                ],
                36164.3,
            ),
            fwd_mlp: lin(&[(1.497, u.nc), (3.002, u.ni), (2.511, u.ci)], 4246.7)
                .max(lin(&[(1.496, u.nc), (3.006, u.ni), (2.510, u.ci)], 4547.7)),
            bwd_mlp: lin(&[(9.583, u.nc), (9.487, u.ni), (3.490, u.ci)], 20690.1).max(lin(
                &[(17.002, u.nc), (2.049, u.ni), (4.542, u.ci)],
                19567.2,
            )),
            bwd_attn: lin(
                &[
                    (12.800, u.nc),
                    (8.553, u.nq),
                    (3.667, u.nkv),
                    (13.030, u.s),
                    (-8.650, u.n),
                    (-33.197, u.bht),
                    (-24.191, u.td),
                    (-6.138, u.cq),
                    (25.542, u.ckv),
                ],
                174953.5,
            )
            .max(lin(
                &[
                    (14.142, u.nc),
                    (8.791, u.nq),
                    (5.190, u.nkv),
                    (14.340, u.s),
                    (51.136, u.n),
                    (-93.808, u.bht),
                    (-11.494, u.td),
                    (-6.472, u.cq),
                    (23.951, u.ckv),
                ],
                245187.6,
            )),
            graph: lin(
                &[
                    (10.214 * l, u.nc),
                    (5.717 * l, u.nq),
                    (2.191 * l, u.nkv),
                    (2.043 * l, u.ni),
                    (6.465 * l, u.s),
                    (1.582, u.nc),
                ],
                90677.0,
            ),
            fwd_peak: lin(
                &[
                    (8.803 * l, u.nc),
                    (5.469 * l, u.nq),
                    (2.085 * l, u.nkv),
                    (2.592 * l, u.ni),
                    (6.443 * l, u.s),
                    (3.598, u.nc),
                ],
                185830.3,
            ),
            bwd_peak: lin(
                &[
                    (6.000, u.nc),
                    (14.343, u.nq),
                    (-28.315, u.nkv),
                    (6.084, u.ni),
                    (6.884, u.s),
                    (-0.954 * l1, u.nc),
                    (-3.926 * l1, u.nq),
                    (20.502 * l1, u.nkv),
                    (0.168 * l1, u.ni),
                    (1.007 * l1, u.s),
                ],
                177067.0,
            ),
            loss: lin(
                &[
                    (10.504, u.rv),
                    (4.070, u.rc),
                    (0.486, u.vc),
                    (1.007, u.multi * u.vc),
                    (0.492, u.nc),
                    (1.181, u.n),
                ],
                15063.7,
            )
            .max(lin(
                &[
                    (4.712, u.rv),
                    (11.889, u.rc),
                    (5.057, u.vc),
                    (0.024, u.multi * u.vc),
                    (0.455, u.nc),
                    (22.651, u.n),
                ],
                -274440.1,
            )),
            embedding: lin(&[(1.772, u.vc), (6.179, u.nc), (30.851, u.n)], -61387.7),
            optimizer: lin(&[(-0.0376, w), (4.0556, pmax)], 7056.7),
        },
    }
}
