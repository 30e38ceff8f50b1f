//! Stand-alone `curate` command (the same subcommands as `dinov2 curate`, without the embedding backbone).
//!
//! ```text
//! cargo run --release -p dinov2-curate --example curate -- dedup --embeddings X.npy --k 64 --threshold 0.6 --output DIR
//! ```

use clap::Parser;

#[derive(Parser)]
#[command(name = "curate", about = "DINOv2 data curation on embeddings")]
struct Cli {
    #[command(subcommand)]
    cmd: dinov2_curate::cli::CurateCommand,
}

fn main() -> std::process::ExitCode {
    match dinov2_curate::cli::run(Cli::parse().cmd) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
