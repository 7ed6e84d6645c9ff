//! Writes the CRD YAML into `crds/generated/` (or checks it with `--check`).
//! The checked-in YAML is what users and the Helm chart install; a test fails
//! when it drifts from the Rust types.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("generated");
    let check = std::env::args().any(|a| a == "--check");
    let mut drifted = false;
    for (file, yaml) in credbroker_crds::generated::all() {
        let yaml = match yaml {
            Ok(y) => y,
            Err(e) => {
                eprintln!("crdgen: rendering {file}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let path = dir.join(file);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                eprintln!("crdgen: {} is stale; run `make crds`", path.display());
                drifted = true;
            }
        } else if let Err(e) =
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, yaml))
        {
            eprintln!("crdgen: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if drifted {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
