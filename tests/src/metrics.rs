//! Reading Prometheus text from Envoy and the store.

#[allow(clippy::wildcard_imports)] // the harness's shared imports and items
use crate::*;
use std::time::{Duration, Instant};

/// Poll a Prometheus endpoint until the series `name` sums to at least `expected` (shadow
/// outcomes are recorded after the response, from the root context), or 5 s pass. Returns the
/// last exposition text.
pub async fn wait_for_metric(client: &reqwest::Client, url: &str, name: &str, expected: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = client.get(url).send().await.unwrap().text().await.unwrap();
        if metric_sum(&text, name) >= expected || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET `url` and return the body as text.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}
