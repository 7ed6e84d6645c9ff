//! The sidecar's TLS on real parts: the pod CA on disk across restarts,
//! leaves verified by rustls/webpki, a real handshake over loopback with a
//! client that trusts only the written bundle, the Java truststore read by
//! the real JDK `keytool`, and upstream verification against a recording
//! HTTPS upstream with its own CA.

// Helpers outside #[test] fns panic on broken setup, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use credbroker_sidecar::tls::bundle::{BUNDLE_FILE, CA_FILE, POD_CA_ALIAS, TRUSTSTORE_FILE};
use credbroker_sidecar::tls::ca::{CERT_FILE, KEY_FILE};
use credbroker_sidecar::tls::{
    CaOrigin, LeafCacheStats, LeafCertCache, LeafPolicy, PodCa, TRUSTSTORE_PASSWORD, UpstreamTls,
    parse_pem_certs, system_roots, write_bundle,
};
use credbroker_test_support::upstream::Upstream;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn pod_ca(dir: &Path) -> Arc<PodCa> {
    Arc::new(PodCa::load_or_generate(dir).unwrap())
}

fn roots_of(certs: &[CertificateDer<'static>]) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).unwrap();
    }
    roots
}

/// Verifies `leaf` for `name` with rustls's webpki verifier, trusting `roots` only.
fn verify(
    leaf: &CertificateDer<'_>,
    roots: &[CertificateDer<'static>],
    name: &str,
) -> Result<(), rustls::Error> {
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots_of(roots)),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_server_cert(
            leaf,
            &[],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
}

// ---------------------------------------------------------------- pod CA

#[test]
fn restart_keeps_the_same_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let first = PodCa::load_or_generate(&dir).unwrap();
    let key = std::fs::read(dir.join(KEY_FILE)).unwrap();
    let second = PodCa::load_or_generate(&dir).unwrap();
    assert_eq!(first.origin(), CaOrigin::Generated);
    assert_eq!(second.origin(), CaOrigin::Loaded);
    assert_eq!(first.cert_der(), second.cert_der());
    assert_eq!(std::fs::read(dir.join(KEY_FILE)).unwrap(), key);

    // A leaf minted after the restart verifies against the CA agents
    // trusted before it.
    let leaf = LeafCertCache::new(Arc::new(second))
        .get("api.example.test")
        .unwrap();
    verify(
        &leaf.cert[0],
        &[first.cert_der().clone()],
        "api.example.test",
    )
    .unwrap();
}

#[test]
fn key_file_is_owner_only_and_stays_in_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    PodCa::load_or_generate(&dir).unwrap();
    let mode = std::fs::metadata(dir.join(KEY_FILE))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "key mode {mode:o}");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [CERT_FILE, KEY_FILE]);
    // Nothing but the CA directory was written.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

// ---------------------------------------------------------------- leaves

#[test]
fn leaf_verifies_against_the_pod_ca_and_names_only_its_host() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = pod_ca(tmp.path());
    let cache = LeafCertCache::new(ca.clone());
    let leaf = cache.get("api.example.test").unwrap();
    assert_eq!(leaf.cert.len(), 1);
    let roots = [ca.cert_der().clone()];
    verify(&leaf.cert[0], &roots, "api.example.test").unwrap();
    let wrong = verify(&leaf.cert[0], &roots, "other.example.test").unwrap_err();
    assert!(
        matches!(wrong, rustls::Error::InvalidCertificate(_)),
        "{wrong:?}"
    );

    let (_, cert) = x509_parser::parse_x509_certificate(&leaf.cert[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    let names: Vec<String> = san.general_names.iter().map(|n| n.to_string()).collect();
    assert_eq!(names, ["DNSName(api.example.test)"]);
    assert!(!cert.is_ca());
    // Short-lived and backdated: 72 h ahead plus 1 h behind.
    let validity = cert.validity();
    let span = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert_eq!(span, 73 * 3600);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(validity.not_before.timestamp() <= now - 3500);
}

#[test]
fn cache_returns_the_same_leaf_and_counts_hits_and_mints() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = LeafCertCache::new(pod_ca(tmp.path()));
    let a = cache.get("api.example.test").unwrap();
    let b = cache.get("api.example.test").unwrap();
    let c = cache.get("API.Example.Test.").unwrap();
    assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&a, &c));
    let other = cache.get("other.example.test").unwrap();
    assert!(!Arc::ptr_eq(&a, &other));
    assert_eq!(
        cache.stats(),
        LeafCacheStats {
            hits: 2,
            mints: 2,
            evictions: 0,
            entries: 2
        }
    );
}

#[test]
fn cache_refuses_names_that_are_not_dns_names() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = LeafCertCache::new(pod_ca(tmp.path()));
    for bad in [
        "127.0.0.1",
        "::1",
        "*.example.test",
        "",
        "a..b",
        "bad name.test",
    ] {
        let err = cache
            .get(bad)
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"));
        assert!(err.to_string().contains("not a DNS name"), "{err}");
    }
    assert_eq!(cache.stats().mints, 0);
}

#[test]
fn cache_renews_a_leaf_that_is_due() {
    let tmp = tempfile::tempdir().unwrap();
    // Renewal due as soon as minted: every lookup must re-mint.
    let policy = LeafPolicy {
        renew_before: LeafPolicy::default().lifetime,
        ..LeafPolicy::default()
    };
    let cache = LeafCertCache::with_policy(pod_ca(tmp.path()), policy).unwrap();
    let a = cache.get("api.example.test").unwrap();
    let b = cache.get("api.example.test").unwrap();
    assert!(!Arc::ptr_eq(&a, &b));
    assert_eq!(cache.stats().mints, 2);
    assert_eq!(cache.stats().entries, 1);
}

#[test]
fn cache_stays_within_its_capacity() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = LeafPolicy {
        capacity: 32,
        ..LeafPolicy::default()
    };
    let cache = LeafCertCache::with_policy(pod_ca(tmp.path()), policy).unwrap();
    for i in 0..200 {
        cache.get(&format!("host{i}.example.test")).unwrap();
    }
    let stats = cache.stats();
    assert!(stats.entries <= 32, "{stats:?}");
    assert_eq!(stats.mints, 200);
    assert_eq!(stats.evictions as usize, 200 - stats.entries);
}

#[test]
fn concurrent_lookups_agree_on_one_leaf_per_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Arc::new(LeafCertCache::new(pod_ca(tmp.path())));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| cache.get(&format!("h{}.example.test", i % 5)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // A handshake that loses a minting race gets the winner's leaf, so every
    // lookup of a name saw the same one.
    for i in 0..5 {
        let canonical = cache.get(&format!("h{i}.example.test")).unwrap();
        for r in &results {
            for leaf in r.iter().skip(i).step_by(5) {
                assert!(Arc::ptr_eq(leaf, &canonical));
            }
        }
    }
    assert_eq!(cache.stats().entries, 5);
}

// ---------------------------------------------------------------- bundle

fn pem_set(path: &Path) -> Vec<CertificateDer<'static>> {
    parse_pem_certs(
        &std::fs::read_to_string(path).unwrap(),
        &path.display().to_string(),
    )
    .unwrap()
}

#[test]
fn bundle_holds_system_roots_pod_ca_and_extras_and_never_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = pod_ca(&tmp.path().join("ca"));
    let extra = PodCa::load_or_generate(tmp.path().join("extra")).unwrap();
    let system = system_roots().unwrap();
    assert!(system.len() > 10, "only {} system roots", system.len());
    let bundle_dir = tmp.path().join("bundle");
    let summary = write_bundle(&bundle_dir, &ca, &system, &[extra.cert_der().clone()]).unwrap();

    let bundle = pem_set(&bundle_dir.join(BUNDLE_FILE));
    let got: HashSet<_> = bundle.iter().collect();
    let mut want: HashSet<_> = system.iter().collect();
    want.insert(ca.cert_der());
    want.insert(extra.cert_der());
    assert_eq!(got, want);
    assert_eq!(bundle.len(), summary.bundle_certs);
    assert_eq!(pem_set(&bundle_dir.join(CA_FILE)), [ca.cert_der().clone()]);

    let mut names: Vec<_> = std::fs::read_dir(&bundle_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [BUNDLE_FILE, CA_FILE, TRUSTSTORE_FILE]);
    for name in &names {
        let path = bundle_dir.join(name);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{name}");
        let contents = std::fs::read(&path).unwrap();
        assert!(
            !contents.windows(11).any(|w| w == b"PRIVATE KEY"),
            "{name} holds a private key"
        );
    }
}

/// The JDK's `keytool`, from `JAVA_HOME` or `PATH`.
fn keytool() -> std::path::PathBuf {
    let from_home = std::env::var_os("JAVA_HOME")
        .map(|home| Path::new(&home).join("bin/keytool"))
        .filter(|p| p.exists());
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("keytool"))
            .find(|p| p.exists())
    });
    from_home.or(from_path).unwrap_or_else(|| {
        panic!(
            "keytool (the JDK) is missing, and this test checks the Java truststore with the \
             real JDK: install it (`apt-get install openjdk-17-jdk-headless`, which hack/setup.sh \
             does) or set JAVA_HOME"
        )
    })
}

#[test]
fn java_keytool_reads_the_truststore() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = pod_ca(&tmp.path().join("ca"));
    let extra = PodCa::load_or_generate(tmp.path().join("extra")).unwrap();
    let system = system_roots().unwrap();
    let bundle_dir = tmp.path().join("bundle");
    let summary = write_bundle(&bundle_dir, &ca, &system, &[extra.cert_der().clone()]).unwrap();
    assert_eq!(summary.skipped_in_truststore, 0);
    assert_eq!(summary.truststore_entries, summary.bundle_certs);

    let out = Command::new(keytool())
        .args(["-list", "-keystore"])
        .arg(bundle_dir.join(TRUSTSTORE_FILE))
        .args(["-storepass", TRUSTSTORE_PASSWORD, "-storetype", "PKCS12"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "keytool failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = format!(
        "Your keystore contains {} entries",
        summary.truststore_entries
    );
    assert!(stdout.contains(&count), "{stdout}");
    assert!(stdout.contains(&format!("{POD_CA_ALIAS}, ")), "{stdout}");
    assert!(stdout.contains("extra-ca-1, "), "{stdout}");
    assert_eq!(
        stdout.matches("trustedCertEntry").count(),
        summary.truststore_entries,
        "{stdout}"
    );

    // The pod CA entry is our certificate, byte for byte.
    let out = Command::new(keytool())
        .args(["-exportcert", "-rfc", "-alias", POD_CA_ALIAS, "-keystore"])
        .arg(bundle_dir.join(TRUSTSTORE_FILE))
        .args(["-storepass", TRUSTSTORE_PASSWORD, "-storetype", "PKCS12"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let exported = parse_pem_certs(&String::from_utf8_lossy(&out.stdout), "keytool").unwrap();
    assert_eq!(exported, [ca.cert_der().clone()]);
}

// ---------------------------------------------------------------- handshake

struct Served {
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
}

/// Accepts one connection with the cache's server config, echoes one line.
async fn serve_once(listener: TcpListener, cache: Arc<LeafCertCache>) -> std::io::Result<Served> {
    let acceptor = TlsAcceptor::from(cache.server_config().unwrap());
    let (tcp, _) = listener.accept().await?;
    let mut tls = acceptor.accept(tcp).await?;
    let (_, conn) = tls.get_ref();
    let served = Served {
        sni: conn.server_name().map(str::to_owned),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
    };
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await?;
    tls.write_all(&buf).await?;
    tls.shutdown().await?;
    Ok(served)
}

/// A client that trusts exactly the certificates in `ca-bundle.crt`.
fn bundle_client(bundle: &Path, alpn: &[&[u8]]) -> TlsConnector {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots_of(&pem_set(bundle)))
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn handshake(
    alpn: &[&[u8]],
    server_name: &str,
) -> (std::io::Result<Served>, std::io::Result<Option<Vec<u8>>>) {
    let tmp = tempfile::tempdir().unwrap();
    let ca = pod_ca(&tmp.path().join("ca"));
    let bundle_dir = tmp.path().join("bundle");
    write_bundle(&bundle_dir, &ca, &system_roots().unwrap(), &[]).unwrap();
    let cache = Arc::new(LeafCertCache::new(ca));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_once(listener, cache));
    let connector = bundle_client(&bundle_dir.join(BUNDLE_FILE), alpn);
    let client = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        tls.write_all(b"hello").await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"hello");
        Ok(alpn)
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .unwrap();
    let served = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    (served, client)
}

#[tokio::test]
async fn handshake_with_a_client_trusting_only_the_bundle_negotiates_h2() {
    let (served, client) = handshake(&[b"h2", b"http/1.1"], "api.example.test").await;
    let served = served.unwrap();
    assert_eq!(served.sni.as_deref(), Some("api.example.test"));
    assert_eq!(served.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(client.unwrap().as_deref(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn handshake_serves_http11_to_clients_that_want_it() {
    let (served, client) = handshake(&[b"http/1.1"], "api.example.test").await;
    assert_eq!(served.unwrap().alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(client.unwrap().as_deref(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn handshake_without_sni_fails() {
    // An IP address as the server name: rustls sends no SNI.
    let (served, client) = handshake(&[b"h2"], "127.0.0.1").await;
    assert!(served.is_err());
    assert!(client.is_err());
}

// ---------------------------------------------------------------- upstream

fn start_upstream(names: &[&str]) -> Upstream {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    Upstream::https(names.iter().copied())
        .start(listener)
        .unwrap()
}

#[tokio::test]
async fn upstream_signed_by_an_unknown_ca_is_refused_naming_the_host() {
    let upstream = start_upstream(&["upstream.test"]);
    let tls = UpstreamTls::new(&system_roots().unwrap(), &[]).unwrap();
    let tcp = TcpStream::connect(upstream.local_addr()).await.unwrap();
    let err = tls.connect("upstream.test", None, tcp).await.err().unwrap();
    let msg = err.to_string();
    assert!(msg.contains("upstream.test"), "{msg}");
    assert!(msg.contains("certificate refused"), "{msg}");
    assert!(msg.contains("issued by a CA not trusted here"), "{msg}");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn upstream_signed_by_a_destination_extra_ca_is_accepted_for_its_name_only() {
    let upstream = start_upstream(&["upstream.test"]);
    let extra = upstream.ca_pem().unwrap().to_owned();
    let tls = UpstreamTls::new(&system_roots().unwrap(), &[]).unwrap();

    let tcp = TcpStream::connect(upstream.local_addr()).await.unwrap();
    let stream = tls
        .connect("upstream.test", Some(&extra), tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(stream);

    // Trusted CA, wrong name: still refused.
    let tcp = TcpStream::connect(upstream.local_addr()).await.unwrap();
    let err = tls
        .connect("other.test", Some(&extra), tcp)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("other.test"), "{err}");

    // A real request over HTTP/1.1 with the same trust reaches the upstream.
    let mut config = (*tls.client_config(Some(&extra)).unwrap()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(upstream.local_addr()).await.unwrap();
    let mut stream = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("upstream.test").unwrap(), tcp)
        .await
        .unwrap();
    stream
        .write_all(b"GET /v1/ping HTTP/1.1\r\nHost: upstream.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    let requests = upstream
        .wait_for_requests(1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(requests[0].path, "/v1/ping");
}

#[tokio::test]
async fn upstream_signed_by_a_global_extra_ca_is_accepted() {
    let upstream = start_upstream(&["upstream.test"]);
    let tls = UpstreamTls::new(
        &system_roots().unwrap(),
        &[upstream.ca_der().unwrap().clone()],
    )
    .unwrap();
    let tcp = TcpStream::connect(upstream.local_addr()).await.unwrap();
    tls.connect("upstream.test", None, tcp).await.unwrap();
}
