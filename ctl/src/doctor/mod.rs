//! `idempotencyctl doctor`: whether an Envoy setup (and its store) keeps the guarantee — every
//! rule it depends on, checked, each finding with where, what a client meets, and the fix.
//!
//! Exit codes: 0 nothing found, 1 warnings only, 2 errors (and 4 when the configuration itself
//! cannot be read).

mod envoy;
mod rules;
mod store;

use std::path::PathBuf;

use serde_json::json;

pub use envoy::Source;
use rules::{Finding, Severity};

/// What to check.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// An Envoy bootstrap, Istio EnvoyFilter file, or saved /config_dump (YAML or JSON).
    #[arg(long, conflicts_with = "envoy_admin", required_unless_present = "envoy_admin")]
    pub envoy_config: Option<PathBuf>,
    /// A running Envoy's admin address: reads /config_dump (what Istio actually pushed).
    #[arg(long)]
    pub envoy_admin: Option<String>,
    /// Also check this store (its API address); an admin token (--token) lets it read /v1/info.
    #[arg(long)]
    pub store: Option<String>,
}

/// Why doctor could not run.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DoctorError(#[from] envoy::ReadError);

/// Run the checks; print the report (a table, or JSON); the exit code.
pub async fn run(args: &DoctorArgs, token: Option<&str>, as_json: bool) -> Result<u8, DoctorError> {
    let source = match (&args.envoy_config, &args.envoy_admin) {
        (Some(path), _) => Source::File(path.clone()),
        (None, Some(url)) => Source::Admin(url.clone()),
        (None, None) => Source::Admin("http://127.0.0.1:9901".into()),
    };
    let setup = envoy::read(&source).await?;
    let mut findings = rules::check(&setup);
    let store_facts = match &args.store {
        Some(base) => Some(store::check(base, token, &mut findings).await),
        None => None,
    };
    let errors = findings.iter().filter(|f| f.severity == Severity::Error).count();
    let warnings = findings.len() - errors;
    if as_json {
        let report = json!({
            "source": format!("{source:?}"),
            "errors": errors,
            "warnings": warnings,
            "findings": findings,
            "store": store_facts,
        });
        println!("{report}");
    } else {
        print_table(&findings);
        if let Some(facts) = &store_facts {
            print_store(facts);
        }
        println!("{errors} error(s), {warnings} warning(s)");
    }
    Ok(if errors > 0 {
        2
    } else if warnings > 0 {
        1
    } else {
        0
    })
}

fn print_table(findings: &[Finding]) {
    if findings.is_empty() {
        println!("every check passed");
        return;
    }
    for finding in findings {
        let severity = match finding.severity {
            Severity::Error => "ERROR",
            Severity::Warning => "WARN ",
        };
        println!("{severity} [{}] {}", finding.rule, finding.location);
        println!("      {}", finding.problem);
        println!("      fix:");
        for line in finding.fix.lines() {
            println!("        {line}");
        }
    }
}

fn print_store(facts: &store::StoreFacts) {
    if let Some(info) = &facts.info {
        let credentials: Vec<&str> = info["credentials"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str)
            .collect();
        println!(
            "store: version {}, backend {}, durable commits {}, replay listener {}, credentials [{}]",
            info["version"].as_str().unwrap_or("?"),
            info["backend"].as_str().unwrap_or("?"),
            if info["durable_commits_healthy"] == true {
                "healthy"
            } else {
                "FAILING"
            },
            info["replay_listen"].as_str().unwrap_or("none"),
            credentials.join(", ")
        );
    }
    if let Some(skew) = facts.clock_skew_ms {
        println!("store clock: {skew:+} ms from this machine's");
    }
}
