//! The Rust validators the controller relies on refuse everything the CRD
//! schema refuses, naming the same field.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cases;

use credbroker_crds::{ClusterCredentialPolicySpec, CredentialBindingSpec, validate};

#[test]
fn the_valid_binding_passes() {
    let v = cases::valid_binding("agents", "openai");
    let spec: CredentialBindingSpec = serde_json::from_value(v["spec"].clone()).unwrap();
    validate::binding_spec(&spec).unwrap();
}

#[test]
fn every_invalid_binding_is_refused_naming_its_field() {
    for case in cases::invalid_binding_cases() {
        let v = cases::apply(&cases::valid_binding("agents", "openai"), &case);
        // A value the type cannot hold (an unknown surface) is refused by
        // deserialization; anything else must reach the validator and fail there.
        match serde_json::from_value::<CredentialBindingSpec>(v["spec"].clone()) {
            Err(e) => assert!(
                e.to_string().contains("unknown variant"),
                "{}: only an unknown enum value may fail to parse, got {e}",
                case.name
            ),
            Ok(spec) => {
                let err = validate::binding_spec(&spec)
                    .expect_err(&format!("{}: accepted", case.name))
                    .to_string();
                assert!(
                    err.starts_with(case.field),
                    "{}: {err:?} does not name {}",
                    case.name,
                    case.field
                );
            }
        }
    }
}

#[test]
fn every_invalid_policy_is_refused_naming_its_field() {
    let valid = cases::valid_policy("team-research");
    let spec: ClusterCredentialPolicySpec = serde_json::from_value(valid["spec"].clone()).unwrap();
    validate::policy_spec(&spec).unwrap();
    for case in cases::invalid_policy_cases() {
        let v = cases::apply(&valid, &case);
        let spec: ClusterCredentialPolicySpec = serde_json::from_value(v["spec"].clone()).unwrap();
        let err = validate::policy_spec(&spec)
            .expect_err(case.name)
            .to_string();
        assert!(
            err.starts_with(case.field),
            "{}: {err:?} does not name {}",
            case.name,
            case.field
        );
    }
}
