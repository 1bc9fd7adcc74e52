//! Noticing that the config changed, however it was changed.
//!
//! Editors replace a file by renaming a new one over it, `kubectl` updates a mounted `ConfigMap` by
//! swapping the `..data` symlink in its directory, and scripts write in place. All of these are
//! events in the directory that holds the config, so the watch is on that directory (the config
//! directory itself when the config is a directory) and any event there counts: the agent then
//! re-reads the config, and a re-read that finds nothing new changes no map.

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use inotify::{Inotify, WatchMask};
use tokio::io::unix::AsyncFd;

/// Events keep coming while a file is written or a `ConfigMap` swapped: wait for this much quiet
/// before reading, so the read sees the finished change.
const QUIET: Duration = Duration::from_millis(100);
/// ...but never wait longer than this after the first event, even if events keep coming.
const MAX_DELAY: Duration = Duration::from_secs(1);

pub struct ConfigWatcher {
    inotify: AsyncFd<Inotify>,
    directory: PathBuf,
    buffer: Vec<u8>,
}

impl ConfigWatcher {
    /// Watches the directory of `config` (or `config` itself if it is a directory).
    pub fn new(config: &Path) -> io::Result<Self> {
        let directory = if config.is_dir() {
            config.to_owned()
        } else {
            match config.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
                _ => PathBuf::from("."),
            }
        };
        let inotify = Inotify::init()?;
        inotify.watches().add(
            &directory,
            WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::ATTRIB,
        )?;
        // SAFETY: `Inotify` owns its descriptor, returns the same one from every `as_raw_fd`
        // and closes it only when dropped, which the `AsyncFd` does.
        let inotify =
            unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }?;
        Ok(ConfigWatcher {
            inotify,
            directory,
            buffer: vec![0; 4096],
        })
    }

    /// The directory watched.
    #[must_use]
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Waits for a change and returns when it was first seen, once the directory has been quiet
    /// for a moment. The time is where the reload latency is measured from.
    pub async fn changed(&mut self) -> io::Result<Instant> {
        self.next_events().await?;
        let first = Instant::now();
        loop {
            let Some(left) = MAX_DELAY.checked_sub(first.elapsed()) else {
                return Ok(first);
            };
            let quiet = QUIET.min(left);
            match tokio::time::timeout(quiet, self.next_events()).await {
                Err(_elapsed) => return Ok(first),
                Ok(result) => result?,
            }
        }
    }

    /// Waits until at least one event was read (and drops what was read: only "something
    /// changed" matters).
    async fn next_events(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.inotify.readable_mut().await?;
            let buffer = &mut self.buffer;
            match ready.try_io(|inotify| inotify.get_mut().read_events(buffer).map(Iterator::count))
            {
                // Nothing read, or not readable after all (the readiness is cleared).
                Ok(Ok(0)) | Err(_) => {}
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(error)) => return Err(error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-watch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    async fn expect_change(watcher: &mut ConfigWatcher, what: &str) {
        tokio::time::timeout(Duration::from_secs(3), watcher.changed())
            .await
            .unwrap_or_else(|_| panic!("{what}: no change seen"))
            .expect("reading events");
    }

    async fn expect_quiet(watcher: &mut ConfigWatcher, what: &str) {
        assert!(
            tokio::time::timeout(Duration::from_millis(300), watcher.changed())
                .await
                .is_err(),
            "{what}: a change was reported"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sees_writes_renames_and_configmap_symlink_swaps() {
        let dir = scratch("file");
        let config = dir.join("config.yaml");
        std::fs::write(&config, "a: 1\n").expect("write");
        let mut watcher = ConfigWatcher::new(&config).expect("watch");
        assert_eq!(watcher.directory(), dir);
        expect_quiet(&mut watcher, "nothing written").await;

        std::fs::write(&config, "a: 2\n").expect("write");
        expect_change(&mut watcher, "written in place").await;

        let new = dir.join(".config.yaml.tmp");
        std::fs::write(&new, "a: 3\n").expect("write");
        std::fs::rename(&new, &config).expect("rename");
        expect_change(&mut watcher, "renamed over").await;

        // A ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> a timestamped dir
        // that is replaced by renaming a new ..data_tmp symlink over ..data.
        std::fs::remove_file(&config).expect("remove");
        for (version, text) in [("v1", "a: 4\n"), ("v2", "a: 5\n")] {
            std::fs::create_dir(dir.join(version)).expect("version dir");
            std::fs::write(dir.join(version).join("config.yaml"), text).expect("write");
        }
        std::os::unix::fs::symlink("v1", dir.join("..data")).expect("symlink");
        std::os::unix::fs::symlink("..data/config.yaml", &config).expect("symlink");
        expect_change(&mut watcher, "ConfigMap created").await;
        std::os::unix::fs::symlink("v2", dir.join("..data_tmp")).expect("symlink");
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap");
        expect_change(&mut watcher, "ConfigMap swapped").await;
        assert_eq!(std::fs::read_to_string(&config).expect("read"), "a: 5\n");
        expect_quiet(&mut watcher, "after the swap").await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_of_events_is_one_change() {
        let dir = scratch("burst");
        let mut watcher = ConfigWatcher::new(&dir).expect("watch");
        for i in 0..20 {
            std::fs::write(dir.join(format!("{i}.yaml")), "x\n").expect("write");
        }
        expect_change(&mut watcher, "burst").await;
        expect_quiet(&mut watcher, "after the burst").await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
