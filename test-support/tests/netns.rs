//! Issue 2's acceptance for network namespaces, against the real kernel: an
//! agent-like process (UID 2000) in one namespace reaches the recording
//! upstream in another over a veth (IPv4 and IPv6, HTTP/1.1 and HTTP/2),
//! `nat OUTPUT REDIRECT` rules capture its connections, and nothing is left
//! behind. Needs root, iproute2, iptables and curl (`make setup`); run with
//! `cargo test -p credbroker-test-support --test netns -- --include-ignored`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credbroker_test_support::netns::{IpFamily, NAME_PREFIX, Netns, NetnsPair, RunAs};
use credbroker_test_support::upstream::{
    Behaviour, ECHO_HEADER, EchoTo, HeaderName, HeaderValue, Reply, StatusCode, Upstream, Version,
    header,
};
use credbroker_test_support::{find_binary, run};

/// The identity agent containers run as in these tests (not root, no groups).
const AGENT: RunAs = RunAs::new(2000, 2000);
const WAIT: Duration = Duration::from_secs(10);

use credbroker_test_support::{Failure, TestResult};

fn curl_binary() -> TestResult<PathBuf> {
    Ok(find_binary("CREDBROKER_CURL", "curl")?)
}

/// What curl saw: status line, headers (names lowercased) and body.
#[derive(Debug)]
struct CurlReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl CurlReply {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Runs curl inside `netns` as `user` and parses its `-i` output. Fails with
/// curl's stderr if curl does.
async fn curl(netns: &Netns, user: RunAs, args: &[&str]) -> TestResult<CurlReply> {
    let output = netns
        .exec(curl_binary()?)
        .user(user)
        // -q first: ignore any ~/.curlrc; -i: headers then body on stdout.
        .args(["-q", "--silent", "--show-error", "--max-time", "10", "-i"])
        .args(args)
        .output_async()
        .await?;
    if !output.status.success() {
        return Err(Failure(format!(
            "curl {args:?} in {} failed ({}): {}",
            netns.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (head, body) = stdout
        .split_once("\r\n\r\n")
        .ok_or_else(|| Failure(format!("curl printed no header block: {stdout:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| Failure(format!("curl printed no status line: {head:?}")))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(CurlReply {
        status,
        headers,
        body: body.to_string(),
    })
}

fn path_str(path: Option<&Path>) -> TestResult<&str> {
    path.and_then(Path::to_str)
        .ok_or_else(|| Failure("the upstream has no CA file".into()))
}

/// An address as it appears in a URL's host part (IPv6 in brackets).
fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    }
}

fn listed_namespaces() -> TestResult<String> {
    Ok(run(Command::new("ip").args(["netns", "list"]))?)
}

/// Asserts that none of `names` is still a network namespace.
fn assert_gone(names: &[String]) -> TestResult {
    let listed = listed_namespaces()?;
    for name in names {
        assert!(
            !listed
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name)),
            "namespace {name} is still listed by `ip netns list`:\n{listed}"
        );
        assert!(
            !Path::new("/run/netns").join(name).exists(),
            "/run/netns/{name} still exists"
        );
    }
    Ok(())
}

fn pair_names(pair: &NetnsPair) -> Vec<String> {
    vec![
        pair.a().netns().name().to_string(),
        pair.b().netns().name().to_string(),
    ]
}

#[tokio::test]
#[ignore = "needs root and network namespaces"]
async fn agent_uid_reaches_the_upstream_over_the_veth_on_ipv4_and_ipv6() -> TestResult {
    let pair = NetnsPair::new()?;
    let names = pair_names(&pair);
    let (pod, remote) = (pair.a(), pair.b());

    // The command really runs as the agent: UID, GID, and no root groups.
    let identity = pod.netns().exec("id").user(AGENT).output_async().await?;
    assert_eq!(
        String::from_utf8_lossy(&identity.stdout).trim(),
        "uid=2000 gid=2000 groups=2000"
    );

    let listener = remote
        .netns()
        .bind_tcp(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 443))?;
    let upstream =
        Upstream::https([remote.ipv4().to_string(), remote.ipv6().to_string()]).start(listener)?;
    let ca = path_str(upstream.ca_file())?;

    for family in [IpFamily::V4, IpFamily::V6] {
        let url = format!(
            "{}/v1/things?family={family}",
            upstream.url(&remote.ip(family).to_string())
        );
        let reply = curl(
            pod.netns(),
            AGENT,
            &[
                "--http1.1",
                "--cacert",
                ca,
                "-H",
                &format!("x-test-family: {family}"),
                "--data",
                "hello",
                &url,
            ],
        )
        .await?;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, "ok\n");
    }

    let requests = upstream.wait_for_requests(2, WAIT).await?;
    assert_eq!(requests.len(), 2, "{requests:#?}");
    for (request, family) in requests.iter().zip([IpFamily::V4, IpFamily::V6]) {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, format!("/v1/things?family={family}"));
        assert_eq!(request.version, Version::HTTP_11);
        assert_eq!(
            request.header("x-test-family"),
            Some(family.to_string().as_str())
        );
        assert_eq!(request.body_text(), "hello");
        // It came over the veth from the pod's address, not from anywhere else.
        assert_eq!(request.connection.peer.ip(), pod.ip(family));
        assert_eq!(request.connection.local.ip(), remote.ip(family));
        assert_eq!(request.connection.alpn.as_deref(), Some("http/1.1"));
    }

    drop(upstream);
    drop(pair);
    assert_gone(&names)
}

#[tokio::test]
#[ignore = "needs root and network namespaces"]
async fn nat_redirect_rules_send_agent_connections_to_a_listener_in_its_namespace() -> TestResult {
    let pair = NetnsPair::new()?;
    let names = pair_names(&pair);
    let (pod, remote) = (pair.a(), pair.b());
    let remote_names = [remote.ipv4().to_string(), remote.ipv6().to_string()];

    let far = Upstream::https(remote_names.clone()).start(
        remote
            .netns()
            .bind_tcp(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 443))?,
    )?;
    // The stand-ins for the sidecar: loopback-only listeners in the pod's
    // namespace, with certificates for the name the agent asked for.
    let local4 = Upstream::https(remote_names.clone())
        .behaviour(Behaviour::reply(Reply::ok().body("intercepted\n")))
        .start(
            pod.netns()
                .bind_tcp(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))?,
        )?;
    let local6 = Upstream::https(remote_names.clone())
        .behaviour(Behaviour::reply(Reply::ok().body("intercepted\n")))
        .start(
            pod.netns()
                .bind_tcp(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0))?,
        )?;

    // Root stands for the sidecar's own UID: exempt, so it can reach the
    // real upstream. IPv4 through iptables, IPv6 through ip6tables-restore.
    let port4 = local4.local_addr().port();
    let pod_ns = pod.netns();
    pod_ns.iptables(
        IpFamily::V4,
        "-t nat -A OUTPUT -p tcp -m owner --uid-owner 0 -j RETURN".split(' '),
    )?;
    pod_ns.iptables(
        IpFamily::V4,
        format!("-t nat -A OUTPUT -p tcp -j REDIRECT --to-ports {port4}").split(' '),
    )?;
    pod_ns.iptables_restore(
        IpFamily::V6,
        &format!(
            "*nat\n\
             :OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT -p tcp -m owner --uid-owner 0 -j RETURN\n\
             -A OUTPUT -p tcp -j REDIRECT --to-ports {}\n\
             COMMIT\n",
            local6.local_addr().port()
        ),
    )?;
    let rules6 = pod_ns.iptables(IpFamily::V6, ["-t", "nat", "-S", "OUTPUT"])?;
    assert!(
        rules6.contains("REDIRECT"),
        "ip6tables rules were not applied:\n{rules6}"
    );

    for (family, local) in [(IpFamily::V4, &local4), (IpFamily::V6, &local6)] {
        let url = format!(
            "{}/redirected?family={family}",
            far.url(&remote.ip(family).to_string())
        );
        let reply = curl(
            pod.netns(),
            AGENT,
            &[
                "--cacert",
                path_str(local.ca_file())?,
                "-H",
                "x-agent: yes",
                &url,
            ],
        )
        .await?;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "intercepted\n"),
            "{family}: {reply:?}"
        );

        let requests = local.wait_for_requests(1, WAIT).await?;
        assert_eq!(requests.len(), 1, "{requests:#?}");
        let request = &requests[0];
        assert_eq!(request.path, format!("/redirected?family={family}"));
        assert_eq!(request.header("x-agent"), Some("yes"));
        // The agent still believes it talks to the far address...
        assert_eq!(
            request.authority.as_deref(),
            Some(host(remote.ip(family)).as_str())
        );
        // ...while the connection landed on loopback in its own namespace.
        assert_eq!(request.connection.local, local.local_addr());
        assert_eq!(request.connection.peer.ip(), pod.ip(family));
    }
    assert_eq!(
        far.connections(),
        0,
        "the far upstream saw a connection: {:?}",
        far.requests()
    );
    assert_eq!(far.request_count(), 0);

    // The exemption holds: root in the same namespace goes straight through.
    let url = format!("{}/direct", far.url(&remote.ipv4().to_string()));
    let reply = curl(
        pod.netns(),
        RunAs::new(0, 0),
        &["--cacert", path_str(far.ca_file())?, &url],
    )
    .await?;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));
    let direct = far.wait_for_requests(1, WAIT).await?;
    assert_eq!(direct[0].path, "/direct");

    drop((far, local4, local6));
    drop(pair);
    assert_gone(&names)
}

#[tokio::test]
#[ignore = "needs root and network namespaces"]
async fn http2_is_negotiated_over_tls_and_spoken_in_cleartext() -> TestResult {
    let pair = NetnsPair::new()?;
    let names = pair_names(&pair);
    let (pod, remote) = (pair.a(), pair.b());
    let tls = Upstream::https([remote.ipv6().to_string()]).start(
        remote
            .netns()
            .bind_tcp(SocketAddr::new(remote.ipv6().into(), 443))?,
    )?;
    let cleartext = Upstream::http().start(
        remote
            .netns()
            .bind_tcp(SocketAddr::new(remote.ipv4().into(), 80))?,
    )?;

    let url = format!("{}/h2", tls.url(&remote.ipv6().to_string()));
    let reply = curl(
        pod.netns(),
        AGENT,
        &[
            "--http2",
            "--cacert",
            path_str(tls.ca_file())?,
            "-H",
            "x-test: h2",
            &url,
        ],
    )
    .await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    let recorded = tls.wait_for_requests(1, WAIT).await?;
    assert_eq!(recorded[0].version, Version::HTTP_2);
    assert_eq!(recorded[0].connection.alpn.as_deref(), Some("h2"));
    assert_eq!(recorded[0].path, "/h2");
    assert_eq!(recorded[0].header("x-test"), Some("h2"));
    // curl leaves the default port out of `:authority`, as it does of `Host`.
    assert_eq!(
        recorded[0].authority.as_deref(),
        Some(host(remote.ipv6().into()).as_str())
    );

    let base = cleartext.url(&remote.ipv4().to_string());
    curl(
        pod.netns(),
        AGENT,
        &["--http2-prior-knowledge", &format!("{base}/h2c")],
    )
    .await?;
    curl(pod.netns(), AGENT, &["--http1.1", &format!("{base}/h1")]).await?;
    let recorded = cleartext.wait_for_requests(2, WAIT).await?;
    let seen: Vec<_> = recorded
        .iter()
        .map(|r| (r.path.as_str(), r.version, r.connection.alpn.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("/h2c", Version::HTTP_2, None),
            ("/h1", Version::HTTP_11, None)
        ]
    );
    assert_eq!(cleartext.ca_file(), None);

    drop((tls, cleartext));
    drop(pair);
    assert_gone(&names)
}

#[tokio::test]
#[ignore = "needs root and network namespaces"]
async fn behaviours_echo_and_answer_as_told() -> TestResult {
    // One namespace is enough here: the upstream listens on its loopback.
    let netns = Netns::new()?;
    let names = vec![netns.name().to_string()];
    let upstream = Upstream::https(["upstream.test"])
        .behaviour(Behaviour::echo_header(
            HeaderName::from_static("x-placeholder"),
            EchoTo::Both,
        ))
        .start(netns.bind_tcp(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))?)?;
    let ca = path_str(upstream.ca_file())?;
    let resolve = format!("upstream.test:{}:127.0.0.1", upstream.local_addr().port());
    let url = upstream.url("upstream.test");
    let get = |extra: &'static [&'static str]| {
        let mut args = vec!["--cacert", ca, "--resolve", resolve.as_str()];
        args.extend_from_slice(extra);
        args.push(url.as_str());
        args
    };

    let reply = curl(&netns, AGENT, &get(&["-H", "x-placeholder: cbph-0123"])).await?;
    assert_eq!((reply.status, reply.body.as_str()), (200, "cbph-0123"));
    assert_eq!(reply.header(ECHO_HEADER.as_str()), ["cbph-0123"]);
    let first = upstream.wait_for_requests(1, WAIT).await?;
    assert_eq!(first[0].connection.sni.as_deref(), Some("upstream.test"));

    // Asking for an echo without the header is a visible 400, not a silent "".
    let reply = curl(&netns, AGENT, &get(&[])).await?;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("x-placeholder"), "{reply:?}");

    upstream.set_behaviour(Behaviour::echo_header(
        HeaderName::from_static("authorization"),
        EchoTo::Header,
    ));
    let reply = curl(
        &netns,
        AGENT,
        &get(&["-H", "authorization: Bearer cbph-4567"]),
    )
    .await?;
    assert_eq!(reply.header("x-echo"), ["Bearer cbph-4567"]);
    assert_eq!(reply.body, "");

    upstream.set_behaviour(Behaviour::echo_body());
    let reply = curl(
        &netns,
        AGENT,
        &get(&[
            "-H",
            "content-type: application/json",
            "--data-binary",
            r#"{"key":"cbph-89"}"#,
        ]),
    )
    .await?;
    assert_eq!(reply.body, r#"{"key":"cbph-89"}"#);
    assert_eq!(reply.header("content-type"), ["application/json"]);

    let unauthorized = Reply::new(StatusCode::UNAUTHORIZED)
        .header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
        .body("denied\n");
    upstream.set_behaviour(Behaviour::sequence([
        Behaviour::reply(unauthorized),
        Behaviour::custom(|request| {
            Reply::ok().body(format!("{} {}\n", request.method, request.path))
        }),
    ]));
    let reply = curl(&netns, AGENT, &get(&[])).await?;
    assert_eq!((reply.status, reply.body.as_str()), (401, "denied\n"));
    assert_eq!(reply.header("www-authenticate"), ["Bearer"]);
    for _ in 0..2 {
        let reply = curl(&netns, AGENT, &get(&["-X", "DELETE"])).await?;
        assert_eq!((reply.status, reply.body.as_str()), (200, "DELETE /\n"));
    }

    upstream.set_behaviour(Behaviour::reply(
        Reply::ok().paced(["one ", "two ", "three"], Duration::from_millis(20)),
    ));
    let reply = curl(&netns, AGENT, &get(&["--http2"])).await?;
    assert_eq!(reply.body, "one two three");

    assert_eq!(upstream.request_count(), 8);
    drop(upstream);
    drop(netns);
    assert_gone(&names)
}

#[test]
#[ignore = "needs root and network namespaces"]
fn namespaces_and_their_processes_are_gone_after_drop_even_on_panic() -> TestResult {
    let names = Arc::new(Mutex::new(Vec::new()));
    let sleepers = Arc::new(Mutex::new(Vec::new()));
    let outcome = std::panic::catch_unwind({
        let (names, sleepers) = (names.clone(), sleepers.clone());
        move || {
            let single = Netns::new().expect("create a namespace");
            let pair = NetnsPair::new().expect("create a pair");
            names.lock().unwrap().extend([single.name().to_string()]);
            names.lock().unwrap().extend(pair_names(&pair));
            // Processes the fixture did not start itself (plain std children,
            // not guards) must die with their namespace too.
            for netns in [&single, pair.a().netns(), pair.b().netns()] {
                let child = netns
                    .exec("sleep")
                    .arg("600")
                    .user(AGENT)
                    .into_std()
                    .spawn()
                    .expect("spawn sleep");
                sleepers.lock().unwrap().push(child);
            }
            let guarded = pair
                .a()
                .netns()
                .exec("sleep")
                .arg("600")
                .spawn("sleeper")
                .expect("spawn guarded sleep");
            let _keep = guarded;
            panic!("deliberate panic while the fixtures are alive");
        }
    });
    assert!(outcome.is_err(), "the closure was meant to panic");

    let names = names.lock().unwrap().clone();
    assert_eq!(names.len(), 3);
    assert_gone(&names)?;
    for mut child in sleepers.lock().unwrap().drain(..) {
        // Killed means reapable at once; poll briefly rather than wait(),
        // so a teardown that forgot them fails here instead of hanging.
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                child.kill()?;
                child.wait()?;
                return Err(Failure(format!(
                    "`sleep 600` (pid {}) outlived its namespace",
                    child.id()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            status.signal(),
            Some(9),
            "sleep {} should have been killed: {status}",
            child.id()
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root and network namespaces"]
fn parallel_pairs_get_distinct_names_and_subnets_and_each_link_works() -> TestResult {
    const PAIRS: usize = 4;
    let started = Instant::now();
    let pairs = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..PAIRS)
            .map(|_| {
                scope.spawn(|| {
                    let started = Instant::now();
                    NetnsPair::new().map(|pair| (pair, started.elapsed()))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("pair thread"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    eprintln!(
        "{PAIRS} pairs set up concurrently in {:?}; each took {:?}",
        started.elapsed(),
        pairs.iter().map(|(_, t)| *t).collect::<Vec<_>>()
    );

    let mut names: Vec<String> = pairs.iter().flat_map(|(p, _)| pair_names(p)).collect();
    let mut addresses: Vec<IpAddr> = pairs
        .iter()
        .flat_map(|(p, _)| {
            [
                p.a().ip(IpFamily::V4),
                p.a().ip(IpFamily::V6),
                p.b().ip(IpFamily::V4),
                p.b().ip(IpFamily::V6),
            ]
        })
        .collect();
    assert!(names.iter().all(|n| n.starts_with(NAME_PREFIX)));
    let listed = listed_namespaces()?;
    assert!(
        names.iter().all(|n| listed.contains(n.as_str())),
        "{names:?} not all in:\n{listed}"
    );
    for (pair, _) in &pairs {
        for family in [IpFamily::V4, IpFamily::V6] {
            // The test process itself, through `enter`, on both ends.
            let listener = pair
                .b()
                .netns()
                .bind_tcp(SocketAddr::new(pair.b().ip(family), 0))?;
            let target = listener.local_addr()?;
            let client = pair
                .a()
                .netns()
                .connect_tcp(target, Duration::from_secs(5))?;
            let (_, peer) = listener.accept()?;
            assert_eq!(peer, client.local_addr()?);
            assert_eq!(peer.ip(), pair.a().ip(family));
        }
    }
    names.sort();
    names.dedup();
    addresses.sort();
    addresses.dedup();
    assert_eq!((names.len(), addresses.len()), (2 * PAIRS, 4 * PAIRS));

    let started = Instant::now();
    drop(pairs);
    eprintln!("{PAIRS} pairs torn down in {:?}", started.elapsed());
    assert_gone(&names)
}

#[test]
#[ignore = "needs root and network namespaces"]
fn a_pair_is_isolated_from_the_host_and_reachable_only_at_its_ends() -> TestResult {
    let pair = NetnsPair::new()?;
    let names = pair_names(&pair);
    // No route out: the pod side can reach nothing but its peer, so tests
    // can never send traffic to the host's networks by mistake.
    let routes4 = pair
        .a()
        .netns()
        .exec("ip")
        .args(["-4", "route", "show"])
        .run()?;
    let routes6 = pair
        .a()
        .netns()
        .exec("ip")
        .args(["-6", "route", "show"])
        .run()?;
    assert!(
        !routes4.contains("default") && !routes6.contains("default"),
        "{routes4}\n{routes6}"
    );
    let unreachable = pair.a().netns().connect_tcp(
        SocketAddr::new(Ipv4Addr::new(10, 214, 0, 1).into(), 443),
        Duration::from_secs(2),
    );
    assert!(
        unreachable.is_err(),
        "10.214.0.1 should be unreachable from the pod side"
    );
    // The veth is not in the host namespace.
    let host_links = run(Command::new("ip").args(["-o", "link", "show"]))?;
    assert!(
        !host_links.contains(&format!("link-netns {}", names[0])),
        "{host_links}"
    );

    drop(pair);
    assert_gone(&names)
}

#[tokio::test]
#[ignore = "needs root, network namespaces and dnsmasq"]
async fn names_resolve_through_the_test_dns_server_in_the_namespaces_it_serves() -> TestResult {
    use credbroker_test_support::dns::Dns;
    let pair = NetnsPair::new()?;
    let (pod, remote) = (pair.a(), pair.b());
    let mut dns = Dns::start(
        remote.netns(),
        remote.ipv4().into(),
        &[(
            "api.example.test",
            vec![remote.ipv4().into(), remote.ipv6().into()],
        )],
    )?;
    dns.serve(pod.netns())?;
    let resolved = pod
        .netns()
        .exec("getent")
        .user(AGENT)
        .args(["ahosts", "api.example.test"])
        .output_async()
        .await?;
    let text = String::from_utf8_lossy(&resolved.stdout);
    assert!(
        text.contains(&remote.ipv4().to_string()),
        "{text}: {}",
        dns.output()
    );
    assert!(text.contains(&remote.ipv6().to_string()), "{text}");
    // Nothing else resolves: no upstream servers, no /etc/hosts.
    let unknown = pod
        .netns()
        .exec("getent")
        .args(["hosts", "elsewhere.example.test"])
        .output_async()
        .await?;
    assert!(!unknown.status.success(), "{unknown:?}");
    let resolv = std::path::Path::new("/etc/netns")
        .join(pod.netns().name())
        .join("resolv.conf");
    assert!(resolv.is_file());
    drop(dns);
    assert!(!resolv.exists(), "the resolver file outlived the fixture");
    Ok(())
}
