//! Writing files so that a reader never sees half of one: every plan, summary, metrics
//! log and checkpoint file the project writes goes through [`write_atomic`] (or, for the
//! files of a checkpoint's temporary folder, [`write_synced`]).

use crate::Error;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Writes through a temporary file in the same folder, flushed to the disk, then renames
/// it over `path` and flushes the folder: a rename within one file system is atomic, so a
/// crash or a full disk leaves the old file or the new one, never half of one, and no
/// temporary. A failure names `path`: bad input when the folder is missing or not
/// writable, an I/O error (exit 1) when the disk is full.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), Error> {
    write_atomic_with(path, |w| w.write_all(text.as_bytes()))
}

/// [`write_atomic`] for content streamed into a writer by `fill`.
pub fn write_atomic_with<T>(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<T>,
) -> Result<T, Error> {
    let tmp = temporary(path);
    let value = write_synced(&tmp, fill).map_err(|e| renamed(e, path))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        std::fs::remove_file(&tmp).ok();
        Error::io(path, e)
    })?;
    sync_dir(folder(path)).map_err(|e| Error::io(path, e))?;
    Ok(value)
}

/// Creates `path`, fills it through a buffer and flushes it to the disk (`fsync`). On
/// failure the partial file is removed and the error names `path`.
pub fn write_synced<T>(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<T>,
) -> Result<T, Error> {
    let result = (|| {
        let mut w = BufWriter::new(File::create(path)?);
        let value = fill(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(value)
    })();
    result.map_err(|e| {
        std::fs::remove_file(path).ok();
        Error::io(path, e)
    })
}

/// Flushes a folder's entries (a rename or a new file in it) to the disk. Where folders
/// cannot be opened as files (Windows) there is nothing to do.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match File::open(dir) {
        Ok(f) => f.sync_all().or_else(|e| {
            // Some file systems refuse fsync on a folder; the rename is done either way.
            if e.kind() == std::io::ErrorKind::InvalidInput {
                Ok(())
            } else {
                Err(e)
            }
        }),
        Err(_) if cfg!(windows) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The folder `path` is in (`.` for a bare file name).
pub fn folder(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `DIR/.NAME.tmp` beside `DIR/NAME`.
fn temporary(path: &Path) -> PathBuf {
    folder(path).join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default()
    ))
}

/// An error on the temporary file, said of the file it stands for.
fn renamed(e: Error, path: &Path) -> Error {
    let name = path.display().to_string();
    match e {
        Error::Io { error, .. } => Error::Io { path: name, error },
        Error::BadInput { what, .. } => Error::BadInput { file: name, what },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::{write_atomic, write_atomic_with};
    use std::io::{Error as IoError, ErrorKind};

    fn names(dir: &std::path::Path) -> Vec<std::ffi::OsString> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("vramplan-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plan.toml");
        write_atomic(&path, "old").unwrap();
        write_atomic(&path, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(names(&dir), vec![std::ffi::OsString::from("plan.toml")]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_missing_folder_is_bad_input_naming_the_file() {
        let path = std::env::temp_dir().join("vramplan-no-such-folder/x/plan.toml");
        let e = write_atomic(&path, "x").unwrap_err();
        assert!(matches!(e, crate::Error::BadInput { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with(&path.display().to_string()),
            "{e}"
        );
        assert!(e.to_string().contains("cannot write"), "{e}");
    }

    /// A writer that fails as a full disk does midway (ENOSPC): the error is an I/O
    /// error naming the file, the old file is intact and no temporary is left.
    #[test]
    fn a_full_disk_names_the_file_and_leaves_the_old_one() {
        let dir = std::env::temp_dir().join(format!("vramplan-fsutil-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("summary.json");
        write_atomic(&path, "old").unwrap();
        let e = write_atomic_with(&path, |w| {
            w.write_all(&[b'x'; 100_000])?;
            Err::<(), _>(IoError::from(ErrorKind::StorageFull))
        })
        .unwrap_err();
        match &e {
            crate::Error::Io { path: p, error } => {
                assert_eq!(p, &path.display().to_string());
                assert_eq!(error.kind(), ErrorKind::StorageFull);
            }
            other => panic!("not an I/O error: {other:?}"),
        }
        assert!(
            e.to_string().starts_with(&path.display().to_string()),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(names(&dir), vec![std::ffi::OsString::from("summary.json")]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
