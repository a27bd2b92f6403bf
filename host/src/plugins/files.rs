//! Reading files the host did not write itself: components and manifests from the plugins
//! folder, artefacts and the key from the compile cache.
//!
//! Whoever fills a folder chooses what a name points at: a FIFO, whose `open` waits for a
//! writer; `/dev/zero`, which never ends; a file of gigabytes. So a file is read only if the
//! descriptor the host opened is a regular file (checked with `fstat` on that descriptor, not
//! with a check of the path that a rename could race), and only up to a limit, with the open
//! itself non-blocking so that a FIFO cannot hold it. Symlinks are followed: Kubernetes
//! ConfigMap volumes consist of them.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It could not be opened or read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// It is not a regular file (what it is instead).
    #[error("not a regular file but {0}; only regular files are read")]
    NotRegular(&'static str),
    /// It holds more than the limit; nothing (or only the limit and a byte) was read.
    #[error("{size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Its size, or the limit plus one when it grew while being read.
        size: u64,
        /// The limit.
        limit: u64,
    },
}

impl FileError {
    /// Whether the file is not there at all.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// An opened regular file of at most `limit` bytes.
#[derive(Debug)]
pub struct BoundedFile {
    file: File,
    metadata: Metadata,
    limit: u64,
}

impl BoundedFile {
    /// Opens `path` (following symlinks) if it is a regular file of at most `limit` bytes.
    pub fn open(path: &Path, limit: u64) -> Result<Self, FileError> {
        // A look at the path first, so that a device is never opened at all (opening one can
        // act: a tape rewinds, a serial line hangs up). It can be raced, so the descriptor is
        // checked again below; that check is the one that counts.
        check(&std::fs::metadata(path)?, limit)?;
        let file = OpenOptions::new()
            .read(true)
            // A FIFO would otherwise block the open until a writer comes; a terminal would
            // become the host's controlling one.
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        let metadata = file.metadata()?;
        check(&metadata, limit)?;
        Ok(Self {
            file,
            metadata,
            limit,
        })
    }

    /// The opened file's metadata (owner, mode, size).
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Where the opened file really is, all symlinks resolved, when the system can tell
    /// (Linux, through `/proc`). It names the file that was opened, so a symlink changed
    /// since cannot make it name another.
    pub fn real_path(&self) -> Option<PathBuf> {
        if cfg!(target_os = "linux") {
            use std::os::fd::AsRawFd as _;
            std::fs::read_link(format!("/proc/self/fd/{}", self.file.as_raw_fd())).ok()
        } else {
            None
        }
    }

    /// Reads the whole file; fails if it grew past the limit since it was opened.
    pub fn read(self) -> Result<Vec<u8>, FileError> {
        let expected = usize::try_from(self.metadata.len()).unwrap_or(usize::MAX);
        let mut bytes = Vec::with_capacity(expected);
        self.file
            .take(self.limit.saturating_add(1))
            .read_to_end(&mut bytes)?;
        let read = bytes.len() as u64;
        if read > self.limit {
            return Err(FileError::TooLarge {
                size: read,
                limit: self.limit,
            });
        }
        Ok(bytes)
    }
}

/// Reads `path` if it is a regular file of at most `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    BoundedFile::open(path, limit)?.read()
}

/// The effective user id of this process: the owner files the host may trust must have.
pub fn host_uid() -> u32 {
    // SAFETY: `geteuid` takes no arguments, touches no memory of ours and cannot fail.
    unsafe { libc::geteuid() }
}

fn check(metadata: &Metadata, limit: u64) -> Result<(), FileError> {
    let kind = metadata.file_type();
    if !kind.is_file() {
        return Err(FileError::NotRegular(if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a special file"
        }));
    }
    if metadata.len() > limit {
        return Err(FileError::TooLarge {
            size: metadata.len(),
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Generous: opening a FIFO non-blocking returns at once; a blocking open never would.
    const AT_ONCE: Duration = Duration::from_secs(5);

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
    }

    #[test]
    fn a_regular_file_within_the_limit_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, b"[limits]\n").unwrap();
        assert_eq!(read_bounded(&path, 9).unwrap(), b"[limits]\n");
        let err = read_bounded(&path, 8).unwrap_err();
        assert!(
            matches!(err, FileError::TooLarge { size: 9, limit: 8 }),
            "{err}"
        );
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        mkfifo(&path);
        let started = Instant::now();
        let err = read_bounded(&path, 1024).unwrap_err();
        assert!(matches!(err, FileError::NotRegular("a FIFO")), "{err}");
        assert!(started.elapsed() < AT_ONCE, "took {:?}", started.elapsed());
    }

    #[test]
    fn devices_and_folders_are_refused_through_symlinks_too() {
        let dir = tempfile::tempdir().unwrap();
        let zero = dir.path().join("w.toml");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let err = read_bounded(&zero, 1024).unwrap_err();
        assert!(
            matches!(err, FileError::NotRegular("a character device")),
            "{err}"
        );
        let err = read_bounded(dir.path(), 1024).unwrap_err();
        assert!(matches!(err, FileError::NotRegular("a directory")), "{err}");
        assert!(
            read_bounded(&dir.path().join("absent"), 1)
                .unwrap_err()
                .is_not_found()
        );
    }

    #[test]
    fn the_real_path_is_where_a_symlink_led() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("..data-1");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("p.toml"), b"").unwrap();
        std::os::unix::fs::symlink("..data-1/p.toml", dir.path().join("p.toml")).unwrap();
        let file = BoundedFile::open(&dir.path().join("p.toml"), 10).unwrap();
        if cfg!(target_os = "linux") {
            let expected = std::fs::canonicalize(target.join("p.toml")).unwrap();
            assert_eq!(file.real_path(), Some(expected));
        }
    }
}
