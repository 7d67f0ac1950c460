//! With a config: does the log agree with the plan? The capacity it prints against the
//! preset's, the memory live at the failure against the planned peak, memory other
//! processes hold (the plan assumes a device of its own), and the host side, which the
//! planner does not model yet.

use super::Cause;
use crate::oom::OomReport;
use crate::report::Report;
use serde::Serialize;

/// The plan's numbers a log is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Predicted {
    pub peak_allocated_bytes: u64,
    pub device_bytes: u64,
    pub capacity_bytes: u64,
    pub fits: bool,
}

impl Predicted {
    pub fn of(r: &Report) -> Predicted {
        Predicted {
            peak_allocated_bytes: r.peak_allocated_bytes,
            device_bytes: r.device_bytes,
            capacity_bytes: r.capacity_bytes,
            fits: r.fits,
        }
    }
}

/// One finding of the log against the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PlanCheck {
    /// The GPU of the log is not the preset's (more than 3 % apart).
    CapacityDiffers {
        log_bytes: u64,
        preset_bytes: u64,
    },
    CapacityMatches {
        log_bytes: u64,
        preset_bytes: u64,
    },
    /// Live tensors plus the request exceed the planned peak by more than 15 %: a larger
    /// batch or sequence than configured, memory kept across steps, or another model.
    MoreThanPlanned {
        at_failure_bytes: u64,
        planned_peak_bytes: u64,
    },
    /// The failure is within the planned peak, and the plan says the run does not fit.
    AgreesDoesNotFit {
        at_failure_bytes: u64,
        planned_peak_bytes: u64,
    },
    /// The plan fits the device, yet the run failed below the planned peak.
    PlanFitsYetFailed {
        at_failure_bytes: u64,
        planned_device_bytes: u64,
    },
    /// Other processes hold memory the plan counts as the run's.
    OtherProcessesNotPlanned {
        bytes: u64,
    },
    /// The kernel killed the run for host memory: the planner has no host-RAM estimate.
    NoHostEstimate,
}

/// The log's numbers against the plan.
pub fn plan_checks(r: &OomReport, cause: Cause, p: &Predicted) -> Vec<PlanCheck> {
    let mut v = Vec::new();
    if cause == Cause::HostOom {
        v.push(PlanCheck::NoHostEstimate);
        return v;
    }
    if let Some(c) = r.capacity_bytes.filter(|&c| c > 0) {
        let (log_bytes, preset_bytes) = (c, p.capacity_bytes);
        if c.abs_diff(preset_bytes) > preset_bytes / 100 * 3 {
            v.push(PlanCheck::CapacityDiffers {
                log_bytes,
                preset_bytes,
            });
        } else {
            v.push(PlanCheck::CapacityMatches {
                log_bytes,
                preset_bytes,
            });
        }
    }
    if let (Some(a), Some(q)) = (r.allocated_bytes, r.request_bytes) {
        let at = a.saturating_add(q);
        let peak = p.peak_allocated_bytes;
        if at > peak.saturating_add(peak / 100 * 15) {
            v.push(PlanCheck::MoreThanPlanned {
                at_failure_bytes: at,
                planned_peak_bytes: peak,
            });
        } else if !p.fits {
            v.push(PlanCheck::AgreesDoesNotFit {
                at_failure_bytes: at,
                planned_peak_bytes: peak,
            });
        } else {
            v.push(PlanCheck::PlanFitsYetFailed {
                at_failure_bytes: at,
                planned_device_bytes: p.device_bytes,
            });
        }
    }
    if let Some(o) = r.other_processes_bytes.filter(|&o| o >= 1 << 30) {
        v.push(PlanCheck::OtherProcessesNotPlanned { bytes: o });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::GIB;

    #[test]
    fn more_than_planned_and_capacity() {
        let p = Predicted {
            peak_allocated_bytes: 20 * GIB,
            device_bytes: 22 * GIB,
            capacity_bytes: 80 * GIB,
            fits: true,
        };
        let r = OomReport {
            capacity_bytes: Some(40 * GIB),
            allocated_bytes: Some(30 * GIB),
            request_bytes: Some(GIB),
            other_processes_bytes: Some(2 * GIB),
            ..OomReport::default()
        };
        let v = plan_checks(&r, Cause::DoesNotFit, &p);
        assert!(matches!(v[0], PlanCheck::CapacityDiffers { .. }));
        assert!(matches!(v[1], PlanCheck::MoreThanPlanned { .. }));
        assert_eq!(v[2], PlanCheck::OtherProcessesNotPlanned { bytes: 2 * GIB });
        let low = OomReport {
            allocated_bytes: Some(10 * GIB),
            ..r.clone()
        };
        assert!(matches!(
            plan_checks(&low, Cause::DoesNotFit, &p)[1],
            PlanCheck::PlanFitsYetFailed { .. }
        ));
        assert_eq!(
            plan_checks(&r, Cause::HostOom, &p),
            vec![PlanCheck::NoHostEstimate]
        );
    }
}
