//! Credentials files, tokens, identities, grants and reloads.

use super::*;

const FILE: &str = r#"
credentials:
  - {name: mesh-proxies, role: proxy, services: [orders], tokens: ["proxy-token-0000001", "proxy-token-0000002"]}
  - {name: edge-proxies, role: proxy, services: ["*"], tokens: ["edge-token-00000001"]}
  - {name: orders-service, role: service, services: [orders], tokens: ["orders-token-000001"]}
  - {name: oncall, role: admin, tokens: ["admin-token-0000001"]}
"#;

#[test]
fn tokens_map_to_their_credential_and_roles() {
    let credentials = Credentials::from_yaml(FILE).unwrap();
    let proxy = credentials.authenticate("proxy-token-0000002").unwrap();
    assert_eq!(proxy.name, "mesh-proxies");
    assert!(proxy.may(Permission::ProxyCalls) && !proxy.may(Permission::AdminRead));
    let proxy_calls = Permission::ProxyCalls;
    assert!(proxy.may_act_for(proxy_calls, "orders") && !proxy.may_act_for(proxy_calls, "payments"));
    let edge = credentials.authenticate("edge-token-00000001").unwrap();
    assert!(edge.may_act_for(proxy_calls, "orders") && edge.may_act_for(proxy_calls, "payments"));
    let service = credentials.authenticate("orders-token-000001").unwrap();
    assert!(service.may(Permission::Checkpoint) && !service.may(Permission::ProxyCalls));
    assert!(
        service.may_act_for(Permission::Checkpoint, "orders")
            && !service.may_act_for(Permission::Checkpoint, "payments")
    );
    let admin = credentials.authenticate("admin-token-0000001").unwrap();
    assert!(admin.may(Permission::AdminPurge) && !admin.may(Permission::Messages));
    assert!(credentials.authenticate("nope").is_none());
}

#[test]
fn bad_files_are_refused_naming_the_field() {
    for (text, expected) in [
        ("credentials: [{name: a, role: root, tokens: [x]}]", "role"),
        ("credentials: [{name: a, role: proxy, services: [o], tokens: []}]", "`tokens` or `identities`"),
        ("credentials: [{name: a, role: proxy, services: [o], identities: [\" x\"]}]", "identities[0]"),
        ("credentials: [{name: a, role: service, tokens: [aaaaaaaaaaaaaaaaaa]}]", "`services`"),
        ("credentials: [{name: a, role: proxy, services: [o], tokens: [short]}]", "shorter than 16"),
        ("credentials: [{name: a, role: proxy, services: [o], tokens: [aaaaaaaaaaaaaaaaaa]}, {name: a, role: admin, tokens: [bbbbbbbbbbbbbbbbbbbb]}]", "unique"),
        ("credentials: [{name: a, role: proxy, services: [o], tokens: [aaaaaaaaaaaaaaaaaa], extra: 1}]", "extra"),
        ("credentials: [{name: a, role: proxy, tokens: [aaaaaaaaaaaaaaaaaa]}]", "a `proxy` credential needs `services`"),
        ("credentials: [{name: a, role: proxy, services: [\"*\", o], tokens: [aaaaaaaaaaaaaaaaaa]}]", "stands alone"),
        ("credentials: [{name: a, role: service, services: [\"*\"], tokens: [aaaaaaaaaaaaaaaaaa]}]", "must name its services"),
        ("credentials: [{name: a, role: admin, services: [o], tokens: [aaaaaaaaaaaaaaaaaa]}]", "does not apply to role `admin`"),
    ] {
        let error = Credentials::from_yaml(text).unwrap_err().to_string();
        assert!(error.contains(expected), "{text}: {error}");
    }
}

#[test]
fn an_identity_holds_the_grants_of_every_credential_that_lists_it() {
    let credentials = Credentials::from_yaml(
        r#"
credentials:
  - {name: orders-proxies, role: proxy, services: [orders], identities: ["spiffe://c/ns/shop/sa/orders"]}
  - {name: orders-service, role: service, services: [orders], identities: ["spiffe://c/ns/shop/sa/orders"]}
  - {name: payments-proxies, role: proxy, services: [payments], identities: ["spiffe://c/ns/pay/sa/payments", "payments.pay"]}
"#,
    )
    .unwrap();
    let orders = credentials
        .authenticate_identity(&["spiffe://c/ns/shop/sa/orders".into()])
        .unwrap();
    assert_eq!(orders.name, "orders-proxies+orders-service");
    assert!(orders.may_act_for(Permission::ProxyCalls, "orders"));
    assert!(orders.may_act_for(Permission::Messages, "orders"));
    assert!(!orders.may_act_for(Permission::ProxyCalls, "payments"));
    assert!(!orders.may(Permission::AdminRead));
    let by_dns = credentials
        .authenticate_identity(&["spiffe://unknown".into(), "payments.pay".into()])
        .unwrap();
    assert_eq!(by_dns.name, "payments-proxies");
    assert!(credentials
        .authenticate_identity(&["spiffe://c/ns/shop/sa/other".into()])
        .is_none());
    assert!(
        credentials.authenticate("spiffe://c/ns/shop/sa/orders").is_none(),
        "an identity is not a token"
    );
}

#[test]
fn the_token_shortcut_holds_every_role() {
    let credentials = Credentials::all_roles("dev-token");
    let principal = credentials.authenticate("dev-token").unwrap();
    assert!(principal.may(Permission::ProxyCalls) && principal.may(Permission::AdminPurge));
    assert!(principal.may_act_for(Permission::ProxyCalls, "anything"));
}

#[test]
fn reload_replaces_the_tokens_and_a_broken_file_keeps_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credentials.yaml");
    std::fs::write(&path, FILE).unwrap();
    let authenticator = Authenticator::new(Some(path.clone()), None).unwrap();
    assert!(authenticator.authenticate("proxy-token-0000001").is_some());
    std::fs::write(
        &path,
        "credentials: [{name: mesh-proxies, role: proxy, services: [orders], tokens: [proxy-token-0000002]}]",
    )
    .unwrap();
    authenticator.reload().unwrap();
    assert!(
        authenticator.authenticate("proxy-token-0000001").is_none(),
        "rotated out"
    );
    assert!(authenticator.authenticate("proxy-token-0000002").is_some());
    std::fs::write(&path, "credentials: [{").unwrap();
    assert!(authenticator.reload().is_err());
    assert!(
        authenticator.authenticate("proxy-token-0000002").is_some(),
        "old ones stay"
    );
}
