//! `dinov2`: features, pictures, weight conversion and data curation from the command line.
//!
//! The command line itself (clap arguments, progress bars, messages) lives in [`cli`]; every subcommand is a
//! thin layer over library calls.

mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    cli::run(cli::Cli::parse())
}
