//! One module per subcommand: parse its options, call the planner or the engine, render.

#[cfg(feature = "engine")]
pub mod calibrate;
pub mod compare;
pub mod diagnose;
pub mod estimate;
#[cfg(feature = "engine")]
pub mod eval;
#[cfg(feature = "engine")]
pub mod export;
pub mod fit;
pub mod gpus;
pub mod models;
#[cfg(feature = "engine")]
pub mod sample;
#[cfg(feature = "engine")]
pub mod train;
