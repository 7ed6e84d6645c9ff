//! The decision every intercepted request gets, as a pure function:
//! may this request carry the secrets whose placeholders it contains?
//!
//! Invariant 2 lives here. A placeholder is swapped only when the
//! connection's destination (SNI and original port, or the cleartext Host)
//! is one of its binding's destinations, the request's authority equals that
//! destination, and method, path and surface are allowed. Anything else
//! carrying a placeholder is blocked with a reason, never forwarded.

use credbroker_crds::Surface;
use credbroker_crds::config::{SidecarBinding, SidecarDestination};

/// What the proxy knows about one request when it decides.
///
/// The contract that makes [`decide`] safe: `host` comes from the client
/// (SNI or Host), so the engine must dial what *it* resolves for `host`
/// (invariant 3), never the connection's original destination. Otherwise an
/// agent could name a bound host while connecting somewhere else.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The destination host: the TLS SNI, or the Host of a cleartext request.
    pub host: &'a str,
    /// The connection's original destination port.
    pub port: u16,
    /// Whether the request arrived inside TLS the sidecar terminated.
    pub tls: bool,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2), if any.
    pub authority: Option<&'a str>,
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
}

/// Where one binding's placeholder was seen in a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeenOn {
    pub header: bool,
    pub query: bool,
    pub body: bool,
    pub basic_auth: bool,
}

impl SeenOn {
    fn surfaces(self) -> impl Iterator<Item = Surface> {
        [
            (self.header, Surface::Header),
            (self.query, Surface::Query),
            (self.body, Surface::Body),
            (self.basic_auth, Surface::BasicAuth),
        ]
        .into_iter()
        .filter_map(|(seen, s)| seen.then_some(s))
    }

    pub fn any(self) -> bool {
        self.header || self.query || self.body || self.basic_auth
    }

    /// Seen on `surface` alone.
    pub fn only(surface: Surface) -> Self {
        let mut seen = Self::default();
        match surface {
            Surface::Header => seen.header = true,
            Surface::Query => seen.query = true,
            Surface::Body => seen.body = true,
            Surface::BasicAuth => seen.basic_auth = true,
        }
        seen
    }
}

/// Why a request carrying a placeholder was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockReason {
    DestinationNotBound,
    Cleartext,
    MethodNotAllowed,
    PathNotAllowed,
    /// The path has dot-segments or encoded separators, which an upstream
    /// may normalise into a path the binding does not allow.
    PathNotNormalized,
    SurfaceNotAllowed(Surface),
}

impl BlockReason {
    /// A stable, human-readable reason for responses, audit and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::DestinationNotBound => "destination_not_bound",
            Self::Cleartext => "cleartext_not_allowed",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PathNotAllowed => "path_not_allowed",
            Self::PathNotNormalized => "path_not_normalized",
            Self::SurfaceNotAllowed(_) => "surface_not_allowed",
        }
    }
}

/// The verdict on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward, swapping the placeholders of these bindings (indexes into
    /// the bindings slice; empty when the request carries none).
    Forward { inject: Vec<usize> },
    /// The request's authority is not the connection's destination: 421.
    Misdirected,
    /// A placeholder may not go here: 403, audited as exfiltration_blocked.
    Block { binding: usize, reason: BlockReason },
}

/// Decides one request. `seen[i]` says where binding `i`'s placeholder
/// appeared (a slice parallel to `bindings`, or shorter: missing = unseen).
pub fn decide(bindings: &[SidecarBinding], seen: &[SeenOn], req: &RequestFacts<'_>) -> Decision {
    if !authority_matches(req.authority, req.host, req.port) {
        // Checked before anything else, placeholder or not: a connection
        // whose TLS was terminated for one name must not carry requests for
        // another (connection coalescing, domain fronting), and in
        // cleartext the Host's port must be the connection's real port.
        return Decision::Misdirected;
    }
    let mut inject = Vec::new();
    for (i, (binding, seen)) in bindings.iter().zip(seen).enumerate() {
        if !seen.any() {
            continue;
        }
        if let Err(reason) = allowed(binding, *seen, req) {
            return Decision::Block { binding: i, reason };
        }
        inject.push(i);
    }
    Decision::Forward { inject }
}

/// Whether `binding`'s placeholder may be swapped on `surface` of `req`,
/// whether or not it was seen there. For a streamed body, which cannot be
/// scanned before it is forwarded: the body scanner gets values only for
/// the bindings this allows, and a placeholder of any other fails the body.
/// The authority check of [`decide`] applies as well; call this only for
/// requests [`decide`] forwards.
pub fn may_swap(
    binding: &SidecarBinding,
    surface: Surface,
    req: &RequestFacts<'_>,
) -> Result<(), BlockReason> {
    allowed(binding, SeenOn::only(surface), req)
}

/// Whether `binding` may be injected into `req`: some destination must match
/// host and port and allow the transport, method and path together.
fn allowed(
    binding: &SidecarBinding,
    seen: SeenOn,
    req: &RequestFacts<'_>,
) -> Result<(), BlockReason> {
    if let Some(s) = seen.surfaces().find(|s| !binding.surfaces.contains(s)) {
        return Err(BlockReason::SurfaceNotAllowed(s));
    }
    let candidates: Vec<&SidecarDestination> = binding
        .destinations
        .iter()
        .filter(|d| d.port == req.port && host_matches(&d.host, req.host))
        .collect();
    if candidates.is_empty() {
        return Err(BlockReason::DestinationNotBound);
    }
    // Report the first reason in the order a user would fix them.
    let mut worst = BlockReason::Cleartext;
    for d in candidates {
        let verdict = if !req.tls && !d.allow_cleartext {
            Err(BlockReason::Cleartext)
        } else if !d.methods.is_empty() && !d.methods.iter().any(|m| m.as_str() == req.method) {
            Err(BlockReason::MethodNotAllowed)
        } else if !d.paths.is_empty() && !path_is_normalized(req.path) {
            Err(BlockReason::PathNotNormalized)
        } else if !d.paths.is_empty() && !d.paths.iter().any(|g| glob_matches(g, req.path)) {
            Err(BlockReason::PathNotAllowed)
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => return Ok(()),
            Err(r) if rank(&r) > rank(&worst) => worst = r,
            Err(_) => {}
        }
    }
    Err(worst)
}

fn rank(r: &BlockReason) -> u8 {
    match r {
        BlockReason::Cleartext => 0,
        BlockReason::MethodNotAllowed => 1,
        BlockReason::PathNotNormalized => 2,
        BlockReason::PathNotAllowed => 3,
        _ => 4,
    }
}

/// Canonical form of a host for comparison: lower case, no trailing dot.
fn canonical_host(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

pub use credbroker_crds::validate::host_matches;

/// Whether the request's authority names the connection's destination:
/// the same host (case-insensitive, a trailing dot ignored) and either the
/// original port written as plain digits, or no port when the original port
/// is the scheme's default (443, or 80 in cleartext). Anything looser
/// (`[host]:443`, `host:+443`, a missing port on 8443) would let the
/// upstream see a Host other than the one checked.
pub fn authority_matches(authority: Option<&str>, host: &str, port: u16) -> bool {
    let Some(authority) = authority else {
        // HTTP/1.1 requires Host, and the HTTP layer rejects requests
        // without one; HTTP/2 may omit :authority only for non-http schemes.
        return false;
    };
    if authority.starts_with('[') || authority.contains('@') {
        // Destinations are DNS names (never IP literals), and userinfo is
        // not allowed in Host or :authority.
        return false;
    }
    let (a_host, a_port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let port_ok = match a_port {
        None => port == 443 || port == 80,
        Some(p) => {
            !p.is_empty()
                && !p.starts_with('0')
                && p.bytes().all(|c| c.is_ascii_digit())
                && p.parse::<u16>().ok() == Some(port)
        }
    };
    port_ok && canonical_host(a_host) == canonical_host(host)
}

/// A path an upstream will not rewrite into another: no `.` or `..`
/// segments, no empty segment but a trailing one, no backslash, no encoded
/// `/`, `\`, `.` or NUL, no double encoding (`%25`, for upstreams that
/// decode twice) and no `;` (Tomcat, Jetty and Spring read `..;` as `..`).
pub fn path_is_normalized(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if path.contains('\\') || path.contains(';') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if ["%2f", "%5c", "%2e", "%00", "%25"]
        .iter()
        .any(|enc| lower.contains(enc))
    {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg == "." || seg == ".." || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// Matches a path glob where `*` stands for any run of characters.
pub fn glob_matches(glob: &str, path: &str) -> bool {
    let parts: Vec<&str> = glob.split('*').collect();
    let (first, rest) = match parts.split_first() {
        Some(x) => x,
        None => return path.is_empty(),
    };
    let Some(mut remaining) = path.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return remaining.is_empty(); // no '*': exact match
    };
    for part in middle {
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use credbroker_crds::{HttpMethod, VaultSecretRef};

    fn dest(host: &str, port: u16) -> SidecarDestination {
        SidecarDestination {
            host: host.into(),
            port,
            methods: vec![],
            paths: vec![],
            extra_ca_pem: None,
            allow_cleartext: false,
        }
    }

    fn binding(
        id: &str,
        destinations: Vec<SidecarDestination>,
        surfaces: Vec<Surface>,
    ) -> SidecarBinding {
        SidecarBinding {
            id: id.into(),
            secret: VaultSecretRef {
                mount: "secret".into(),
                path: format!("teams/{id}"),
                key: "k".into(),
                kv_version: 2,
            },
            destinations,
            surfaces,
            refresh_interval: "30s".into(),
            placeholder: None,
        }
    }

    fn req<'a>(
        host: &'a str,
        authority: &'a str,
        method: &'a str,
        path: &'a str,
    ) -> RequestFacts<'a> {
        RequestFacts {
            host,
            port: 443,
            tls: true,
            authority: Some(authority),
            method,
            path,
        }
    }

    const HEADER: SeenOn = SeenOn {
        header: true,
        query: false,
        body: false,
        basic_auth: false,
    };
    const NONE: SeenOn = SeenOn {
        header: false,
        query: false,
        body: false,
        basic_auth: false,
    };

    fn openai_and_anthropic() -> Vec<SidecarBinding> {
        let mut scoped = dest("api.openai.com", 443);
        scoped.methods = vec![HttpMethod::Post];
        scoped.paths = vec!["/v1/*".into()];
        vec![
            binding("openai", vec![scoped], vec![Surface::Header]),
            binding(
                "anthropic",
                vec![dest("*.anthropic.com", 443)],
                vec![Surface::Header],
            ),
        ]
    }

    #[test]
    fn a_placeholder_goes_only_to_its_own_destinations() {
        let b = openai_and_anthropic();
        let ok = req("api.openai.com", "api.openai.com", "POST", "/v1/chat");
        assert_eq!(
            decide(&b, &[HEADER, NONE], &ok),
            Decision::Forward { inject: vec![0] }
        );
        // openai's placeholder toward anthropic's (bound) host: blocked.
        let cross = req("api.anthropic.com", "api.anthropic.com", "POST", "/v1/chat");
        assert_eq!(
            decide(&b, &[HEADER, NONE], &cross),
            Decision::Block {
                binding: 0,
                reason: BlockReason::DestinationNotBound
            }
        );
        // No placeholder at all: forwarded untouched.
        assert_eq!(
            decide(&b, &[NONE, NONE], &cross),
            Decision::Forward { inject: vec![] }
        );
        // Wrong port.
        let other_port = RequestFacts {
            port: 8443,
            authority: Some("api.openai.com:8443"),
            ..ok
        };
        assert!(matches!(
            decide(&b, &[HEADER], &other_port),
            Decision::Block { .. }
        ));
    }

    #[test]
    fn method_path_and_surface_are_enforced() {
        let b = openai_and_anthropic();
        let cases = [
            (
                req("api.openai.com", "api.openai.com", "GET", "/v1/x"),
                BlockReason::MethodNotAllowed,
            ),
            (
                req("api.openai.com", "api.openai.com", "POST", "/v2/x"),
                BlockReason::PathNotAllowed,
            ),
            (
                req("api.openai.com", "api.openai.com", "POST", "/v1/../admin"),
                BlockReason::PathNotNormalized,
            ),
            (
                req(
                    "api.openai.com",
                    "api.openai.com",
                    "POST",
                    "/v1/%2e%2e/admin",
                ),
                BlockReason::PathNotNormalized,
            ),
            (
                req("api.openai.com", "api.openai.com", "POST", "/v1/a%2Fb"),
                BlockReason::PathNotNormalized,
            ),
        ];
        for (r, reason) in cases {
            assert_eq!(
                decide(&b, &[HEADER], &r),
                Decision::Block { binding: 0, reason },
                "{r:?}"
            );
        }
        let in_body = SeenOn { body: true, ..NONE };
        let r = req("api.openai.com", "api.openai.com", "POST", "/v1/x");
        assert_eq!(
            decide(&b, &[in_body], &r),
            Decision::Block {
                binding: 0,
                reason: BlockReason::SurfaceNotAllowed(Surface::Body)
            }
        );
    }

    #[test]
    fn authority_must_equal_the_sni() {
        let b = openai_and_anthropic();
        for (authority, ok) in [
            ("api.openai.com", true),
            ("API.OpenAI.com.", true),
            ("api.openai.com:443", true),
            ("api.openai.com:8443", false),
            ("evil.com", false),
            ("api.openai.com.evil.com", false),
            ("user@api.openai.com", false),
            ("[api.openai.com]:443", false),
            ("api.openai.com:+443", false),
            ("api.openai.com:", false),
            ("api.openai.com:0443", false),
        ] {
            let r = req("api.openai.com", authority, "POST", "/v1/x");
            let d = decide(&b, &[NONE], &r);
            assert_eq!(d != Decision::Misdirected, ok, "{authority}: {d:?}");
        }
        let missing = RequestFacts {
            authority: None,
            ..req("api.openai.com", "", "POST", "/v1/x")
        };
        assert_eq!(decide(&b, &[NONE], &missing), Decision::Misdirected);
    }

    #[test]
    fn cleartext_needs_an_explicit_opt_in() {
        let mut b = vec![binding(
            "plain",
            vec![dest("internal.svc", 80)],
            vec![Surface::Header],
        )];
        let r = RequestFacts {
            host: "internal.svc",
            port: 80,
            tls: false,
            authority: Some("internal.svc"),
            method: "GET",
            path: "/",
        };
        assert_eq!(
            decide(&b, &[HEADER], &r),
            Decision::Block {
                binding: 0,
                reason: BlockReason::Cleartext
            }
        );
        b[0].destinations[0].allow_cleartext = true;
        assert_eq!(
            decide(&b, &[HEADER], &r),
            Decision::Forward { inject: vec![0] }
        );
    }

    #[test]
    fn may_swap_follows_the_same_rules_per_surface() {
        let mut b = openai_and_anthropic();
        b[0].surfaces.push(Surface::Body);
        let ok = req("api.openai.com", "api.openai.com", "POST", "/v1/chat");
        assert_eq!(may_swap(&b[0], Surface::Body, &ok), Ok(()));
        assert_eq!(
            may_swap(&b[0], Surface::Query, &ok),
            Err(BlockReason::SurfaceNotAllowed(Surface::Query))
        );
        assert_eq!(
            may_swap(
                &b[0],
                Surface::Body,
                &req("api.openai.com", "api.openai.com", "GET", "/v1/chat")
            ),
            Err(BlockReason::MethodNotAllowed)
        );
        assert_eq!(
            may_swap(&b[1], Surface::Body, &ok),
            Err(BlockReason::SurfaceNotAllowed(Surface::Body))
        );
    }

    #[test]
    fn globs() {
        assert!(glob_matches("/v1/*", "/v1/chat/completions"));
        assert!(glob_matches("/v1/*", "/v1/"));
        assert!(!glob_matches("/v1/*", "/v1"));
        assert!(!glob_matches("/v1/*", "/v2/x"));
        assert!(glob_matches("/v1/*/files", "/v1/a/b/files"));
        assert!(!glob_matches("/v1/*/files", "/v1/files"));
        assert!(glob_matches("/exact", "/exact"));
        assert!(!glob_matches("/exact", "/exact/more"));
        assert!(glob_matches("*", "/anything"));
        assert!(!glob_matches("/a*a", "/a"));
    }

    #[test]
    fn normalized_paths() {
        for ok in ["/", "/v1/chat", "/v1/chat/", "/a.b/c..d"] {
            assert!(path_is_normalized(ok), "{ok}");
        }
        for bad in [
            "",
            "v1",
            "/v1//x",
            "/./x",
            "/x/..",
            "/x/%2E%2E/y",
            "/x%2fy",
            "/x\\y",
            "/x%00",
            "/v1/..;/admin",
            "/v1/%252e%252e/admin",
            "/v1/x;jsessionid=1",
        ] {
            assert!(!path_is_normalized(bad), "{bad}");
        }
    }
}
