//! HTTP client of the store API: what services (checkpoints, consumers) and operators
//! (`idempotencyctl`: records, stuck locks, metrics, `/v1/info`) call.

use std::time::Duration;

use idempotency_wire::{paths, CheckpointRequest, ClaimRequest, ClaimResponse, MessageDoneRequest, RecordId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ClientError;

/// A client of the store service (`http://idempotency-store:8081` in a mesh).
#[derive(Debug, Clone)]
pub struct StoreClient {
    base_url: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl StoreClient {
    /// Client for the store at `base_url`, presenting `token` as bearer token.
    pub fn new(base_url: impl Into<String>, token: Option<String>) -> Result<StoreClient, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(StoreClient {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    /// Send a request built on this client (its base URL and token): the response of a 2xx,
    /// `ClientError::Status` otherwise.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let body = response.text().await.unwrap_or_default();
            return Err(ClientError::Status { status, body });
        }
        Ok(response)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The base URL this client talks to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Admin: one record (`None` when there is none).
    pub async fn record(&self, id: &RecordId) -> Result<Option<serde_json::Value>, ClientError> {
        let query = [("service", &id.service), ("scope", &id.scope), ("key", &id.key)];
        match self
            .send(self.http.get(self.url(paths::RECORDS)).query(&query))
            .await
        {
            Ok(response) => Ok(Some(response.json().await?)),
            Err(ClientError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Admin: delete one record; false when there was none.
    pub async fn purge(&self, id: &RecordId) -> Result<bool, ClientError> {
        let query = [("service", &id.service), ("scope", &id.scope), ("key", &id.key)];
        match self
            .send(self.http.delete(self.url(paths::RECORDS)).query(&query))
            .await
        {
            Ok(_) => Ok(true),
            Err(ClientError::Status { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Admin: one page of a service's records in progress for at least `older_than_ms`
    /// (`{"records": [...], "next": cursor or null}`).
    pub async fn records_in_progress(
        &self,
        service: &str,
        older_than_ms: u64,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        let mut query = vec![
            ("service", service.to_owned()),
            ("older_than_ms", older_than_ms.to_string()),
            ("limit", limit.to_string()),
        ];
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_owned()));
        }
        let request = self.http.get(self.url(paths::RECORDS_IN_PROGRESS)).query(&query);
        Ok(self.send(request).await?.json().await?)
    }

    /// Admin: what the store says about itself (`/v1/info`).
    pub async fn info(&self) -> Result<serde_json::Value, ClientError> {
        Ok(self
            .send(self.http.get(self.url(paths::INFO)))
            .await?
            .json()
            .await?)
    }

    /// The store's Prometheus metrics, as text.
    pub async fn metrics_text(&self) -> Result<String, ClientError> {
        Ok(self
            .send(self.http.get(self.url("/metrics")))
            .await?
            .text()
            .await?)
    }

    async fn post<B: Serialize, R: DeserializeOwned>(&self, path: &str, body: &B) -> Result<R, ClientError> {
        let mut request = self.http.post(format!("{}{path}", self.base_url)).json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        if status == 409 {
            return Err(ClientError::LostLock);
        }
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            return Err(ClientError::Status { status, body });
        }
        Ok(response.json().await?)
    }

    /// Record a finished phase.
    pub async fn checkpoint(&self, request: &CheckpointRequest) -> Result<(), ClientError> {
        self.post::<_, serde_json::Value>(paths::CHECKPOINT, request)
            .await
            .map(|_| ())
    }

    /// Claim a message before handling it.
    pub async fn claim(&self, request: &ClaimRequest) -> Result<ClaimResponse, ClientError> {
        self.post(paths::MESSAGE_CLAIM, request).await
    }

    /// Mark a claimed message handled.
    pub async fn complete_message(&self, request: &MessageDoneRequest) -> Result<(), ClientError> {
        self.post::<_, serde_json::Value>(paths::MESSAGE_COMPLETE, request)
            .await
            .map(|_| ())
    }

    /// Give a claim back after the handler failed.
    pub async fn release_message(&self, request: &MessageDoneRequest) -> Result<(), ClientError> {
        self.post::<_, serde_json::Value>(paths::MESSAGE_RELEASE, request)
            .await
            .map(|_| ())
    }
}

/// The sum of every series of metric `name` in Prometheus text (all label sets).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series.split('{').next()? == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}
