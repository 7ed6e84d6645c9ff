//! The contract between what the webhook injects and what the sidecar
//! reads: the init container's args must parse as `credbroker-sidecar
//! init`'s and give the capture the settings asked for, and every
//! variable the sidecar container gets must be one `credbroker-sidecar
//! proxy` reads, with a value it accepts. A renamed flag or variable on
//! either side fails here, not in a pod that never starts.

use std::collections::BTreeMap;

use clap::{CommandFactory, Parser};
use credbroker_sidecar::init::{CaptureConfig, InitArgs};
use credbroker_sidecar::run::ProxyArgs;
use credbroker_webhook::mutate::{init_container, sidecar_container};
use credbroker_webhook::settings::{InjectSettings, SidecarVault};

#[derive(Parser)]
struct Init {
    #[command(flatten)]
    args: InitArgs,
}

#[derive(Parser)]
struct Proxy {
    #[command(flatten)]
    args: Box<ProxyArgs>,
}

fn settings() -> InjectSettings {
    InjectSettings {
        sidecar_image: "sidecar:1".into(),
        init_image: "init:1".into(),
        image_pull_policy: None,
        proxy_uid: 15017,
        proxy_gid: 15018,
        proxy_port: 15101,
        admin_port: 15121,
        exclude_ports: vec![22, 5432],
        exclude_cidrs: vec!["10.0.0.1/32".into(), "fd00::/8".into()],
        audience: "credbroker".into(),
        token_expiration_seconds: 3600,
        vault: SidecarVault {
            addr: "https://vault.vault.svc:8200".into(),
            auth_mount: "kubernetes".into(),
            namespace: Some("team-a".into()),
            ca_pem: Some("-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n".into()),
        },
        sidecar_resources: Default::default(),
        broker_namespace: "credbroker-system".into(),
    }
}

#[test]
fn the_init_container_runs_init_with_the_settings() {
    let settings = settings();
    let init = init_container(&settings);
    let args = init.args.unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("init"));
    let parsed =
        Init::try_parse_from(std::iter::once("init").chain(args[1..].iter().map(String::as_str)))
            .unwrap_or_else(|e| panic!("credbroker-sidecar init refuses the injected args: {e}"));
    let capture = CaptureConfig::from_args(&parsed.args)
        .unwrap_or_else(|e| panic!("the injected args give no capture: {e}"));
    assert_eq!(capture.proxy_uid, 15017);
    assert_eq!(capture.proxy_gid, 15018);
    assert_eq!(capture.proxy_port, 15101);
    assert_eq!(capture.exclude_ports, vec![22, 5432]);
    let cidrs: Vec<String> = capture
        .exclude_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(cidrs, ["10.0.0.1/32", "fd00::/8"]);
}

#[test]
fn every_sidecar_variable_is_one_the_sidecar_reads_with_a_value_it_takes() {
    let sidecar = sidecar_container(&settings());
    assert_eq!(sidecar.args.as_deref(), Some(&["proxy".to_owned()][..]));
    // The sidecar's variables, by name, and the flag each one sets.
    let command = Proxy::command();
    let flag_of: BTreeMap<String, String> = command
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_string_lossy().into_owned(),
                a.get_long()?.to_owned(),
            ))
        })
        .collect();
    let mut argv = vec!["proxy".to_owned()];
    for var in sidecar.env.unwrap_or_default() {
        let flag = flag_of.get(&var.name).unwrap_or_else(|| {
            panic!(
                "the webhook sets {}, which credbroker-sidecar proxy does not read",
                var.name
            )
        });
        // Downward-API values: any pod name and namespace will do.
        let value = var.value.unwrap_or_else(|| "agent".to_owned());
        argv.push(format!("--{flag}={value}"));
    }
    let parsed = Proxy::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("credbroker-sidecar proxy refuses the injected env: {e}"));
    assert_eq!(parsed.args.proxy_uid, 15017);
    assert_eq!(parsed.args.proxy_gid, 15018);
    assert_eq!(parsed.args.proxy_port, 15101);
    assert_eq!(
        parsed.args.engine.admin_addr.map(|a| a.port()),
        Some(15121),
        "the startupProbe's port"
    );
    // In a pod, no --vault-role: the role comes from the bindings file.
    assert!(parsed.args.engine.vault.vault_role.is_none());
}
