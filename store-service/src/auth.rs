//! Who may call what: bearer tokens or mesh identities (`identity.rs`) mapped to credentials
//! with roles — `proxy` (the mesh's
//! filters) and `service` (phase checkpoints and message dedup), both bound to service names,
//! and `admin` (record lookup, purge, listing) — loaded from a YAML file and reloaded without a
//! restart.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time against every known
//! digest (no early exit), so neither timing nor a memory dump of the store gives them away.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

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

impl Role {
    /// The role's name as the credentials file spells it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Service => "service",
            Role::Admin => "admin",
        }
    }
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

/// One role a caller holds, and the services it may act for in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The role.
    pub role: Role,
    /// Services it may act for; `None`: any (admin, the `--token` shortcut, or a `proxy`
    /// credential that lists `"*"`).
    pub services: Option<BTreeSet<String>>,
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Credential name (logged; the token never is); for an identity listed by several
    /// credentials, their names joined with `+`.
    pub name: String,
    /// What it may do.
    pub grants: Vec<Grant>,
}

impl Principal {
    /// Everything (`--token`, or no authentication at all).
    pub fn all_roles(name: &str) -> Principal {
        Principal {
            name: name.to_owned(),
            grants: [Role::Proxy, Role::Service, Role::Admin]
                .into_iter()
                .map(|role| Grant { role, services: None })
                .collect(),
        }
    }

    /// True when some role grants `permission`.
    pub fn may(&self, permission: Permission) -> bool {
        self.grants.iter().any(|g| permission.granted_by(g.role))
    }

    /// True when a role that grants `permission` may use it for `service` (every call that
    /// names a service).
    pub fn may_act_for(&self, permission: Permission, service: &str) -> bool {
        self.grants
            .iter()
            .any(|g| permission.granted_by(g.role) && g.services.as_ref().is_none_or(|s| s.contains(service)))
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
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    identities: Vec<String>,
}

/// The services a credential of `role` may act for, from its `services` list: required for
/// `proxy` and `service` (a proxy credential may say `["*"]` for every service, explicitly;
/// a `service` credential must name them), refused for `admin`.
fn bound_services(
    at: &str,
    role: Role,
    services: Vec<String>,
) -> Result<Option<BTreeSet<String>>, CredentialsError> {
    let wildcard = services.iter().any(|s| s == ANY_SERVICE);
    match role {
        _ if services.iter().any(|s| s.trim().is_empty()) => Err(CredentialsError::Invalid(format!(
            "{at}: `services` must not contain empty names"
        ))),
        Role::Admin if !services.is_empty() => Err(CredentialsError::Invalid(format!(
            "{at}: `services` does not apply to role `admin` (admins act for every service)"
        ))),
        Role::Admin => Ok(None),
        _ if services.is_empty() => Err(CredentialsError::Invalid(format!(
            "{at}: a `{}` credential needs `services`: the service names it may act for{}",
            role.name(),
            if role == Role::Proxy {
                " (the `service_name` of the filters that use it; `[\"*\"]` for every service, which lets one leaked token lock and complete any service's keys)"
            } else {
                ""
            }
        ))),
        Role::Service if wildcard => Err(CredentialsError::Invalid(format!(
            "{at}: a `service` credential must name its services; `*` is only for `proxy`"
        ))),
        Role::Proxy if wildcard && services.len() > 1 => Err(CredentialsError::Invalid(format!(
            "{at}: `services: [\"*\"]` stands alone"
        ))),
        _ if wildcard => Ok(None),
        _ => Ok(Some(services.into_iter().collect())),
    }
}

/// The `services` entry that lets a `proxy` credential act for every service.
pub const ANY_SERVICE: &str = "*";

/// Shortest token accepted from a credentials file.
pub const MIN_TOKEN_LENGTH: usize = 16;

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A set of credentials: token digests and mesh identities, and who they belong to.
#[derive(Debug, Default)]
pub struct Credentials {
    entries: Vec<([u8; 32], Arc<Principal>)>,
    /// Mesh identities (certificate URI or DNS SANs); one listed by several credentials holds
    /// all their grants (in a mesh a workload's sidecar and the workload share one identity).
    identities: HashMap<String, Arc<Principal>>,
}

impl Credentials {
    /// One token with every role (`--token`).
    pub fn all_roles(token: &str) -> Credentials {
        Credentials {
            entries: vec![(digest(token), Arc::new(Principal::all_roles("--token")))],
            identities: HashMap::new(),
        }
    }

    /// Parse a credentials file's text.
    pub fn from_yaml(text: &str) -> Result<Credentials, CredentialsError> {
        let raw: RawFile =
            serde_yaml::from_str(text).map_err(|e| CredentialsError::Invalid(e.to_string()))?;
        let mut names = BTreeSet::new();
        let mut seen_tokens = BTreeSet::new();
        let mut entries = Vec::new();
        let mut identities: HashMap<String, Principal> = HashMap::new();
        for (i, credential) in raw.credentials.into_iter().enumerate() {
            let at = format!("credentials[{i}] ({:?})", credential.name);
            if credential.name.trim().is_empty() || !names.insert(credential.name.clone()) {
                return Err(CredentialsError::Invalid(format!(
                    "{at}: `name` must be set and unique"
                )));
            }
            if credential.tokens.is_empty() && credential.identities.is_empty() {
                return Err(CredentialsError::Invalid(format!(
                    "{at}: `tokens` or `identities` must list at least one token or mesh identity"
                )));
            }
            let grant = Grant {
                role: credential.role,
                services: bound_services(&at, credential.role, credential.services)?,
            };
            for (n, identity) in credential.identities.iter().enumerate() {
                if identity.trim().is_empty() || identity.trim() != identity {
                    return Err(CredentialsError::Invalid(format!(
                        "{at}: identities[{n}] must be a certificate URI or DNS SAN such as spiffe://cluster.local/ns/shop/sa/orders"
                    )));
                }
                let entry = identities.entry(identity.clone()).or_insert_with(|| Principal {
                    name: String::new(),
                    grants: Vec::new(),
                });
                if !entry.name.is_empty() {
                    entry.name.push('+');
                }
                entry.name.push_str(&credential.name);
                entry.grants.push(grant.clone());
            }
            let principal = Arc::new(Principal {
                name: credential.name,
                grants: vec![grant],
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
        Ok(Credentials {
            entries,
            identities: identities
                .into_iter()
                .map(|(identity, principal)| (identity, Arc::new(principal)))
                .collect(),
        })
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
        self.identities.extend(other.identities);
        self
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.entries.len()
    }

    /// Number of mesh identities.
    pub fn identities(&self) -> usize {
        self.identities.len()
    }

    /// Who the first known of `identities` (a caller's SANs, URI SANs first) is, if any.
    pub fn authenticate_identity(&self, identities: &[String]) -> Option<Arc<Principal>> {
        identities.iter().find_map(|id| self.identities.get(id).cloned())
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

    /// Who the caller with these mesh identities is.
    pub fn authenticate_identity(&self, identities: &[String]) -> Option<Arc<Principal>> {
        self.current.read().ok()?.authenticate_identity(identities)
    }

    /// The names of the credentials in force (never a token), sorted.
    pub fn names(&self) -> Vec<String> {
        let Ok(current) = self.current.read() else {
            return Vec::new();
        };
        let names: BTreeSet<String> = current
            .entries
            .iter()
            .map(|(_, principal)| principal.name.clone())
            .chain(
                current
                    .identities
                    .values()
                    .flat_map(|p| p.name.split('+').map(str::to_owned).collect::<Vec<_>>()),
            )
            .collect();
        names.into_iter().collect()
    }

    /// (tokens, identities) in force, for logs.
    pub fn counts(&self) -> (usize, usize) {
        self.current
            .read()
            .map(|c| (c.tokens(), c.identities()))
            .unwrap_or_default()
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
    crate::reload::watch_file(path, poll, "credentials", move || {
        authenticator
            .reload()
            .map(|tokens| {
                let (_, identities) = authenticator.counts();
                format!("{tokens} tokens, {identities} identities")
            })
            .map_err(|e| e.to_string())
    })
    .await;
}

#[cfg(test)]
mod tests;
