//! A binding's status from what reconcile found: the five conditions, in
//! words a human can act on. Pure; the clock is an argument.

use credbroker_crds::CredentialBindingStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::desired::Verdict;

pub const READY: &str = "Ready";
pub const POLICY_ALLOWED: &str = "PolicyAllowed";
pub const VAULT_POLICY_SYNCED: &str = "VaultPolicySynced";
pub const VAULT_ROLE_SYNCED: &str = "VaultRoleSynced";
pub const SECRET_FOUND: &str = "SecretFound";

/// The `PolicyAllowed` reason a verdict shows.
pub fn verdict_reason(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Effective => "Allowed",
        Verdict::Denied(_) => "NotAllowed",
        Verdict::Invalid(_) => "Invalid",
        Verdict::Conflict(_) => "Conflict",
        Verdict::CaUnavailable(_) => "CaConfigMapUnavailable",
        Verdict::Deleting => "Deleting",
    }
}

/// How one Vault object's sync went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sync {
    Synced(String),
    /// Not attempted: the binding is not effective.
    NotGranted,
    Failed {
        reason: &'static str,
        message: String,
    },
}

/// What KV v2 metadata said of the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretState {
    Found {
        version: u64,
        path: String,
    },
    NotFound(String),
    Unknown {
        reason: &'static str,
        message: String,
    },
}

/// Everything one reconcile learned about one binding.
#[derive(Debug, Clone)]
pub struct Findings {
    pub verdict: Verdict,
    pub policy: Sync,
    pub role: Sync,
    pub secret: SecretState,
    /// The grant's Vault policy and role name, when the binding is effective.
    pub vault_policy: Option<String>,
    /// The service account the grant is for, when the binding is effective.
    pub service_account: Option<String>,
}

struct Cond {
    type_: &'static str,
    ok: Option<bool>,
    reason: &'static str,
    message: String,
}

/// The status these findings give, keeping each condition's
/// `lastTransitionTime` from `previous` when its status did not change.
pub fn status_for(
    findings: &Findings,
    generation: Option<i64>,
    previous: Option<&CredentialBindingStatus>,
    now: Time,
) -> CredentialBindingStatus {
    let reason = verdict_reason(&findings.verdict);
    let allowed = match &findings.verdict {
        Verdict::Effective => Cond::yes(
            POLICY_ALLOWED,
            reason,
            "a ClusterCredentialPolicy allows this binding",
        ),
        Verdict::Denied(d) => Cond::no(POLICY_ALLOWED, reason, d.0.clone()),
        Verdict::Invalid(m) | Verdict::Conflict(m) | Verdict::CaUnavailable(m) => {
            Cond::no(POLICY_ALLOWED, reason, m.clone())
        }
        Verdict::Deleting => Cond::no(
            POLICY_ALLOWED,
            reason,
            "the binding is being deleted".into(),
        ),
    };
    let sync = |type_: &'static str, s: &Sync, what: &str| match s {
        Sync::Synced(name) => Cond::yes(type_, "Synced", format!("{what} {name} is up to date")),
        Sync::NotGranted => Cond::no(
            type_,
            "NotGranted",
            format!("no {what} is granted: the binding is not allowed"),
        ),
        Sync::Failed { reason, message } => Cond::no(type_, reason, message.clone()),
    };
    let policy = sync(VAULT_POLICY_SYNCED, &findings.policy, "Vault policy");
    let role = sync(VAULT_ROLE_SYNCED, &findings.role, "Kubernetes-auth role");
    let secret = match &findings.secret {
        SecretState::Found { version, path } => Cond::yes(
            SECRET_FOUND,
            "Found",
            format!("version {version} of {path} exists"),
        ),
        SecretState::NotFound(message) => Cond::no(SECRET_FOUND, "NotFound", message.clone()),
        SecretState::Unknown { reason, message } => Cond {
            type_: SECRET_FOUND,
            ok: None,
            reason,
            message: message.clone(),
        },
    };
    // Ready names the first thing in the way, in the order a human fixes them.
    let blocking = [&allowed, &policy, &role, &secret]
        .into_iter()
        .find(|c| c.ok == Some(false) || (c.ok.is_none() && c.reason == "VaultUnavailable"));
    let ready = match blocking {
        None => Cond::yes(
            READY,
            "Ready",
            "the service account's pods can use this credential",
        ),
        Some(c) => Cond::no(READY, c.reason, c.message.clone()),
    };
    let conditions = [ready, allowed, policy, role, secret]
        .into_iter()
        .map(|c| c.into_condition(generation, previous, &now))
        .collect();
    CredentialBindingStatus {
        conditions,
        observed_generation: generation,
        secret_version: match &findings.secret {
            SecretState::Found { version, .. } => Some(*version),
            _ => None,
        },
        vault_policy: findings.vault_policy.clone(),
        vault_role: findings.vault_policy.clone(),
        granted_service_account: findings.service_account.clone(),
    }
}

impl Cond {
    fn yes(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            ok: Some(true),
            reason,
            message: message.into(),
        }
    }

    fn no(type_: &'static str, reason: &'static str, message: String) -> Self {
        Self {
            type_,
            ok: Some(false),
            reason,
            message,
        }
    }

    fn into_condition(
        self,
        generation: Option<i64>,
        previous: Option<&CredentialBindingStatus>,
        now: &Time,
    ) -> Condition {
        let status = match self.ok {
            Some(true) => "True",
            Some(false) => "False",
            None => "Unknown",
        };
        let last_transition_time = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == self.type_))
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: self.type_.into(),
            status: status.into(),
            reason: self.reason.into(),
            // The API caps a message at 32768 bytes.
            message: self.message.chars().take(4096).collect(),
            observed_generation: generation,
            last_transition_time,
        }
    }
}

/// Whether two statuses say the same, ignoring transition times (so an
/// unchanged status is not written again).
pub fn same_status(a: &CredentialBindingStatus, b: &CredentialBindingStatus) -> bool {
    let strip = |s: &CredentialBindingStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        }
        s.conditions.sort_by(|x, y| x.type_.cmp(&y.type_));
        s
    };
    strip(a) == strip(b)
}

/// The Ready condition's (status, reason, message).
pub fn ready_of(status: Option<&CredentialBindingStatus>) -> Option<(String, String, String)> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The Event a status change deserves, as (ready, reason, message): one
/// when Ready changes, and one when it stays False with a new message (a
/// different problem). Nothing when only other fields moved.
pub fn event_for(
    previous: Option<&CredentialBindingStatus>,
    new: &CredentialBindingStatus,
) -> Option<(bool, String, String)> {
    let (status, reason, message) = ready_of(Some(new))?;
    let before = ready_of(previous);
    let changed = match &before {
        None => true,
        Some((s, r, m)) => *s != status || *r != reason || (status != "True" && *m != message),
    };
    changed.then(|| (status == "True", reason, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Denial;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn good() -> Findings {
        Findings {
            verdict: Verdict::Effective,
            policy: Sync::Synced("credbroker-x".into()),
            role: Sync::Synced("credbroker-x".into()),
            secret: SecretState::Found {
                version: 3,
                path: "secret/teams/x".into(),
            },
            vault_policy: Some("credbroker-x".into()),
            service_account: Some("agent".into()),
        }
    }

    fn cond<'a>(s: &'a CredentialBindingStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn ready_names_the_first_blocker_and_times_move_only_on_change() {
        let ok = status_for(&good(), Some(2), None, t(10));
        assert_eq!(cond(&ok, READY).status, "True");
        assert_eq!(ok.secret_version, Some(3));
        assert_eq!(ok.observed_generation, Some(2));

        let mut denied = good();
        denied.verdict = Verdict::Denied(Denial(
            "no ClusterCredentialPolicy selects namespace a".into(),
        ));
        denied.policy = Sync::NotGranted;
        let s = status_for(&denied, Some(2), Some(&ok), t(20));
        assert_eq!(cond(&s, READY).reason, "NotAllowed");
        assert!(cond(&s, READY).message.contains("selects namespace a"));
        assert_eq!(cond(&s, READY).last_transition_time, t(20));
        // SecretFound did not change: its time stays.
        assert_eq!(cond(&s, SECRET_FOUND).last_transition_time, t(10));

        let mut down = good();
        down.secret = SecretState::Unknown {
            reason: "VaultUnavailable",
            message: "Vault unreachable at http://x".into(),
        };
        let s = status_for(&down, Some(2), Some(&ok), t(30));
        assert_eq!(cond(&s, READY).reason, "VaultUnavailable");
        assert_eq!(cond(&s, SECRET_FOUND).status, "Unknown");

        let mut v1 = good();
        v1.secret = SecretState::Unknown {
            reason: "KvV1",
            message: "KV v1 keeps no metadata".into(),
        };
        assert_eq!(
            cond(&status_for(&v1, None, None, t(1)), READY).status,
            "True"
        );

        assert!(same_status(&ok, &status_for(&good(), Some(2), None, t(99))));
        assert!(!same_status(&ok, &s));

        // Events: on a change of Ready, or of its message while not Ready.
        assert_eq!(event_for(None, &ok).map(|e| e.0), Some(true));
        assert!(event_for(Some(&ok), &ok).is_none());
        assert_eq!(
            event_for(Some(&ok), &s).map(|e| e.1),
            Some("VaultUnavailable".to_owned())
        );
        let mut other = down.clone();
        other.secret = SecretState::Unknown {
            reason: "VaultUnavailable",
            message: "Vault unreachable at http://y".into(),
        };
        let s2 = status_for(&other, Some(2), Some(&s), t(40));
        assert!(event_for(Some(&s), &s2).is_some());
        assert!(event_for(Some(&s2), &s2).is_none());
    }
}
