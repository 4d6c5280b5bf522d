//! Files the store re-reads without a restart (credentials, replay secrets): on SIGHUP and
//! whenever they change — modification time, size or inode (a file replaced by rename, as
//! Kubernetes updates a mounted Secret, is a new inode even within the filesystem's timestamp
//! granularity). A file that fails to load is logged and what was in force stays.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What identifies one version of a file: modification time, size and (on unix) inode.
type Version = Option<(SystemTime, u64, u64)>;

fn version(path: &Path) -> Version {
    let metadata = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&metadata);
    #[cfg(not(unix))]
    let inode = 0;
    Some((metadata.modified().ok()?, metadata.len(), inode))
}

/// Call `reload` on SIGHUP and whenever `path` changes (checked every `poll`), until the process
/// ends. `reload` answers what it loaded (for the log) or why it refused the file.
pub async fn watch_file<F>(path: PathBuf, poll: Duration, what: &'static str, reload: F)
where
    F: Fn() -> Result<String, String> + Send + 'static,
{
    let mut last = version(&path);
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
        let now = version(&path);
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
