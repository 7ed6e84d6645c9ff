//! `credbroker-controller`: see the library's docs and docs/controller.md.

#![forbid(unsafe_code)]

use clap::Parser;
use credbroker_controller::run::{Args, init_logging, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(reason = e.reason(), "credbroker-controller: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
