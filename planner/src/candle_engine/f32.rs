//! The f32 engine's working sets (CPU, `precision = "fp32"`), fitted against the counting
//! allocator (see the module above for how).

use super::{lin, Units, WorkingSets};
use crate::spec::Arch;

/// The working sets of one step in f32; `w` and `pmax` are the parameters' total and
/// largest bytes.
pub(super) fn working_sets(arch: Arch, u: &Units, layers: f64, w: f64, pmax: f64) -> WorkingSets {
    let h = halves(arch, u);
    let (graph, fwd_peak, bwd_peak) = whole_graph(arch, u, layers);
    WorkingSets {
        fwd_attn: h.fwd_attn,
        fwd_mlp: h.fwd_mlp,
        bwd_mlp: h.bwd_mlp,
        bwd_attn: h.bwd_attn,
        graph,
        fwd_peak,
        bwd_peak,
        loss: loss_stage(arch, u),
        embedding: match arch {
            Arch::Nanochat => lin(&[(2.0, u.vc), (15.0, u.nc), (4.0, u.n)], 6_413.0),
            _ => lin(&[(2.0, u.vc), (6.0, u.nc)], 2_621.0),
        },
        optimizer: match arch {
            Arch::Nanochat => lin(&[(-0.247, w), (3.424, pmax)], 43_961.0),
            _ => lin(&[(-0.011, w), (4.041, pmax)], -6_305.0),
        },
    }
}

/// With checkpointing each block runs as two halves, `x + attn(norm(x))` and
/// `h + mlp(norm(h))`, each built and dropped on its own; these are the working sets of
/// their forwards and of their recompute-and-backward, above the live bytes before them.
struct Halves {
    fwd_attn: u64,
    fwd_mlp: u64,
    bwd_mlp: u64,
    bwd_attn: u64,
}

fn halves(arch: Arch, u: &Units) -> Halves {
    match arch {
        Arch::Nanochat => Halves {
            fwd_attn: lin(
                &[
                    (3.255, u.nc),
                    (18.131, u.nq),
                    (6.014, u.s),
                    (-24.957, u.n),
                    (37.52, u.bht),
                    (-3.212, u.td),
                    (0.955, u.cq),
                ],
                122.0,
            ),
            fwd_mlp: lin(&[(3.011, u.nc), (3.002, u.ni), (0.007, u.ci)], 124.0)
                .max(lin(&[(2.005, u.nc), (3.002, u.ni), (1.0, u.ci)], 0.0)),
            bwd_mlp: lin(&[(20.069, u.nc), (3.995, u.ni), (2.131, u.ci)], 3.0)
                .max(lin(&[(10.146, u.nc), (12.262, u.ni), (0.95, u.ci)], 43.0)),
            bwd_attn: lin(
                &[
                    (23.796, u.nc),
                    (36.955, u.nq),
                    (6.987, u.s),
                    (41.322, u.bht),
                    (4.829, u.cq),
                ],
                -3.0,
            )
            .max(lin(
                &[
                    (12.649, u.nc),
                    (19.983, u.nq),
                    (16.996, u.s),
                    (30.571, u.bht),
                    (5.684, u.cq),
                ],
                0.0,
            )),
        },
        _ => Halves {
            fwd_attn: lin(
                &[
                    (4.017, u.nc),
                    (10.323, u.nq),
                    (4.075, u.nkv),
                    (6.007, u.s),
                    (-11.22, u.n),
                    (19.792, u.bht),
                    (-2.327, u.td),
                    (1.207, u.cq),
                    (0.152, u.ckv),
                ],
                116.0,
            ),
            fwd_mlp: lin(&[(4.012, u.nc), (4.003, u.ni), (0.013, u.ci)], 108.0)
                .max(lin(&[(3.015, u.nc), (4.005, u.ni), (0.994, u.ci)], 0.0)),
            bwd_mlp: lin(&[(17.116, u.nc), (15.616, u.ni), (4.097, u.ci)], 0.0)
                .max(lin(&[(14.133, u.nc), (19.022, u.ni), (1.975, u.ci)], 29.0)),
            bwd_attn: lin(
                &[
                    (23.718, u.nc),
                    (19.03, u.nq),
                    (13.788, u.nkv),
                    (6.897, u.s),
                    (34.844, u.bht),
                    (3.066, u.cq),
                    (3.306, u.ckv),
                ],
                12.0,
            )
            .max(lin(
                &[
                    (13.755, u.nc),
                    (11.471, u.nq),
                    (5.339, u.nkv),
                    (17.041, u.s),
                    (7.859, u.bht),
                    (1.486, u.cq),
                    (2.064, u.ckv),
                ],
                -3.0,
            )),
        },
    }
}

/// A whole block's recompute-and-backward working set (both halves in one graph), the
/// larger of two planes, one where the MLP's backward peaks and one where attention's does:
/// the unit in which the backward without checkpointing is written.
fn block_backward(arch: Arch, u: &Units) -> u64 {
    match arch {
        Arch::Nanochat => lin(
            &[(22.587, u.nc), (25.879, u.nq), (10.504, u.ni), (5.178, u.s)],
            47.0,
        )
        .max(lin(
            &[(22.704, u.nc), (30.872, u.nq), (3.676, u.ni), (14.27, u.s)],
            5.0,
        )),
        _ => lin(
            &[
                (20.976, u.nc),
                (13.002, u.nq),
                (5.802, u.nkv),
                (18.78, u.ni),
                (5.213, u.s),
            ],
            4.0,
        )
        .max(lin(
            &[
                (21.482, u.nc),
                (12.301, u.nq),
                (7.797, u.nkv),
                (3.926, u.ni),
                (16.501, u.s),
            ],
            1.0,
        )),
    }
}

/// Without checkpointing: the forward graph kept for backward, the forward's peak above
/// the step's start, and the backward's peak above the end of the loss (written with one
/// checkpointed block's backward, `bb`, and the blocks before the last).
fn whole_graph(arch: Arch, u: &Units, layers: f64) -> (u64, u64, u64) {
    let l = layers;
    let l1 = (layers - 1.0).max(0.0);
    let bb = block_backward(arch, u) as f64;
    match arch {
        Arch::Nanochat => (
            lin(
                &[
                    (7.678 * l, u.nc),
                    (19.644 * l, u.nq),
                    (2.968 * l, u.ni),
                    (6.106 * l, u.s),
                    (3.435, u.nc),
                ],
                7.0,
            ),
            lin(
                &[
                    (7.658 * l, u.nc),
                    (19.664 * l, u.nq),
                    (2.971 * l, u.ni),
                    (6.105 * l, u.s),
                    (3.446, u.nc),
                ],
                7.0,
            ),
            lin(
                &[
                    (1.116, bb),
                    (-16.347, u.nc),
                    (-26.939, u.nq),
                    (-3.098, u.ni),
                    (-5.799, u.s),
                    (4.785 * l1, u.nc),
                    (18.782 * l1, u.nq),
                    (-0.165 * l1, u.ni),
                    (-0.237 * l1, u.s),
                ],
                -14.0,
            ),
        ),
        _ => (
            lin(
                &[
                    (9.839 * l, u.nc),
                    (11.408 * l, u.nq),
                    (3.048 * l, u.nkv),
                    (4.029 * l, u.ni),
                    (6.037 * l, u.s),
                    (1.209, u.nc),
                ],
                4.0,
            ),
            lin(
                &[
                    (9.845 * l, u.nc),
                    (11.524 * l, u.nq),
                    (2.746 * l, u.nkv),
                    (4.069 * l, u.ni),
                    (6.013 * l, u.s),
                    (1.254, u.nc),
                ],
                3.0,
            ),
            lin(
                &[
                    (0.858, bb),
                    (-6.173, u.nc),
                    (-4.792, u.nq),
                    (-9.106, u.nkv),
                    (-1.369, u.ni),
                    (-5.097, u.s),
                    (-0.472 * l1, u.nc),
                    (4.724 * l1, u.nq),
                    (12.442 * l1, u.nkv),
                    (0.665 * l1, u.ni),
                    (1.145 * l1, u.s),
                ],
                16.0,
            ),
        ),
    }
}

/// The chunked loss's working set: the larger of the chunk's logits graph (about 16 f32
/// copies of the chunk's logits for nanochat's soft-capped head, 10 for llama) and the
/// head-gradient accumulation.
fn loss_stage(arch: Arch, u: &Units) -> u64 {
    let common = [(u.multi, u.vc), (1.0, u.nc), (2.0, u.n)];
    let plane = |rv: f64, rc: f64, vc: f64, c: f64| {
        let mut t = vec![(rv, u.rv), (rc, u.rc), (vc, u.vc)];
        t.extend(common.iter().map(|(a, b)| (*a, *b)));
        lin(&t, c)
    };
    match arch {
        Arch::Nanochat => plane(8.0, 5.0, 5.0, 12_026.0).max(plane(16.0, 2.08, 0.0, 12_613.0)),
        _ => plane(5.0, 6.0, 5.0, 12_066.0).max(plane(10.0, 3.2, 0.0, 24_512.0)),
    }
}
