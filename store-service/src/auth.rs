//! Who may call what: bearer tokens mapped to credentials with roles — `proxy` (the mesh's
//! filters), `service` (bound to service names: phase checkpoints and message dedup), `admin`
//! (record lookup, purge, listing) — loaded from a YAML file and reloaded without a restart.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time against every known
//! digest (no early exit), so neither timing nor a memory dump of the store gives them away.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

/// A role a credential holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The idempotency filters: acquire, complete, release, outcome-unknown, abandon.
    Proxy,
    /// A service: checkpoints and message deduplication, for its own service names only.
    Service,
    /// Operators: look up, list and purge records.
    Admin,
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// acquire, complete, release, outcome-unknown, abandon.
    ProxyCalls,
    /// Record a phase checkpoint.
    Checkpoint,
    /// Claim, complete and release messages.
    Messages,
    /// Read or list records.
    AdminRead,
    /// Purge records.
    AdminPurge,
}

impl Permission {
    /// The name used in 403 answers and audit lines.
    pub fn name(self) -> &'static str {
        match self {
            Permission::ProxyCalls => "proxy",
            Permission::Checkpoint => "checkpoint",
            Permission::Messages => "messages",
            Permission::AdminRead => "admin:read",
            Permission::AdminPurge => "admin:purge",
        }
    }

    fn granted_by(self, role: Role) -> bool {
        matches!(
            (self, role),
            (Permission::ProxyCalls, Role::Proxy)
                | (Permission::Checkpoint | Permission::Messages, Role::Service)
                | (Permission::AdminRead | Permission::AdminPurge, Role::Admin)
        )
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Credential name (logged; the token never is).
    pub name: String,
    /// Roles held.
    pub roles: BTreeSet<Role>,
    /// Services a `service` credential may act for; `None`: any.
    pub services: Option<BTreeSet<String>>,
}

impl Principal {
    /// Everything (`--token`, or no authentication at all).
    pub fn all_roles(name: &str) -> Principal {
        Principal {
            name: name.to_owned(),
            roles: [Role::Proxy, Role::Service, Role::Admin].into(),
            services: None,
        }
    }

    /// True when some role grants `permission`.
    pub fn may(&self, permission: Permission) -> bool {
        self.roles.iter().any(|role| permission.granted_by(*role))
    }

    /// True when this caller may act for `service` (service-bound calls).
    pub fn may_act_for(&self, service: &str) -> bool {
        self.services.as_ref().is_none_or(|s| s.contains(service))
    }
}

/// Why a credentials file was refused.
#[derive(Debug, Error)]
pub enum CredentialsError {
    /// It could not be read.
    #[error("cannot read credentials file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// It is not valid YAML of the expected shape (the message names the field).
    #[error("invalid credentials file: {0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    credentials: Vec<RawCredential>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    name: String,
    role: Role,
    #[serde(default)]
    services: Vec<String>,
    tokens: Vec<String>,
}

/// Shortest token accepted from a credentials file.
pub const MIN_TOKEN_LENGTH: usize = 16;

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A set of credentials: token digests and who they belong to.
#[derive(Debug, Default)]
pub struct Credentials {
    entries: Vec<([u8; 32], Arc<Principal>)>,
}

impl Credentials {
    /// One token with every role (`--token`).
    pub fn all_roles(token: &str) -> Credentials {
        Credentials {
            entries: vec![(digest(token), Arc::new(Principal::all_roles("--token")))],
        }
    }

    /// Parse a credentials file's text.
    pub fn from_yaml(text: &str) -> Result<Credentials, CredentialsError> {
        let raw: RawFile =
            serde_yaml::from_str(text).map_err(|e| CredentialsError::Invalid(e.to_string()))?;
        let mut names = BTreeSet::new();
        let mut seen_tokens = BTreeSet::new();
        let mut entries = Vec::new();
        for (i, credential) in raw.credentials.into_iter().enumerate() {
            let at = format!("credentials[{i}] ({:?})", credential.name);
            if credential.name.trim().is_empty() || !names.insert(credential.name.clone()) {
                return Err(CredentialsError::Invalid(format!(
                    "{at}: `name` must be set and unique"
                )));
            }
            if credential.tokens.is_empty() {
                return Err(CredentialsError::Invalid(format!(
                    "{at}: `tokens` must list at least one token"
                )));
            }
            let services = match (credential.role, credential.services.is_empty()) {
                (Role::Service, true) => {
                    return Err(CredentialsError::Invalid(format!(
                        "{at}: a `service` credential needs `services` (the service names it may act for)"
                    )))
                }
                (Role::Service, false) => Some(credential.services.into_iter().collect()),
                (_, true) => None,
                (_, false) => {
                    return Err(CredentialsError::Invalid(format!(
                        "{at}: `services` only applies to role `service`"
                    )))
                }
            };
            let principal = Arc::new(Principal {
                name: credential.name,
                roles: [credential.role].into(),
                services,
            });
            for (t, token) in credential.tokens.iter().enumerate() {
                if token.len() < MIN_TOKEN_LENGTH {
                    return Err(CredentialsError::Invalid(format!(
                        "{at}: tokens[{t}] is shorter than {MIN_TOKEN_LENGTH} characters"
                    )));
                }
                let hash = digest(token);
                if !seen_tokens.insert(hash) {
                    return Err(CredentialsError::Invalid(format!(
                        "{at}: tokens[{t}] is used twice"
                    )));
                }
                entries.push((hash, principal.clone()));
            }
        }
        Ok(Credentials { entries })
    }

    /// Read and parse a credentials file.
    pub fn from_file(path: &Path) -> Result<Credentials, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|error| CredentialsError::Read {
            path: path.to_owned(),
            error,
        })?;
        Credentials::from_yaml(&text)
    }

    /// Add every credential of `other`.
    pub fn merge(mut self, other: Credentials) -> Credentials {
        self.entries.extend(other.entries);
        self
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.entries.len()
    }

    /// Who presented `token`, if anyone. Compares against every digest in constant time.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Principal>> {
        let presented = digest(token);
        let mut found = None;
        for (hash, principal) in &self.entries {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(principal.clone());
            }
        }
        found
    }
}

/// The credentials in force, reloadable from their file.
#[derive(Debug)]
pub struct Authenticator {
    current: RwLock<Arc<Credentials>>,
    file: Option<PathBuf>,
    shortcut: Option<String>,
}

impl Authenticator {
    /// Credentials from `file` (if any) plus the all-roles `shortcut` token (if any).
    pub fn new(file: Option<PathBuf>, shortcut: Option<String>) -> Result<Authenticator, CredentialsError> {
        let authenticator = Authenticator {
            current: RwLock::new(Arc::new(Credentials::default())),
            file,
            shortcut,
        };
        authenticator.reload()?;
        Ok(authenticator)
    }

    /// Read the file again; on error keep the credentials in force.
    pub fn reload(&self) -> Result<usize, CredentialsError> {
        let mut credentials = match &self.file {
            Some(path) => Credentials::from_file(path)?,
            None => Credentials::default(),
        };
        if let Some(token) = &self.shortcut {
            credentials = credentials.merge(Credentials::all_roles(token));
        }
        let tokens = credentials.tokens();
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(credentials);
        }
        Ok(tokens)
    }

    /// Who presented `token`.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Principal>> {
        self.current.read().ok()?.authenticate(token)
    }

    /// The credentials file, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

/// Reload the credentials file on SIGHUP and whenever it changes (checked every `poll`), until
/// the process ends. A file that fails to parse is logged and the old credentials stay.
pub async fn watch(authenticator: Arc<Authenticator>, poll: Duration) {
    let Some(path) = authenticator.file().map(Path::to_owned) else {
        return;
    };
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut last: Option<SystemTime> = modified(&path);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let signalled = match hangup.as_mut() {
            Some(signal) => tokio::select! {
                _ = signal.recv() => true,
                () = tokio::time::sleep(poll) => false,
            },
            None => {
                tokio::time::sleep(poll).await;
                false
            }
        };
        #[cfg(not(unix))]
        let signalled = {
            tokio::time::sleep(poll).await;
            false
        };
        let now = modified(&path);
        if !signalled && now == last {
            continue;
        }
        last = now;
        match authenticator.reload() {
            Ok(tokens) => tracing::info!(file = %path.display(), tokens, "credentials reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "credentials not reloaded; the previous ones stay in force")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
credentials:
  - {name: mesh-proxies, role: proxy, tokens: ["proxy-token-0000001", "proxy-token-0000002"]}
  - {name: orders-service, role: service, services: [orders], tokens: ["orders-token-000001"]}
  - {name: oncall, role: admin, tokens: ["admin-token-0000001"]}
"#;

    #[test]
    fn tokens_map_to_their_credential_and_roles() {
        let credentials = Credentials::from_yaml(FILE).unwrap();
        let proxy = credentials.authenticate("proxy-token-0000002").unwrap();
        assert_eq!(proxy.name, "mesh-proxies");
        assert!(proxy.may(Permission::ProxyCalls) && !proxy.may(Permission::AdminRead));
        let service = credentials.authenticate("orders-token-000001").unwrap();
        assert!(service.may(Permission::Checkpoint) && !service.may(Permission::ProxyCalls));
        assert!(service.may_act_for("orders") && !service.may_act_for("payments"));
        let admin = credentials.authenticate("admin-token-0000001").unwrap();
        assert!(admin.may(Permission::AdminPurge) && !admin.may(Permission::Messages));
        assert!(credentials.authenticate("nope").is_none());
    }

    #[test]
    fn bad_files_are_refused_naming_the_field() {
        for (text, expected) in [
            ("credentials: [{name: a, role: root, tokens: [x]}]", "role"),
            ("credentials: [{name: a, role: proxy, tokens: []}]", "`tokens`"),
            ("credentials: [{name: a, role: service, tokens: [aaaaaaaaaaaaaaaaaa]}]", "`services`"),
            ("credentials: [{name: a, role: proxy, tokens: [short]}]", "shorter than 16"),
            ("credentials: [{name: a, role: proxy, tokens: [aaaaaaaaaaaaaaaaaa]}, {name: a, role: admin, tokens: [bbbbbbbbbbbbbbbbbbbb]}]", "unique"),
            ("credentials: [{name: a, role: proxy, tokens: [aaaaaaaaaaaaaaaaaa], extra: 1}]", "extra"),
        ] {
            let error = Credentials::from_yaml(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn the_token_shortcut_holds_every_role() {
        let credentials = Credentials::all_roles("dev-token");
        let principal = credentials.authenticate("dev-token").unwrap();
        assert!(principal.may(Permission::ProxyCalls) && principal.may(Permission::AdminPurge));
        assert!(principal.may_act_for("anything"));
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
            "credentials: [{name: mesh-proxies, role: proxy, tokens: [proxy-token-0000002]}]",
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
}
