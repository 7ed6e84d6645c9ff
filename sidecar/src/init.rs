//! The pod's packet filter, programmed once by the init container
//! (DESIGN.md invariant 6: capture is complete or the pod does not start).
//!
//! Three layers, pure ones first:
//! - [`CaptureConfig`]: what `init`'s arguments ask for, validated;
//! - [`ruleset`] and [`render_restore`]: the iptables rules for one IP
//!   family, and the `iptables-restore --noflush` input that converges any
//!   current state ([`CurrentRules`], parsed from `iptables-save`) to them;
//! - [`run`]: detects the backend (legacy or nft), applies IPv4 always and
//!   IPv6 whenever it is enabled, re-reads the tables and checks that every
//!   rule is in place, and fails naming the rule and the reason otherwise.
//!
//! All rules live in credbroker's own chain (`CREDBROKER_OUTPUT` in the nat
//! and filter tables), entered by one jump at the top of `OUTPUT`. A run
//! flushes and refills that chain and replaces the jump, in one restore
//! transaction per family, so running `init` again leaves exactly the same
//! rules. Rules of other tools are left alone.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use crate::{Error, Result};

/// The port the sidecar listens on for redirected connections. Not 15001:
/// Istio's and Kuma's proxies take it (and Istio the 15000-15090 range), and
/// two sidecars in one pod must not fight over a port.
pub const DEFAULT_PROXY_PORT: u16 = 15101;
/// The sidecar's UID, the one identity whose traffic is not captured.
///
/// Not 1337: Istio's proxy runs as 1337, and a pod in both meshes would let
/// Istio's proxy (or an agent given that UID for Istio) bypass credbroker.
/// 15017 is outside the ranges images give their own users (system users
/// below 1000, first users from 1000, nobody/distroless at 65532-65534) and
/// Linkerd's 2102, and is easy to recognise in `ps` and rule listings. The webhook refuses agent containers
/// that run as it.
pub const DEFAULT_PROXY_UID: u32 = 15017;
/// The sidecar's primary GID. The exemption requires the UID *and* this GID,
/// so it is never wider than the UID alone.
pub const DEFAULT_PROXY_GID: u32 = 15017;
/// Every chain credbroker creates starts with this; chains with the prefix
/// that a run does not declare are leftovers and are removed.
pub const CHAIN_PREFIX: &str = "CREDBROKER_";
/// credbroker's chain, in both the nat and the filter table.
pub const OUTPUT_CHAIN: &str = "CREDBROKER_OUTPUT";
/// How long `iptables-restore` waits for the legacy backend's xtables lock.
const XTABLES_WAIT_SECONDS: u32 = 30;
/// iptables' multiport match takes at most 15 ports.
const MULTIPORT_MAX: usize = 15;

/// Settings of the `init` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// The port the sidecar listens on for redirected TCP.
    #[arg(long, default_value_t = DEFAULT_PROXY_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_port: u16,
    /// The sidecar's UID: its traffic (with --proxy-gid) is not captured.
    /// Not 0, and by default not Istio's 1337.
    #[arg(long, default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// The sidecar's primary GID (required together with --proxy-uid).
    #[arg(long, default_value_t = DEFAULT_PROXY_GID)]
    pub proxy_gid: u32,
    /// Destination ports (TCP and UDP) left alone, e.g. a database's;
    /// repeatable or comma-separated.
    #[arg(long = "exclude-port", value_name = "PORT", value_delimiter = ',',
          value_parser = clap::value_parser!(u16).range(1..))]
    pub exclude_ports: Vec<u16>,
    /// Destination networks (IPv4 or IPv6, e.g. 10.96.0.0/12) left alone;
    /// repeatable or comma-separated.
    #[arg(long = "exclude-cidr", value_name = "CIDR", value_delimiter = ',')]
    pub exclude_cidrs: Vec<Cidr>,
    /// Also reject UDP other than DNS (UDP 443 is always rejected so QUIC
    /// falls back to TCP).
    #[arg(long)]
    pub reject_other_udp: bool,
    /// The iptables backend: the one already in use in the namespace (auto),
    /// or forced.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Print the rulesets (iptables-restore input) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Legacy,
    Nft,
}

/// Which kernel interface the iptables tools drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::Nft => "nft",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }

    fn port_unreachable(self) -> &'static str {
        match self {
            Self::V4 => "icmp-port-unreachable",
            Self::V6 => "icmp6-port-unreachable",
        }
    }

    /// `iptables-legacy-save`, `ip6tables-nft-restore`, ...
    fn tool(self, backend: Backend, action: &str) -> String {
        let base = match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        };
        format!("{base}-{}-{action}", backend.name())
    }
}

/// An IPv4 or IPv6 network, written `ADDR/LEN` (a bare address is a /32 or
/// /128). Host bits must be zero, so a typo cannot silently widen or move
/// the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("`{addr}` is not an IP address (expected e.g. 10.96.0.0/12 or fd00::/8)")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`/{len}` is not a prefix length from 0 to {max}"))?,
        };
        if prefix_len == 0 {
            return Err(format!(
                "`{s}` would exclude every destination, so nothing would be captured"
            ));
        }
        let bits = match addr {
            IpAddr::V4(a) => u128::from(a.to_bits()) << 96,
            IpAddr::V6(a) => a.to_bits(),
        };
        let host_bits = bits.checked_shl(u32::from(prefix_len)).unwrap_or(0);
        if host_bits != 0 {
            let mask = u128::MAX << (128 - u32::from(prefix_len));
            let network = match addr {
                IpAddr::V4(_) => IpAddr::V4(
                    u32::try_from((bits & mask) >> 96)
                        .unwrap_or_default()
                        .into(),
                ),
                IpAddr::V6(_) => IpAddr::V6((bits & mask).into()),
            };
            return Err(format!(
                "`{s}` has host bits set; did you mean {network}/{prefix_len}?"
            ));
        }
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// What to capture and what to leave alone, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    pub proxy_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// Sorted, without duplicates.
    pub exclude_ports: Vec<u16>,
    /// Sorted, without duplicates.
    pub exclude_cidrs: Vec<Cidr>,
    pub reject_other_udp: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            proxy_port: DEFAULT_PROXY_PORT,
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: DEFAULT_PROXY_GID,
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            reject_other_udp: false,
        }
    }
}

impl CaptureConfig {
    pub fn from_args(args: &InitArgs) -> Result<Self> {
        if args.proxy_port == 0 {
            return Err(Error::Init("--proxy-port 0 is not a port".into()));
        }
        if args.proxy_uid == 0 {
            return Err(Error::Init(
                "--proxy-uid 0 (root) would exempt every root process in the pod from capture"
                    .into(),
            ));
        }
        if let Some(port) = args.exclude_ports.iter().find(|p| **p == 0) {
            return Err(Error::Init(format!("--exclude-port {port} is not a port")));
        }
        let exclude_ports: BTreeSet<u16> = args.exclude_ports.iter().copied().collect();
        let exclude_cidrs: BTreeSet<Cidr> = args.exclude_cidrs.iter().copied().collect();
        Ok(Self {
            proxy_port: args.proxy_port,
            proxy_uid: args.proxy_uid,
            proxy_gid: args.proxy_gid,
            exclude_ports: exclude_ports.into_iter().collect(),
            exclude_cidrs: exclude_cidrs.into_iter().collect(),
            reject_other_udp: args.reject_other_udp,
        })
    }
}

/// One rule: its matches, why it exists (the rule comment) and its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<String>,
    /// Without the `credbroker: ` prefix the rule carries.
    pub comment: &'static str,
    pub target: Vec<String>,
}

impl Rule {
    fn new(matches: &[&str], comment: &'static str, target: &[&str]) -> Self {
        let owned = |parts: &[&str]| parts.iter().map(|s| (*s).to_string()).collect();
        Self {
            matches: owned(matches),
            comment,
            target: owned(target),
        }
    }

    /// The comment as iptables stores it.
    pub fn full_comment(&self) -> String {
        format!("credbroker: {}", self.comment)
    }

    /// The rule's arguments after `-A CHAIN` (comments hold no `"` or `\`).
    fn spec(&self) -> String {
        let mut parts = self.matches.clone();
        parts.extend([
            "-m".to_string(),
            "comment".to_string(),
            "--comment".to_string(),
            format!("\"{}\"", self.full_comment()),
        ]);
        parts.extend(self.target.iter().cloned());
        parts.join(" ")
    }
}

/// credbroker's rules in one table: its chain, and the jump into it that
/// goes first in the table's `OUTPUT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    pub table: &'static str,
    pub jump: Rule,
    pub rules: Vec<Rule>,
}

/// Everything credbroker installs for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub family: Family,
    pub tables: Vec<TableRules>,
}

/// The rules for `family` (pure).
///
/// nat: every outbound TCP connection goes to the sidecar's port, except the
/// sidecar's own (UID and GID), loopback, and the excluded ports and
/// networks. IPv6 link-local destinations are captured like any other.
///
/// filter: UDP 443 is rejected so QUIC falls back to (captured) TCP; DNS is
/// allowed; with `reject_other_udp` all other UDP is rejected too. TCP that
/// conntrack marks INVALID is dropped: the nat table never sees it, so it
/// would leave with its original destination, past the sidecar.
pub fn ruleset(config: &CaptureConfig, family: Family) -> Ruleset {
    let uid = config.proxy_uid.to_string();
    let gid = config.proxy_gid.to_string();
    let sidecar = [
        "-m",
        "owner",
        "--uid-owner",
        uid.as_str(),
        "--gid-owner",
        gid.as_str(),
    ];
    let port_chunks: Vec<String> = config
        .exclude_ports
        .chunks(MULTIPORT_MAX)
        .map(|chunk| {
            chunk
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let cidrs: Vec<String> = config
        .exclude_cidrs
        .iter()
        .filter(|c| c.family() == family)
        .map(Cidr::to_string)
        .collect();
    let exclude_ports = |protocol: &str| -> Vec<Rule> {
        port_chunks
            .iter()
            .map(|ports| {
                Rule::new(
                    &["-p", protocol, "-m", "multiport", "--dports", ports],
                    "excluded port (--exclude-port)",
                    &["-j", "RETURN"],
                )
            })
            .collect()
    };
    let exclude_cidrs = cidrs.iter().map(|cidr| {
        Rule::new(
            &["-d", cidr],
            "excluded network (--exclude-cidr)",
            &["-j", "RETURN"],
        )
    });

    let mut nat = vec![
        Rule::new(
            &sidecar,
            "the sidecar itself is not captured",
            &["-j", "RETURN"],
        ),
        Rule::new(&["-o", "lo"], "loopback is not captured", &["-j", "RETURN"]),
        Rule::new(
            &["-d", family.loopback()],
            "loopback is not captured",
            &["-j", "RETURN"],
        ),
    ];
    nat.extend(exclude_cidrs.clone());
    nat.extend(exclude_ports("tcp"));
    let proxy_port = config.proxy_port.to_string();
    nat.push(Rule::new(
        &["-p", "tcp"],
        "outbound TCP goes to the sidecar",
        &["-j", "REDIRECT", "--to-ports", &proxy_port],
    ));

    let reject = ["-j", "REJECT", "--reject-with", family.port_unreachable()];
    let mut filter = vec![
        Rule::new(
            &sidecar,
            "the sidecar itself is not filtered",
            &["-j", "RETURN"],
        ),
        Rule::new(&["-o", "lo"], "loopback is not filtered", &["-j", "RETURN"]),
    ];
    filter.extend(exclude_cidrs);
    filter.extend(exclude_ports("tcp"));
    filter.extend(exclude_ports("udp"));
    filter.push(Rule::new(
        &["-p", "tcp", "-m", "conntrack", "--ctstate", "INVALID"],
        "untracked TCP would bypass the redirect",
        &["-j", "DROP"],
    ));
    filter.push(Rule::new(
        &["-p", "udp", "-m", "udp", "--dport", "53"],
        "DNS is allowed",
        &["-j", "RETURN"],
    ));
    filter.push(Rule::new(
        &["-p", "udp", "-m", "udp", "--dport", "443"],
        "QUIC is rejected so clients fall back to TCP",
        &reject,
    ));
    if config.reject_other_udp {
        filter.push(Rule::new(
            &["-p", "udp"],
            "other UDP is rejected (--reject-other-udp)",
            &reject,
        ));
    }

    Ruleset {
        family,
        tables: vec![
            TableRules {
                table: "nat",
                jump: Rule::new(
                    &["-p", "tcp"],
                    "capture outbound TCP",
                    &["-j", OUTPUT_CHAIN],
                ),
                rules: nat,
            },
            TableRules {
                table: "filter",
                jump: Rule::new(&[], "filter outbound traffic", &["-j", OUTPUT_CHAIN]),
                rules: filter,
            },
        ],
    }
}

/// The rules for `family` as `iptables-restore --noflush` input for a
/// namespace that has none of them yet (what `--dry-run` prints).
pub fn render(config: &CaptureConfig, family: Family) -> String {
    render_restore(&ruleset(config, family), &CurrentRules::default())
}

/// `iptables-restore --noflush` input that takes the namespace from
/// `current` to exactly `ruleset` (pure). Per table: declaring
/// [`OUTPUT_CHAIN`] creates or flushes it; every existing jump into a
/// credbroker chain is deleted and the one jump re-inserted first in
/// `OUTPUT`; leftover credbroker chains are flushed and deleted. Other rules
/// are not touched.
pub fn render_restore(ruleset: &Ruleset, current: &CurrentRules) -> String {
    let mut out = String::new();
    let mut line = |l: &str| {
        out.push_str(l);
        out.push('\n');
    };
    for table in &ruleset.tables {
        let now = current.table(table.table);
        line(&format!("*{}", table.table));
        line(&format!(":{OUTPUT_CHAIN} - [0:0]"));
        for rule in now.map(CurrentTable::jumps_into_own).unwrap_or_default() {
            line(&format!("-D {} {}", rule.chain, rule.spec));
        }
        let stale: Vec<&str> = now
            .map(|t| t.own_chains().filter(|c| *c != OUTPUT_CHAIN).collect())
            .unwrap_or_default();
        for chain in &stale {
            line(&format!("-F {chain}"));
        }
        for chain in &stale {
            line(&format!("-X {chain}"));
        }
        for rule in &table.rules {
            line(&format!("-A {OUTPUT_CHAIN} {}", rule.spec()));
        }
        line(&format!("-I OUTPUT 1 {}", table.jump.spec()));
        line("COMMIT");
    }
    out
}

/// The rules of a namespace as `iptables-save` prints them, as far as
/// credbroker cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CurrentRules {
    tables: Vec<CurrentTable>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CurrentTable {
    name: String,
    chains: Vec<String>,
    rules: Vec<SavedRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SavedRule {
    chain: String,
    /// Everything after `-A CHAIN `, verbatim (valid restore input).
    spec: String,
    /// The `-j`/`-g` target, if any.
    target: Option<String>,
    comment: Option<String>,
}

impl CurrentRules {
    /// Parses `iptables-save` output (pure; unknown lines are ignored).
    pub fn parse(save: &str) -> Self {
        let mut tables: Vec<CurrentTable> = Vec::new();
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                tables.push(CurrentTable {
                    name: name.to_string(),
                    ..CurrentTable::default()
                });
                continue;
            }
            let Some(table) = tables.last_mut() else {
                continue;
            };
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(chain) = decl.split_whitespace().next() {
                    table.chains.push(chain.to_string());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let Some((chain, spec)) = rest.split_once(' ') else {
                    continue;
                };
                let tokens = tokenize(spec);
                let after = |flags: &[&str]| {
                    tokens
                        .windows(2)
                        .find(|w| flags.contains(&w[0].as_str()))
                        .map(|w| w[1].clone())
                };
                table.rules.push(SavedRule {
                    chain: chain.to_string(),
                    spec: spec.to_string(),
                    target: after(&["-j", "-g", "--jump", "--goto"]),
                    comment: after(&["--comment"]),
                });
            }
        }
        Self { tables }
    }

    fn table(&self, name: &str) -> Option<&CurrentTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// How many rules, of any tool, the tables hold (backend detection).
    pub fn rule_count(&self) -> usize {
        self.tables.iter().map(|t| t.rules.len()).sum()
    }
}

impl CurrentTable {
    fn own_chains(&self) -> impl Iterator<Item = &str> {
        self.chains
            .iter()
            .map(String::as_str)
            .filter(|c| c.starts_with(CHAIN_PREFIX))
    }

    /// Rules outside credbroker's chains that lead into one of them.
    fn jumps_into_own(&self) -> Vec<&SavedRule> {
        self.rules
            .iter()
            .filter(|r| !r.chain.starts_with(CHAIN_PREFIX))
            .filter(|r| {
                r.target
                    .as_deref()
                    .is_some_and(|t| t.starts_with(CHAIN_PREFIX))
            })
            .collect()
    }
}

/// Splits an `iptables-save` rule into arguments: whitespace-separated, with
/// double-quoted strings in which `\` escapes the next character.
fn tokenize(spec: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current: Option<String> = None;
    let mut chars = spec.chars();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                current.get_or_insert_with(String::new);
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.get_or_insert_with(String::new).push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                tokens.extend(current.take());
            }
            c => current.get_or_insert_with(String::new).push(c),
        }
    }
    tokens.extend(current);
    tokens
}

/// Checks that `current` (read back after applying) holds `ruleset` exactly:
/// credbroker's chain has its rules in order (recognised by their comments)
/// and `OUTPUT` starts with the one jump into it.
pub fn verify(ruleset: &Ruleset, current: &CurrentRules) -> Result<()> {
    let family = ruleset.family.name();
    for table in &ruleset.tables {
        let name = table.table;
        let Some(now) = current.table(name) else {
            return Err(Error::Init(format!(
                "{family}: the {name} table is missing after applying the rules"
            )));
        };
        let installed: Vec<Option<&str>> = now
            .rules
            .iter()
            .filter(|r| r.chain == OUTPUT_CHAIN)
            .map(|r| r.comment.as_deref())
            .collect();
        let wanted: Vec<String> = table.rules.iter().map(Rule::full_comment).collect();
        for (i, rule) in table.rules.iter().enumerate() {
            if installed.get(i).copied().flatten() != Some(wanted[i].as_str()) {
                return Err(Error::Init(format!(
                    "{family}: rule {} of {name} chain {OUTPUT_CHAIN} (`{}`) is not in place \
                     after applying; the chain holds {} rules",
                    i + 1,
                    rule.spec(),
                    installed.len()
                )));
            }
        }
        if installed.len() != wanted.len() {
            return Err(Error::Init(format!(
                "{family}: {name} chain {OUTPUT_CHAIN} holds {} rules after applying, expected {}",
                installed.len(),
                wanted.len()
            )));
        }
        let jumps = now.jumps_into_own();
        let first_in_output = now.rules.iter().find(|r| r.chain == "OUTPUT");
        let jump_first = first_in_output.is_some_and(|r| r.target.as_deref() == Some(OUTPUT_CHAIN));
        if jumps.len() != 1 || !jump_first {
            return Err(Error::Init(format!(
                "{family}: {name} OUTPUT should start with the one jump to {OUTPUT_CHAIN}; \
                 found {} jumps into credbroker chains, first OUTPUT rule: {}",
                jumps.len(),
                first_in_output.map_or("none", |r| r.spec.as_str())
            )));
        }
    }
    Ok(())
}

/// Picks the backend already in use, as Kubernetes' iptables-wrapper does:
/// the one whose save output holds more rules; nft when tied (a fresh pod
/// namespace has none in either, and nft is what current distributions use).
pub fn choose_backend(legacy_rules: usize, nft_rules: usize) -> Backend {
    if legacy_rules > nft_rules {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

/// Explains a failed `iptables-restore`: which line of `input` it refused
/// (its rule and comment) and what it said.
pub fn explain_restore_failure(tool: &str, family: Family, input: &str, stderr: &str) -> String {
    let stderr = stderr.trim();
    let line_no = stderr.split("line ").skip(1).find_map(|rest| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<usize>().ok()
    });
    let lines: Vec<&str> = input.lines().collect();
    let family = family.name();
    match line_no.and_then(|n| Some((n, *lines.get(n.checked_sub(1)?)?))) {
        Some((n, "COMMIT")) => {
            let table = lines[..n]
                .iter()
                .rev()
                .find_map(|l| l.strip_prefix('*'))
                .unwrap_or("?");
            format!(
                "{tool} could not commit the {family} {table} table (line {n}); the kernel \
                 refused one of its rules: {stderr}"
            )
        }
        Some((n, rule)) => {
            format!("{tool} refused {family} rule at line {n}, `{rule}`: {stderr}")
        }
        None => format!("{tool} failed to apply the {family} rules: {stderr}"),
    }
}

/// Runs `init`: prints the rules (`--dry-run`), or applies and checks them.
pub fn run(args: &InitArgs) -> Result<()> {
    let config = CaptureConfig::from_args(args)?;
    let mut stdout = std::io::stdout().lock();
    let mut say = |text: &str| {
        writeln!(stdout, "{text}").map_err(|e| Error::Io {
            what: "writing to stdout".into(),
            source: e,
        })
    };
    if args.dry_run {
        for family in [Family::V4, Family::V6] {
            let tool = match family {
                Family::V4 => "iptables-restore",
                Family::V6 => "ip6tables-restore",
            };
            say(&format!(
                "# {}: input for `{tool} --noflush`",
                family.name()
            ))?;
            say(render(&config, family).trim_end())?;
        }
        return Ok(());
    }

    let backend = match args.backend {
        BackendChoice::Legacy => Backend::Legacy,
        BackendChoice::Nft => Backend::Nft,
        BackendChoice::Auto => {
            let count = |backend| {
                [Family::V4, Family::V6]
                    .into_iter()
                    .filter_map(|family| save(&family.tool(backend, "save")).ok())
                    .map(|out| CurrentRules::parse(&out).rule_count())
                    .sum::<usize>()
            };
            let (legacy, nft) = (count(Backend::Legacy), count(Backend::Nft));
            let backend = choose_backend(legacy, nft);
            if legacy > 0 && nft > 0 {
                eprintln!(
                    "credbroker init: warning: both iptables backends hold rules ({legacy} \
                     legacy, {nft} nft) and the kernel applies both; using {}",
                    backend.name()
                );
            }
            backend
        }
    };

    let mut families = vec![Family::V4];
    if ipv6_enabled(Path::new(IPV6_CONF))? {
        families.push(Family::V6);
    } else {
        say(
            "credbroker init: IPv6 is disabled in this network namespace; no ip6tables rules needed",
        )?;
    }
    for family in families {
        let ruleset = ruleset(&config, family);
        apply(&ruleset, backend)?;
        let counts: Vec<String> = ruleset
            .tables
            .iter()
            .map(|t| {
                format!(
                    "{}: {} rules and the jump from OUTPUT",
                    t.table,
                    t.rules.len()
                )
            })
            .collect();
        say(&format!(
            "credbroker init: {} rules in place with {} ({})",
            family.name(),
            family.tool(backend, "restore"),
            counts.join(", ")
        ))?;
    }
    Ok(())
}

/// Applies one family's ruleset with `backend` and reads it back.
fn apply(ruleset: &Ruleset, backend: Backend) -> Result<()> {
    let family = ruleset.family;
    let save_tool = family.tool(backend, "save");
    let restore_tool = family.tool(backend, "restore");
    let before = CurrentRules::parse(&save(&save_tool)?);
    let input = render_restore(ruleset, &before);

    let path = find_tool(&restore_tool)?;
    let mut child = Command::new(&path)
        .arg("--noflush")
        .arg(format!("--wait={XTABLES_WAIT_SECONDS}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Io {
            what: format!("starting {}", path.display()),
            source: e,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A few kilobytes at most: far below the pipe buffer, so writing all
        // before reading the output cannot deadlock.
        stdin.write_all(input.as_bytes()).map_err(|e| Error::Io {
            what: format!("writing the {} rules to {restore_tool}", family.name()),
            source: e,
        })?;
    }
    let output = child.wait_with_output().map_err(|e| Error::Io {
        what: format!("waiting for {restore_tool}"),
        source: e,
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Error::Init(explain_restore_failure(
            &restore_tool,
            family,
            &input,
            &format!("{stderr} ({})", output.status),
        )));
    }
    verify(ruleset, &CurrentRules::parse(&save(&save_tool)?))
}

/// Runs an `*-save` tool and returns what it printed.
fn save(tool: &str) -> Result<String> {
    let path = find_tool(tool)?;
    let output = Command::new(&path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Io {
            what: format!("running {}", path.display()),
            source: e,
        })?;
    if !output.status.success() {
        return Err(Error::Init(format!(
            "{tool} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Finds a tool on `PATH` or in the sbin folders, where the iptables tools
/// live but which a container's `PATH` may lack.
fn find_tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH");
    path.iter()
        .flat_map(std::env::split_paths)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Init(format!(
                "`{name}` not found on PATH or in /usr/sbin, /sbin: the init image needs the \
                 iptables tools (Debian package `iptables`)"
            ))
        })
}

const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// Whether IPv6 is on for any interface of this namespace, current or
/// future (`all`, `default`, each device): rules are needed if any
/// `disable_ipv6` is 0. No `conf` folder means a kernel without IPv6.
/// Unreadable values are errors: guessing "off" would leave IPv6 uncaptured.
pub(crate) fn ipv6_enabled(conf: &Path) -> Result<bool> {
    let entries = match std::fs::read_dir(conf) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(Error::Io {
                what: format!("listing {}", conf.display()),
                source: e,
            });
        }
    };
    let mut enabled = false;
    for entry in entries {
        let entry = entry.map_err(|e| Error::Io {
            what: format!("listing {}", conf.display()),
            source: e,
        })?;
        let file = entry.path().join("disable_ipv6");
        let value = std::fs::read_to_string(&file).map_err(|e| Error::Io {
            what: format!("reading {}", file.display()),
            source: e,
        })?;
        enabled |= value.trim() == "0";
    }
    Ok(enabled)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(line: &[&str]) -> std::result::Result<InitArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("init").chain(line.iter().copied())).map(|c| c.init)
    }

    fn config(line: &[&str]) -> CaptureConfig {
        CaptureConfig::from_args(&args(line).unwrap()).unwrap()
    }

    const DEFAULT_V4: &str = r#"*nat
:CREDBROKER_OUTPUT - [0:0]
-A CREDBROKER_OUTPUT -m owner --uid-owner 15017 --gid-owner 15017 -m comment --comment "credbroker: the sidecar itself is not captured" -j RETURN
-A CREDBROKER_OUTPUT -o lo -m comment --comment "credbroker: loopback is not captured" -j RETURN
-A CREDBROKER_OUTPUT -d 127.0.0.0/8 -m comment --comment "credbroker: loopback is not captured" -j RETURN
-A CREDBROKER_OUTPUT -p tcp -m comment --comment "credbroker: outbound TCP goes to the sidecar" -j REDIRECT --to-ports 15101
-I OUTPUT 1 -p tcp -m comment --comment "credbroker: capture outbound TCP" -j CREDBROKER_OUTPUT
COMMIT
*filter
:CREDBROKER_OUTPUT - [0:0]
-A CREDBROKER_OUTPUT -m owner --uid-owner 15017 --gid-owner 15017 -m comment --comment "credbroker: the sidecar itself is not filtered" -j RETURN
-A CREDBROKER_OUTPUT -o lo -m comment --comment "credbroker: loopback is not filtered" -j RETURN
-A CREDBROKER_OUTPUT -p tcp -m conntrack --ctstate INVALID -m comment --comment "credbroker: untracked TCP would bypass the redirect" -j DROP
-A CREDBROKER_OUTPUT -p udp -m udp --dport 53 -m comment --comment "credbroker: DNS is allowed" -j RETURN
-A CREDBROKER_OUTPUT -p udp -m udp --dport 443 -m comment --comment "credbroker: QUIC is rejected so clients fall back to TCP" -j REJECT --reject-with icmp-port-unreachable
-I OUTPUT 1 -m comment --comment "credbroker: filter outbound traffic" -j CREDBROKER_OUTPUT
COMMIT
"#;

    #[test]
    fn the_default_ipv4_ruleset() {
        assert_eq!(render(&config(&[]), Family::V4), DEFAULT_V4);
        assert_eq!(config(&[]), CaptureConfig::default());
    }

    #[test]
    fn the_default_ipv6_ruleset_differs_only_in_loopback_and_icmp() {
        let v6 = render(&config(&[]), Family::V6);
        let expected = DEFAULT_V4
            .replace("127.0.0.0/8", "::1/128")
            .replace("icmp-port-unreachable", "icmp6-port-unreachable");
        assert_eq!(v6, expected);
        // Link-local destinations are captured like any other.
        assert!(!v6.contains("fe80"));
    }

    #[test]
    fn rulesets_follow_the_config() {
        struct Case {
            args: &'static [&'static str],
            family: Family,
            present: &'static [&'static str],
            absent: &'static [&'static str],
        }
        let cases = [
            Case {
                args: &[
                    "--proxy-port",
                    "16001",
                    "--proxy-uid",
                    "2102",
                    "--proxy-gid",
                    "2103",
                ],
                family: Family::V4,
                present: &[
                    "-j REDIRECT --to-ports 16001",
                    "-m owner --uid-owner 2102 --gid-owner 2103 -m comment",
                ],
                absent: &["15101", "15017"],
            },
            Case {
                args: &[
                    "--exclude-cidr",
                    "10.96.0.0/12,fd00:10::/64",
                    "--exclude-cidr",
                    "192.0.2.7",
                ],
                family: Family::V4,
                present: &[
                    "-A CREDBROKER_OUTPUT -d 10.96.0.0/12 -m comment --comment \"credbroker: excluded network (--exclude-cidr)\" -j RETURN",
                    "-d 192.0.2.7/32 -m comment",
                ],
                absent: &["fd00:10::/64"],
            },
            Case {
                args: &["--exclude-cidr", "10.96.0.0/12,fd00:10::/64"],
                family: Family::V6,
                present: &["-d fd00:10::/64 -m comment"],
                absent: &["10.96.0.0/12"],
            },
            Case {
                args: &["--exclude-port", "5432,6379", "--exclude-port", "5432"],
                family: Family::V4,
                present: &[
                    "-A CREDBROKER_OUTPUT -p tcp -m multiport --dports 5432,6379 -m comment --comment \"credbroker: excluded port (--exclude-port)\" -j RETURN",
                    "-p udp -m multiport --dports 5432,6379 -m comment",
                ],
                absent: &["5432,6379,5432"],
            },
            Case {
                args: &["--reject-other-udp"],
                family: Family::V6,
                present: &[
                    "-A CREDBROKER_OUTPUT -p udp -m comment --comment \"credbroker: other UDP is rejected (--reject-other-udp)\" -j REJECT --reject-with icmp6-port-unreachable\n-I OUTPUT 1",
                ],
                absent: &[],
            },
        ];
        for case in cases {
            let text = render(&config(case.args), case.family);
            for needle in case.present {
                assert!(
                    text.contains(needle),
                    "{:?}: missing {needle}\n{text}",
                    case.args
                );
            }
            for needle in case.absent {
                assert!(
                    !text.contains(needle),
                    "{:?}: has {needle}\n{text}",
                    case.args
                );
            }
            // Every rule carries a credbroker comment.
            for line in text
                .lines()
                .filter(|l| l.starts_with("-A") || l.starts_with("-I"))
            {
                assert!(
                    line.contains("-m comment --comment \"credbroker: "),
                    "{line}"
                );
            }
        }
    }

    #[test]
    fn exclusions_come_before_the_redirect_and_the_rejects() {
        let text = render(
            &config(&[
                "--exclude-port",
                "8443",
                "--exclude-cidr",
                "10.0.0.0/8",
                "--reject-other-udp",
            ]),
            Family::V4,
        );
        let at = |needle: &str| text.find(needle).unwrap();
        let nat_redirect = at("-j REDIRECT");
        assert!(at("--dports 8443") < nat_redirect && at("-d 10.0.0.0/8") < nat_redirect);
        let filter = at("*filter");
        let filter_text = &text[filter..];
        let pos = |needle: &str| filter_text.find(needle).unwrap();
        assert!(pos("-d 10.0.0.0/8") < pos("INVALID"));
        assert!(pos("-p udp -m multiport --dports 8443") < pos("--dport 443"));
        assert!(pos("--dport 53") < pos("--dport 443"));
        assert!(pos("--dport 443") < pos("-p udp -m comment"));
    }

    #[test]
    fn many_excluded_ports_are_split_into_multiport_groups_of_15() {
        let ports: Vec<String> = (1000..1020).map(|p| p.to_string()).collect();
        let text = render(&config(&["--exclude-port", &ports.join(",")]), Family::V4);
        assert!(text.contains(
            "--dports 1000,1001,1002,1003,1004,1005,1006,1007,1008,1009,1010,1011,1012,1013,1014 "
        ));
        assert!(text.contains("--dports 1015,1016,1017,1018,1019 "));
    }

    #[test]
    fn bad_arguments_are_refused_naming_the_argument() {
        let cases: &[(&[&str], &str)] = &[
            (&["--exclude-cidr", "10.0.0.300/8"], "--exclude-cidr"),
            (&["--exclude-cidr", "10.0.0.1/8"], "did you mean 10.0.0.0/8"),
            (&["--exclude-cidr", "fd00::1/8"], "did you mean fd00::/8"),
            (
                &["--exclude-cidr", "10.0.0.0/33"],
                "prefix length from 0 to 32",
            ),
            (
                &["--exclude-cidr", "0.0.0.0/0"],
                "nothing would be captured",
            ),
            (&["--exclude-cidr", "::/0"], "nothing would be captured"),
            (&["--exclude-port", "0"], "--exclude-port"),
            (&["--exclude-port", "70000"], "--exclude-port"),
            (&["--proxy-port", "0"], "--proxy-port"),
            (&["--backend", "iptables"], "--backend"),
        ];
        for (line, needle) in cases {
            let err = args(line).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(needle), "{line:?}: {err}");
        }
        let root = CaptureConfig::from_args(&args(&["--proxy-uid", "0"]).unwrap()).unwrap_err();
        assert!(root.to_string().contains("--proxy-uid 0"), "{root}");
    }

    #[test]
    fn cidrs_parse_and_print_canonically() {
        for (input, printed) in [
            ("10.96.0.0/12", "10.96.0.0/12"),
            ("192.0.2.1", "192.0.2.1/32"),
            ("FD00:10:0::/64", "fd00:10::/64"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("fe80::/10", "fe80::/10"),
        ] {
            assert_eq!(input.parse::<Cidr>().unwrap().to_string(), printed);
        }
        assert!("10.0.0.0/8/8".parse::<Cidr>().is_err());
        assert!("fe80::1%eth0/128".parse::<Cidr>().is_err());
    }

    const SAVED_AFTER_ONE_RUN: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables) on Sat Nov 28 20:40:23 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [12:720]
:CREDBROKER_OUTPUT - [0:0]
-A OUTPUT -m comment --comment "credbroker: filter outbound traffic" -j CREDBROKER_OUTPUT
-A OUTPUT -d 192.0.2.1/32 -m comment --comment "someone else's \"rule\"" -j ACCEPT
-A CREDBROKER_OUTPUT -o lo -m comment --comment "credbroker: loopback is not filtered" -j RETURN
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CREDBROKER_OUTPUT - [0:0]
:CREDBROKER_OLD - [0:0]
-A OUTPUT -p tcp -m comment --comment "credbroker: capture outbound TCP" -j CREDBROKER_OUTPUT
-A OUTPUT -p tcp -m comment --comment "credbroker: capture outbound TCP" -j CREDBROKER_OUTPUT
-A OUTPUT -g CREDBROKER_OLD
-A CREDBROKER_OLD -j CREDBROKER_OUTPUT
-A CREDBROKER_OUTPUT -p tcp -j REDIRECT --to-ports 15101
COMMIT
# Completed on Sat Nov 28 20:40:23 2026
"#;

    #[test]
    fn restore_input_converges_from_whatever_is_there() {
        let current = CurrentRules::parse(SAVED_AFTER_ONE_RUN);
        let text = render_restore(&ruleset(&config(&[]), Family::V4), &current);
        let (nat, filter) = text.split_at(text.find("*filter").unwrap());
        // Duplicate and stale jumps out, leftover chains flushed and deleted,
        // then exactly one jump back in, at the top.
        let expected_nat_head = r#"*nat
:CREDBROKER_OUTPUT - [0:0]
-D OUTPUT -p tcp -m comment --comment "credbroker: capture outbound TCP" -j CREDBROKER_OUTPUT
-D OUTPUT -p tcp -m comment --comment "credbroker: capture outbound TCP" -j CREDBROKER_OUTPUT
-D OUTPUT -g CREDBROKER_OLD
-F CREDBROKER_OLD
-X CREDBROKER_OLD
-A CREDBROKER_OUTPUT -m owner"#;
        assert!(nat.starts_with(expected_nat_head), "{nat}");
        assert_eq!(nat.matches("-I OUTPUT 1").count(), 1);
        assert!(filter.contains(
            "-D OUTPUT -m comment --comment \"credbroker: filter outbound traffic\" -j CREDBROKER_OUTPUT\n"
        ));
        // Other tools' rules are never named.
        assert!(!text.contains("192.0.2.1"));
    }

    #[test]
    fn verify_accepts_exactly_the_ruleset_and_names_what_is_off() {
        let rules = ruleset(&config(&[]), Family::V4);
        // What iptables-save prints after a clean run (same comments, same
        // order; the matches as the tool normalises them).
        let mut saved = String::new();
        for table in &rules.tables {
            saved.push_str(&format!(
                "*{}\n:OUTPUT ACCEPT [3:180]\n:{OUTPUT_CHAIN} - [0:0]\n",
                table.table
            ));
            saved.push_str(&format!("-A OUTPUT {}\n", table.jump.spec()));
            saved.push_str("-A OUTPUT -j ACCEPT\n");
            for rule in &table.rules {
                saved.push_str(&format!("-A {OUTPUT_CHAIN} {}\n", rule.spec()));
            }
            saved.push_str("COMMIT\n");
        }
        verify(&rules, &CurrentRules::parse(&saved)).unwrap();

        let missing = saved.replace(
            "-A CREDBROKER_OUTPUT -p udp -m udp --dport 53",
            "-A OTHER -p udp",
        );
        let err = verify(&rules, &CurrentRules::parse(&missing))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--dport 53") && err.contains("filter"),
            "{err}"
        );

        let doubled = saved.replacen(
            "-A OUTPUT -j ACCEPT",
            "-A OUTPUT -p tcp -j CREDBROKER_OUTPUT",
            1,
        );
        let err = verify(&rules, &CurrentRules::parse(&doubled))
            .unwrap_err()
            .to_string();
        assert!(err.contains("found 2 jumps"), "{err}");

        let not_first = saved.replacen(
            "-A OUTPUT -p tcp -m comment",
            "-A OUTPUT -j ACCEPT\n-A OUTPUT -p tcp -m comment",
            1,
        );
        let err = verify(&rules, &CurrentRules::parse(&not_first))
            .unwrap_err()
            .to_string();
        assert!(err.contains("first OUTPUT rule: -j ACCEPT"), "{err}");
    }

    #[test]
    fn tokenizing_saved_rules_handles_quotes_and_escapes() {
        assert_eq!(
            tokenize(r#"-m comment --comment "a \"b\" c" -j  X"#),
            ["-m", "comment", "--comment", "a \"b\" c", "-j", "X"]
        );
        assert_eq!(tokenize(r#"--comment """#), ["--comment", ""]);
    }

    #[test]
    fn the_backend_in_use_wins_and_nft_breaks_ties() {
        assert_eq!(choose_backend(0, 0), Backend::Nft);
        assert_eq!(choose_backend(3, 0), Backend::Legacy);
        assert_eq!(choose_backend(3, 3), Backend::Nft);
        assert_eq!(choose_backend(1, 9), Backend::Nft);
        assert_eq!(
            Family::V6.tool(Backend::Legacy, "save"),
            "ip6tables-legacy-save"
        );
    }

    #[test]
    fn restore_failures_name_the_rule_and_the_reason() {
        let input = render(&config(&[]), Family::V4);
        let msg = explain_restore_failure(
            "iptables-nft-restore",
            Family::V4,
            &input,
            "iptables-nft-restore: line 3 failed: Couldn't load match `owner':No such file or directory",
        );
        assert!(
            msg.contains("line 3") && msg.contains("--uid-owner 15017"),
            "{msg}"
        );
        assert!(
            msg.contains("the sidecar itself is not captured") && msg.contains("owner'"),
            "{msg}"
        );

        let msg = explain_restore_failure(
            "iptables-legacy-restore",
            Family::V4,
            &input,
            "iptables-restore: line 8 failed",
        );
        assert!(
            msg.contains("could not commit the ipv4 nat table (line 8)"),
            "{msg}"
        );

        let msg = explain_restore_failure(
            "x",
            Family::V6,
            &input,
            "Permission denied (you must be root)",
        );
        assert!(
            msg.contains("x failed to apply the ipv6 rules: Permission denied"),
            "{msg}"
        );
    }

    #[test]
    fn ipv6_counts_as_enabled_if_any_interface_has_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let set = |iface: &str, value: &str| {
            std::fs::create_dir_all(dir.join(iface)).unwrap();
            std::fs::write(dir.join(iface).join("disable_ipv6"), value).unwrap();
        };
        assert!(!ipv6_enabled(&dir.join("absent")).unwrap());
        set("all", "1\n");
        set("default", "1\n");
        set("lo", "1\n");
        assert!(!ipv6_enabled(&dir).unwrap());
        set("eth0", "0\n");
        assert!(ipv6_enabled(&dir).unwrap());
        std::fs::remove_file(dir.join("lo/disable_ipv6")).unwrap();
        assert!(
            ipv6_enabled(&dir).is_err(),
            "an unreadable value must not count as off"
        );
    }
}
