//! The controller's test harness: a real kube-apiserver + etcd and a real
//! OpenBao per scenario, with OpenBao's Kubernetes auth reviewing tokens
//! against that apiserver, and the real `credbroker-controller` binary
//! running against both with the Vault policy it prints for itself.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use credbroker_crds::{ClusterCredentialPolicy, CredentialBinding};
use credbroker_test_support::apiserver::{Cluster, SERVICE_ACCOUNT_ISSUER, TestApiServer};
use credbroker_test_support::openbao::OpenBao;
use credbroker_test_support::process::ChildGuard;
use credbroker_test_support::{free_port, run, wait_until};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

pub use credbroker_test_support::{Failure, TestResult};

/// Where the controller's reviewer and lease live.
pub const SYSTEM_NS: &str = "credbroker-system";

/// A secret value no code path may print: unique per call.
pub fn secret_value(name: &str) -> String {
    let n = credbroker_test_support::random_u32().unwrap_or(7);
    format!("sk-live-{name}-{n:08x}-do-not-print-0123456789")
}

/// One scenario's real parts.
pub struct Env {
    pub server: TestApiServer,
    pub cluster: Cluster,
    pub vault: OpenBao,
    pub cluster_id: String,
    controller_token: String,
    /// A kubeconfig for the controller's own ServiceAccount.
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    /// Every secret value written, for the leak scans.
    pub secrets: Vec<String>,
}

pub struct Controller {
    pub process: ChildGuard,
    pub admin_port: u16,
}

impl Env {
    pub async fn start(cluster_id: &str) -> TestResult<Self> {
        let server = TestApiServer::start().await?;
        let cluster = Cluster::new(server.client().await?);
        let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds/generated");
        cluster
            .install_crds(&[
                crds.join("credbroker.dev_credentialbindings.yaml"),
                crds.join("credbroker.dev_clustercredentialpolicies.yaml"),
            ])
            .await?;
        cluster.create_namespace(SYSTEM_NS, &[]).await?;
        let reviewer = cluster
            .create_token_reviewer(SYSTEM_NS, "vault-reviewer")
            .await?;
        let vault = OpenBao::start().await?;
        vault.mount_kv1("kv1").await?;
        vault.configure_kubernetes_auth("kubernetes", &server, &reviewer)?;
        let dir = tempfile::tempdir()?;
        // The controller runs as its own ServiceAccount, bound to exactly
        // the RBAC it documents (controller/deploy/rbac.yaml).
        let rbac = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/rbac.yaml");
        run(server
            .kubectl()
            .args(["apply", "-f", &rbac.display().to_string()]))?;
        let sa_token = cluster
            .token(
                SYSTEM_NS,
                "credbroker-controller",
                &[SERVICE_ACCOUNT_ISSUER],
                Duration::from_secs(3600),
            )
            .await?;
        let kubeconfig = dir.path().join("controller.kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig_for_token(&sa_token))?;
        // The controller runs with exactly the policy it documents.
        let policy = run(Command::new(controller_binary()).args([
            "--print-vault-policy",
            "--cluster-id",
            cluster_id,
            "--kv-mount",
            "secret",
        ]))?;
        vault.write_policy("credbroker-controller", &policy).await?;
        let controller_token = vault.create_token(&["credbroker-controller"]).await?;
        Ok(Self {
            server,
            cluster,
            vault,
            cluster_id: cluster_id.to_owned(),
            secrets: vec![controller_token.clone()],
            controller_token,
            kubeconfig,
            dir,
        })
    }

    pub fn client(&self) -> kube::Client {
        self.cluster.client.clone()
    }

    /// Flags that make a controller log in with AppRole (a role holding
    /// the controller's policy) instead of a token.
    pub fn approle_args(&mut self) -> TestResult<Vec<String>> {
        self.vault.bao(&["auth", "enable", "approle"])?;
        self.vault.bao(&[
            "write",
            "auth/approle/role/credbroker-controller",
            "token_policies=credbroker-controller",
            "token_no_default_policy=true",
            "token_ttl=10m",
        ])?;
        let role_id = self.vault.bao(&[
            "read",
            "-field=role_id",
            "auth/approle/role/credbroker-controller/role-id",
        ])?;
        let secret_id = self.vault.bao(&[
            "write",
            "-f",
            "-field=secret_id",
            "auth/approle/role/credbroker-controller/secret-id",
        ])?;
        let file = self.dir.path().join("approle.secret-id");
        std::fs::write(&file, secret_id.trim())?;
        self.secrets.push(secret_id.trim().to_owned());
        Ok(vec![
            "--vault-auth".into(),
            "approle".into(),
            "--vault-role-id".into(),
            role_id.trim().to_owned(),
            "--vault-secret-id-file".into(),
            file.display().to_string(),
        ])
    }

    /// Starts a controller replica with short intervals, for tests.
    pub async fn controller(&self, name: &str, extra: &[&str]) -> TestResult<Controller> {
        let admin_port = free_port()?;
        let token_file = self.dir.path().join(format!("{name}.token"));
        std::fs::write(&token_file, &self.controller_token)?;
        let mut cmd = Command::new(controller_binary());
        cmd.args([
            "--cluster-id",
            &self.cluster_id,
            "--vault-addr",
            self.vault.addr(),
            "--vault-allow-http",
            "--vault-auth",
            "token",
            "--vault-token-file",
            &token_file.display().to_string(),
            "--vault-timeout",
            "2s",
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
            "--lease-namespace",
            SYSTEM_NS,
            "--lease-identity",
            name,
            "--resync-interval",
            "2s",
            "--sweep-interval",
            "2s",
            "--cleanup-timeout",
            "20s",
            "--lease-duration",
            "6s",
            "--lease-renew-deadline",
            "4s",
            "--lease-retry-period",
            "1s",
        ])
        .args(extra)
        .env("KUBECONFIG", &self.kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("VAULT_ADDR")
        .env_remove("CREDBROKER_VAULT_TOKEN");
        for proxy in [
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "all_proxy",
        ] {
            cmd.env_remove(proxy);
        }
        let process = ChildGuard::spawn(name, cmd)?;
        let controller = Controller {
            process,
            admin_port,
        };
        wait_until(
            &format!("controller {name} ready"),
            Duration::from_secs(30),
            || async {
                controller
                    .process
                    .check_running()
                    .map_err(|e| e.to_string())?;
                match controller.admin("/readyz") {
                    Ok((200, _)) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await?;
        Ok(controller)
    }

    pub async fn namespace(&self, name: &str, labels: &[(&str, &str)]) -> TestResult {
        self.cluster.create_namespace(name, labels).await?;
        Ok(())
    }

    /// Applies a ClusterCredentialPolicy from its spec (server-side apply).
    pub async fn apply_policy(&self, name: &str, spec: serde_json::Value) -> TestResult {
        let api = Api::<ClusterCredentialPolicy>::all(self.client());
        let object = serde_json::json!({
            "apiVersion": "credbroker.dev/v1alpha1", "kind": "ClusterCredentialPolicy",
            "metadata": { "name": name }, "spec": spec,
        });
        api.patch(
            name,
            &PatchParams::apply("tests").force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(|e| Failure(format!("applying policy {name}: {e}")))?;
        Ok(())
    }

    pub async fn delete_policy(&self, name: &str) -> TestResult {
        Api::<ClusterCredentialPolicy>::all(self.client())
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }

    /// Applies a CredentialBinding from its spec (server-side apply).
    pub async fn apply_binding(&self, ns: &str, name: &str, spec: serde_json::Value) -> TestResult {
        let api = Api::<CredentialBinding>::namespaced(self.client(), ns);
        let object = serde_json::json!({
            "apiVersion": "credbroker.dev/v1alpha1", "kind": "CredentialBinding",
            "metadata": { "name": name, "namespace": ns }, "spec": spec,
        });
        api.patch(
            name,
            &PatchParams::apply("tests").force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(|e| Failure(format!("applying binding {ns}/{name}: {e}")))?;
        Ok(())
    }

    pub async fn delete_binding(&self, ns: &str, name: &str) -> TestResult {
        Api::<CredentialBinding>::namespaced(self.client(), ns)
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }

    /// Waits until the binding is gone (its finalizer ran).
    pub async fn wait_binding_gone(&self, ns: &str, name: &str, within: Duration) -> TestResult {
        let api = Api::<CredentialBinding>::namespaced(self.client(), ns);
        wait_until(&format!("binding {ns}/{name} gone"), within, || async {
            match api.get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(b)) => Err(format!(
                    "still there, finalizers {:?}",
                    b.metadata.finalizers
                )),
                Err(e) => Err(e.to_string()),
            }
        })
        .await?;
        Ok(())
    }

    /// Waits until condition `type_` of the binding has `status` (and the
    /// status describes the current generation); returns the binding.
    pub async fn wait_condition(
        &self,
        ns: &str,
        name: &str,
        type_: &str,
        status: &str,
        within: Duration,
    ) -> TestResult<CredentialBinding> {
        let api = Api::<CredentialBinding>::namespaced(self.client(), ns);
        let found = wait_until(&format!("{ns}/{name} {type_}={status}"), within, || async {
            let b = api.get(name).await.map_err(|e| e.to_string())?;
            let st = b.status.clone().unwrap_or_default();
            let current = st.observed_generation == b.metadata.generation;
            match st.conditions.iter().find(|c| c.type_ == type_) {
                Some(c) if c.status == status && current => Ok(b),
                Some(c) => Err(format!(
                    "{}={} ({}: {})",
                    c.type_, c.status, c.reason, c.message
                )),
                None => Err("no such condition yet".into()),
            }
        })
        .await?;
        Ok(found)
    }

    pub async fn binding(&self, ns: &str, name: &str) -> TestResult<CredentialBinding> {
        Ok(Api::<CredentialBinding>::namespaced(self.client(), ns)
            .get(name)
            .await?)
    }

    pub async fn configmap(&self, ns: &str, name: &str) -> TestResult<Option<ConfigMap>> {
        Ok(Api::<ConfigMap>::namespaced(self.client(), ns)
            .get_opt(name)
            .await?)
    }

    /// Writes a KV v2 secret as root and remembers the value for leak scans.
    pub fn put_secret(&mut self, path: &str, value: &str) -> TestResult {
        self.secrets.push(value.to_owned());
        self.vault.bao(&[
            "kv",
            "put",
            "-mount=secret",
            path,
            &format!("api_key={value}"),
        ])?;
        Ok(())
    }

    /// The text of a Vault ACL policy, or `None`.
    pub fn vault_policy(&self, name: &str) -> TestResult<Option<String>> {
        match self
            .vault
            .bao(&["read", "-format=json", &format!("sys/policies/acl/{name}")])
        {
            Ok(json) => {
                let v: serde_json::Value = serde_json::from_str(&json)?;
                Ok(v["data"]["policy"].as_str().map(str::to_owned))
            }
            Err(e) if e.to_string().contains("No value found") || e.to_string().contains("404") => {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A Kubernetes-auth role as Vault returns it, or `None`.
    pub fn vault_role(&self, name: &str) -> TestResult<Option<serde_json::Value>> {
        match self.vault.bao(&[
            "read",
            "-format=json",
            &format!("auth/kubernetes/role/{name}"),
        ]) {
            Ok(json) => {
                let v: serde_json::Value = serde_json::from_str(&json)?;
                Ok(Some(v["data"].clone()))
            }
            Err(e) if e.to_string().contains("No value found") || e.to_string().contains("404") => {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn vault_name(&self, ns: &str, sa: &str) -> String {
        credbroker_controller::names::vault_name(&self.cluster_id, ns, sa)
    }

    /// Logs in through Kubernetes auth as the sidecar would, with a real
    /// TokenRequest token; returns the Vault token or the refusal.
    pub async fn login(
        &self,
        ns: &str,
        sa: &str,
        audience: &str,
        role: &str,
    ) -> TestResult<Result<String, String>> {
        let jwt = self
            .cluster
            .token(ns, sa, &[audience], Duration::from_secs(600))
            .await?;
        let out = self.vault.bao(&[
            "write",
            "-format=json",
            "auth/kubernetes/login",
            &format!("role={role}"),
            &format!("jwt={jwt}"),
        ]);
        Ok(match out {
            Ok(json) => {
                let v: serde_json::Value = serde_json::from_str(&json)?;
                Ok(v["auth"]["client_token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned())
            }
            Err(e) => Err(e.to_string().replace(&jwt, "<jwt>")),
        })
    }

    /// Runs `bao` as `token`: Ok(stdout) or Err(stderr).
    pub fn bao_as(&self, token: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = self.vault.bao_command();
        cmd.env("BAO_TOKEN", token).args(args);
        run(&mut cmd).map_err(|e| e.to_string())
    }

    /// Everything a user could look at: the bindings (status included),
    /// the ConfigMaps, the Events, and the given processes' output.
    pub async fn visible_text(
        &self,
        namespaces: &[&str],
        controllers: &[&Controller],
    ) -> TestResult<String> {
        let mut text = String::new();
        for ns in namespaces {
            let bindings = Api::<CredentialBinding>::namespaced(self.client(), ns)
                .list(&Default::default())
                .await?;
            text.push_str(&serde_json::to_string(&bindings.items)?);
            let cms = Api::<ConfigMap>::namespaced(self.client(), ns)
                .list(&Default::default())
                .await?;
            text.push_str(&serde_json::to_string(&cms.items)?);
            let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(self.client(), ns)
                .list(&Default::default())
                .await?;
            text.push_str(&serde_json::to_string(&events.items)?);
        }
        for c in controllers {
            text.push_str(&c.process.output());
            text.push_str(&c.metrics()?);
        }
        Ok(text)
    }

    /// Fails if any secret value appears in `text`, raw, base64 or hex.
    pub fn assert_no_secret_in(&self, what: &str, text: &str) -> TestResult {
        for secret in &self.secrets {
            let forms = credbroker_test_support::encoded_forms(secret);
            if forms.iter().any(|f| text.contains(f.as_str())) {
                return Err(Failure(format!("a secret value appears in {what}")));
            }
        }
        Ok(())
    }

    /// The events of one binding, as (type, reason, note).
    pub async fn events_of(
        &self,
        ns: &str,
        name: &str,
    ) -> TestResult<Vec<(String, String, String)>> {
        let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(self.client(), ns)
            .list(&Default::default())
            .await?;
        Ok(events
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect())
    }
}

impl Controller {
    pub fn admin(&self, path: &str) -> TestResult<(u16, String)> {
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.admin_port))?;
        Ok(credbroker_test_support::http_get(stream, path)?)
    }

    pub fn metrics(&self) -> TestResult<String> {
        Ok(self.admin("/metrics")?.1)
    }

    /// The sum of a counter family's samples whose labels contain `filter`.
    pub fn counter(&self, name: &str, filter: &str) -> TestResult<u64> {
        let text = self.metrics()?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#') && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    /// Every Vault write so far.
    pub fn vault_writes(&self) -> TestResult<u64> {
        self.counter("credbroker_controller_vault_writes_total", "")
    }

    pub fn output(&self) -> String {
        self.process.output()
    }
}

pub fn controller_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_credbroker-controller"))
}

/// A binding spec in the test's shape.
pub fn binding_spec(sa: &str, path: &str, env: &str, host: &str) -> serde_json::Value {
    serde_json::json!({
        "serviceAccountName": sa,
        "source": { "vault": { "mount": "secret", "path": path, "key": "api_key" } },
        "placeholder": { "env": env, "prefix": "sk-" },
        "destinations": [{ "host": host }],
    })
}

/// A policy admitting namespaces labelled `team=<team>` to `secret/<prefix>` toward `hosts`.
pub fn policy_spec(team: &str, prefix: &str, hosts: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "namespaceSelector": { "matchLabels": { "team": team } },
        "allow": [{ "vault": { "mount": "secret", "pathPrefix": prefix }, "destinations": hosts }],
    })
}
