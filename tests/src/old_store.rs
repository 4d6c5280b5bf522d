//! A front for the store that behaves like a store from before `/v1/batch`: it answers that
//! path with 404 and passes every other call on (HTTP/2 from Envoy, HTTP/1.1 to the store).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// Start the front on a free port; its port and task (abort it to stop).
pub async fn front(store_port: u16) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new()
        .fallback(forward)
        .with_state((reqwest::Client::new(), store_port));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, task)
}

async fn forward(
    State((client, store_port)): State<(reqwest::Client, u16)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path() == idempotency_wire::paths::BATCH {
        return (StatusCode::NOT_FOUND, "no such route").into_response();
    }
    let mut request = client.request(
        reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap(),
        format!(
            "http://127.0.0.1:{store_port}{}",
            uri.path_and_query().map_or("/", |p| p.as_str())
        ),
    );
    for name in ["authorization", "content-type"] {
        if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) {
            request = request.header(name, value);
        }
    }
    match request.body(body).send().await {
        Ok(answer) => {
            let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
            let bytes = answer.bytes().await.unwrap_or_default();
            (status, [("content-type", "application/json")], bytes).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
