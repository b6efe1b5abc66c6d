//! Atomic file replacement, the one way Tally puts a file in place: write a
//! temporary file, fsync it, rename it over the target, fsync the
//! directory. A reader (or a restart after a crash) sees the old file or
//! the new one, never a part of either.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` via `<path>.tmp`, atomically.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    rename_into_place(&tmp, path)
}

/// Moves the finished, fsynced file `tmp` to `path` and makes the rename
/// itself durable (an fsync of the directory).
pub fn rename_into_place(tmp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(tmp, path)?;
    // A bare file name's parent is "", which is the current directory.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(dir)
}

/// fsync of a directory, so that renames and removals inside it survive a
/// power cut.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
