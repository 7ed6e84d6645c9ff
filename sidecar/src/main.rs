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
    Proxy(Box<credbroker_sidecar::run::ProxyArgs>),
    /// An explicit HTTP proxy on loopback, for use without Kubernetes.
    Local(Box<credbroker_sidecar::run::LocalArgs>),
    /// Print a new random placeholder (for a local config file).
    Placeholder {
        /// A prefix, so SDKs that check a key's shape accept it (e.g. `sk-`).
        #[arg(long)]
        prefix: Option<String>,
    },
}

fn runtime() -> credbroker_sidecar::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("credbroker")
        .build()
        .map_err(|e| credbroker_sidecar::Error::Io {
            what: "starting the async runtime".into(),
            source: e,
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(args) => credbroker_sidecar::init::run(&args),
        Command::Proxy(args) => {
            runtime().and_then(|rt| rt.block_on(credbroker_sidecar::run::run_proxy(*args)))
        }
        Command::Local(args) => {
            runtime().and_then(|rt| rt.block_on(credbroker_sidecar::run::run_local(*args)))
        }
        Command::Placeholder { prefix } => {
            credbroker_sidecar::secret::Placeholder::generate(prefix.as_deref()).map(|p| {
                #[allow(clippy::print_stdout)]
                {
                    println!("{p}");
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credbroker-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}
