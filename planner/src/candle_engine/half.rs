//! The working sets with 16-bit compute over f32 master weights (`precision =
//! "bf16-autocast"` on CUDA, `"fp16-autocast"`), fitted like the f32 ones to the engine
//! run in f16 on the CPU (candle's CPU matmul has no bf16; both are 2-byte dtypes through
//! the same graph) over 400 configurations, counting tensors alone: gemm's CPU packing
//! scratch is left out, since a GPU's matmul has none (`docs/data/candle_f16_stages.tsv`;
//! `python3 tools/calibrate_candle.py fit docs/data/candle_f16_stages.tsv --rust` writes
//! the `match` below). Where a stage's peak moves between ops the working set is the
//! largest of two or three planes; AdamW's is computed from the parameters' sizes in
//! update order. Relative rms (worst) over the calibration set:
//! - a half's forward, attention: nanochat 0.63 % (1.91 %), llama 0.82 % (2.37 %)
//! - MLP: nanochat 0.00 % (0.00 %), llama 0.00 % (0.02 %)
//! - its recompute and backward, attention: nanochat 0.20 % (0.60 %), llama 0.26 % (0.86 %)
//! - MLP: nanochat 0.07 % (0.26 %), llama 0.11 % (0.63 %)
//! - the loss stage: nanochat 0.03 % (0.21 %), llama 0.44 % (2.75 %)
//! - the embedding's backward: nanochat 0.00 % (0.00 %), llama 0.00 % (0.00 %)
//! - without checkpointing, the graph kept: nanochat 0.70 % (2.28 %), llama 0.69 % (2.28 %)
//! - the forward peak: nanochat 0.70 % (2.28 %), llama 0.69 % (2.28 %)
//! - the whole graph's backward: nanochat 3.44 % (14.04 %), llama 1.80 % (7.88 %)
//! - AdamW: nanochat 2.67 % (25.15 %), llama 0.06 % (0.37 %)
//!
//! These are the tensors the graph allocates; on CUDA each is one allocation from the
//! memory pool, which is what the engine measures there (not yet measured on a GPU).

use super::{lin, Units, WorkingSets};
use crate::spec::Arch;

/// The working sets of one step with 16-bit compute; `adam` is AdamW's peak from the
/// parameters' sizes (see `adam_peak`).
pub(super) fn working_sets(arch: Arch, u: &Units, layers: f64, adam: f64) -> WorkingSets {
    let l = layers;
    let l1 = (layers - 1.0).max(0.0);
    match arch {
        Arch::Nanochat => WorkingSets {
            fwd_attn: lin(
                &[
                    (1.941, u.nc),
                    (14.322, u.nq),
                    (6.546, u.s),
                    (-29.252, u.n),
                    (20.858, u.bht),
                    (-1.859, u.td),
                    (2.196, u.cq),
                ],
                31429.8,
            )
            .max(lin(
                &[
                    (3.046, u.nc),
                    (2.073, u.nq),
                    (4.246, u.s),
                    (214.580, u.n),
                    (14.065, u.bht),
                    (-27.798, u.td),
                    (26.202, u.cq),
                ],
                -338201.5,
            )),
            fwd_mlp: lin(&[(2.491, u.nc), (0.057, u.ni), (0.139, u.ci)], -5458.4)
                .max(lin(&[(1.500, u.nc), (1.500, u.ni), (1.000, u.ci)], 2624.0)),
            bwd_mlp: lin(&[(16.535, u.nc), (1.523, u.ni), (2.902, u.ci)], 16849.9)
                .max(lin(&[(7.525, u.nc), (6.259, u.ni), (1.968, u.ci)], 13066.2)),
            bwd_attn: lin(
                &[
                    (9.012, u.nc),
                    (14.875, u.nq),
                    (15.542, u.s),
                    (-29.426, u.n),
                    (18.960, u.bht),
                    (-2.454, u.td),
                    (4.351, u.cq),
                ],
                61466.8,
            )
            .max(lin(
                &[
                    (10.646, u.nc),
                    (28.798, u.nq),
                    (7.407, u.s),
                    (-34.752, u.n),
                    (16.442, u.bht),
                    (11.522, u.td),
                    (2.840, u.cq),
                ],
                80251.3,
            ))
            .max(lin(
                &[
                    (16.441, u.nc),
                    (21.660, u.nq),
                    (7.607, u.s),
                    (-5.706, u.n),
                    (20.962, u.bht),
                    (-2.849, u.td),
                    (7.363, u.cq),
                ],
                38974.9,
            )),
            graph: lin(
                &[
                    (9.088 * l, u.nc),
                    (14.673 * l, u.nq),
                    (1.495 * l, u.ni),
                    (6.551 * l, u.s),
                    (2.288 * l, u.cq),
                    (0.926 * l, u.ci),
                    (4.797, u.nc),
                ],
                71131.0,
            ),
            fwd_peak: lin(
                &[
                    (9.088 * l, u.nc),
                    (14.673 * l, u.nq),
                    (1.495 * l, u.ni),
                    (6.551 * l, u.s),
                    (2.288 * l, u.cq),
                    (0.926 * l, u.ci),
                    (4.797, u.nc),
                ],
                71131.0,
            ),
            bwd_peak: lin(
                &[
                    (4.614, u.nc),
                    (0.512, u.nq),
                    (0.026, u.ni),
                    (9.021, u.s),
                    (1.127, u.cq),
                    (1.580, u.ci),
                    (0.052, u.vc),
                    (-14.660, u.n),
                    (0.026 * l1, u.nc),
                    (8.038 * l1, u.nq),
                    (0.054 * l1, u.ni),
                    (0.966 * l1, u.s),
                    (4.348 * l1, u.cq),
                    (2.032 * l1, u.ci),
                ],
                35569.2,
            )
            .max(lin(
                &[
                    (8.163, u.nc),
                    (13.757, u.nq),
                    (1.479, u.ni),
                    (2.884, u.s),
                    (-17.307, u.cq),
                    (-13.917, u.ci),
                    (1.887, u.vc),
                    (-128.985, u.n),
                    (-3.570 * l1, u.nc),
                    (2.640 * l1, u.nq),
                    (1.312 * l1, u.ni),
                    (-1.798 * l1, u.s),
                    (33.715 * l1, u.cq),
                    (8.786 * l1, u.ci),
                ],
                26024.1,
            ))
            .max(lin(
                &[
                    (13.958, u.nc),
                    (-38.164, u.nq),
                    (5.055, u.ni),
                    (3.937, u.s),
                    (115.320, u.cq),
                    (-6.650, u.ci),
                    (-0.648, u.vc),
                    (-403.675, u.n),
                    (-0.185 * l1, u.nc),
                    (31.386 * l1, u.nq),
                    (-0.506 * l1, u.ni),
                    (-0.651 * l1, u.s),
                    (-46.250 * l1, u.cq),
                    (-3.991 * l1, u.ci),
                ],
                667343.1,
            )),
            loss: lin(
                &[
                    (7.978, u.rv),
                    (5.068, u.rc),
                    (2.503, u.vc),
                    (2.503, u.multi * u.vc),
                    (0.484, u.nc),
                    (4.087, u.n),
                ],
                10763.3,
            )
            .max(lin(
                &[
                    (16.504, u.rv),
                    (3.665, u.rc),
                    (0.477, u.vc),
                    (0.941, u.multi * u.vc),
                    (0.361, u.nc),
                    (6.041, u.n),
                ],
                15583.8,
            ))
            .max(lin(
                &[
                    (16.502, u.rv),
                    (3.538, u.rc),
                    (0.497, u.vc),
                    (1.002, u.multi * u.vc),
                    (0.499, u.nc),
                    (0.745, u.n),
                ],
                15003.4,
            )),
            embedding: lin(&[(-0.000, u.vc), (17.000, u.nc), (4.000, u.n)], 7691.0)
                .max(lin(&[(2.000, u.vc), (8.500, u.nc), (4.000, u.n)], 5459.0)),
            optimizer: lin(&[(0.9979, adam)], 581.4),
        },
        _ => WorkingSets {
            fwd_attn: lin(
                &[
                    (2.512, u.nc),
                    (5.610, u.nq),
                    (1.308, u.nkv),
                    (6.491, u.s),
                    (-21.590, u.n),
                    (19.590, u.bht),
                    (-0.521, u.td),
                    (-9.783, u.cq),
                    (11.350, u.ckv),
                ],
                16214.4,
            )
            .max(lin(
                &[
                    (2.455, u.nc),
                    (5.364, u.nq),
                    (2.137, u.nkv),
                    (6.516, u.s),
                    (-38.359, u.n),
                    (13.947, u.bht),
                    (0.335, u.td),
                    (1.511, u.cq),
                    (0.052, u.ckv),
                ],
                14897.3,
            )),
            fwd_mlp: lin(&[(2.001, u.nc), (1.999, u.ni), (1.502, u.ci)], 4160.4)
                .max(lin(&[(2.000, u.nc), (2.000, u.ni), (1.501, u.ci)], 4088.4)),
            bwd_mlp: lin(&[(9.536, u.nc), (9.504, u.ni), (3.505, u.ci)], 16173.8).max(lin(
                &[(17.026, u.nc), (2.034, u.ni), (4.424, u.ci)],
                18407.8,
            )),
            bwd_attn: lin(
                &[
                    (17.590, u.nc),
                    (9.427, u.nq),
                    (9.126, u.nkv),
                    (6.369, u.s),
                    (-230.903, u.n),
                    (28.866, u.bht),
                    (13.482, u.td),
                    (6.035, u.cq),
                    (-8.323, u.ckv),
                ],
                94458.8,
            )
            .max(lin(
                &[
                    (16.938, u.nc),
                    (9.149, u.nq),
                    (5.841, u.nkv),
                    (7.726, u.s),
                    (-10.174, u.n),
                    (9.712, u.bht),
                    (-7.507, u.td),
                    (1.826, u.cq),
                    (5.808, u.ckv),
                ],
                38931.0,
            ))
            .max(lin(
                &[
                    (9.481, u.nc),
                    (5.318, u.nq),
                    (2.642, u.nkv),
                    (15.513, u.s),
                    (-28.863, u.n),
                    (13.722, u.bht),
                    (-1.030, u.td),
                    (2.027, u.cq),
                    (2.517, u.ckv),
                ],
                47484.5,
            )),
            graph: lin(
                &[
                    (10.217 * l, u.nc),
                    (5.909 * l, u.nq),
                    (1.555 * l, u.nkv),
                    (1.967 * l, u.ni),
                    (6.517 * l, u.s),
                    (0.428 * l, u.cq),
                    (0.304 * l, u.ckv),
                    (1.589 * l, u.ci),
                    (1.262, u.nc),
                ],
                29477.2,
            ),
            fwd_peak: lin(
                &[
                    (10.217 * l, u.nc),
                    (5.909 * l, u.nq),
                    (1.555 * l, u.nkv),
                    (1.967 * l, u.ni),
                    (6.517 * l, u.s),
                    (0.428 * l, u.cq),
                    (0.304 * l, u.ckv),
                    (1.589 * l, u.ci),
                    (1.262, u.nc),
                ],
                29477.2,
            ),
            bwd_peak: lin(
                &[
                    (4.591, u.nc),
                    (0.022, u.nq),
                    (0.096, u.nkv),
                    (7.444, u.ni),
                    (0.040, u.s),
                    (1.722, u.cq),
                    (-4.255, u.ckv),
                    (2.044, u.ci),
                    (-0.006, u.vc),
                    (1.526, u.n),
                    (-0.041 * l1, u.nc),
                    (3.833 * l1, u.nq),
                    (4.056 * l1, u.nkv),
                    (0.039 * l1, u.ni),
                    (0.972 * l1, u.s),
                    (1.126 * l1, u.cq),
                    (5.474 * l1, u.ckv),
                    (2.900 * l1, u.ci),
                ],
                25948.6,
            )
            .max(lin(
                &[
                    (4.479, u.nc),
                    (0.113, u.nq),
                    (0.451, u.nkv),
                    (-0.030, u.ni),
                    (9.024, u.s),
                    (-1.516, u.cq),
                    (1.446, u.ckv),
                    (3.170, u.ci),
                    (0.002, u.vc),
                    (-6.339, u.n),
                    (0.078 * l1, u.nc),
                    (4.057 * l1, u.nq),
                    (3.894 * l1, u.nkv),
                    (0.016 * l1, u.ni),
                    (0.996 * l1, u.s),
                    (2.899 * l1, u.cq),
                    (2.138 * l1, u.ckv),
                    (2.873 * l1, u.ci),
                ],
                39023.5,
            ))
            .max(lin(
                &[
                    (8.843, u.nc),
                    (8.163, u.nq),
                    (-16.890, u.nkv),
                    (0.886, u.ni),
                    (4.127, u.s),
                    (0.623, u.cq),
                    (28.303, u.ckv),
                    (5.194, u.ci),
                    (1.222, u.vc),
                    (446.060, u.n),
                    (1.048 * l1, u.nc),
                    (4.639 * l1, u.nq),
                    (12.656 * l1, u.nkv),
                    (-1.175 * l1, u.ni),
                    (-1.732 * l1, u.s),
                    (0.796 * l1, u.cq),
                    (-17.083 * l1, u.ckv),
                    (4.731 * l1, u.ci),
                ],
                -758119.4,
            )),
            loss: lin(
                &[
                    (6.223, u.rv),
                    (10.200, u.rc),
                    (1.781, u.vc),
                    (0.836, u.multi * u.vc),
                    (1.060, u.nc),
                    (-105.236, u.n),
                ],
                163935.5,
            )
            .max(lin(
                &[
                    (4.872, u.rv),
                    (1.657, u.rc),
                    (8.140, u.vc),
                    (-3.084, u.multi * u.vc),
                    (0.615, u.nc),
                    (2.000, u.n),
                ],
                30687.4,
            ))
            .max(lin(
                &[
                    (10.504, u.rv),
                    (4.077, u.rc),
                    (0.489, u.vc),
                    (1.007, u.multi * u.vc),
                    (0.488, u.nc),
                    (2.225, u.n),
                ],
                12545.2,
            )),
            embedding: lin(&[(-0.000, u.vc), (7.500, u.nc), (0.000, u.n)], 3387.0)
                .max(lin(&[(2.000, u.vc), (5.000, u.nc), (0.000, u.n)], 3131.0)),
            optimizer: lin(&[(1.0000, adam)], 893.9),
        },
    }
}
