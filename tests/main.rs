mod accuracy;
mod cli;
mod diagnose;
mod fuzz_cli;
mod parquet_data;
mod run_folder;
mod train;
