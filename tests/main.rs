mod accuracy;
mod cli;
mod diagnose;
mod fuzz_cli;
mod launch;
mod oom_corpus;
mod parquet_data;
mod train;
