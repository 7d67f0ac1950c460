//! The working sets with 16-bit compute over f32 master weights (`precision =
//! "bf16-autocast"` on CUDA, `"fp16-autocast"`), fitted to the engine run in f16 on the
//! CPU (candle's CPU matmul has no bf16; both are 2-byte dtypes through the same graph)
//! over 700 configurations, counting tensors alone: gemm's CPU packing scratch is left
//! out, since a GPU's matmul has none.
//! Data: `docs/data/candle_f16_stages.tsv`; this file is written by
//! `python3 tools/calibrate_candle.py fit docs/data/candle_f16_stages.tsv --write <this file>`.
//! Where a stage's peak moves between ops the working set is the largest of two or
//! three planes; AdamW's is computed from the parameters' sizes in update order.
//! Relative rms (worst) over the calibration set:
//! - a half's forward, attention: nanochat 0.63 % (1.91 %), llama 0.82 % (2.37 %)
//! - MLP: nanochat 0.00 % (0.00 %), llama 0.00 % (0.02 %)
//! - a half's recompute and backward, attention: nanochat 0.20 % (0.60 %), llama 0.26 % (0.86 %)
//! - MLP: nanochat 0.07 % (0.26 %), llama 0.11 % (0.63 %)
//! - the loss stage: nanochat 0.04 % (0.32 %), llama 0.38 % (4.10 %)
//! - the embedding's backward: nanochat 0.00 % (0.00 %), llama 0.00 % (0.00 %)
//! - without checkpointing, the graph kept: nanochat 0.81 % (2.67 %), llama 0.70 % (3.27 %)
//! - the forward's peak: nanochat 0.81 % (2.67 %), llama 0.70 % (3.27 %)
//! - the whole graph's backward: nanochat 4.53 % (19.12 %), llama 3.13 % (13.80 %)
//! - AdamW: nanochat 2.05 % (25.25 %), llama 0.05 % (0.38 %)

use super::{lin, Units, WorkingSets};
use crate::spec::Arch;

/// The working sets of one step with 16-bit compute; `adam` is AdamW's peak from the parameters'
/// sizes (see `adam_peak`).
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
                    (9.071 * l, u.nc),
                    (14.687 * l, u.nq),
                    (1.492 * l, u.ni),
                    (6.553 * l, u.s),
                    (2.150 * l, u.cq),
                    (0.961 * l, u.ci),
                    (4.816, u.nc),
                ],
                67978.5,
            ),
            fwd_peak: lin(
                &[
                    (9.071 * l, u.nc),
                    (14.687 * l, u.nq),
                    (1.492 * l, u.ni),
                    (6.553 * l, u.s),
                    (2.150 * l, u.cq),
                    (0.961 * l, u.ci),
                    (4.816, u.nc),
                ],
                67978.5,
            ),
            bwd_peak: lin(
                &[
                    (9.970, u.nc),
                    (9.219, u.nq),
                    (-0.538, u.ni),
                    (0.599, u.s),
                    (5.674, u.cq),
                    (1.775, u.ci),
                    (1.289, u.vc),
                    (55.400, u.n),
                    (-0.112 * l1, u.nc),
                    (10.712 * l1, u.nq),
                    (-0.829 * l1, u.ni),
                    (1.188 * l1, u.s),
                    (-3.737 * l1, u.cq),
                    (3.692 * l1, u.ci),
                ],
                24772.9,
            )
            .max(lin(
                &[
                    (4.533, u.nc),
                    (0.587, u.nq),
                    (-0.007, u.ni),
                    (9.000, u.s),
                    (1.212, u.cq),
                    (1.953, u.ci),
                    (0.028, u.vc),
                    (0.143, u.n),
                    (-0.119 * l1, u.nc),
                    (7.962 * l1, u.nq),
                    (0.031 * l1, u.ni),
                    (1.014 * l1, u.s),
                    (4.857 * l1, u.cq),
                    (2.092 * l1, u.ci),
                ],
                15949.3,
            ))
            .max(lin(
                &[
                    (1.960, u.nc),
                    (-0.768, u.nq),
                    (5.089, u.ni),
                    (-0.121, u.s),
                    (-3.914, u.cq),
                    (0.973, u.ci),
                    (-0.099, u.vc),
                    (-35.342, u.n),
                    (2.843 * l1, u.nc),
                    (9.229 * l1, u.nq),
                    (-0.615 * l1, u.ni),
                    (1.144 * l1, u.s),
                    (14.428 * l1, u.cq),
                    (1.134 * l1, u.ci),
                ],
                74511.8,
            )),
            loss: lin(
                &[
                    (7.976, u.rv),
                    (5.059, u.rc),
                    (2.503, u.vc),
                    (2.503, u.multi * u.vc),
                    (0.485, u.nc),
                    (3.956, u.n),
                ],
                11191.3,
            )
            .max(lin(
                &[
                    (16.478, u.rv),
                    (0.056, u.rc),
                    (0.677, u.vc),
                    (-1.697, u.multi * u.vc),
                    (1.126, u.nc),
                    (-40.344, u.n),
                ],
                155962.8,
            ))
            .max(lin(
                &[
                    (16.504, u.rv),
                    (3.557, u.rc),
                    (0.493, u.vc),
                    (1.003, u.multi * u.vc),
                    (0.494, u.nc),
                    (1.191, u.n),
                ],
                14435.7,
            )),
            embedding: lin(&[(-0.000, u.vc), (17.000, u.nc), (4.000, u.n)], 7691.0)
                .max(lin(&[(2.000, u.vc), (8.500, u.nc), (4.000, u.n)], 5459.0)),
            optimizer: lin(&[(0.9977, adam)], 441.3),
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
                    (10.120 * l, u.nc),
                    (5.678 * l, u.nq),
                    (1.801 * l, u.nkv),
                    (1.986 * l, u.ni),
                    (6.520 * l, u.s),
                    (0.866 * l, u.cq),
                    (1.211 * l, u.ckv),
                    (1.551 * l, u.ci),
                    (1.263, u.nc),
                ],
                33297.5,
            ),
            fwd_peak: lin(
                &[
                    (10.120 * l, u.nc),
                    (5.678 * l, u.nq),
                    (1.801 * l, u.nkv),
                    (1.986 * l, u.ni),
                    (6.520 * l, u.s),
                    (0.866 * l, u.cq),
                    (1.211 * l, u.ckv),
                    (1.551 * l, u.ci),
                    (1.263, u.nc),
                ],
                33297.5,
            ),
            bwd_peak: lin(
                &[
                    (10.130, u.nc),
                    (2.772, u.nq),
                    (10.295, u.nkv),
                    (-1.473, u.ni),
                    (0.726, u.s),
                    (22.070, u.cq),
                    (-37.128, u.ckv),
                    (7.754, u.ci),
                    (1.285, u.vc),
                    (-378.297, u.n),
                    (0.885 * l1, u.nc),
                    (9.512 * l1, u.nq),
                    (1.356 * l1, u.nkv),
                    (-0.394 * l1, u.ni),
                    (-0.502 * l1, u.s),
                    (-28.442 * l1, u.cq),
                    (18.965 * l1, u.ckv),
                    (4.629 * l1, u.ci),
                ],
                487503.1,
            )
            .max(lin(
                &[
                    (5.217, u.nc),
                    (0.200, u.nq),
                    (0.925, u.nkv),
                    (0.135, u.ni),
                    (8.961, u.s),
                    (-0.090, u.cq),
                    (3.341, u.ckv),
                    (1.585, u.ci),
                    (-0.110, u.vc),
                    (-85.806, u.n),
                    (1.021 * l1, u.nc),
                    (3.899 * l1, u.nq),
                    (3.538 * l1, u.nkv),
                    (-0.028 * l1, u.ni),
                    (0.952 * l1, u.s),
                    (1.606 * l1, u.cq),
                    (1.426 * l1, u.ckv),
                    (2.373 * l1, u.ci),
                ],
                108032.9,
            ))
            .max(lin(
                &[
                    (4.061, u.nc),
                    (1.892, u.nq),
                    (-1.693, u.nkv),
                    (7.357, u.ni),
                    (-0.018, u.s),
                    (-23.618, u.cq),
                    (16.234, u.ckv),
                    (2.800, u.ci),
                    (0.084, u.vc),
                    (54.418, u.n),
                    (0.468 * l1, u.nc),
                    (1.229 * l1, u.nq),
                    (6.354 * l1, u.nkv),
                    (-0.014 * l1, u.ni),
                    (1.069 * l1, u.s),
                    (33.100 * l1, u.cq),
                    (-22.736 * l1, u.ckv),
                    (2.038 * l1, u.ci),
                ],
                4679.3,
            )),
            loss: lin(
                &[
                    (0.552, u.rv),
                    (18.377, u.rc),
                    (5.448, u.vc),
                    (0.274, u.multi * u.vc),
                    (0.431, u.nc),
                    (57.101, u.n),
                ],
                -720656.8,
            )
            .max(lin(
                &[
                    (4.982, u.rv),
                    (5.542, u.rc),
                    (2.503, u.vc),
                    (2.503, u.multi * u.vc),
                    (0.493, u.nc),
                    (2.312, u.n),
                ],
                13548.3,
            ))
            .max(lin(
                &[
                    (10.503, u.rv),
                    (4.085, u.rc),
                    (0.490, u.vc),
                    (1.008, u.multi * u.vc),
                    (0.481, u.nc),
                    (2.431, u.n),
                ],
                12348.7,
            )),
            embedding: lin(&[(-0.000, u.vc), (7.500, u.nc), (0.000, u.n)], 3387.0)
                .max(lin(&[(2.000, u.vc), (5.000, u.nc), (0.000, u.n)], 3131.0)),
            optimizer: lin(&[(1.0000, adam)], 916.2),
        },
    }
}
