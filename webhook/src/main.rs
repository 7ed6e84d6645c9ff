//! `credbroker-webhook`: see the library's docs and docs/webhook.md.

#![forbid(unsafe_code)]

use clap::Parser;
use credbroker_webhook::run::{Args, init_logging, run};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("credbroker-webhook: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
