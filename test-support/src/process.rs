//! Child processes owned by a fixture: killed and reaped on drop (so a
//! panicking test leaves nothing running), with stderr kept in a file so a
//! fixture whose process dies can say why.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Error, Result};

/// A running child process that is killed when dropped.
pub struct ChildGuard {
    name: String,
    child: Child,
    log_path: PathBuf,
    // Keeps the log directory alive as long as the process.
    _log_dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr both captured into one log file.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("credbroker-{name}-log-"))
            .tempdir()
            .map_err(|e| Error::Io(format!("creating log dir for {name}"), e))?;
        let log_path = log_dir.path().join("output.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Error::Io(format!("creating log file for {name}"), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::Io(format!("cloning log file for {name}"), e))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = cmd.spawn().map_err(|e| Error::Spawn {
            what: name.to_string(),
            source: e,
        })?;
        Ok(Self {
            name: name.to_string(),
            child,
            log_path,
            _log_dir: log_dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `max` bytes of output, for failure messages.
    pub fn output_tail(&self, max: usize) -> String {
        let out = self.output();
        let start = out.len().saturating_sub(max);
        let start = (start..=out.len())
            .find(|i| out.is_char_boundary(*i))
            .unwrap_or(out.len());
        out[start..].to_string()
    }

    /// `Err(ProcessExited)` with the process's output if it is no longer running.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::ProcessExited {
                name: self.name.clone(),
                status: status.to_string(),
                output: self.output_tail(4000),
            }),
            Err(e) => Err(Error::Io(format!("checking on {}", self.name), e)),
        }
    }

    /// Sends a signal (e.g. SIGSTOP/SIGCONT to simulate an outage).
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig)
            .map_err(|e| Error::Io(format!("sending {sig} to {}", self.name), e.into()))
    }

    /// Stops the process (SIGSTOP) and returns only once every one of its
    /// threads is stopped. A stop is delivered asynchronously; on a loaded
    /// machine a test that sent its next request right after `kill()` could
    /// otherwise still be served.
    pub fn pause(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGSTOP)?;
        let tasks = format!("/proc/{}/task", self.child.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let all_stopped = std::fs::read_dir(&tasks)
                .map_err(|e| Error::Io(format!("reading {tasks}"), e))?
                .flatten()
                .all(|task| {
                    // The state is the field after the parenthesised command.
                    std::fs::read_to_string(task.path().join("stat"))
                        .ok()
                        .and_then(|stat| {
                            stat.rsplit_once(')')
                                .map(|(_, rest)| rest.trim_start().starts_with('T'))
                        })
                        .unwrap_or(true) // a thread that exited meanwhile
                });
            if all_stopped {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Other(format!(
                    "{} did not stop within 5s of SIGSTOP",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks the process to stop (SIGTERM), then kills it after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let _ = self.signal(nix::sys::signal::Signal::SIGCONT);
        let _ = self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // A paused process cannot die of SIGKILL until continued on some
        // kernels' accounting; continue it first, then kill and reap.
        let _ = self.signal(nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` so that the kernel kills it when this test process exits,
/// even though a `static` fixture is never dropped.
///
/// `PR_SET_PDEATHSIG` (set by `setpriv --pdeathsig KILL`) fires when the
/// *thread* that forked the child exits, and cargo runs each test on its own
/// short-lived thread. So the fork happens on one spawner thread that lives as
/// long as the process.
pub fn spawn_for_process_lifetime(name: &str, cmd: &Command) -> Result<ChildGuard> {
    use std::sync::mpsc;
    use std::sync::{Mutex, OnceLock};
    type Request = (String, Command, mpsc::Sender<Result<ChildGuard>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();

    let mut wrapped = Command::new("setpriv");
    wrapped
        .arg("--pdeathsig")
        .arg("KILL")
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }

    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("credbroker-test-spawner".into())
            .spawn(move || {
                for (name, cmd, reply) in rx {
                    let _ = reply.send(ChildGuard::spawn(&name, cmd));
                }
            })
            .map(|_| ())
            .unwrap_or_default();
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .map_err(|_| Error::Other("the spawner lock is poisoned".into()))?
        .send((name.to_string(), wrapped, reply_tx))
        .map_err(|_| Error::Other("the spawner thread is gone".into()))?;
    reply_rx
        .recv()
        .map_err(|_| Error::Other("the spawner thread is gone".into()))?
}
