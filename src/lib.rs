//! vramplan's library: the candle training engine (feature `engine`, on by default) that
//! the CLI and the benches use, the typed errors the CLI maps to exit codes, and the one
//! way the project writes files.

#[cfg(feature = "engine")]
pub mod engine;
mod error;
mod fsutil;

pub use error::Error;
pub use fsutil::write_atomic;
