//! The controller's acceptance scenarios (issue 5), each on its own real
//! kube-apiserver + etcd and its own real OpenBao, with the real binary.
//! Every scenario ends by scanning what a user can see for secret values.

mod support;

use std::time::{Duration, Instant};

use credbroker_crds::config::SidecarBindings;
use credbroker_crds::keys::{BINDINGS_CONFIGMAP_KEY, bindings_configmap_name};
use credbroker_test_support::apiserver::SERVICE_ACCOUNT_ISSUER;
use credbroker_test_support::wait_until;
use support::*;

const WITHIN: Duration = Duration::from_secs(30);

/// Acceptance 1–4, 6–8, 14 and 15: default deny, the exact grant, a real
/// Kubernetes-auth login and what its token can and cannot do, two
/// bindings on one account, a path change, narrowing the policy, deletion.
#[tokio::test]
#[ignore = "needs OpenBao and kube-apiserver (KUBEBUILDER_ASSETS): run make setup"]
async fn a_binding_is_granted_exactly_what_policy_allows_and_nothing_after() -> TestResult {
    let mut env = Env::start("journey").await?;
    // No periodic resync: every change below must be picked up from its
    // own event (a binding, a policy, a sibling).
    let ctl = env
        .controller(
            "ctl-journey",
            &["--resync-interval", "1h", "--sweep-interval", "1h"],
        )
        .await?;
    env.namespace("agents", &[("team", "research")]).await?;
    env.cluster
        .create_service_account("agents", "research")
        .await?;
    env.cluster
        .create_service_account("agents", "intruder")
        .await?;
    let openai = secret_value("openai");
    let unbound = secret_value("unbound");
    env.put_secret("teams/research/openai", &openai)?;
    env.put_secret("teams/research/unbound", &unbound)?;
    let name = env.vault_name("agents", "research");
    let cm_name = bindings_configmap_name("research");

    // 1. No policy: not allowed, and nothing reaches Vault.
    env.apply_binding(
        "agents",
        "openai",
        binding_spec(
            "research",
            "teams/research/openai",
            "OPENAI_API_KEY",
            "api.openai.com",
        ),
    )
    .await?;
    let b = env
        .wait_condition("agents", "openai", "PolicyAllowed", "False", WITHIN)
        .await?;
    let ready = ready_condition(&b);
    assert_eq!(ready.reason, "NotAllowed");
    assert_eq!(
        ready.message,
        "no ClusterCredentialPolicy selects namespace agents"
    );
    assert_eq!(ctl.vault_writes()?, 0, "{}", ctl.output());
    assert_eq!(env.vault_policy(&name)?, None);
    assert_eq!(env.vault_role(&name)?, None);
    assert!(env.configmap("agents", &cm_name).await?.is_none());

    // A policy that allows another host still does not allow this one.
    env.apply_policy(
        "research",
        policy_spec("research", "teams/research/", &["api.anthropic.com"]),
    )
    .await?;
    wait_until("the denial to name the host", WITHIN, || async {
        let b = env.binding("agents", "openai").await.map_err(|e| e.0)?;
        let m = ready_condition(&b).message;
        if m.contains("no ClusterCredentialPolicy allows host api.openai.com")
            && m.contains("namespace agents")
        {
            Ok(())
        } else {
            Err(m)
        }
    })
    .await?;

    // An allowing policy: Ready.
    env.apply_policy(
        "research",
        policy_spec("research", "teams/research/", &["api.openai.com"]),
    )
    .await?;
    let b = env
        .wait_condition("agents", "openai", "Ready", "True", WITHIN)
        .await?;
    let status = b.status.clone().unwrap_or_default();
    assert_eq!(status.secret_version, Some(1));
    assert_eq!(status.vault_policy.as_deref(), Some(name.as_str()));
    for c in [
        "PolicyAllowed",
        "VaultPolicySynced",
        "VaultRoleSynced",
        "SecretFound",
    ] {
        let cond = status.conditions.iter().find(|x| x.type_ == c);
        assert_eq!(
            cond.map(|x| x.status.as_str()),
            Some("True"),
            "{c}: {cond:?}"
        );
    }

    // 2. Exactly the expected policy and role, as Vault returns them.
    let policy: serde_json::Value =
        serde_json::from_str(&env.vault_policy(&name)?.unwrap_or_default())?;
    assert_eq!(policy, expected_policy(&["teams/research/openai"]));
    let role = env
        .vault_role(&name)?
        .ok_or_else(|| Failure("no role".into()))?;
    assert_eq!(
        role["bound_service_account_names"],
        serde_json::json!(["research"])
    );
    assert_eq!(
        role["bound_service_account_namespaces"],
        serde_json::json!(["agents"])
    );
    assert_eq!(role["audience"], "credbroker");
    assert_eq!(role["token_no_default_policy"], true);
    assert_eq!(role["token_policies"], serde_json::json!([name]));
    assert_eq!(role["token_ttl"], 600);
    assert_eq!(role["token_max_ttl"], 3600);
    let sidecar = sidecar_config(&env, "agents", &cm_name).await?;
    assert_eq!(sidecar.vault_role.as_deref(), Some(name.as_str()));
    assert_eq!(ids(&sidecar), ["openai"]);

    // 14. kubectl shows Ready and the version.
    let table = credbroker_test_support::run(env.server.kubectl().args([
        "get",
        "credentialbindings",
        "-n",
        "agents",
    ]))?;
    let row = table
        .lines()
        .find(|l| l.starts_with("openai"))
        .unwrap_or_default()
        .to_owned();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells.get(3..5), Some(&["True", "1"][..]), "{table}");

    // 3. A real TokenRequest token, reviewed by OpenBao against the apiserver.
    let token = env
        .login("agents", "research", "credbroker", &name)
        .await?
        .map_err(|e| Failure(format!("login refused: {e}")))?;
    let read = env.bao_as(
        &token,
        &[
            "kv",
            "get",
            "-mount=secret",
            "-field=api_key",
            "teams/research/openai",
        ],
    );
    assert!(
        read.as_deref().is_ok_and(|v| v.trim() == openai),
        "the bound secret is not readable"
    );
    for (what, args) in [
        (
            "an unbound secret in the same mount",
            vec!["kv", "get", "-mount=secret", "teams/research/unbound"],
        ),
        (
            "a list of the mount",
            vec!["kv", "list", "-mount=secret", "teams/research"],
        ),
        ("sys/mounts", vec!["read", "sys/mounts"]),
        ("sys/policies/acl", vec!["list", "sys/policies/acl"]),
        (
            "a write to the bound secret",
            vec![
                "kv",
                "put",
                "-mount=secret",
                "teams/research/openai",
                "api_key=x",
            ],
        ),
        (
            "a write elsewhere",
            vec!["kv", "put", "-mount=secret", "teams/research/new", "k=v"],
        ),
        ("a token of its own", vec!["token", "create"]),
    ] {
        let got = env.bao_as(&token, &args);
        assert!(
            got.as_ref()
                .is_err_and(|e| e.contains("permission denied") || e.contains("403")),
            "{what} was allowed: {:?}",
            got.map(|_| "ok")
        );
    }
    env.bao_as(&token, &["token", "lookup"]).map_err(Failure)?;
    env.bao_as(&token, &["token", "renew"]).map_err(Failure)?;
    env.bao_as(&token, &["token", "revoke", "-self"])
        .map_err(Failure)?;
    assert!(
        env.bao_as(&token, &["token", "lookup"]).is_err(),
        "the revoked token still works"
    );

    // 4. The API server's own audience, and another account's token, are refused.
    let wrong_audience = env
        .login("agents", "research", SERVICE_ACCOUNT_ISSUER, &name)
        .await?;
    assert!(
        wrong_audience.is_err(),
        "a default-audience token logged in"
    );
    let other_account = env.login("agents", "intruder", "credbroker", &name).await?;
    assert!(
        other_account.is_err(),
        "another service account's token logged in"
    );

    // 6. A second binding on the same account: one policy granting both.
    let anthropic = secret_value("anthropic");
    env.put_secret("teams/research/anthropic", &anthropic)?;
    env.apply_binding(
        "agents",
        "anthropic",
        binding_spec(
            "research",
            "teams/research/anthropic",
            "ANTHROPIC_API_KEY",
            "api.openai.com",
        ),
    )
    .await?;
    env.wait_condition("agents", "anthropic", "Ready", "True", WITHIN)
        .await?;
    let policy: serde_json::Value =
        serde_json::from_str(&env.vault_policy(&name)?.unwrap_or_default())?;
    assert_eq!(
        policy,
        expected_policy(&["teams/research/anthropic", "teams/research/openai"])
    );
    wait_until("the ConfigMap to hold both bindings", WITHIN, || async {
        let ids = ids(&sidecar_config(&env, "agents", &cm_name)
            .await
            .map_err(|e| e.0)?);
        if ids == ["anthropic", "openai"] {
            Ok(())
        } else {
            Err(format!("{ids:?}"))
        }
    })
    .await?;

    // Deleting one leaves the other working.
    let token = login_ok(&env, "agents", "research", &name).await?;
    env.delete_binding("agents", "openai").await?;
    env.wait_binding_gone("agents", "openai", WITHIN).await?;
    wait_until("the policy to drop the deleted binding", WITHIN, || async {
        let p = env
            .vault_policy(&name)
            .map_err(|e| e.0)?
            .unwrap_or_default();
        if p.contains("teams/research/openai") {
            Err(p)
        } else {
            Ok(())
        }
    })
    .await?;
    assert!(
        readable(&env, &token, "teams/research/anthropic"),
        "the remaining binding broke"
    );
    assert!(
        !readable(&env, &token, "teams/research/openai"),
        "a deleted binding's secret is still readable"
    );
    assert_eq!(
        ids(&sidecar_config(&env, "agents", &cm_name).await?),
        ["anthropic"]
    );

    // 7. Changing the path moves the grant, for tokens already issued too.
    let moved = secret_value("moved");
    env.put_secret("teams/research/moved", &moved)?;
    env.apply_binding(
        "agents",
        "anthropic",
        binding_spec(
            "research",
            "teams/research/moved",
            "ANTHROPIC_API_KEY",
            "api.openai.com",
        ),
    )
    .await?;
    env.wait_condition("agents", "anthropic", "Ready", "True", WITHIN)
        .await?;
    wait_until("the grant to move", WITHIN, || async {
        if readable(&env, &token, "teams/research/moved")
            && !readable(&env, &token, "teams/research/anthropic")
        {
            Ok(())
        } else {
            Err("not yet")
        }
    })
    .await?;

    // 1 again: narrowing the policy withdraws the grant.
    env.apply_policy(
        "research",
        policy_spec("research", "teams/research/other/", &["api.openai.com"]),
    )
    .await?;
    let b = env
        .wait_condition("agents", "anthropic", "PolicyAllowed", "False", WITHIN)
        .await?;
    assert!(
        ready_condition(&b)
            .message
            .contains("Vault path secret/teams/research/moved"),
        "{b:?}"
    );
    let status = b.status.clone().unwrap_or_default();
    assert_eq!(
        (status.vault_policy, status.secret_version),
        (None, None),
        "a withdrawn grant still shows"
    );
    wait_until("the grant to be withdrawn", WITHIN, || async {
        let gone = env.vault_policy(&name).map_err(|e| e.0)?.is_none()
            && env.vault_role(&name).map_err(|e| e.0)?.is_none()
            && env
                .configmap("agents", &cm_name)
                .await
                .map_err(|e| e.0)?
                .is_none();
        if gone {
            Ok(())
        } else {
            Err("policy, role or ConfigMap still there".to_owned())
        }
    })
    .await?;
    assert!(
        !readable(&env, &token, "teams/research/moved"),
        "a withdrawn grant still reads"
    );

    // 8. Deleting the last binding removes the policy, the role and the ConfigMap.
    env.apply_policy(
        "research",
        policy_spec("research", "teams/research/", &["api.openai.com"]),
    )
    .await?;
    env.wait_condition("agents", "anthropic", "Ready", "True", WITHIN)
        .await?;
    assert!(env.vault_policy(&name)?.is_some());
    env.delete_binding("agents", "anthropic").await?;
    env.wait_binding_gone("agents", "anthropic", WITHIN).await?;
    assert_eq!(env.vault_policy(&name)?, None);
    assert_eq!(env.vault_role(&name)?, None);
    assert!(env.configmap("agents", &cm_name).await?.is_none());

    // A binding moved to another service account leaves the old one's
    // grant at once (no sweep runs here), and the old one's other binding
    // keeps working.
    env.cluster
        .create_service_account("agents", "research2")
        .await?;
    let mover = secret_value("mover");
    env.put_secret("teams/research/mover", &mover)?;
    let spec = |sa: &str| binding_spec(sa, "teams/research/mover", "MOVER", "api.openai.com");
    env.apply_binding(
        "agents",
        "stay",
        binding_spec(
            "research",
            "teams/research/openai",
            "STAY",
            "api.openai.com",
        ),
    )
    .await?;
    env.apply_binding("agents", "mover", spec("research"))
        .await?;
    env.wait_condition("agents", "mover", "Ready", "True", WITHIN)
        .await?;
    env.wait_condition("agents", "stay", "Ready", "True", WITHIN)
        .await?;
    assert!(
        env.vault_policy(&name)?
            .unwrap_or_default()
            .contains("teams/research/mover")
    );
    env.apply_binding("agents", "mover", spec("research2"))
        .await?;
    let b = env
        .wait_condition("agents", "mover", "Ready", "True", WITHIN)
        .await?;
    let moved_to = env.vault_name("agents", "research2");
    assert_eq!(
        b.status.unwrap_or_default().vault_policy.as_deref(),
        Some(moved_to.as_str())
    );
    wait_until(
        "the old account's grant to drop the moved binding",
        WITHIN,
        || async {
            let p = env
                .vault_policy(&name)
                .map_err(|e| e.0)?
                .unwrap_or_default();
            let ids = ids(&sidecar_config(&env, "agents", &cm_name)
                .await
                .map_err(|e| e.0)?);
            if !p.contains("teams/research/mover")
                && p.contains("teams/research/openai")
                && ids == ["stay"]
            {
                Ok(())
            } else {
                Err(format!("{ids:?} {p}"))
            }
        },
    )
    .await?;
    assert!(
        env.vault_policy(&moved_to)?
            .unwrap_or_default()
            .contains("teams/research/mover")
    );
    for gone in ["mover", "stay"] {
        env.delete_binding("agents", gone).await?;
        env.wait_binding_gone("agents", gone, WITHIN).await?;
    }
    assert_eq!(env.vault_policy(&moved_to)?, None);
    assert_eq!(env.vault_policy(&name)?, None);

    // Two bindings of one account with one env var: the older wins, and the
    // other takes over as soon as the first is deleted (no resync runs).
    let twin = secret_value("twin");
    env.put_secret("teams/research/twin", &twin)?;
    env.apply_binding(
        "agents",
        "first",
        binding_spec(
            "research",
            "teams/research/openai",
            "TWIN_KEY",
            "api.openai.com",
        ),
    )
    .await?;
    env.wait_condition("agents", "first", "Ready", "True", WITHIN)
        .await?;
    env.apply_binding(
        "agents",
        "second",
        binding_spec(
            "research",
            "teams/research/twin",
            "TWIN_KEY",
            "api.openai.com",
        ),
    )
    .await?;
    let b = env
        .wait_condition("agents", "second", "PolicyAllowed", "False", WITHIN)
        .await?;
    let ready = ready_condition(&b);
    assert_eq!(ready.reason, "Conflict", "{ready:?}");
    assert!(ready.message.contains("binding first"), "{ready:?}");
    env.delete_binding("agents", "first").await?;
    env.wait_condition("agents", "second", "Ready", "True", WITHIN)
        .await?;
    let policy = env.vault_policy(&name)?.unwrap_or_default();
    assert!(
        policy.contains("secret/data/teams/research/twin")
            && !policy.contains("teams/research/openai"),
        "{policy}"
    );
    env.delete_binding("agents", "second").await?;
    env.wait_binding_gone("agents", "second", WITHIN).await?;

    // Events told the story.
    wait_until("the events", WITHIN, || async {
        let events = env.events_of("agents", "openai").await.map_err(|e| e.0)?;
        let denied = events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "NotAllowed");
        let ready = events.iter().any(|(t, r, _)| t == "Normal" && r == "Ready");
        let granted = events
            .iter()
            .any(|(t, r, _)| t == "Normal" && r == "VaultGrantUpdated");
        if denied && ready && granted {
            Ok(())
        } else {
            Err(format!("{events:?}"))
        }
    })
    .await?;

    // 15. No secret value anywhere a user can look.
    let text = env.visible_text(&["agents"], &[&ctl]).await?;
    env.assert_no_secret_in(
        "the controller's output, statuses, ConfigMaps, Events or metrics",
        &text,
    )?;
    env.assert_no_secret_in(
        "kubectl get -o yaml",
        &credbroker_test_support::run(env.server.kubectl().args([
            "get",
            "credentialbindings,configmaps,events",
            "-A",
            "-o",
            "yaml",
        ]))?,
    )?;
    Ok(())
}

/// Acceptance 5, 9 and 10: colliding tenants stay apart, orphans of this
/// cluster id are swept (another cluster's are not), and a steady state
/// makes no Vault writes.
#[tokio::test]
#[ignore = "needs OpenBao and kube-apiserver (KUBEBUILDER_ASSETS): run make setup"]
async fn tenants_stay_apart_orphans_are_swept_and_resyncs_write_nothing() -> TestResult {
    let mut env = Env::start("tenants").await?;
    let ctl = env
        .controller("ctl-tenants", &["--resync-interval", "1s"])
        .await?;
    let mut t = policy_spec("t", "teams/t/", &["api.openai.com"]);
    if let Some(allow) = t["allow"].as_array_mut() {
        allow.push(serde_json::json!({
            "vault": { "mount": "kv1", "pathPrefix": "teams/t/", "kvVersion": 1 },
            "destinations": ["api.openai.com"],
        }));
    }
    env.apply_policy("t", t).await?;
    let value = secret_value("tenant");
    env.put_secret("teams/t/key", &value)?;
    for (ns, sa) in [("a-b", "c"), ("a", "b-c")] {
        env.namespace(ns, &[("team", "t")]).await?;
        env.cluster.create_service_account(ns, sa).await?;
        env.apply_binding(
            ns,
            "key",
            binding_spec(sa, "teams/t/key", "KEY", "api.openai.com"),
        )
        .await?;
    }
    for ns in ["a-b", "a"] {
        env.wait_condition(ns, "key", "Ready", "True", WITHIN)
            .await?;
    }
    // 5. Separate policies and roles; each role admits only its own account.
    let (one, two) = (env.vault_name("a-b", "c"), env.vault_name("a", "b-c"));
    assert_ne!(one, two);
    for (name, ns, sa) in [(&one, "a-b", "c"), (&two, "a", "b-c")] {
        assert!(env.vault_policy(name)?.is_some(), "{name}");
        let role = env
            .vault_role(name)?
            .ok_or_else(|| Failure(format!("no role {name}")))?;
        assert_eq!(
            role["bound_service_account_namespaces"],
            serde_json::json!([ns])
        );
        assert_eq!(role["bound_service_account_names"], serde_json::json!([sa]));
    }
    assert!(
        env.login("a-b", "c", "credbroker", &two).await?.is_err(),
        "a-b/c logged in as a/b-c"
    );
    assert!(
        env.login("a", "b-c", "credbroker", &one).await?.is_err(),
        "a/b-c logged in as a-b/c"
    );
    login_ok(&env, "a-b", "c", &one).await?;

    // 9. Hand-made orphans: ours is swept, another cluster's is left alone.
    let ours = format!(
        "{}orphan-0123456789abcdef",
        credbroker_controller::names::cluster_prefix("tenants")
    );
    let theirs = format!(
        "{}orphan-0123456789abcdef",
        credbroker_controller::names::cluster_prefix("elsewhere")
    );
    for name in [&ours, &theirs] {
        env.vault
            .write_policy(name, r#"path "secret/data/x" { capabilities = ["read"] }"#)
            .await?;
        env.vault.bao(&[
            "write",
            &format!("auth/kubernetes/role/{name}"),
            "bound_service_account_names=x",
            "bound_service_account_namespaces=x",
            "audience=credbroker",
        ])?;
    }
    wait_until(
        "the sweep to delete this cluster's orphans",
        WITHIN,
        || async {
            let policy = env.vault_policy(&ours).map_err(|e| e.0)?;
            let role = env.vault_role(&ours).map_err(|e| e.0)?;
            if policy.is_none() && role.is_none() {
                Ok(())
            } else {
                Err("still there".to_owned())
            }
        },
    )
    .await
    .map_err(|e| Failure(format!("{e}\n{}", ctl.output())))?;
    assert!(
        env.vault_policy(&theirs)?.is_some(),
        "another cluster's policy was swept"
    );
    assert!(
        env.vault_role(&theirs)?.is_some(),
        "another cluster's role was swept"
    );
    assert!(
        env.vault_policy(&one)?.is_some() && env.vault_policy(&two)?.is_some(),
        "a live grant was swept"
    );
    assert_eq!(
        ctl.counter("credbroker_controller_swept_total", "policy")?,
        1
    );
    assert!(ctl.counter("credbroker_controller_sweeps_total", "result=\"ok\"")? > 0);
    assert_eq!(
        ctl.counter("credbroker_controller_sweeps_total", "result=\"error\"")?,
        0,
        "{}",
        ctl.output()
    );

    // KV v1: the grant names the path itself, and SecretFound cannot know.
    let v1 = secret_value("kv1");
    env.secrets.push(v1.clone());
    env.vault.bao(&[
        "kv",
        "put",
        "-mount=kv1",
        "teams/t/v1key",
        &format!("api_key={v1}"),
    ])?;
    let mut spec = binding_spec("c", "teams/t/v1key", "V1_KEY", "api.openai.com");
    spec["source"]["vault"]["mount"] = "kv1".into();
    spec["source"]["vault"]["kvVersion"] = 1.into();
    env.apply_binding("a-b", "v1", spec).await?;
    let b = env
        .wait_condition("a-b", "v1", "Ready", "True", WITHIN)
        .await?;
    let found = b
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "SecretFound");
    assert_eq!(
        found.map(|c| (c.status, c.reason)),
        Some(("Unknown".into(), "KvV1".into()))
    );
    let policy = env.vault_policy(&one)?.unwrap_or_default();
    assert!(policy.contains("\"kv1/teams/t/v1key\""), "{policy}");
    let token = login_ok(&env, "a-b", "c", &one).await?;
    let read = env.bao_as(
        &token,
        &["kv", "get", "-mount=kv1", "-field=api_key", "teams/t/v1key"],
    );
    assert!(
        read.is_ok_and(|v| v.trim() == v1),
        "the KV v1 secret is not readable"
    );

    // A hand-made ConfigMap of the controller's kind, backed by nothing, is
    // swept; one merely labelled like it, with another name, is not.
    for name in ["credbroker-ghost-0123abcd", "not-ours"] {
        let cm: k8s_openapi::api::core::v1::ConfigMap =
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": name, "labels": {
                    "app.kubernetes.io/managed-by": "credbroker-controller",
                    "credbroker.dev/service-account": "ghost" } },
                "data": { "bindings.v1.json": "{}" }
            }))?;
        kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(env.client(), "a")
            .create(&Default::default(), &cm)
            .await?;
    }
    wait_until(
        "the sweep to delete the orphaned ConfigMap",
        WITHIN,
        || async {
            match env.configmap("a", "credbroker-ghost-0123abcd").await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err("still there".to_owned()),
                Err(e) => Err(e.0),
            }
        },
    )
    .await?;
    assert!(
        env.configmap("a", "not-ours").await?.is_some(),
        "a ConfigMap not named by the controller was swept"
    );

    // Drift: a policy and a role deleted by hand come back.
    env.vault
        .bao(&["delete", &format!("sys/policies/acl/{one}")])?;
    env.vault
        .bao(&["delete", &format!("auth/kubernetes/role/{one}")])?;
    wait_until(
        "the deleted policy and role to be put back",
        WITHIN,
        || async {
            let p = env.vault_policy(&one).map_err(|e| e.0)?;
            let r = env.vault_role(&one).map_err(|e| e.0)?;
            if p.is_some() && r.is_some() {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        },
    )
    .await?;
    login_ok(&env, "a-b", "c", &one).await?;

    // 10. Ten resyncs of every binding: no write at all, to Vault or to
    // the API server.
    let before = resource_versions(&env).await?;
    let writes = ctl.vault_writes()?;
    let reconciles = ctl.counter("credbroker_controller_reconciles_total", "result=\"ok\"")?;
    wait_until(
        "ten resyncs of both bindings",
        Duration::from_secs(60),
        || async {
            let now = ctl
                .counter("credbroker_controller_reconciles_total", "result=\"ok\"")
                .map_err(|e| e.0)?;
            if now >= reconciles + 30 {
                Ok(())
            } else {
                Err(format!("{} so far", now - reconciles))
            }
        },
    )
    .await?;
    assert_eq!(
        ctl.vault_writes()?,
        writes,
        "a steady-state resync wrote to Vault"
    );
    assert_eq!(
        resource_versions(&env).await?,
        before,
        "a steady-state resync wrote a binding or a ConfigMap"
    );
    assert_eq!(
        ctl.counter("credbroker_controller_reconcile_errors_total", "")?,
        0,
        "{}",
        ctl.output()
    );

    let text = env.visible_text(&["a-b", "a"], &[&ctl]).await?;
    env.assert_no_secret_in(
        "the controller's output, statuses, ConfigMaps, Events or metrics",
        &text,
    )?;
    Ok(())
}

/// Acceptance 11 and 12: a missing secret is reported and picked up once
/// written; Vault paused turns bindings VaultUnavailable without a crash,
/// a deletion during the outage gives up in bounded time, and everything
/// converges after Vault resumes.
#[tokio::test]
#[ignore = "needs OpenBao and kube-apiserver (KUBEBUILDER_ASSETS): run make setup"]
async fn missing_secrets_and_vault_outages_are_reported_and_recovered() -> TestResult {
    let mut env = Env::start("outage").await?;
    // This replica logs in with AppRole.
    let approle = env.approle_args()?;
    let approle: Vec<&str> = approle.iter().map(String::as_str).collect();
    let ctl = env.controller("ctl-outage", &approle).await?;
    assert_eq!(
        ctl.counter("credbroker_controller_vault_logins_total", "result=\"ok\"")?,
        1,
        "{}",
        ctl.output()
    );
    env.namespace("outage", &[("team", "o")]).await?;
    for sa in ["agent", "doomed"] {
        env.cluster.create_service_account("outage", sa).await?;
    }
    env.apply_policy("o", policy_spec("o", "teams/o/", &["api.openai.com"]))
        .await?;

    // 12. A missing secret, then written.
    env.apply_binding(
        "outage",
        "missing",
        binding_spec("agent", "teams/o/missing", "MISSING", "api.openai.com"),
    )
    .await?;
    let b = env
        .wait_condition("outage", "missing", "SecretFound", "False", WITHIN)
        .await?;
    let found = b
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "SecretFound");
    assert!(
        found
            .as_ref()
            .is_some_and(|c| c.message == "path secret/teams/o/missing not found"),
        "{found:?}"
    );
    let value = secret_value("missing");
    env.put_secret("teams/o/missing", &value)?;
    let b = env
        .wait_condition("outage", "missing", "Ready", "True", WITHIN)
        .await?;
    assert_eq!(b.status.unwrap_or_default().secret_version, Some(1));

    let doomed = secret_value("doomed");
    env.put_secret("teams/o/doomed", &doomed)?;
    env.apply_binding(
        "outage",
        "doomed",
        binding_spec("doomed", "teams/o/doomed", "DOOMED", "api.openai.com"),
    )
    .await?;
    env.wait_condition("outage", "doomed", "Ready", "True", WITHIN)
        .await?;
    let doomed_name = env.vault_name("outage", "doomed");
    assert!(env.vault_policy(&doomed_name)?.is_some());

    // 11. Vault paused.
    env.vault.pause()?;
    let paused = Instant::now();
    let b = env
        .wait_condition("outage", "missing", "Ready", "False", WITHIN)
        .await?;
    let ready = ready_condition(&b);
    assert_eq!(ready.reason, "VaultUnavailable", "{ready:?}");
    assert!(
        ready
            .message
            .contains(&format!("Vault unreachable at {}", env.vault.addr())),
        "{ready:?}"
    );
    wait_until("a VaultUnavailable event", WITHIN, || async {
        let events = env.events_of("outage", "missing").await.map_err(|e| e.0)?;
        if events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "VaultUnavailable")
        {
            Ok(())
        } else {
            Err(format!("{events:?}"))
        }
    })
    .await?;
    // A binding created during the outage, and one deleted during it.
    env.apply_binding(
        "outage",
        "during",
        binding_spec("agent", "teams/o/during", "DURING", "api.openai.com"),
    )
    .await?;
    env.delete_binding("outage", "doomed").await?;
    env.wait_binding_gone("outage", "doomed", Duration::from_secs(60))
        .await?;
    let gave_up = paused.elapsed();
    wait_until("a CleanupAbandoned event", WITHIN, || async {
        let events = env.events_of("outage", "doomed").await.map_err(|e| e.0)?;
        if events.iter().any(|(_, r, _)| r == "CleanupAbandoned") {
            Ok(())
        } else {
            Err(format!("{events:?}"))
        }
    })
    .await?;
    ctl.process.check_running()?;
    assert_eq!(ctl.admin("/healthz")?.0, 200);
    assert!(
        ctl.counter(
            "credbroker_controller_reconcile_errors_total",
            "reason=\"VaultUnavailable\""
        )? > 0,
        "{}",
        ctl.metrics()?
    );
    assert!(env.binding("outage", "during").await.is_ok());

    // Resumed: everything converges on its own, the abandoned grant too.
    env.vault.resume()?;
    let resumed = Instant::now();
    let during = secret_value("during");
    env.put_secret("teams/o/during", &during)?;
    for name in ["missing", "during"] {
        env.wait_condition("outage", name, "Ready", "True", Duration::from_secs(60))
            .await?;
    }
    let converged = resumed.elapsed();
    wait_until(
        "the sweep to delete the abandoned grant",
        WITHIN,
        || async {
            let p = env.vault_policy(&doomed_name).map_err(|e| e.0)?;
            let r = env.vault_role(&doomed_name).map_err(|e| e.0)?;
            if p.is_none() && r.is_none() {
                Ok(())
            } else {
                Err("still there".to_owned())
            }
        },
    )
    .await?;
    let policy = env
        .vault_policy(&env.vault_name("outage", "agent"))?
        .unwrap_or_default();
    assert!(policy.contains("secret/data/teams/o/during"), "{policy}");
    eprintln!(
        "outage: the deletion gave up after {gave_up:?}; converged {converged:?} after resume"
    );

    let text = env.visible_text(&["outage"], &[&ctl]).await?;
    env.assert_no_secret_in(
        "the controller's output, statuses, ConfigMaps, Events or metrics",
        &text,
    )?;
    Ok(())
}

/// Acceptance 13: two replicas; only the leader writes; killed, the other
/// takes over within the lease duration. The standby logs in to Vault
/// through Kubernetes auth with its own ServiceAccount token.
#[tokio::test]
#[ignore = "needs OpenBao and kube-apiserver (KUBEBUILDER_ASSETS): run make setup"]
async fn only_the_leader_writes_and_a_standby_takes_over() -> TestResult {
    use k8s_openapi::api::coordination::v1::Lease;
    let mut env = Env::start("leader").await?;
    // The controller's own Kubernetes-auth identity, set up by the admin
    // (its ServiceAccount comes from controller/deploy/rbac.yaml).
    env.vault.bao(&[
        "write",
        "auth/kubernetes/role/credbroker-controller",
        "bound_service_account_names=credbroker-controller",
        &format!("bound_service_account_namespaces={SYSTEM_NS}"),
        "audience=vault",
        "token_policies=credbroker-controller",
        "token_no_default_policy=true",
        "token_ttl=10m",
    ])?;
    let jwt = env
        .cluster
        .token(
            SYSTEM_NS,
            "credbroker-controller",
            &["vault"],
            Duration::from_secs(3600),
        )
        .await?;
    let jwt_file = tempfile::NamedTempFile::new()?;
    std::fs::write(jwt_file.path(), &jwt)?;
    let jwt_path = jwt_file.path().display().to_string();

    let a = env.controller("ctl-a", &[]).await?;
    wait_until("ctl-a to lead", WITHIN, || async {
        match a.counter("credbroker_controller_leader", "") {
            Ok(1) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    let b = env
        .controller(
            "ctl-b",
            &[
                "--vault-auth",
                "kubernetes",
                "--vault-role",
                "credbroker-controller",
                "--vault-jwt-file",
                &jwt_path,
            ],
        )
        .await?;
    assert_eq!(
        b.counter("credbroker_controller_vault_logins_total", "result=\"ok\"")?,
        1,
        "{}",
        b.output()
    );

    env.namespace("lead", &[("team", "l")]).await?;
    env.cluster.create_service_account("lead", "agent").await?;
    env.apply_policy("l", policy_spec("l", "teams/l/", &["api.openai.com"]))
        .await?;
    let value = secret_value("leader");
    env.put_secret("teams/l/one", &value)?;
    env.apply_binding(
        "lead",
        "one",
        binding_spec("agent", "teams/l/one", "ONE", "api.openai.com"),
    )
    .await?;
    env.wait_condition("lead", "one", "Ready", "True", WITHIN)
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(a.vault_writes()? > 0);
    assert_eq!(b.vault_writes()?, 0, "the standby wrote to Vault");
    assert_eq!(
        b.counter("credbroker_controller_reconciles_total", "")?,
        0,
        "the standby reconciled"
    );
    assert_eq!(b.counter("credbroker_controller_leader", "")?, 0);
    let leases = kube::Api::<Lease>::namespaced(env.client(), SYSTEM_NS);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert_eq!(holder(leases.get("credbroker-controller").await?), "ctl-a");

    // The leader dies without a word.
    a.process.signal(nix::sys::signal::Signal::SIGKILL)?;
    let killed = Instant::now();
    wait_until("ctl-b to take the lease", WITHIN, || async {
        let l = leases
            .get("credbroker-controller")
            .await
            .map_err(|e| e.to_string())?;
        let h = holder(l);
        if h == "ctl-b" { Ok(()) } else { Err(h) }
    })
    .await?;
    let takeover = killed.elapsed();
    // The lease duration (6 s) after the last renewal (at most one retry
    // period, 1 s, before the kill), one more retry period for the
    // standby's next try, and a second of slack for a loaded machine.
    assert!(
        takeover <= Duration::from_secs(9),
        "took over after {takeover:?}"
    );
    let two = secret_value("leader-two");
    env.put_secret("teams/l/two", &two)?;
    env.apply_binding(
        "lead",
        "two",
        binding_spec("agent", "teams/l/two", "TWO", "api.openai.com"),
    )
    .await?;
    env.wait_condition("lead", "two", "Ready", "True", WITHIN)
        .await?;
    assert!(b.vault_writes()? > 0, "the new leader did not write");
    eprintln!("leader: the standby took over {takeover:?} after the leader was killed");

    // A leader frozen past its lease (SIGSTOP) is replaced; woken up, it
    // must not write (its fence has lapsed) and it exits.
    let c = env.controller("ctl-c", &[]).await?;
    b.process.pause()?;
    wait_until(
        "ctl-c to take the lease from the frozen ctl-b",
        WITHIN,
        || async {
            let h = holder(
                leases
                    .get("credbroker-controller")
                    .await
                    .map_err(|e| e.to_string())?,
            );
            if h == "ctl-c" { Ok(()) } else { Err(h) }
        },
    )
    .await?;
    // While ctl-b sleeps, ctl-c withdraws a path; ctl-b's queue still holds
    // the old state.
    env.delete_binding("lead", "two").await?;
    env.wait_binding_gone("lead", "two", WITHIN).await?;
    let policy_name = env.vault_name("lead", "agent");
    let without_two = env.vault_policy(&policy_name)?.unwrap_or_default();
    assert!(!without_two.contains("teams/l/two"), "{without_two}");
    b.process.resume()?;
    wait_until("the woken ctl-b to exit", WITHIN, || async {
        match b.process.check_running() {
            Err(_) => Ok(()),
            Ok(()) => Err("still running"),
        }
    })
    .await?;
    assert!(
        b.output().contains("lost the leader lease"),
        "{}",
        b.output()
    );
    assert_eq!(
        env.vault_policy(&policy_name)?.unwrap_or_default(),
        without_two,
        "the woken leader wrote"
    );
    env.wait_condition("lead", "one", "Ready", "True", WITHIN)
        .await?;

    let text = env.visible_text(&["lead"], &[&c]).await? + &a.output() + &b.output();
    env.assert_no_secret_in(
        "the controllers' output, statuses, ConfigMaps, Events or metrics",
        &text,
    )?;
    Ok(())
}

/// The resourceVersions of the tenants scenario's bindings and ConfigMaps.
async fn resource_versions(env: &Env) -> TestResult<Vec<Option<String>>> {
    let mut v = Vec::new();
    for (ns, name) in [("a-b", "key"), ("a", "key"), ("a-b", "v1")] {
        v.push(env.binding(ns, name).await?.metadata.resource_version);
    }
    for (ns, sa) in [("a-b", "c"), ("a", "b-c")] {
        let name = credbroker_crds::keys::bindings_configmap_name(sa);
        v.push(
            env.configmap(ns, &name)
                .await?
                .and_then(|c| c.metadata.resource_version),
        );
    }
    Ok(v)
}

/// The Ready condition's (reason, message); empty when there is none.
fn ready_condition(b: &credbroker_crds::CredentialBinding) -> Ready {
    let c = b
        .status
        .clone()
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready");
    Ready {
        reason: c.as_ref().map(|c| c.reason.clone()).unwrap_or_default(),
        message: c.map(|c| c.message).unwrap_or_default(),
    }
}

#[derive(Debug)]
struct Ready {
    reason: String,
    message: String,
}

fn expected_policy(paths: &[&str]) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for p in paths {
        map.insert(
            format!("secret/data/{p}"),
            serde_json::json!({ "capabilities": ["read"] }),
        );
        map.insert(
            format!("secret/metadata/{p}"),
            serde_json::json!({ "capabilities": ["read"] }),
        );
    }
    map.insert(
        "auth/token/lookup-self".into(),
        serde_json::json!({ "capabilities": ["read"] }),
    );
    map.insert(
        "auth/token/renew-self".into(),
        serde_json::json!({ "capabilities": ["update"] }),
    );
    map.insert(
        "auth/token/revoke-self".into(),
        serde_json::json!({ "capabilities": ["update"] }),
    );
    serde_json::json!({ "path": map })
}

async fn sidecar_config(env: &Env, ns: &str, name: &str) -> TestResult<SidecarBindings> {
    let cm = env
        .configmap(ns, name)
        .await?
        .ok_or_else(|| Failure(format!("no ConfigMap {ns}/{name}")))?;
    let json = cm
        .data
        .unwrap_or_default()
        .remove(BINDINGS_CONFIGMAP_KEY)
        .ok_or_else(|| Failure(format!("ConfigMap {name} has no {BINDINGS_CONFIGMAP_KEY}")))?;
    Ok(SidecarBindings::from_json(&json)?)
}

/// The binding ids in a ConfigMap, sorted (the file lists them oldest first).
fn ids(s: &SidecarBindings) -> Vec<String> {
    let mut ids: Vec<String> = s.bindings.iter().map(|b| b.id.clone()).collect();
    ids.sort();
    ids
}

async fn login_ok(env: &Env, ns: &str, sa: &str, role: &str) -> TestResult<String> {
    env.login(ns, sa, "credbroker", role)
        .await?
        .map_err(|e| Failure(format!("{ns}/{sa} could not log in: {e}")))
}

fn readable(env: &Env, token: &str, path: &str) -> bool {
    env.bao_as(
        token,
        &["kv", "get", "-mount=secret", "-field=api_key", path],
    )
    .is_ok()
}
