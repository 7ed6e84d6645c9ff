//! A real DNS server for tests (DESIGN.md section 6, "DNS"): dnsmasq inside
//! a network namespace, answering only the records a test gives it (no
//! upstream servers, no `/etc/hosts`), so a name resolves exactly as the
//! test says, for every process in the namespaces it serves.
//!
//! Processes started with `ip netns exec` (every [`NsCommand`](crate::netns::NsCommand))
//! see `/etc/netns/<name>/resolv.conf` as their `/etc/resolv.conf`;
//! [`Dns::serve`] writes that file, and removes it on drop.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::process::ChildGuard;
use crate::{Error, Result};

/// A running dnsmasq. Dropping it stops the server and removes the
/// resolver files it wrote.
pub struct Dns {
    child: ChildGuard,
    addr: IpAddr,
    resolv_dirs: Vec<PathBuf>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Dns {
    /// Starts dnsmasq in `netns`, listening on `listen` port 53 (UDP and
    /// TCP), answering `records` (a name and its addresses, A and AAAA)
    /// and refusing everything else.
    pub fn start(netns: &Netns, listen: IpAddr, records: &[(&str, Vec<IpAddr>)]) -> Result<Self> {
        let dnsmasq = crate::require_tool("dnsmasq", "dnsmasq-base")?;
        let mut command = netns.exec(dnsmasq).args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--pid-file=",
            "--log-facility=-",
            "--port=53",
        ]);
        command = command.arg(format!("--listen-address={listen}"));
        for (name, addrs) in records {
            if addrs.is_empty() {
                return Err(Error::Other(format!("DNS record {name} has no address")));
            }
            let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            command = command.arg(format!("--host-record={name},{}", list.join(",")));
        }
        let child = command.spawn("dnsmasq")?;
        let dns = Self {
            child,
            addr: listen,
            resolv_dirs: Vec::new(),
        };
        let probe = records
            .first()
            .map(|(name, _)| *name)
            .unwrap_or("probe.test");
        dns.wait_until_answering(netns, probe)?;
        Ok(dns)
    }

    /// The server's address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Makes processes started in `client` (with `ip netns exec`) resolve
    /// through this server.
    pub fn serve(&mut self, client: &Netns) -> Result<()> {
        sweep_stale_resolvers();
        let dir = PathBuf::from("/etc/netns").join(client.name());
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
        let conf = format!("nameserver {}\noptions timeout:1 attempts:3\n", self.addr);
        let path = dir.join("resolv.conf");
        std::fs::write(&path, conf)
            .map_err(|e| Error::Io(format!("writing {}", path.display()), e))?;
        self.resolv_dirs.push(dir);
        Ok(())
    }

    /// Everything dnsmasq printed (for failure messages).
    pub fn output(&self) -> String {
        self.child.output()
    }

    /// Sends one A query for `name` from inside `netns` until an answer
    /// comes back.
    fn wait_until_answering(&self, netns: &Netns, name: &str) -> Result<()> {
        let server = SocketAddr::new(self.addr, 53);
        let query = a_query(name);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            self.child.check_running()?;
            let bind: SocketAddr = if self.addr.is_ipv4() {
                "0.0.0.0:0"
                    .parse()
                    .map_err(|_| Error::Other("address".into()))?
            } else {
                "[::]:0"
                    .parse()
                    .map_err(|_| Error::Other("address".into()))?
            };
            let answer = netns.enter(|| -> std::io::Result<usize> {
                let socket = UdpSocket::bind(bind)?;
                socket.set_read_timeout(Some(Duration::from_millis(200)))?;
                socket.send_to(&query, server)?;
                let mut buf = [0u8; 512];
                socket.recv(&mut buf)
            })?;
            match answer {
                Ok(n) if n >= 12 => return Ok(()),
                Ok(n) => last = format!("a {n}-byte answer"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Timeout {
            what: format!("dnsmasq on {server}"),
            after: Duration::from_secs(10),
            last: format!("{last}; output: {}", self.child.output_tail(2000)),
        })
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        for dir in &self.resolv_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Removes `/etc/netns/cbt-*` folders whose namespace is gone (a test
/// process killed by SIGKILL cannot run its drops).
fn sweep_stale_resolvers() {
    let Ok(entries) = std::fs::read_dir("/etc/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(crate::netns::NAME_PREFIX)
            && !std::path::Path::new("/run/netns").join(&*name).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A DNS query for the A record of `name` (RFC 1035 section 4).
fn a_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).unwrap_or(63).min(63));
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_query_is_well_formed() {
        let q = super::a_query("api.example.test");
        assert_eq!(&q[12..16], b"\x03api");
        assert_eq!(&q[q.len() - 5..], &[0, 0, 1, 0, 1]);
    }
}
