mod accuracy;
mod cli;
mod diagnose;
mod train;
