//! The self-managed serving certificate against a real kube-apiserver and
//! etcd: the Secret and every caBundle are written as the module promises,
//! a rotation never leaves a moment where the served certificate is not
//! trusted by what is published, and of two replicas only the lease holder
//! writes.
//!
//! The MutatingWebhookConfigurations here point at a URL nothing serves,
//! with `failurePolicy: Ignore` and an objectSelector nothing matches: the
//! API server never calls them; they only hold caBundles.

// Test helpers outside #[test] functions: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use credbroker_controller::leader::LeaseSettings;
use credbroker_test_support::apiserver::{Cluster, TestApiServer};
use credbroker_test_support::{Failure, TestResult, install_crypto_provider, wait_until};
use credbroker_webhook::certs::{
    CA_CERT_KEY, CA_KEY_KEY, MANAGED_BY, MANAGED_BY_LABEL, ROTATE_ANNOTATION, ROTATED_ANNOTATION,
    SelfManaged, ServingCert, TLS_CERT_KEY, TLS_KEY_KEY, WRITTEN_BY_ANNOTATION, run_self_managed,
};
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{
    Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_util::sync::CancellationToken;

const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Two samples and a request: how much later than the event a sample may
/// see it.
const SAMPLING_SLACK: Duration = Duration::from_millis(400);

fn settings(ns: &str, mwc: &str, identity: &str, ca: u64, cert: u64) -> SelfManaged {
    SelfManaged {
        namespace: ns.into(),
        secret_name: "credbroker-webhook-tls".into(),
        webhook_configuration: mwc.into(),
        dns_names: vec![format!("credbroker-webhook.{ns}.svc"), "127.0.0.1".into()],
        ca_validity: Duration::from_secs(ca),
        cert_validity: Duration::from_secs(cert),
        propagation_delay: Duration::from_secs(2),
        check_interval: Duration::from_millis(500),
        lease: LeaseSettings {
            namespace: ns.into(),
            name: "credbroker-webhook-tls".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(500),
        },
    }
}

async fn create_webhook_configuration(client: &kube::Client, name: &str) -> TestResult {
    let webhook = |entry: &str| MutatingWebhook {
        name: format!("{entry}.{name}.credbroker.dev"),
        admission_review_versions: vec!["v1".into()],
        client_config: WebhookClientConfig {
            url: Some("https://127.0.0.1:1/mutate".into()),
            ..Default::default()
        },
        failure_policy: Some("Ignore".into()),
        side_effects: "None".into(),
        timeout_seconds: Some(1),
        object_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "credbroker.dev/certs-test".into(),
                "never-set".into(),
            )])),
            ..Default::default()
        }),
        rules: Some(vec![RuleWithOperations {
            api_groups: Some(vec![String::new()]),
            api_versions: Some(vec!["v1".into()]),
            operations: Some(vec!["CREATE".into()]),
            resources: Some(vec!["configmaps".into()]),
            scope: Some("Namespaced".into()),
        }]),
        ..Default::default()
    };
    let mwc = MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        webhooks: Some(vec![webhook("first"), webhook("second")]),
    };
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &mwc)
        .await
        .map_err(|e| Failure(format!("creating MutatingWebhookConfiguration {name}: {e}")))?;
    Ok(())
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    Some(String::from_utf8_lossy(&bytes.0).into_owned())
}

fn annotation(secret: &Secret, key: &str) -> Option<String> {
    secret.metadata.annotations.as_ref()?.get(key).cloned()
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("a PEM bundle")
}

/// The CA of `bundle` that `leaf` verifies against for every name, now, as
/// a TLS client (the API server) checks it.
fn issuer_in(leaf: &CertificateDer<'_>, bundle: &str, names: &[String]) -> Option<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let now = UnixTime::since_unix_epoch(SystemTime::now().duration_since(UNIX_EPOCH).ok()?);
    pem_certs(bundle).into_iter().find_map(|ca| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).ok()?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .ok()?;
        names
            .iter()
            .all(|name| {
                let name = ServerName::try_from(name.as_str()).expect("a server name");
                verifier
                    .verify_server_cert(leaf, &[], &name, &[], now)
                    .is_ok()
            })
            .then(|| ca.as_ref().to_vec())
    })
}

/// One look at everything, in the order a rotation changes it.
struct Sample {
    at: Instant,
    /// Each webhook entry's caBundle.
    bundles: Vec<Option<String>>,
    /// The leaf `serving` presents.
    served: Option<CertificateDer<'static>>,
    secret: Option<Secret>,
}

impl Sample {
    /// The CAs every entry trusts (entries are written together; checked).
    fn published(&self) -> Vec<Vec<u8>> {
        self.bundles
            .first()
            .cloned()
            .flatten()
            .map(|b| {
                pem_certs(&b)
                    .into_iter()
                    .map(|c| c.as_ref().to_vec())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn served_issuer(&self, names: &[String]) -> Option<Vec<u8>> {
        let bundle = self.bundles.first().cloned().flatten()?;
        issuer_in(self.served.as_ref()?, &bundle, names)
    }

    fn annotation(&self, key: &str) -> Option<String> {
        self.secret.as_ref().and_then(|s| annotation(s, key))
    }
}

/// Samples every 100 ms and checks, at every sample, that what `serving`
/// presents verifies against every published caBundle.
struct Observer {
    client: kube::Client,
    settings: SelfManaged,
    serving: Arc<ServingCert>,
    samples: Vec<Sample>,
    seen_bundle: bool,
    seen_served: bool,
}

impl Observer {
    fn new(client: &kube::Client, settings: &SelfManaged, serving: &Arc<ServingCert>) -> Self {
        Self {
            client: client.clone(),
            settings: settings.clone(),
            serving: serving.clone(),
            samples: Vec::new(),
            seen_bundle: false,
            seen_served: false,
        }
    }

    async fn sample(&self) -> TestResult<Sample> {
        let mwc = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .get(&self.settings.webhook_configuration)
            .await?;
        let bundles = mwc
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| {
                w.client_config
                    .ca_bundle
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            })
            .collect();
        let served = self.serving.current().and_then(|k| k.cert.first().cloned());
        let secret = Api::<Secret>::namespaced(self.client.clone(), &self.settings.namespace)
            .get_opt(&self.settings.secret_name)
            .await?;
        Ok(Sample {
            at: Instant::now(),
            bundles,
            served,
            secret,
        })
    }

    fn check(&mut self, s: &Sample) {
        let names = &self.settings.dns_names;
        if s.bundles.iter().all(Option::is_none) {
            // Only before the first publication: nothing was trusted, so
            // nothing could break.
            assert!(!self.seen_bundle, "the caBundles were emptied");
            return;
        }
        self.seen_bundle = true;
        let Some(served) = s.served.as_ref() else {
            // The observed replica has not loaded the certificate yet (a
            // follower reads it from the Secret the leader wrote): it is not
            // ready until it has, so no request reaches it. Once it has
            // served one, it must never serve none.
            assert!(!self.seen_served, "the served certificate disappeared");
            return;
        };
        self.seen_served = true;
        for (i, bundle) in s.bundles.iter().enumerate() {
            let bundle = bundle
                .as_ref()
                .unwrap_or_else(|| panic!("webhook {i} has no caBundle"));
            assert_eq!(Some(bundle), s.bundles[0].as_ref(), "the entries disagree");
            assert!(
                issuer_in(served, bundle, names).is_some(),
                "at a sample, the served certificate does not verify against webhook {i}'s caBundle"
            );
        }
    }

    /// Samples until `done`, checking every sample.
    async fn until(
        &mut self,
        what: &str,
        within: Duration,
        mut done: impl FnMut(&Sample) -> bool,
    ) -> TestResult<usize> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.sample().await?;
            self.check(&s);
            let finished = done(&s);
            self.samples.push(s);
            if finished {
                return Ok(self.samples.len() - 1);
            }
            if Instant::now() > deadline {
                return Err(Failure(format!("{what}: not seen within {within:?}")));
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }
}

/// Every version of the Secret the API server reports: (resourceVersion,
/// written-by). A list, then a watch from its resourceVersion (this
/// apiserver refuses watches from "0").
fn record_versions(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Arc<Mutex<Vec<(String, String)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    let selector = format!("metadata.name={name}");
    let out = seen.clone();
    let record = move |s: &Secret| {
        let rv = s.metadata.resource_version.clone().unwrap_or_default();
        let by = annotation(s, WRITTEN_BY_ANNOTATION).unwrap_or_default();
        let mut out = out.lock().unwrap();
        if !out.iter().any(|(seen, _)| *seen == rv) {
            out.push((rv, by));
        }
    };
    tokio::spawn(async move {
        let mut from = String::new();
        loop {
            if from.is_empty() {
                match api.list(&ListParams::default().fields(&selector)).await {
                    Ok(list) => {
                        list.items.iter().for_each(&record);
                        from = list.metadata.resource_version.unwrap_or_default();
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let Ok(stream) = api
                .watch(&WatchParams::default().fields(&selector), &from)
                .await
            else {
                from.clear();
                continue;
            };
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(WatchEvent::Added(s) | WatchEvent::Modified(s)) => {
                        record(&s);
                        from = s.metadata.resource_version.clone().unwrap_or_default();
                    }
                    Ok(WatchEvent::Bookmark(b)) => from = b.metadata.resource_version,
                    Ok(WatchEvent::Deleted(_)) => {}
                    Ok(WatchEvent::Error(_)) | Err(_) => {
                        from.clear();
                        break;
                    }
                }
            }
        }
    });
    seen
}

async fn force_rotation(client: &kube::Client, settings: &SelfManaged, value: &str) -> TestResult {
    let patch = serde_json::json!({ "metadata": { "annotations": { ROTATE_ANNOTATION: value } } });
    Api::<Secret>::namespaced(client.clone(), &settings.namespace)
        .patch(
            &settings.secret_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

async fn lease_holder(client: &kube::Client, settings: &SelfManaged) -> TestResult<Option<String>> {
    let lease = Api::<Lease>::namespaced(client.clone(), &settings.lease.namespace)
        .get_opt(&settings.lease.name)
        .await?;
    Ok(lease.and_then(|l| l.spec).and_then(|s| s.holder_identity))
}

fn in_sync(s: &Sample) -> bool {
    let ca = s.secret.as_ref().and_then(|x| text(x, CA_CERT_KEY));
    ca.is_some() && s.bundles.iter().all(|b| b == &ca) && s.served.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kube-apiserver and etcd (make setup)"]
async fn a_self_managed_certificate_rotates_without_an_untrusted_moment() -> TestResult {
    install_crypto_provider();
    let server = TestApiServer::shared().await?;
    let client = server.client().await?;
    let started = Instant::now();
    let ns = "certs-rotation";
    Cluster::new(client.clone())
        .create_namespace(ns, &[])
        .await?;
    let mwc = "credbroker-certs-rotation";
    create_webhook_configuration(&client, mwc).await?;
    // Short lives, so one run sees a forced and a scheduled CA rotation
    // and a scheduled serving-certificate renewal.
    let cfg = settings(ns, mwc, "replica-a", 30, 12);
    let names = cfg.dns_names.clone();
    let serving = ServingCert::new();
    let shutdown = CancellationToken::new();
    let versions = record_versions(&client, ns, &cfg.secret_name);
    let task = tokio::spawn(run_self_managed(
        client.clone(),
        cfg.clone(),
        serving.clone(),
        shutdown.clone(),
    ));
    let mut obs = Observer::new(&client, &cfg, &serving);

    // 1. The Secret appears, both caBundles equal its ca.crt, and the
    // served certificate verifies for the DNS and the IP name.
    let first = obs
        .until(
            "the first certificate, published",
            Duration::from_secs(20),
            in_sync,
        )
        .await?;
    let ready_after = obs.samples[first].at - started;
    let secret = obs.samples[first].secret.clone().expect("the Secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(
        secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .map(String::as_str),
        Some(MANAGED_BY)
    );
    for key in [TLS_CERT_KEY, TLS_KEY_KEY, CA_CERT_KEY, CA_KEY_KEY] {
        assert!(
            text(&secret, key).is_some_and(|v| !v.is_empty()),
            "{key} is missing"
        );
    }
    let served_pem = text(&secret, TLS_CERT_KEY).unwrap();
    assert_eq!(
        obs.samples[first]
            .served
            .as_ref()
            .map(|c| c.as_ref().to_vec()),
        Some(pem_certs(&served_pem)[0].as_ref().to_vec()),
        "serving presents the Secret's tls.crt"
    );
    let old_ca = obs.samples[first]
        .served_issuer(&names)
        .expect("verifies for every name");
    assert_eq!(
        obs.samples[first].published(),
        std::slice::from_ref(&old_ca)
    );

    // 2. A forced rotation: old and new published together, the switch
    // only after the delay, the old CA dropped only after that.
    let forced_at = Instant::now();
    force_rotation(&client, &cfg, "test-1").await?;
    let from = obs.samples.len();
    let done = obs
        .until(
            "the forced rotation to finish",
            Duration::from_secs(30),
            |s| {
                let published = s.published();
                s.annotation(ROTATED_ANNOTATION).as_deref() == Some("test-1")
                    && published.len() == 1
                    && published[0] != old_ca
                    && s.served_issuer(&names).as_ref() == Some(&published[0])
            },
        )
        .await?;
    let new_ca = obs.samples[done].published()[0].clone();
    let window = &obs.samples[from..=done];
    let two = window
        .iter()
        .position(|s| s.published() == [old_ca.clone(), new_ca.clone()])
        .expect("a period where the bundle holds the old and the new CA");
    let switch = window
        .iter()
        .position(|s| s.served_issuer(&names).as_ref() == Some(&new_ca))
        .expect("the switch to the new CA");
    let dropped = window
        .iter()
        .position(|s| s.published() == [new_ca.clone()])
        .expect("the old CA dropped");
    assert!(
        two < switch && switch < dropped,
        "order: {two} < {switch} < {dropped}"
    );
    let waited = window[switch].at - window[two].at;
    assert!(
        waited + SAMPLING_SLACK >= cfg.propagation_delay,
        "the new CA's certificate was served {waited:?} after the CA was published"
    );
    let overlap = window[dropped].at - window[switch].at;
    assert!(
        overlap + SAMPLING_SLACK >= cfg.propagation_delay + 2 * cfg.check_interval,
        "the old CA was dropped {overlap:?} after the switch"
    );
    let forced_took = window[dropped].at - forced_at;

    // 3. Scheduled work: the serving certificate is renewed from the same
    // CA (past 2/3 of 12 s), then the CA rotates on its own (past 2/3 of
    // 30 s), through the same overlap.
    let from = obs.samples.len();
    let leaf_of = |s: &Sample| s.served.as_ref().map(|c| c.as_ref().to_vec());
    let last_leaf = leaf_of(&obs.samples[done]);
    let renewed = obs
        .until(
            "a scheduled renewal from the same CA",
            Duration::from_secs(20),
            |s| leaf_of(s) != last_leaf && s.served_issuer(&names).as_ref() == Some(&new_ca),
        )
        .await?;
    let renewed_after = obs.samples[renewed].at - obs.samples[done].at;
    let rotated = obs
        .until(
            "a scheduled CA rotation to finish",
            Duration::from_secs(40),
            |s| {
                let published = s.published();
                published.len() == 1
                    && published[0] != new_ca
                    && published[0] != old_ca
                    && in_sync(s)
            },
        )
        .await?;
    assert!(
        obs.samples[from..=rotated]
            .iter()
            .any(|s| s.published().len() == 2),
        "the scheduled rotation had an overlap"
    );

    // 4. Shutdown returns Ok and hands the lease back.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .map_err(|_| Failure("run_self_managed did not stop within 10 s".into()))??
        .map_err(|e| Failure(format!("run_self_managed: {e}")))?;
    assert_eq!(
        lease_holder(&client, &cfg).await?,
        None,
        "the lease was released"
    );

    let versions = versions.lock().unwrap().clone();
    let writers: BTreeSet<_> = versions.iter().map(|(_, by)| by.as_str()).collect();
    eprintln!(
        "ready {ready_after:?} after start; forced rotation done in {forced_took:?} \
         (served from the new CA {waited:?} after it was published, old CA dropped {overlap:?} later); \
         scheduled renewal {renewed_after:?} later; {} samples, {} Secret versions, writers {writers:?}",
        obs.samples.len(),
        versions.len()
    );
    assert!(
        writers.iter().all(|w| *w == "replica-a" || w.is_empty()),
        "{writers:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kube-apiserver and etcd (make setup)"]
async fn of_two_replicas_only_the_lease_holder_writes_and_both_serve_the_same() -> TestResult {
    install_crypto_provider();
    let server = TestApiServer::shared().await?;
    let client = server.client().await?;
    let ns = "certs-replicas";
    Cluster::new(client.clone())
        .create_namespace(ns, &[])
        .await?;
    let mwc = "credbroker-certs-replicas";
    create_webhook_configuration(&client, mwc).await?;
    let versions = record_versions(&client, ns, "credbroker-webhook-tls");

    let mut replicas = Vec::new();
    for identity in ["replica-a", "replica-b"] {
        let cfg = settings(ns, mwc, identity, 60, 30);
        let serving = ServingCert::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_self_managed(
            client.clone(),
            cfg.clone(),
            serving.clone(),
            shutdown.clone(),
        ));
        replicas.push((identity, cfg, serving, shutdown, task));
    }
    let cfg = replicas[0].1.clone();
    let same = |replicas: &[(&str, SelfManaged, Arc<ServingCert>, CancellationToken, _)]| {
        let fps: BTreeSet<_> = replicas.iter().map(|r| r.2.fingerprint()).collect();
        fps.len() == 1 && !fps.contains(&None)
    };

    let mut obs = Observer::new(&client, &cfg, &replicas[0].2);
    obs.until(
        "the first certificate, published",
        Duration::from_secs(20),
        in_sync,
    )
    .await?;
    wait_until(
        "both replicas to serve the same certificate",
        Duration::from_secs(10),
        || async {
            if same(&replicas) {
                Ok(())
            } else {
                Err("not yet")
            }
        },
    )
    .await?;
    let leader = lease_holder(&client, &cfg).await?.expect("a lease holder");
    assert!(leader == "replica-a" || leader == "replica-b", "{leader}");

    // A rotation, done by the leader alone; both end up on the new CA.
    let before = replicas[0].2.fingerprint();
    force_rotation(&client, &cfg, "r1").await?;
    obs.until("the rotation to finish", Duration::from_secs(30), |s| {
        s.annotation(ROTATED_ANNOTATION).as_deref() == Some("r1")
            && s.published().len() == 1
            && in_sync(s)
    })
    .await?;
    wait_until(
        "both replicas to serve the new certificate",
        Duration::from_secs(10),
        || async {
            if same(&replicas) && replicas[0].2.fingerprint() != before {
                Ok(())
            } else {
                Err("not yet")
            }
        },
    )
    .await?;
    assert_eq!(
        lease_holder(&client, &cfg).await?.as_deref(),
        Some(leader.as_str())
    );
    let led: Vec<_> = versions.lock().unwrap().clone();
    let writers: BTreeSet<_> = led.iter().map(|(_, by)| by.clone()).collect();
    assert_eq!(
        writers,
        BTreeSet::from([leader.clone()]),
        "only the leader wrote: {led:?}"
    );

    // The leader stops: it hands the lease over, and the other carries on.
    let at = replicas.iter().position(|r| r.0 == leader).unwrap();
    let (_, _, _, shutdown, task) = replicas.remove(at);
    shutdown.cancel();
    task.await?
        .map_err(|e| Failure(format!("the stopped leader: {e}")))?;
    let (other, other_cfg, other_serving, other_shutdown, other_task) = replicas.remove(0);
    wait_until(
        "the other replica to take the lease",
        Duration::from_secs(10),
        || async {
            match lease_holder(&client, &cfg).await {
                Ok(Some(h)) if h == other => Ok(()),
                Ok(h) => Err(format!("holder {h:?}")),
                Err(e) => Err(e.0),
            }
        },
    )
    .await?;
    let mut obs = Observer::new(&client, &other_cfg, &other_serving);
    force_rotation(&client, &cfg, "r2").await?;
    obs.until(
        "the new leader's rotation to finish",
        Duration::from_secs(30),
        |s| {
            s.annotation(ROTATED_ANNOTATION).as_deref() == Some("r2")
                && s.published().len() == 1
                && in_sync(s)
                && s.annotation(WRITTEN_BY_ANNOTATION).as_deref() == Some(other)
        },
    )
    .await?;
    other_shutdown.cancel();
    other_task
        .await?
        .map_err(|e| Failure(format!("the second leader: {e}")))?;

    let all = versions.lock().unwrap().clone();
    let by_leader = all.iter().filter(|(_, by)| *by == leader).count();
    let by_other = all.len() - by_leader;
    eprintln!(
        "{} Secret versions: {by_leader} by {leader} while it led, {by_other} by {other} after; \
         {} versions before the failover, all by {leader}",
        all.len(),
        led.len()
    );
    // After the failover, the other replica's writes follow the first's.
    let first_other = all
        .iter()
        .position(|(_, by)| by == other)
        .expect("writes by the new leader");
    assert!(
        all[first_other..].iter().all(|(_, by)| by == other),
        "{all:?}"
    );
    Ok(())
}
