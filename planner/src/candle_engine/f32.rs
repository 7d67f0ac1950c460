//! The f32 engine's working sets (`precision = "fp32"`), fitted to the engine on the CPU
//! over 700 configurations, counting the whole heap: on the CPU gemm's packing scratch is
//! real memory.
//! Data: `docs/data/candle_f32_stages.tsv`; this file is written by
//! `python3 tools/calibrate_candle.py fit docs/data/candle_f32_stages.tsv --write <this file>`.
//! Where a stage's peak moves between ops the working set is the largest of two or
//! three planes; AdamW's is computed from the parameters' sizes in update order.
//! Relative rms (worst) over the calibration set:
//! - a half's forward, attention: nanochat 0.95 % (2.75 %), llama 1.25 % (3.38 %)
//! - MLP: nanochat 0.00 % (0.00 %), llama 0.00 % (0.00 %)
//! - a half's recompute and backward, attention: nanochat 0.32 % (0.91 %), llama 0.39 % (1.31 %)
//! - MLP: nanochat 0.03 % (0.10 %), llama 0.52 % (3.07 %)
//! - the loss stage: nanochat 0.35 % (3.57 %), llama 0.86 % (8.66 %)
//! - the embedding's backward: nanochat 0.00 % (0.00 %), llama 0.00 % (0.00 %)
//! - without checkpointing, the graph kept: nanochat 1.20 % (4.53 %), llama 1.02 % (3.80 %)
//! - the forward's peak: nanochat 1.21 % (4.48 %), llama 1.06 % (4.00 %)
//! - the whole graph's backward: nanochat 2.66 % (10.87 %), llama 1.34 % (8.91 %)
//! - AdamW: nanochat 2.05 % (25.25 %), llama 0.05 % (0.38 %)

use super::{lin, Units, WorkingSets};
use crate::spec::Arch;

/// The working sets of one step in f32; `adam` is AdamW's peak from the parameters'
/// sizes (see `adam_peak`).
pub(super) fn working_sets(arch: Arch, u: &Units, layers: f64, adam: f64) -> WorkingSets {
    let l = layers;
    let l1 = (layers - 1.0).max(0.0);
    match arch {
        Arch::Nanochat => WorkingSets {
            fwd_attn: lin(
                &[
                    (3.831, u.nc),
                    (18.885, u.nq),
                    (6.075, u.s),
                    (-77.545, u.n),
                    (34.109, u.bht),
                    (-3.195, u.td),
                    (0.409, u.cq),
                ],
                46580.6,
            )
            .max(lin(
                &[
                    (4.006, u.nc),
                    (16.770, u.nq),
                    (6.014, u.s),
                    (-27.009, u.n),
                    (35.646, u.bht),
                    (0.260, u.td),
                    (0.316, u.cq),
                ],
                27088.6,
            )),
            fwd_mlp: lin(&[(2.002, u.nc), (3.000, u.ni), (0.999, u.ci)], 1330.1)
                .max(lin(&[(3.000, u.nc), (3.000, u.ni), (-0.000, u.ci)], 2112.0)),
            bwd_mlp: lin(&[(20.009, u.nc), (4.032, u.ni), (1.918, u.ci)], 13940.1).max(lin(
                &[(10.017, u.nc), (12.260, u.ni), (0.970, u.ci)],
                12087.5,
            )),
            bwd_attn: lin(
                &[
                    (23.446, u.nc),
                    (37.674, u.nq),
                    (7.427, u.s),
                    (-79.371, u.n),
                    (47.571, u.bht),
                    (-6.251, u.td),
                    (3.313, u.cq),
                ],
                74461.8,
            )
            .max(lin(
                &[
                    (23.940, u.nc),
                    (36.057, u.nq),
                    (6.980, u.s),
                    (-11.908, u.n),
                    (34.248, u.bht),
                    (-1.758, u.td),
                    (6.797, u.cq),
                ],
                17254.5,
            ))
            .max(lin(
                &[
                    (13.050, u.nc),
                    (20.984, u.nq),
                    (17.060, u.s),
                    (-56.073, u.n),
                    (18.352, u.bht),
                    (-4.817, u.td),
                    (3.380, u.cq),
                ],
                70200.1,
            )),
            graph: lin(
                &[
                    (7.864 * l, u.nc),
                    (19.101 * l, u.nq),
                    (2.953 * l, u.ni),
                    (6.084 * l, u.s),
                    (0.511 * l, u.cq),
                    (0.031 * l, u.ci),
                    (2.976, u.nc),
                ],
                55591.7,
            ),
            fwd_peak: lin(
                &[
                    (7.793 * l, u.nc),
                    (19.114 * l, u.nq),
                    (2.950 * l, u.ni),
                    (6.091 * l, u.s),
                    (0.417 * l, u.cq),
                    (0.181 * l, u.ci),
                    (3.012, u.nc),
                ],
                54982.9,
            ),
            bwd_peak: lin(
                &[
                    (9.515, u.nc),
                    (2.551, u.nq),
                    (-0.100, u.ni),
                    (10.925, u.s),
                    (3.874, u.cq),
                    (1.474, u.ci),
                    (0.009, u.vc),
                    (-13.281, u.n),
                    (-0.155 * l1, u.nc),
                    (15.748 * l1, u.nq),
                    (0.088 * l1, u.ni),
                    (1.007 * l1, u.s),
                    (2.959 * l1, u.cq),
                    (2.841 * l1, u.ci),
                ],
                25304.6,
            )
            .max(lin(
                &[
                    (18.598, u.nc),
                    (17.747, u.nq),
                    (-0.639, u.ni),
                    (0.087, u.s),
                    (4.818, u.cq),
                    (2.751, u.ci),
                    (1.405, u.vc),
                    (148.006, u.n),
                    (-0.059 * l1, u.nc),
                    (16.996 * l1, u.nq),
                    (0.004 * l1, u.ni),
                    (1.306 * l1, u.s),
                    (0.836 * l1, u.cq),
                    (2.219 * l1, u.ci),
                ],
                -128069.0,
            ))
            .max(lin(
                &[
                    (5.987, u.nc),
                    (0.093, u.nq),
                    (9.233, u.ni),
                    (-0.018, u.s),
                    (0.107, u.cq),
                    (1.011, u.ci),
                    (-0.014, u.vc),
                    (2.287, u.n),
                    (0.009 * l1, u.nc),
                    (15.923 * l1, u.nq),
                    (0.016 * l1, u.ni),
                    (0.996 * l1, u.s),
                    (5.667 * l1, u.cq),
                    (1.935 * l1, u.ci),
                ],
                14247.2,
            )),
            loss: lin(
                &[
                    (15.981, u.rv),
                    (2.415, u.rc),
                    (-0.031, u.vc),
                    (1.040, u.multi * u.vc),
                    (1.003, u.nc),
                    (0.183, u.n),
                ],
                10024.4,
            )
            .max(lin(
                &[
                    (8.000, u.rv),
                    (4.970, u.rc),
                    (9.065, u.vc),
                    (-3.065, u.multi * u.vc),
                    (1.003, u.nc),
                    (0.848, u.n),
                ],
                14248.0,
            ))
            .max(lin(
                &[
                    (10.444, u.rv),
                    (-15.966, u.rc),
                    (-0.819, u.vc),
                    (-0.819, u.multi * u.vc),
                    (2.282, u.nc),
                    (-39.348, u.n),
                ],
                354401.4,
            )),
            embedding: lin(&[(-0.000, u.vc), (17.000, u.nc), (7.000, u.n)], 7413.0)
                .max(lin(&[(2.000, u.vc), (16.000, u.nc), (4.000, u.n)], 6669.0)),
            optimizer: lin(&[(0.9977, adam)], 441.3),
        },
        _ => WorkingSets {
            fwd_attn: lin(
                &[
                    (5.127, u.nc),
                    (10.578, u.nq),
                    (4.429, u.nkv),
                    (5.987, u.s),
                    (-92.604, u.n),
                    (30.156, u.bht),
                    (2.268, u.td),
                    (0.836, u.cq),
                    (-3.204, u.ckv),
                ],
                24093.4,
            )
            .max(lin(
                &[
                    (5.028, u.nc),
                    (6.931, u.nq),
                    (6.592, u.nkv),
                    (6.011, u.s),
                    (-45.340, u.n),
                    (38.103, u.bht),
                    (1.026, u.td),
                    (-0.221, u.cq),
                    (-0.763, u.ckv),
                ],
                14622.5,
            )),
            fwd_mlp: lin(&[(4.000, u.nc), (4.000, u.ni), (-0.000, u.ci)], 3024.0)
                .max(lin(&[(3.000, u.nc), (4.000, u.ni), (1.000, u.ci)], 2392.4)),
            bwd_mlp: lin(&[(14.097, u.nc), (18.967, u.ni), (2.078, u.ci)], 21927.7).max(lin(
                &[(20.256, u.nc), (10.233, u.ni), (7.523, u.ci)],
                -122593.2,
            )),
            bwd_attn: lin(
                &[
                    (14.098, u.nc),
                    (11.622, u.nq),
                    (5.250, u.nkv),
                    (17.049, u.s),
                    (-63.737, u.n),
                    (15.652, u.bht),
                    (-2.097, u.td),
                    (1.020, u.cq),
                    (1.059, u.ckv),
                ],
                65034.6,
            )
            .max(lin(
                &[
                    (23.977, u.nc),
                    (19.007, u.nq),
                    (16.340, u.nkv),
                    (6.943, u.s),
                    (-153.513, u.n),
                    (13.527, u.bht),
                    (5.630, u.td),
                    (6.580, u.cq),
                    (-6.232, u.ckv),
                ],
                66402.2,
            ))
            .max(lin(
                &[
                    (23.870, u.nc),
                    (20.249, u.nq),
                    (13.370, u.nkv),
                    (7.508, u.s),
                    (-26.413, u.n),
                    (4.990, u.bht),
                    (-29.389, u.td),
                    (-0.211, u.cq),
                    (7.553, u.ckv),
                ],
                58369.7,
            )),
            graph: lin(
                &[
                    (10.014 * l, u.nc),
                    (11.210 * l, u.nq),
                    (3.657 * l, u.nkv),
                    (3.958 * l, u.ni),
                    (6.033 * l, u.s),
                    (-0.145 * l, u.cq),
                    (0.207 * l, u.ckv),
                    (0.117 * l, u.ci),
                    (0.805, u.nc),
                ],
                22251.6,
            ),
            fwd_peak: lin(
                &[
                    (9.947 * l, u.nc),
                    (11.237 * l, u.nq),
                    (3.673 * l, u.nkv),
                    (3.947 * l, u.ni),
                    (6.034 * l, u.s),
                    (-0.357 * l, u.cq),
                    (-0.004 * l, u.ckv),
                    (0.369 * l, u.ci),
                    (0.847, u.nc),
                ],
                23480.7,
            ),
            bwd_peak: lin(
                &[
                    (9.003, u.nc),
                    (1.070, u.nq),
                    (0.927, u.nkv),
                    (-0.022, u.ni),
                    (11.005, u.s),
                    (-0.778, u.cq),
                    (1.812, u.ckv),
                    (3.036, u.ci),
                    (0.002, u.vc),
                    (-1.979, u.n),
                    (0.059 * l1, u.nc),
                    (8.054 * l1, u.nq),
                    (7.937 * l1, u.nkv),
                    (0.013 * l1, u.ni),
                    (0.995 * l1, u.s),
                    (2.816 * l1, u.cq),
                    (1.688 * l1, u.ckv),
                    (2.956 * l1, u.ci),
                ],
                25788.9,
            )
            .max(lin(
                &[
                    (8.820, u.nc),
                    (0.107, u.nq),
                    (-0.517, u.nkv),
                    (14.953, u.ni),
                    (0.025, u.s),
                    (-3.599, u.cq),
                    (6.692, u.ckv),
                    (2.389, u.ci),
                    (0.010, u.vc),
                    (15.731, u.n),
                    (0.222 * l1, u.nc),
                    (8.316 * l1, u.nq),
                    (7.982 * l1, u.nkv),
                    (-0.042 * l1, u.ni),
                    (0.990 * l1, u.s),
                    (4.351 * l1, u.cq),
                    (-2.190 * l1, u.ckv),
                    (2.928 * l1, u.ci),
                ],
                523.6,
            ))
            .max(lin(
                &[
                    (18.168, u.nc),
                    (4.319, u.nq),
                    (18.860, u.nkv),
                    (0.949, u.ni),
                    (1.276, u.s),
                    (16.462, u.cq),
                    (-37.724, u.ckv),
                    (3.273, u.ci),
                    (1.437, u.vc),
                    (-675.388, u.n),
                    (1.379 * l1, u.nc),
                    (6.529 * l1, u.nq),
                    (11.526 * l1, u.nkv),
                    (-0.845 * l1, u.ni),
                    (0.246 * l1, u.s),
                    (-3.507 * l1, u.cq),
                    (-3.583 * l1, u.ckv),
                    (2.453 * l1, u.ci),
                ],
                852361.5,
            )),
            loss: lin(
                &[
                    (10.002, u.rv),
                    (3.174, u.rc),
                    (-0.036, u.vc),
                    (1.023, u.multi * u.vc),
                    (1.000, u.nc),
                    (0.769, u.n),
                ],
                12420.2,
            )
            .max(lin(
                &[
                    (5.039, u.rv),
                    (7.761, u.rc),
                    (2.975, u.vc),
                    (2.975, u.multi * u.vc),
                    (0.939, u.nc),
                    (4.931, u.n),
                ],
                -3541.3,
            ))
            .max(lin(
                &[
                    (0.093, u.rv),
                    (16.956, u.rc),
                    (-1.321, u.vc),
                    (-8.716, u.multi * u.vc),
                    (2.549, u.nc),
                    (-55.173, u.n),
                ],
                937046.1,
            )),
            embedding: lin(&[(2.000, u.vc), (7.000, u.nc), (0.000, u.n)], 2877.0)
                .max(lin(&[(-0.000, u.vc), (8.000, u.nc), (0.000, u.n)], 2621.0)),
            optimizer: lin(&[(1.0000, adam)], 916.2),
        },
    }
}
