//! The start-up check of the store route: once configured, the root context sends one
//! `GET /healthz` to `store_cluster` and logs an error naming the fix when the cluster is missing
//! or leads somewhere other than the store's API (the replay listener, another service).
//! It only logs: a store that is down at start-up is an outage, handled per request.

/// Path of the probe.
pub const PROBE_PATH: &str = "/healthz";
/// `x-idempotency-store` value of the store's API listener.
pub const API_LISTENER: &str = "api";

/// What the probe found, as a log line; `None` when the store's API answered.
pub fn dispatch_failed(cluster: &str, status: &str) -> String {
    format!(
        "idempotency: cannot call store_cluster {cluster:?} ({status}): it is not a cluster of this Envoy; add it (the store's API port, HTTP/2) or correct store_cluster"
    )
}

/// The verdict on the probe's reply: its status (`None`: no reply) and the
/// `x-idempotency-store` header it carried.
pub fn reply_problem(cluster: &str, status: Option<u16>, answered_by: Option<&str>) -> Option<String> {
    match (status, answered_by) {
        (_, Some(API_LISTENER)) => None,
        (_, Some(other)) => Some(format!(
            "idempotency: store_cluster {cluster:?} leads to the store's {other:?} listener, not its API: point it at the store's --listen port (the replay route alone uses --replay-listen)"
        )),
        (None, None) => Some(format!(
            "idempotency: the store behind store_cluster {cluster:?} did not answer its start-up check; requests fail per failure_mode until it does"
        )),
        (Some(status), None) => Some(format!(
            "idempotency: store_cluster {cluster:?} answered {status} without the store's mark: it does not lead to the idempotency store's API; correct the cluster's endpoints"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_stores_api_passes_and_every_other_answer_names_the_fix() {
        assert_eq!(reply_problem("store", Some(200), Some("api")), None);
        assert_eq!(
            reply_problem("store", Some(503), Some("api")),
            None,
            "not ready is an outage, not a mistake"
        );
        assert!(reply_problem("store", Some(404), Some("replay"))
            .unwrap_or_default()
            .contains("--listen"));
        assert!(reply_problem("store", Some(200), None)
            .unwrap_or_default()
            .contains("endpoints"));
        assert!(reply_problem("store", None, None)
            .unwrap_or_default()
            .contains("did not answer"));
        assert!(dispatch_failed("stor", "BadArgument").contains("not a cluster"));
    }
}
