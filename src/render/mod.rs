//! Output formats: pure functions from planner data to text.

pub mod json;
pub mod svg;
pub mod table;
