//! vramplan: predict, fit and explain the GPU memory of LLM training runs, and train with the plan.

mod cli;
mod cmd;
mod exit;
mod launch;
mod load;
mod nvml;
mod render;

use std::process::ExitCode;

fn main() -> ExitCode {
    #[cfg(feature = "engine")]
    vramplan::engine::keep_elementwise_on_one_thread();
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::code_for(&e)
        }
    }
}
