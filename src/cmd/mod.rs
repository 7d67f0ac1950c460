//! One module per subcommand: parse its options, call the planner or the engine, render.

pub mod compare;
pub mod diagnose;
pub mod estimate;
pub mod fit;
pub mod gpus;
pub mod models;
pub mod sample;
pub mod train;
