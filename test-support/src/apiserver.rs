//! A real kube-apiserver backed by a real etcd, started the envtest way:
//! binaries from `KUBEBUILDER_ASSETS`, free loopback ports, RBAC
//! authorization, and mutating and validating admission (webhooks and
//! ValidatingAdmissionPolicy) as a cluster has them.
//!
//! What envtest is not: it runs no controller-manager and no kubelet. So there
//! is no garbage collector (owner references never cascade), no namespace
//! controller (a deleted namespace stays `Terminating`), no service-account
//! controller (no `default` ServiceAccount; create the ones a test needs), and
//! no pod ever runs. Tests create what they need and delete what they own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec, TokenReviewStatus,
};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::pki::{self, TestCa};
use crate::process::ChildGuard;
use crate::{Error, Result, free_port, require_binary_in_assets, wait_until};

/// The service-account issuer the fixture's API server signs tokens with.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A running etcd + kube-apiserver. Drop stops both and removes their files.
pub struct TestApiServer {
    url: String,
    port: u16,
    dir: PathBuf,
    ca_pem: String,
    sa_public_key_pem: String,
    kubeconfig_path: PathBuf,
    kubectl: PathBuf,
    // Dropped last-to-first: apiserver before etcd.
    apiserver: ChildGuard,
    _etcd: ChildGuard,
    _owned_dir: Option<tempfile::TempDir>,
    pub startup: Duration,
}

impl TestApiServer {
    /// Starts an instance owned by the caller, stopped on drop.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("credbroker-apiserver-")
            .tempdir()
            .map_err(|e| Error::Io("creating the apiserver directory".into(), e))?;
        let path = dir.path().to_path_buf();
        let mut me = Self::start_in(path, false).await?;
        me._owned_dir = Some(dir);
        Ok(me)
    }

    /// Like [`Self::start`], with the ServiceAccount admission plugin on:
    /// pods need their ServiceAccount to exist, and get its default token
    /// volume (`kube-api-access-*`) as on a real cluster.
    pub async fn start_with_service_account_admission() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("credbroker-apiserver-")
            .tempdir()
            .map_err(|e| Error::Io("creating the apiserver directory".into(), e))?;
        let path = dir.path().to_path_buf();
        let mut me = Self::start_in(path, true).await?;
        me._owned_dir = Some(dir);
        Ok(me)
    }

    /// One instance shared by every test of this test binary, started on
    /// first use (a start takes seconds). Its processes die with the binary.
    /// Tests sharing it must use their own namespaces and names.
    pub async fn shared() -> Result<Arc<Self>> {
        static SHARED: tokio::sync::OnceCell<std::result::Result<Arc<TestApiServer>, String>> =
            tokio::sync::OnceCell::const_new();
        SHARED
            .get_or_init(|| async {
                let dir = crate::process_scratch_dir("apiserver").map_err(|e| e.to_string())?;
                Self::start_in(dir, false)
                    .await
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .await
            .clone()
            .map_err(|e| Error::Other(format!("the shared apiserver did not start: {e}")))
    }

    /// Starts etcd and kube-apiserver in `dir`, retrying with new ports when
    /// another process took a port between choosing it and binding it.
    async fn start_in(dir: PathBuf, service_account_admission: bool) -> Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(&dir, service_account_admission).await {
                Err(e) if attempt < 3 && e.to_string().contains("address already in use") => {
                    continue;
                }
                other => return other,
            }
        }
    }

    async fn start_once(dir: &Path, service_account_admission: bool) -> Result<Self> {
        let spawn = ChildGuard::spawn;
        let dir = dir.to_path_buf();
        {
            // Keys and an admin kubeconfig live here: owner only.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::Io(format!("restricting {}", dir.display()), e))?;
        }
        let started = Instant::now();
        let etcd_bin = require_binary_in_assets("etcd")?;
        let apiserver_bin = require_binary_in_assets("kube-apiserver")?;
        let kubectl = require_binary_in_assets("kubectl")?;
        let write = |name: &str, contents: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, contents).map_err(|e| Error::Io(format!("writing {name}"), e))?;
            Ok(p)
        };

        // PKI: one CA for serving and client certs; an admin client in
        // system:masters; an ECDSA service-account signing key.
        let ca = TestCa::new("credbroker-test-apiserver-ca")?;
        let serving = ca.issue_server(&["127.0.0.1", "localhost"])?;
        let admin = ca.issue_client("credbroker-test-admin", &["system:masters"])?;
        let (sa_key, sa_pub) = pki::signing_key_pem()?;
        let ca_file = write("ca.crt", ca.cert_pem())?;
        let cert_file = write("apiserver.crt", &serving.cert_pem)?;
        let key_file = write("apiserver.key", &serving.key_pem)?;
        let sa_key_file = write("sa.key", &sa_key)?;
        let sa_pub_file = write("sa.pub", &sa_pub)?;

        let etcd_port = free_port()?;
        let mut etcd_peer_port = free_port()?;
        while etcd_peer_port == etcd_port {
            etcd_peer_port = free_port()?;
        }
        let etcd_data = dir.join("etcd");
        let mut etcd = Command::new(&etcd_bin);
        etcd.arg("--data-dir")
            .arg(&etcd_data)
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
            ))
            .arg(format!(
                "--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"
            ))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=default=http://127.0.0.1:{etcd_peer_port}"
            ))
            .arg("--unsafe-no-fsync")
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
        let etcd = spawn("etcd", etcd)?;
        let etcd_health = format!("http://127.0.0.1:{etcd_port}/health");
        wait_until("etcd health", Duration::from_secs(30), || {
            let alive = etcd.check_running();
            let url = etcd_health.clone();
            async move {
                alive?;
                http_get_ok(url).await
            }
        })
        .await?;

        let port = free_port()?;
        let mut cmd = Command::new(&apiserver_bin);
        cmd.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!("--tls-cert-file={}", cert_file.display()))
            .arg(format!("--tls-private-key-file={}", key_file.display()))
            .arg(format!("--client-ca-file={}", ca_file.display()))
            .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
            .arg(format!("--service-account-key-file={}", sa_pub_file.display()))
            .arg(format!("--service-account-signing-key-file={}", sa_key_file.display()))
            .arg("--service-cluster-ip-range=10.96.0.0/24")
            .arg("--authorization-mode=RBAC")
            .arg("--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy")
            .arg("--allow-privileged=true");
        if !service_account_admission {
            // No service-account controller runs here, so no `default`
            // ServiceAccount exists: the plugin would refuse most pods.
            cmd.arg("--disable-admission-plugins=ServiceAccount");
        }
        let apiserver = spawn("kube-apiserver", cmd)?;

        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin, namespace: default}}\ncurrent-context: test\n",
            ca = b64(ca.cert_pem()),
            cert = b64(&admin.cert_pem),
            key = b64(&admin.key_pem),
        );
        let kubeconfig_path = write("kubeconfig", &kubeconfig)?;

        // /readyz covers etcd, the RBAC bootstrap roles (system:auth-delegator
        // among them) and the CRD and admission machinery.
        let client = client_from_kubeconfig(&kubeconfig_path).await?;
        wait_until("kube-apiserver /readyz", Duration::from_secs(90), || {
            let alive = apiserver.check_running();
            let client = client.clone();
            async move {
                alive?;
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| Error::Other(e.to_string()))?;
                client
                    .request_text(req)
                    .await
                    .map_err(|e| Error::Other(e.to_string()))
            }
        })
        .await?;
        Ok(Self {
            url: format!("https://127.0.0.1:{port}"),
            port,
            dir,
            ca_pem: ca.cert_pem().to_string(),
            sa_public_key_pem: sa_pub,
            kubeconfig_path,
            kubectl,
            apiserver,
            _etcd: etcd,
            _owned_dir: None,
            startup: started.elapsed(),
        })
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The CA that signed the serving certificate (what Vault's Kubernetes
    /// auth needs as `kubernetes_ca_cert`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
    /// The public key service-account tokens verify with (for JWT auth).
    pub fn service_account_public_key_pem(&self) -> &str {
        &self.sa_public_key_pem
    }
    /// An admin kubeconfig, for the real `kubectl`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }
    /// A scratch directory that lives as long as the fixture.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A kubeconfig that authenticates with `token` (a ServiceAccount's),
    /// for running a component as its own identity.
    pub fn kubeconfig_for_token(&self, token: &str) -> String {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem());
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: component\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: component\ncurrent-context: test\n",
            self.url()
        )
    }

    /// The real `kubectl`, pointed at this server as admin.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig_path);
        cmd
    }

    /// `kubectl apply -f -` as admin, with `yaml` (or JSON) on stdin and
    /// `extra` arguments after it (`--dry-run=server`, ...): stdout if
    /// applied, stderr (what a user sees) if refused. Failing to run
    /// kubectl at all is an `Err` too, saying so.
    pub fn kubectl_apply(&self, yaml: &str, extra: &[&str]) -> std::result::Result<String, String> {
        use std::io::Write as _;
        use std::process::Stdio;
        let mut child = self
            .kubectl()
            .args(["apply", "--request-timeout=30s", "-f", "-"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running kubectl: {e}"))?;
        // Written, then closed (dropped) before waiting: kubectl reads to EOF.
        child
            .stdin
            .take()
            .ok_or_else(|| "kubectl has no stdin".to_owned())?
            .write_all(yaml.as_bytes())
            .map_err(|e| format!("writing to kubectl: {e}"))?;
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for kubectl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A fresh admin client. Make one per test: a client lives on the tokio
    /// runtime that created it, and each `#[tokio::test]` has its own.
    pub async fn client(&self) -> Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig_path).await
    }

    /// The apiserver's output so far (for failure messages).
    pub fn apiserver_output_tail(&self) -> String {
        self.apiserver.output_tail(4000)
    }
}

/// Helpers that build the Kubernetes objects tests need, on any client.
pub struct Cluster {
    pub client: kube::Client,
}

impl Cluster {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    /// Creates a namespace with labels.
    pub async fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) -> Result<Namespace> {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .map_err(kube_error(&format!("creating namespace {name}")))
    }

    /// Creates a ServiceAccount (envtest has no `default` one).
    pub async fn create_service_account(&self, ns: &str, name: &str) -> Result<ServiceAccount> {
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &sa)
            .await
            .map_err(kube_error(&format!("creating service account {ns}/{name}")))
    }

    /// A token for a ServiceAccount with the given audience (TokenRequest).
    pub async fn token(
        &self,
        ns: &str,
        sa: &str,
        audiences: &[&str],
        expiry: Duration,
    ) -> Result<String> {
        let req = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
                expiration_seconds: Some(expiry.as_secs() as i64),
                bound_object_ref: None,
            }),
            ..Default::default()
        };
        let resp: TokenRequest = Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create_subresource("token", sa, &PostParams::default(), &req)
            .await
            .map_err(kube_error(&format!("requesting a token for {ns}/{sa}")))?;
        resp.status
            .and_then(|s| s.token)
            .ok_or_else(|| Error::Other(format!("TokenRequest for {ns}/{sa} returned no status")))
    }

    /// Asks the API server whether `token` is valid for `audiences`.
    pub async fn token_review(&self, token: &str, audiences: &[&str]) -> Result<TokenReviewStatus> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            },
            ..Default::default()
        };
        let resp = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(kube_error("creating a TokenReview"))?;
        resp.status
            .ok_or_else(|| Error::Other("TokenReview returned no status".into()))
    }

    /// Creates the ServiceAccount Vault's Kubernetes auth uses to review
    /// tokens, bound to `system:auth-delegator`, and returns a long-lived
    /// token for it (Vault runs outside the cluster, so it needs one).
    pub async fn create_token_reviewer(&self, ns: &str, name: &str) -> Result<String> {
        self.create_service_account(ns, name).await?;
        let crb = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(format!("{ns}-{name}-auth-delegator")),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: "system:auth-delegator".into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: name.into(),
                namespace: Some(ns.into()),
                ..Default::default()
            }]),
        };
        Api::<ClusterRoleBinding>::all(self.client.clone())
            .create(&PostParams::default(), &crb)
            .await
            .map_err(kube_error(
                "binding the token reviewer to system:auth-delegator",
            ))?;
        // The API server's default audience: what TokenReview expects of a
        // reviewer's own token.
        self.token(
            ns,
            name,
            &[SERVICE_ACCOUNT_ISSUER],
            Duration::from_secs(24 * 3600),
        )
        .await
    }

    /// Applies CRD YAML files (server-side apply) and waits until each is
    /// Established, so objects of its kind can be created right away.
    pub async fn install_crds(&self, yaml_files: &[PathBuf]) -> Result<()> {
        let api = Api::<CustomResourceDefinition>::all(self.client.clone());
        for file in yaml_files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| Error::Io(format!("reading {}", file.display()), e))?;
            let crd: CustomResourceDefinition = serde_yaml_ng(&text, file)?;
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(
                &name,
                &kube::api::PatchParams::apply("credbroker-tests").force(),
                &kube::api::Patch::Apply(&crd),
            )
            .await
            .map_err(kube_error(&format!("applying CRD {name}")))?;
            let api = api.clone();
            let n = name.clone();
            wait_until(
                &format!("CRD {name} Established"),
                Duration::from_secs(30),
                move || {
                    let api = api.clone();
                    let n = n.clone();
                    async move {
                        let crd = api.get(&n).await.map_err(|e| e.to_string())?;
                        let established = crd
                            .status
                            .and_then(|s| s.conditions)
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True");
                        if established {
                            Ok(())
                        } else {
                            Err("not yet".to_string())
                        }
                    }
                },
            )
            .await?;
        }
        Ok(())
    }
}

fn serde_yaml_ng(text: &str, file: &Path) -> Result<CustomResourceDefinition> {
    // CRD files carry a leading comment; YAML parsers skip it.
    serde_json::from_value(
        yaml_to_json(text).map_err(|e| Error::Other(format!("parsing {}: {e}", file.display())))?,
    )
    .map_err(|e| Error::Other(format!("{} is not a CRD: {e}", file.display())))
}

fn yaml_to_json(text: &str) -> std::result::Result<serde_json::Value, String> {
    serde_yaml::from_str(text).map_err(|e| e.to_string())
}

/// A client from a kubeconfig file (an admin one, or a component's own).
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    crate::install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(path)
        .map_err(|e| Error::Other(format!("reading the test kubeconfig: {e}")))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Other(format!("loading the test kubeconfig: {e}")))?;
    kube::Client::try_from(config).map_err(|e| Error::Other(format!("building a client: {e}")))
}

/// Maps a kube error to ours, saying what we were doing.
pub fn kube_error(doing: &str) -> impl FnOnce(kube::Error) -> Error + '_ {
    move |e| Error::Other(format!("{doing}: {e}"))
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

async fn http_get_ok(url: String) -> Result<()> {
    // etcd's plain-HTTP health endpoint. An async client with its own short
    // timeout, so a wedged etcd cannot block the runtime.
    crate::install_crypto_provider();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| Error::Other(format!("building an HTTP client: {e}")))?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| Error::Other(format!("{url}: {e}")))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(Error::Other(format!("{url} answered {}", resp.status())))
    }
}
