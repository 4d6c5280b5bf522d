//! Files the store re-reads without a restart (credentials, replay secrets): on SIGHUP and
//! whenever their modification time changes. A file that fails to load is logged and what was
//! in force stays.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Call `reload` on SIGHUP and whenever `path` changes (checked every `poll`), until the process
/// ends. `reload` answers what it loaded (for the log) or why it refused the file.
pub async fn watch_file<F>(path: PathBuf, poll: Duration, what: &'static str, reload: F)
where
    F: Fn() -> Result<String, String> + Send + 'static,
{
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
        match reload() {
            Ok(loaded) => tracing::info!(file = %path.display(), loaded, "{what} reloaded"),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "{what} not reloaded; the previous ones stay in force")
            }
        }
    }
}
