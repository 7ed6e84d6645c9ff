//! Real Linux network namespaces for tests (DESIGN.md section 6, "pod
//! network"): a [`Netns`] stands for a pod's network, a [`NetnsPair`] for a
//! pod and the network beyond it, joined by a veth with IPv4 and IPv6.
//!
//! Everything here shells out to the same tools an operator would use
//! (`ip`, `iptables`, `setpriv`), needs root, and undoes itself on drop: every
//! process still inside a namespace is killed and the namespace deleted, also
//! when the test panics. (A test process killed by SIGKILL cannot run drops;
//! its namespaces stay visible in `ip netns list` as `cbt-*`.)
//!
//! Names are reserved atomically through `ip netns add` (which refuses a name
//! that exists), so fixtures in parallel tests, in one process or several,
//! never collide; a pair's addresses are derived from its reserved name.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::ChildGuard;
use crate::{Error, Result};

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Every fixture's namespace name starts with this, so leftovers are easy to spot.
pub const NAME_PREFIX: &str = "cbt-";

/// The name of the veth end in each namespace of a pair (as in a pod).
pub const VETH_NAME: &str = "eth0";

/// Prefix lengths of a pair's link: a /30 holds exactly the two ends.
pub const IPV4_PREFIX_LEN: u8 = 30;
pub const IPV6_PREFIX_LEN: u8 = 64;

/// A pair's subnet index selects one /30 of 10.213.0.0/16 and one /64 of
/// fd00:cb::/48, so there are this many distinct pairs.
const SUBNETS: u32 = 1 << 14;

/// How many random names to try before giving up (only stale leftovers or a
/// nearly full subnet space make a second try likely).
const NAME_ATTEMPTS: usize = 32;

/// How long teardown waits for killed processes to leave a namespace.
const TEARDOWN_GRACE: Duration = Duration::from_secs(2);

/// Which IP version a call is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    fn iptables_restore(self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore",
            Self::V6 => "ip6tables-restore",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        })
    }
}

/// The identity a command runs as inside a namespace (supplementary groups
/// are cleared), e.g. an agent container's UID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    pub const fn new(uid: u32, gid: u32) -> Self {
        Self { uid, gid }
    }
}

/// The host tools a namespace needs, found once per fixture.
#[derive(Clone, Debug)]
struct Tools {
    ip: PathBuf,
    setpriv: PathBuf,
}

impl Tools {
    fn find() -> Result<Self> {
        crate::require_root("network namespaces, veth links and iptables need root")?;
        Ok(Self {
            ip: crate::require_tool("ip", "iproute2")?,
            setpriv: crate::require_tool("setpriv", "util-linux")?,
        })
    }
}

/// A network namespace named `cbt-<random>` with loopback up. Dropping it
/// kills every process inside and deletes it.
pub struct Netns {
    name: String,
    tools: Tools,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netns").field("name", &self.name).finish()
    }
}

impl Netns {
    /// Creates a fresh namespace. Fails with a message saying what to install
    /// when not root or `ip` is missing.
    pub fn new() -> Result<Self> {
        let tools = Tools::find()?;
        for _ in 0..NAME_ATTEMPTS {
            let name = format!("{NAME_PREFIX}{:08x}", random_u32()?);
            if let Some(netns) = Self::create(name, &tools)? {
                return Ok(netns);
            }
        }
        Err(Error::Other(format!(
            "no free network namespace name after {NAME_ATTEMPTS} tries; see `ip netns list`"
        )))
    }

    /// Creates namespace `name`; `Ok(None)` if that name is taken.
    fn create(name: String, tools: &Tools) -> Result<Option<Self>> {
        if Path::new(NETNS_DIR).join(&name).exists() {
            return Ok(None);
        }
        let mut add = Command::new(&tools.ip);
        add.args(["netns", "add", &name]);
        let output = add.output().map_err(|e| Error::Spawn {
            what: format!("{add:?}"),
            source: e,
        })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            // `ip netns add` creates /run/netns/NAME with O_EXCL: losing a
            // race for a name shows up here, and just means "try another".
            if stderr.contains("File exists") {
                return Ok(None);
            }
            return Err(Error::Command {
                command: format!("{add:?}"),
                status: output.status.to_string(),
                stderr,
            });
        }
        // From here on, Drop deletes the namespace if a later step fails.
        let netns = Self {
            name,
            tools: tools.clone(),
        };
        netns.ip_batch("link set lo up\n")?;
        Ok(Some(netns))
    }

    /// The namespace's name, as `ip netns` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file (`/run/netns/NAME`), for `setns` or `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// A command that runs `program` inside this namespace (as root unless
    /// [`NsCommand::user`] is set). Relative programs are looked up on `PATH`.
    pub fn exec(&self, program: impl AsRef<OsStr>) -> NsCommand {
        NsCommand {
            netns: self.name.clone(),
            tools: self.tools.clone(),
            user: None,
            program: program.as_ref().to_os_string(),
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// Runs `iptables` or `ip6tables` with `args` inside; returns its stdout.
    /// `-w` is added so parallel tests wait for the xtables lock instead of
    /// failing on it (the legacy backend shares one lock host-wide).
    pub fn iptables<I, S>(&self, family: IpFamily, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let tool = crate::require_tool(family.iptables(), "iptables")?;
        self.exec(tool).arg("-w").args(args).run()
    }

    /// Feeds `rules` (iptables-save format) to `iptables-restore` or
    /// `ip6tables-restore` inside. As usual for restore, each table named in
    /// `rules` is replaced whole.
    pub fn iptables_restore(&self, family: IpFamily, rules: &str) -> Result<()> {
        let tool = crate::require_tool(family.iptables_restore(), "iptables")?;
        let mut command = self.exec(tool).arg("-w").into_std();
        run_with_input(&mut command, rules.as_bytes()).map(drop)
    }

    /// Runs `f` on a short-lived thread that has entered this namespace, and
    /// returns its result. Sockets `f` creates stay in this namespace for
    /// their whole life, whichever thread later uses them; threads `f` spawns
    /// start inside it too. The calling thread is never moved.
    pub fn enter<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = self.path();
        let file =
            File::open(&path).map_err(|e| Error::Io(format!("opening {}", path.display()), e))?;
        let name = self.name.as_str();
        std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name(format!("netns-{name}"))
                .spawn_scoped(scope, move || {
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                        Error::Io(format!("entering network namespace {name}"), e.into())
                    })?;
                    Ok(f())
                })
                .map_err(|e| {
                    Error::Io(
                        format!("starting a thread to enter network namespace {name}"),
                        e,
                    )
                })?;
            worker.join().map_err(|panic| {
                Error::Other(format!(
                    "code run inside network namespace {name} panicked: {}",
                    panic_message(&*panic)
                ))
            })?
        })
    }

    /// Binds a TCP listener inside this namespace (`[::]` listeners are
    /// dual-stack). Serve it from any thread or runtime.
    pub fn bind_tcp(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.enter(|| TcpListener::bind(addr))?.map_err(|e| {
            Error::Io(
                format!("binding {addr} in network namespace {}", self.name),
                e,
            )
        })
    }

    /// Connects to `addr` from inside this namespace.
    pub fn connect_tcp(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.enter(|| TcpStream::connect_timeout(&addr, timeout))?
            .map_err(|e| {
                Error::Io(
                    format!("connecting to {addr} from network namespace {}", self.name),
                    e,
                )
            })
    }

    /// The processes whose network namespace this is (not this test process).
    pub fn pids(&self) -> Result<Vec<u32>> {
        let path = self.path();
        let ns = std::fs::metadata(&path)
            .map_err(|e| Error::Io(format!("reading {}", path.display()), e))?;
        let me = std::process::id();
        let proc = std::fs::read_dir("/proc").map_err(|e| Error::Io("listing /proc".into(), e))?;
        // Processes come and go while we look; any entry we cannot read is
        // one that has just gone (or a zombie, which has left its namespace).
        let pids = proc
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                Some((
                    entry.file_name().to_str()?.parse::<u32>().ok()?,
                    entry.path(),
                ))
            })
            .filter(|(pid, _)| *pid != me)
            .filter(|(_, dir)| {
                std::fs::metadata(dir.join("ns/net"))
                    .is_ok_and(|m| m.dev() == ns.dev() && m.ino() == ns.ino())
            })
            .map(|(pid, _)| pid)
            .collect();
        Ok(pids)
    }

    /// Runs an `ip -batch` script inside this namespace.
    fn ip_batch(&self, script: &str) -> Result<()> {
        let mut command = Command::new(&self.tools.ip);
        command.args(["-n", &self.name, "-batch", "-"]);
        run_with_input(&mut command, script.as_bytes()).map(drop)
    }

    /// Writes a sysctl of this namespace (`/proc/sys/net` shows the
    /// namespace of the thread that opens it).
    fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.enter(|| std::fs::write(&path, value))?.map_err(|e| {
            Error::Io(
                format!("setting {key}={value} in network namespace {}", self.name),
                e,
            )
        })
    }

    fn teardown(&self) -> Result<()> {
        // A process keeps its namespace alive (and reachable) after the name
        // is deleted, so everything inside goes first, children of this test
        // or not. Zombies have already left the namespace.
        let deadline = Instant::now() + TEARDOWN_GRACE;
        let mut survivors = None;
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                // Delete the name anyway: a survivor keeps the namespace
                // alive, but no later test can stumble on it by name.
                survivors = Some(pids);
                break;
            }
            for pid in pids {
                if let Ok(pid) = i32::try_from(pid) {
                    // ESRCH just means it exited in the meantime.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        crate::run(Command::new(&self.tools.ip).args(["netns", "delete", &self.name]))?;
        match survivors {
            Some(pids) => Err(Error::Other(format!("processes {pids:?} survived SIGKILL"))),
            None => Ok(()),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            // Drop cannot fail; say loudly what was left so it can be removed.
            eprintln!(
                "credbroker-test-support: could not fully remove network namespace {} \
                 (remove it with `ip netns delete {}`): {e}",
                self.name, self.name
            );
        }
    }
}

/// A command to run inside a [`Netns`]: `ip netns exec NAME [setpriv ...] program args`.
#[derive(Clone, Debug)]
pub struct NsCommand {
    netns: String,
    tools: Tools,
    user: Option<RunAs>,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl NsCommand {
    /// Runs as `user` instead of root, with no supplementary groups and no
    /// capabilities (setpriv drops them with the UID change).
    pub fn user(mut self, user: RunAs) -> Self {
        self.user = Some(user);
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// The full command line as a std `Command` (also convertible into a
    /// `tokio::process::Command`).
    pub fn into_std(self) -> Command {
        let mut command = Command::new(&self.tools.ip);
        command.args([
            OsStr::new("netns"),
            OsStr::new("exec"),
            OsStr::new(&self.netns),
        ]);
        if let Some(RunAs { uid, gid }) = self.user {
            command
                .arg(&self.tools.setpriv)
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .args(["--clear-groups", "--"]);
        }
        command.arg(&self.program).args(&self.args).envs(self.envs);
        command
    }

    /// Runs to completion and returns stdout; a non-zero exit is an error
    /// carrying stderr. Blocks the thread: in async code use [`Self::output_async`].
    pub fn run(self) -> Result<String> {
        crate::run(&mut self.into_std())
    }

    /// Runs to completion and returns the raw output, whatever the exit status.
    pub fn output(self) -> Result<Output> {
        let mut command = self.into_std();
        command.output().map_err(|e| Error::Spawn {
            what: format!("{command:?}"),
            source: e,
        })
    }

    /// Like [`Self::output`] without blocking the runtime, so a server in the
    /// same runtime (e.g. an [`Upstream`](crate::upstream::Upstream)) keeps
    /// serving while the command talks to it. The process is killed if the
    /// future is dropped.
    pub async fn output_async(self) -> Result<Output> {
        let command = self.into_std();
        let what = format!("{command:?}");
        let mut command = tokio::process::Command::from(command);
        command.stdin(Stdio::null()).kill_on_drop(true);
        command
            .output()
            .await
            .map_err(|e| Error::Spawn { what, source: e })
    }

    /// Starts a long-running child (killed on drop, output kept for failure
    /// messages; see [`ChildGuard`]).
    pub fn spawn(self, name: &str) -> Result<ChildGuard> {
        ChildGuard::spawn(name, self.into_std())
    }
}

/// One end of a [`NetnsPair`]: a namespace and its addresses on the veth.
#[derive(Debug)]
pub struct Side {
    netns: Netns,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl Side {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// This end's address in `family`.
    pub fn ip(&self, family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => self.ipv4.into(),
            IpFamily::V6 => self.ipv6.into(),
        }
    }
}

/// Two namespaces joined by a veth named [`VETH_NAME`] on both ends, with
/// `10.213.X.Y/30` and `fd00:cb:0:N::/64` addresses (`a` ends in 1, `b` in 2).
/// Only the two ends are reachable: there is no route anywhere else.
#[derive(Debug)]
pub struct NetnsPair {
    a: Side,
    b: Side,
}

impl NetnsPair {
    /// Creates both namespaces and the link, ready for traffic (IPv6 without
    /// duplicate address detection, so addresses work at once).
    pub fn new() -> Result<Self> {
        let tools = Tools::find()?;
        for _ in 0..NAME_ATTEMPTS {
            let subnet = random_u32()? % SUBNETS;
            // The names carry the subnet, so creating `-a` (atomic, refused
            // if it exists) reserves the subnet across all test processes.
            let Some(a) = Netns::create(format!("{NAME_PREFIX}{subnet:04x}-a"), &tools)? else {
                continue;
            };
            // Taken only by a stale leftover; `a` is deleted as we retry.
            let Some(b) = Netns::create(format!("{NAME_PREFIX}{subnet:04x}-b"), &tools)? else {
                continue;
            };
            let pair = Self {
                a: Side {
                    netns: a,
                    ipv4: subnet_ipv4(subnet, 1),
                    ipv6: subnet_ipv6(subnet, 1),
                },
                b: Side {
                    netns: b,
                    ipv4: subnet_ipv4(subnet, 2),
                    ipv6: subnet_ipv6(subnet, 2),
                },
            };
            pair.link()?;
            return Ok(pair);
        }
        Err(Error::Other(format!(
            "no free {NAME_PREFIX}XXXX-a/-b namespace names after {NAME_ATTEMPTS} tries; \
             stale ones? see `ip netns list`"
        )))
    }

    /// The first end (by convention the pod side).
    pub fn a(&self) -> &Side {
        &self.a
    }

    /// The second end (by convention the network the pod talks to).
    pub fn b(&self) -> &Side {
        &self.b
    }

    fn link(&self) -> Result<()> {
        for side in [&self.a, &self.b] {
            // Also covers link-local addresses, which have no `nodad` switch;
            // set before the veth exists so its ends inherit it.
            side.netns
                .set_sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        let (a, b) = (&self.a, &self.b);
        let addresses = |side: &Side| {
            format!(
                "addr add {}/{IPV4_PREFIX_LEN} dev {VETH_NAME}\n\
                 addr add {}/{IPV6_PREFIX_LEN} dev {VETH_NAME} nodad\n\
                 link set {VETH_NAME} up\n",
                side.ipv4, side.ipv6
            )
        };
        a.netns.ip_batch(&format!(
            "link add {VETH_NAME} type veth peer name {VETH_NAME} netns {}\n{}",
            b.netns.name,
            addresses(a)
        ))?;
        b.netns.ip_batch(&addresses(b))
    }
}

fn subnet_ipv4(subnet: u32, host: u8) -> Ipv4Addr {
    // 10.213.0.0/16 cut into /30s: the high 8 bits pick the third octet, the
    // low 6 bits the /30 inside it.
    let [_, _, third, fourth] = (subnet << 2).to_be_bytes();
    Ipv4Addr::new(10, 213, third, fourth + host)
}

fn subnet_ipv6(subnet: u32, host: u16) -> Ipv6Addr {
    let [_, _, hi, lo] = subnet.to_be_bytes();
    Ipv6Addr::new(0xfd00, 0xcb, 0, u16::from_be_bytes([hi, lo]), 0, 0, 0, host)
}

use crate::random_u32;

/// Runs `command` with `input` on stdin; like [`crate::run`] otherwise.
fn run_with_input(command: &mut Command, input: &[u8]) -> Result<String> {
    let what = format!("{command:?}");
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| Error::Spawn {
        what: what.clone(),
        source: e,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // Inputs here are a few lines of rules, far below the pipe buffer, so
        // writing all before reading output cannot deadlock. Dropping stdin
        // closes it, which ends the batch.
        stdin
            .write_all(input)
            .map_err(|e| Error::Io(format!("writing the input of {what}"), e))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| Error::Io(format!("waiting for {what}"), e))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: what,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_map_to_distinct_addresses_inside_the_test_ranges() {
        assert_eq!(subnet_ipv4(0, 1), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(subnet_ipv4(1, 2), Ipv4Addr::new(10, 213, 0, 6));
        assert_eq!(
            subnet_ipv4(SUBNETS - 1, 2),
            Ipv4Addr::new(10, 213, 255, 254)
        );
        assert_eq!(
            subnet_ipv6(0x3fff, 1),
            "fd00:cb:0:3fff::1".parse::<Ipv6Addr>().unwrap()
        );
        let mut seen = std::collections::HashSet::new();
        for subnet in 0..SUBNETS {
            assert!(seen.insert(subnet_ipv4(subnet, 1)));
            assert!(seen.insert(subnet_ipv4(subnet, 2)));
        }
    }
}
