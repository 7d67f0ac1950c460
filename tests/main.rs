mod accuracy;
mod cli;
mod diagnose;
mod parquet_data;
mod train;
