//! Minimal HTTP client of the store API.

use std::time::Duration;

use idempotency_wire::{paths, CheckpointRequest, ClaimRequest, ClaimResponse, MessageDoneRequest};
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
