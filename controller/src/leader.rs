//! Leader election on a `coordination.k8s.io` Lease, so that only one
//! replica writes to Vault and Kubernetes at a time.
//!
//! The rules are client-go's: a lease is taken over only when its record
//! (holder and renew time) has not changed for a whole lease duration as
//! measured by this replica's own clock, so clock skew between replicas
//! does not matter; updates carry the resourceVersion, so two replicas
//! cannot both win. A leader that cannot renew within the renew deadline
//! (shorter than the lease duration) steps down before anyone else can
//! take over.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{Error, Result, VaultError};

/// Whether this replica may write, checked before every write is sent:
/// until when it is sure it holds the lease. A leader frozen (SIGSTOP, a
/// partition) wakes up past that instant and refuses to write before it
/// has even noticed that it lost the lease. A write started in time must
/// also finish before a standby could take over: [`Fence::check`] returns
/// its deadline.
#[derive(Debug)]
pub struct Fence {
    elected: bool,
    /// (start writes before, finish them before).
    until: Mutex<Option<(Instant, Instant)>>,
}

impl Fence {
    /// No leader election: every write is allowed.
    pub fn unfenced() -> Arc<Self> {
        Arc::new(Self {
            elected: false,
            until: Mutex::new(None),
        })
    }

    /// Leader election: no write until the lease is held.
    pub fn elected() -> Arc<Self> {
        Arc::new(Self {
            elected: true,
            until: Mutex::new(None),
        })
    }

    /// `Ok(deadline)` if this replica may start a write now: the write must
    /// be done within `deadline` (`None`: no limit, no election).
    pub fn check(&self, doing: &str) -> Result<Option<Duration>, VaultError> {
        if !self.elected {
            return Ok(None);
        }
        let until = *self.until.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match until {
            Some((start_by, finish_by)) if now < start_by => {
                Ok(Some(finish_by.saturating_duration_since(now)))
            }
            _ => Err(VaultError::NotLeader {
                doing: doing.to_owned(),
            }),
        }
    }

    /// Held from a renewal sent at `sent`: writes may start until
    /// `sent + renew_deadline` and must end one retry period before
    /// `sent + lease_duration`, the earliest a standby can take over (a
    /// request cancelled here may still be applied there).
    fn held_since(&self, sent: Instant, settings: &LeaseSettings) {
        let finish_by = (sent + settings.lease_duration)
            .checked_sub(settings.retry_period)
            .unwrap_or(sent);
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((sent + settings.renew_deadline, finish_by));
    }

    /// No more writes.
    pub fn close(&self) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Where the lease is and how it is held.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica's name in `holderIdentity` (the pod name).
    pub identity: String,
    /// How long a silent leader keeps the lease.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down.
    pub renew_deadline: Duration,
    /// How often to renew, or to try to take over.
    pub retry_period: Duration,
}

/// One replica's view of the lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    fence: Arc<Fence>,
    /// The last record seen and when this replica first saw it.
    observed: Option<(String, Option<MicroTime>, Instant)>,
    /// When the winning request was sent.
    acquired_at: Option<Instant>,
}

impl Elector {
    pub fn new(client: kube::Client, settings: LeaseSettings, fence: Arc<Fence>) -> Result<Self> {
        if settings.renew_deadline >= settings.lease_duration {
            return Err(Error::config(
                "--lease-renew-deadline",
                "must be shorter than --lease-duration, or two leaders could overlap",
            ));
        }
        if settings.renew_deadline + settings.retry_period >= settings.lease_duration {
            return Err(Error::config(
                "--lease-renew-deadline",
                "plus --lease-retry-period must be shorter than --lease-duration: writes need that margin to finish",
            ));
        }
        if settings.retry_period.is_zero() || settings.retry_period >= settings.renew_deadline {
            return Err(Error::config(
                "--lease-retry-period",
                "must be more than zero and shorter than --lease-renew-deadline",
            ));
        }
        Ok(Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            fence,
            observed: None,
            acquired_at: None,
        })
    }

    /// Waits until this replica holds the lease. `false` if cancelled first.
    pub async fn acquire(&mut self, cancel: &CancellationToken) -> bool {
        loop {
            let sent = Instant::now();
            let attempt =
                tokio::time::timeout(self.settings.renew_deadline, self.try_acquire_or_renew());
            let result = tokio::select! {
                _ = cancel.cancelled() => return false,
                r = attempt => r.unwrap_or_else(|_| Err(Error::config("leader election", "the lease request timed out"))),
            };
            match result {
                Ok(true) => {
                    self.acquired_at = Some(sent);
                    self.fence.held_since(sent, &self.settings);
                    info!(lease = %self.settings.name, identity = %self.settings.identity, "became the leader");
                    return true;
                }
                Ok(false) => {}
                Err(e) => warn!("leader election: {e}"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(self.settings.retry_period) => {}
            }
        }
    }

    /// Renews until renewal fails for the renew deadline or another
    /// replica holds the lease; returns the reason. Returns `None` when
    /// cancelled (the caller then releases the lease).
    pub async fn hold(&mut self, cancel: &CancellationToken) -> Option<String> {
        let mut last_renew = self.acquired_at.unwrap_or_else(Instant::now);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(self.settings.retry_period) => {}
            }
            let sent = Instant::now();
            let attempt = tokio::time::timeout(
                self.settings
                    .renew_deadline
                    .saturating_sub(last_renew.elapsed()),
                self.try_acquire_or_renew(),
            )
            .await;
            match attempt {
                Ok(Ok(true)) => {
                    last_renew = sent;
                    self.fence.held_since(sent, &self.settings);
                }
                Ok(Ok(false)) => {
                    self.fence.close();
                    return Some("another replica holds the lease".into());
                }
                Ok(Err(e)) => warn!("renewing the leader lease: {e}"),
                Err(_) => {}
            }
            if last_renew.elapsed() >= self.settings.renew_deadline {
                self.fence.close();
                return Some(format!(
                    "the lease was not renewed within {:?}",
                    self.settings.renew_deadline
                ));
            }
        }
    }

    /// Gives the lease up, so a standby takes over at once.
    pub async fn release(&mut self) {
        self.fence.close();
        let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
            .is_ok()
        {
            info!(lease = %self.settings.name, "released the leader lease");
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let name = &self.settings.name;
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let seconds =
            i32::try_from(self.settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let me = self.settings.identity.clone();
        let current = self.api.get_opt(name).await.map_err(Error::kube(format!(
            "reading lease {}/{name}",
            self.settings.namespace
        )))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(Error::kube(format!("creating lease {name}"))(e)),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != me {
            let record = (holder.clone(), spec.renew_time.clone());
            let changed = self
                .observed
                .as_ref()
                .is_none_or(|(h, r, _)| (h, r) != (&record.0, &record.1));
            if changed {
                self.observed = Some((record.0, record.1, Instant::now()));
            }
            let silent_for = self
                .observed
                .as_ref()
                .map(|(_, _, at)| at.elapsed())
                .unwrap_or_default();
            if !holder.is_empty() && silent_for < self.settings.lease_duration {
                return Ok(false);
            }
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            info!(lease = %name, previous = %holder, "taking over the leader lease");
        }
        spec.holder_identity = Some(me);
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(seconds);
        // The resourceVersion read above makes this a compare-and-swap.
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(Error::kube(format!("updating lease {name}"))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(renew: u64, lease: u64) -> LeaseSettings {
        LeaseSettings {
            namespace: "ns".into(),
            name: "lease".into(),
            identity: "me".into(),
            lease_duration: Duration::from_millis(lease),
            renew_deadline: Duration::from_millis(renew),
            retry_period: Duration::from_millis(1),
        }
    }

    #[test]
    fn the_fence_refuses_writes_once_a_renewal_is_too_old() {
        assert_eq!(Fence::unfenced().check("x"), Ok(None));
        let fence = Fence::elected();
        assert!(fence.check("x").is_err(), "no lease yet");
        fence.held_since(Instant::now(), &settings(60_000, 90_000));
        let left = fence.check("x").unwrap().unwrap();
        assert!(left > Duration::from_secs(80) && left <= Duration::from_secs(90));
        // A renewal sent long ago: its deadline has passed, even though no
        // one said the lease was lost.
        let long_ago = Instant::now() - Duration::from_millis(50);
        fence.held_since(long_ago, &settings(20, 40));
        assert!(
            matches!(fence.check("writing x"), Err(VaultError::NotLeader { doing }) if doing == "writing x")
        );
        fence.held_since(Instant::now(), &settings(60_000, 90_000));
        fence.close();
        assert!(fence.check("x").is_err());
    }
}
