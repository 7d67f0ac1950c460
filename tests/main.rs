mod accuracy;
mod cli;
mod train;
