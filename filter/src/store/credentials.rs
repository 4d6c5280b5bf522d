//! The store token each call presents: the newest one configured in this VM for the same store
//! cluster and service, so a credential rotation loses no write.
//!
//! A rotation pushes a new plugin configuration (new `store_token`); Envoy creates a new root
//! context for it in the same VM, while connections of the old configuration drain — their
//! streams and the old root context's retried writes still belong to the old configuration. Were
//! they to present the old token after the store dropped it, an acquire would be refused (503)
//! and a `complete` would fail until the lock expired (re-execution). Every configuration
//! publishes its token when it is configured; every call presents the newest for its
//! (`store_cluster`, `service_name`). A VM is single-threaded, so the registry is thread-local.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::config::Config;

thread_local! {
    /// Store cluster → service → the newest token (two levels, so a call looks up by `&str`,
    /// allocating nothing).
    static NEWEST: RefCell<HashMap<String, HashMap<String, Rc<Token>>>> = RefCell::new(HashMap::new());
}

/// A published token: the `Authorization` value, built once.
#[derive(Debug, PartialEq, Eq)]
pub struct Token {
    /// `Bearer <token>`, or `None` for a configuration without a token (mesh identity).
    pub authorization: Option<String>,
}

/// `config` was just configured: its token is the newest for its store cluster and service.
pub fn publish(config: &Config) {
    let token = Rc::new(Token {
        authorization: config.store.token.as_ref().map(|t| format!("Bearer {t}")),
    });
    NEWEST.with(|newest| {
        newest
            .borrow_mut()
            .entry(config.store.cluster.clone())
            .or_default()
            .insert(config.service_name.clone(), token);
    });
}

/// The token a call made under `config` presents: the newest published for its store cluster
/// and service (its own, unless a newer configuration replaced it).
pub fn current(config: &Config) -> Rc<Token> {
    NEWEST
        .with(|newest| {
            newest
                .borrow()
                .get(config.store.cluster.as_str())
                .and_then(|services| services.get(config.service_name.as_str()))
                .cloned()
        })
        .unwrap_or_else(|| {
            Rc::new(Token {
                authorization: config.store.token.as_ref().map(|t| format!("Bearer {t}")),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(service: &str, token: &str) -> Config {
        crate::mock::succeeded(Config::parse(
            format!(r#"{{"service_name":"{service}","store_token":"{token}"}}"#).as_bytes(),
        ))
    }

    #[test]
    fn calls_of_an_old_configuration_present_the_newest_token_of_their_service() {
        let old = config("orders", "old-token");
        publish(&old);
        assert_eq!(current(&old).authorization.as_deref(), Some("Bearer old-token"));
        let new = config("orders", "new-token");
        publish(&new);
        assert_eq!(current(&old).authorization.as_deref(), Some("Bearer new-token"));
        assert_eq!(current(&new).authorization.as_deref(), Some("Bearer new-token"));
        let other = config("payments", "payments-token");
        assert_eq!(
            current(&other).authorization.as_deref(),
            Some("Bearer payments-token"),
            "another service keeps its own, even unpublished"
        );
    }
}
