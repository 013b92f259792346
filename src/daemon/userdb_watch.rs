//! Whether `/etc/passwd` or `/etc/group` may have changed since the last
//! look, for the lookup cache: cheap enough to ask at every request.
//!
//! - With inotify (the normal case): a watch on each file (a write in
//!   place, through whatever path) and one on `/etc` (a file replaced by a
//!   rename, as `useradd`, `gpasswd` and `vipw` do). The kernel queues the
//!   event before the changing call returns, so a request that arrives
//!   after a change sees it; asking costs one non-blocking `read` of the
//!   inotify descriptor, where comparing the files costs two `stat`s.
//! - Where that is not possible (no inotify, a file that is a symlink, a
//!   watch lost, an error), every look compares the device, inode, size,
//!   mtime and ctime of both files instead.
//!
//! Never: reads the files' contents, blocks, or decides what a change means
//! (that is [`super::lookups`]).

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// The directory and the files watched.
const DIR: &str = "/etc";
const NAMES: [&str; 2] = ["passwd", "group"];

/// Where the watched files are (a test's own directory in unit tests).
#[derive(Debug, Clone)]
struct Paths {
    dir: PathBuf,
    names: [OsString; 2],
}

impl Paths {
    fn etc() -> Self {
        Self::of(PathBuf::from(DIR), NAMES)
    }

    fn of(dir: PathBuf, names: [&str; 2]) -> Self {
        Self {
            dir,
            names: names.map(OsString::from),
        }
    }

    fn files(&self) -> [PathBuf; 2] {
        self.names.each_ref().map(|n| self.dir.join(n))
    }
}

/// What one look saw; two looks that saw different things mean the files
/// may have changed in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// With inotify: the number of changes seen since the watch began.
    Changes(u64),
    /// Without: the files' identity now.
    Stamps([Option<FileStamp>; 2]),
}

/// The identity of a file at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &std::path::Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

fn stamps(paths: &Paths) -> [Option<FileStamp>; 2] {
    paths.files().map(|p| stamp(&p))
}

/// The watch of the user database files (kept, and asked, under the lookup
/// cache's lock).
#[derive(Debug)]
pub struct UserDbWatch {
    /// `None`: compare the files instead.
    watch: Option<Watch>,
    paths: Paths,
}

#[derive(Debug)]
struct Watch {
    fd: Inotify,
    dir: WatchDescriptor,
    files: [Option<WatchDescriptor>; 2],
    changes: u64,
}

/// What a change to a file is, for its own watch.
fn file_flags() -> AddWatchFlags {
    AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_DONT_FOLLOW
}

/// What a change to the directory's entries is (and its own loss).
fn dir_flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

impl Watch {
    fn start(paths: &Paths) -> Option<Self> {
        let files = paths.files();
        // A symlink's target can change without an event here.
        if files
            .iter()
            .any(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()))
        {
            return None;
        }
        let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        let dir = fd.add_watch(&paths.dir, dir_flags()).ok()?;
        let files = files.map(|p| fd.add_watch(&p, file_flags()).ok());
        Some(Self {
            fd,
            dir,
            files,
            changes: 0,
        })
    }

    /// Reads every queued event; `Err` when the watch can no longer be
    /// trusted (the directory's watch is gone, or reading failed).
    fn drain(&mut self, paths: &Paths) -> Result<(), ()> {
        loop {
            let events = match self.fd.read_events() {
                Ok(events) => events,
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(_) => return Err(()),
            };
            for e in events {
                if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    self.changes += 1;
                } else if e.wd == self.dir {
                    if e.mask.intersects(
                        AddWatchFlags::IN_IGNORED
                            | AddWatchFlags::IN_DELETE_SELF
                            | AddWatchFlags::IN_MOVE_SELF
                            | AddWatchFlags::IN_UNMOUNT,
                    ) {
                        return Err(());
                    }
                    let Some(name) = e.name.as_deref() else {
                        continue;
                    };
                    if let Some(i) = paths.names.iter().position(|n| n.as_os_str() == name) {
                        self.changes += 1;
                        // A file replaced by a rename is a new inode: watch
                        // that one now (the old watch ends by itself).
                        let wd = self.fd.add_watch(&paths.dir.join(name), file_flags()).ok();
                        if let Some(slot) = self.files.get_mut(i) {
                            *slot = wd;
                        }
                    }
                } else if self.files.contains(&Some(e.wd))
                    && !e.mask.contains(AddWatchFlags::IN_IGNORED)
                {
                    self.changes += 1;
                }
            }
        }
    }
}

impl UserDbWatch {
    /// Watches with inotify if it can, else compares the files at each look.
    pub fn new() -> Self {
        Self::at(Paths::etc())
    }

    fn at(paths: Paths) -> Self {
        Self {
            watch: Watch::start(&paths),
            paths,
        }
    }

    /// Whether this watch uses inotify (rather than two `stat`s per look).
    pub fn uses_inotify(&self) -> bool {
        self.watch.is_some()
    }

    /// What the files look like now (see [`Seen`]).
    pub fn seen(&mut self) -> Seen {
        if let Some(watch) = self.watch.as_mut() {
            match watch.drain(&self.paths) {
                Ok(()) => return Seen::Changes(watch.changes),
                // From now on, compare the files at each look.
                Err(()) => self.watch = None,
            }
        }
        Seen::Stamps(stamps(&self.paths))
    }
}

impl Default for UserDbWatch {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A directory of its own with `passwd` and `group` in it.
    /// Appends `line` to the file at `path`, writing in place.
    fn append(path: &std::path::Path, line: &[u8]) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(line).unwrap();
    }

    fn dir(name: &str) -> (PathBuf, UserDbWatch) {
        let dir = std::env::temp_dir().join(format!("kh-watch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for n in NAMES {
            std::fs::write(dir.join(n), "root:x:0:\n").unwrap();
        }
        let w = UserDbWatch::at(Paths::of(dir.clone(), NAMES));
        assert!(w.uses_inotify());
        (dir, w)
    }

    #[test]
    fn two_looks_with_nothing_changed_in_between_see_the_same() {
        let mut w = UserDbWatch::new();
        assert_eq!(w.seen(), w.seen());
        let (dir, mut w) = dir("same");
        std::fs::write(dir.join("shadow"), "other files do not count").unwrap();
        assert_eq!(w.seen(), w.seen());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_write_in_place_is_seen_by_the_next_look() {
        let (dir, mut w) = dir("inplace");
        let before = w.seen();
        append(&dir.join("group"), b"deployers:x:1000:alice\n");
        let after = w.seen();
        assert_ne!(before, after);
        assert_eq!(after, w.seen());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_file_replaced_by_rename_is_seen_and_then_watched_itself() {
        let (dir, mut w) = dir("rename");
        let before = w.seen();
        std::fs::write(dir.join("passwd+"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::rename(dir.join("passwd+"), dir.join("passwd")).unwrap();
        let replaced = w.seen();
        assert_ne!(before, replaced);
        // The new file, written in place through another name (a hard
        // link), is watched too.
        std::fs::hard_link(dir.join("passwd"), dir.join("elsewhere")).unwrap();
        let linked = w.seen();
        append(
            &dir.join("elsewhere"),
            b"alice:x:1000:1000::/home/alice:/bin/sh\n",
        );
        assert_ne!(linked, w.seen());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_lost_watch_falls_back_to_comparing_the_files() {
        let (dir, mut w) = dir("lost");
        let _ = w.seen();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(w.seen(), Seen::Stamps(_)));
        assert!(!w.uses_inotify());
        assert_eq!(w.seen(), w.seen());
    }

    #[test]
    fn a_symlinked_file_is_compared_not_watched() {
        let (dir, _) = dir("symlink");
        std::fs::remove_file(dir.join("group")).unwrap();
        std::os::unix::fs::symlink(dir.join("passwd"), dir.join("group")).unwrap();
        let mut w = UserDbWatch::at(Paths::of(dir.clone(), NAMES));
        assert!(!w.uses_inotify());
        let before = w.seen();
        std::fs::write(dir.join("passwd"), "changed, and longer than before\n").unwrap();
        assert_ne!(before, w.seen());
        let _ = std::fs::remove_dir_all(dir);
    }
}
