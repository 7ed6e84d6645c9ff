//! `credbroker-sidecar`: one binary, three subcommands sharing one engine.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "credbroker-sidecar",
    version,
    about = "Keeps real credentials out of AI agents."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Program the pod's packet filter so its outbound TCP reaches the
    /// sidecar (run by the init container).
    Init(credbroker_sidecar::init::InitArgs),
    /// The in-pod transparent proxy.
    Proxy,
    /// An explicit HTTP proxy on loopback, for use without Kubernetes.
    Local,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(args) => credbroker_sidecar::init::run(&args),
        Command::Proxy => Err(credbroker_sidecar::Error::NotImplemented(
            "the proxy subcommand",
        )),
        Command::Local => Err(credbroker_sidecar::Error::NotImplemented(
            "the local subcommand",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credbroker-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}
