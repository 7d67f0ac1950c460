//! Writing files so that a reader never sees half of one: every plan, summary and
//! metrics log the project writes goes through [`write_atomic`].

use crate::Error;
use std::path::Path;

/// Writes through a temporary file in the same folder, then renames it over `path`: a
/// rename within one file system is atomic, so a crash leaves the old file or the new
/// one, never a half-written plan. A failure is bad input naming `path` (the folder is
/// missing or not writable).
pub fn write_atomic(path: &Path, text: &str) -> Result<(), Error> {
    let name = path.display().to_string();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default()
    ));
    let cannot = |e: std::io::Error| Error::bad(&name, format!("cannot write: {e}"));
    std::fs::write(&tmp, text).map_err(cannot)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        std::fs::remove_file(&tmp).ok();
        cannot(e)
    })
}

#[cfg(test)]
mod tests {
    use super::write_atomic;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("vramplan-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plan.toml");
        write_atomic(&path, "old").unwrap();
        write_atomic(&path, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("plan.toml")]);
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
}
