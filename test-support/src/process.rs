//! Child processes owned by a fixture: killed and reaped on drop (so a
//! panicking test leaves nothing running), killed by the kernel if the test
//! process itself dies (SIGTERM from a CI timeout runs no destructors), and
//! with their output kept in a file so a fixture whose process dies can say
//! why.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::{Error, Result};

/// A running child process that is killed when dropped.
pub struct ChildGuard {
    name: String,
    pid: u32,
    // Behind a lock so `&self` methods (pause/resume) can first check the
    // child has not been reaped: a reaped PID may belong to anyone.
    child: Mutex<Child>,
    log_path: PathBuf,
    // Keeps the log directory alive as long as the process.
    _log_dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr captured into one log file, under
    /// `setpriv --pdeathsig KILL` so it cannot outlive this test process.
    ///
    /// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child
    /// exits, and cargo runs each test on a short-lived thread (and a shared
    /// fixture outlives the test that started it), so every fork happens on
    /// one spawner thread that lives as long as the process.
    pub fn spawn(name: &str, cmd: Command) -> Result<Self> {
        let mut wrapped = Command::new(crate::require_tool("setpriv", "util-linux")?);
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
        on_spawner_thread(name, wrapped)
    }

    fn spawn_here(name: &str, mut cmd: Command) -> Result<Self> {
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("{name}-log-"))
            .tempdir_in(crate::process_scratch_root()?)
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
            pid: child.id(),
            child: Mutex::new(child),
            log_path,
            _log_dir: log_dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Err(ProcessExited)` with the process's output if it is no longer running.
    pub fn check_running(&self) -> Result<()> {
        let status = self.lock().try_wait();
        match status {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::ProcessExited {
                name: self.name.clone(),
                status: status.to_string(),
                output: self.output_tail(4000),
            }),
            Err(e) => Err(Error::Io(format!("checking on {}", self.name), e)),
        }
    }

    /// Sends a signal (e.g. SIGSTOP/SIGCONT to simulate an outage), but
    /// only while the child has not been reaped.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let mut child = self.lock();
        if !matches!(child.try_wait(), Ok(None)) {
            drop(child);
            return self.check_running();
        }
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        nix::sys::signal::kill(pid, sig)
            .map_err(|e| Error::Io(format!("sending {sig} to {}", self.name), e.into()))
    }

    /// Stops the process (SIGSTOP) and returns only once every one of its
    /// threads is stopped. A stop is delivered asynchronously; on a loaded
    /// machine a test that sent its next request right after `kill()` could
    /// otherwise still be served.
    pub fn pause(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)?;
        let tasks = format!("/proc/{}/task", self.pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            self.check_running()?;
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
            if Instant::now() > deadline {
                return Err(Error::Other(format!(
                    "{} did not stop within 5s of SIGSTOP",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets a paused process run again.
    pub fn resume(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Asks the process to stop (SIGTERM), then kills it after `grace`.
    pub fn stop(&self, grace: Duration) {
        let _ = self.signal(Signal::SIGCONT);
        let _ = self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(self.lock().try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut child = self.lock();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Continue a paused process first so it can act on the kill at once;
        // `signal` skips a child that was already reaped.
        let _ = self.signal(Signal::SIGCONT);
        let mut child = self.lock();
        let _ = child.kill(); // std does not signal a reaped child
        let _ = child.wait();
    }
}

fn on_spawner_thread(name: &str, cmd: Command) -> Result<ChildGuard> {
    use std::sync::OnceLock;
    use std::sync::mpsc;
    type Request = (String, Command, mpsc::Sender<Result<ChildGuard>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();

    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        // If the thread cannot start, the send below fails and says so.
        let _ = std::thread::Builder::new()
            .name("credbroker-test-spawner".into())
            .spawn(move || {
                for (name, cmd, reply) in rx {
                    let _ = reply.send(ChildGuard::spawn_here(&name, cmd));
                }
            });
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send((name.to_string(), cmd, reply_tx))
        .map_err(|_| Error::Other("the test spawner thread is gone".into()))?;
    reply_rx
        .recv()
        .map_err(|_| Error::Other("the test spawner thread is gone".into()))?
}
