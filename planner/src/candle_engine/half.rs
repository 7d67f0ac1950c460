//! TEMPORARY
use super::{Units, WorkingSets};
use crate::spec::Arch;
pub(super) fn working_sets(arch: Arch, u: &Units, layers: f64, w: f64, pmax: f64) -> WorkingSets {
    super::f32::working_sets(arch, u, layers, w, pmax)
}
