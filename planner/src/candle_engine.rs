//! The `candle` engine's inventory: what vramplan's own engine allocates in one step.
//!
//! Until the engine's own accounting lands, it is the torch inventory of the same run in
//! fp32 (the engine trains in f32 on CPU).

use crate::spec::RunSpec;
use crate::timeline::Timeline;

pub fn play(spec: &RunSpec) -> Timeline {
    crate::torch::play(spec)
}
