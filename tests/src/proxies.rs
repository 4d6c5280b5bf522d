//! TCP proxies between Envoy and the store that delay, or switch to delaying, every byte.

use std::time::Duration;

/// A TCP proxy on a free port to `127.0.0.1:target` that holds every chunk from the client for
/// `delay` before forwarding it: a slow store, injected outside the code under test.
pub async fn delay_proxy(target: u16, delay: Duration) -> (u16, tokio::task::JoinHandle<()>) {
    let (port, task, _) = switchable_delay_proxy(target, delay).await;
    (port, task)
}

/// Like [`delay_proxy`], with the delay changeable while it runs (milliseconds, through the
/// returned handle): a store that is slow, then recovers.
pub async fn switchable_delay_proxy(
    target: u16,
    delay: Duration,
) -> (
    u16,
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
        u64::try_from(delay.as_millis()).unwrap(),
    ));
    let handle = delay_ms.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let delay_ms = delay_ms.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upstream = async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(n) = client_read.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        let delay = Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                        tokio::time::sleep(delay).await;
                        if server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let downstream = async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                };
                tokio::join!(upstream, downstream);
            });
        }
    });
    (port, task, handle)
}
