//! The binary's own refusals, which need no real part: each exits non-zero
//! naming what was wrong.

use std::process::Command;

const SIDECAR: &str = env!("CARGO_BIN_EXE_credbroker-sidecar");

#[test]
fn proxy_refuses_to_run_as_an_identity_init_did_not_exempt() {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    // The right UID, the wrong GID: init's exemption matches both, so the
    // sidecar's own connections would be captured.
    let out = Command::new(SIDECAR)
        .args([
            "proxy",
            "--secret-source",
            "file",
            "--secrets-dir",
            "/nonexistent",
        ])
        .args(["--proxy-uid", &uid.to_string()])
        .args(["--proxy-gid", &(gid.wrapping_add(1)).to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("GID {gid}")) && stderr.contains("--proxy-gid"),
        "{stderr}"
    );
}
