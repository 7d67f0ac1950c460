mod accuracy;
mod cli;
