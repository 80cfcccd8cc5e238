//! Writing quickstart's files as one transaction: files are created with `O_EXCL` (an existing
//! file is never overwritten), an edited file is replaced atomically, and everything is undone
//! (created files and directories removed in reverse order, edited files restored) unless the
//! caller commits.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

enum Step {
    File(PathBuf),
    Dir(PathBuf),
    Replaced { path: PathBuf, original: Vec<u8> },
}

/// What has been written so far; undone on drop unless [`Transaction::commit`] was called.
#[derive(Default)]
pub struct Transaction {
    steps: Vec<Step>,
    committed: bool,
}

impl Transaction {
    pub fn new() -> Transaction {
        Transaction::default()
    }

    /// Creates `dir` and its missing parents (mode 0755), remembering each one created.
    pub fn create_dirs(&mut self, dir: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut cur = Some(dir);
        while let Some(d) = cur {
            if d.as_os_str().is_empty() || d.exists() {
                break;
            }
            missing.push(d.to_path_buf());
            cur = d.parent();
        }
        for d in missing.into_iter().rev() {
            std::fs::DirBuilder::new().mode(0o755).create(&d).with_context(|| format!("creating {}", d.display()))?;
            self.steps.push(Step::Dir(d));
        }
        if !dir.is_dir() {
            anyhow::bail!("{} exists and is not a directory", dir.display());
        }
        Ok(())
    }

    /// Creates a new file with `mode`; fails, writing nothing, when the path exists.
    pub fn create_file(&mut self, path: &Path, contents: &[u8], mode: u32) -> Result<()> {
        if let Some(parent) = path.parent() {
            self.create_dirs(parent)?;
        }
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).with_context(
            || match path.symlink_metadata() {
                Ok(_) => format!("{} exists: quickstart never overwrites a file", path.display()),
                Err(_) => format!("creating {}", path.display()),
            },
        )?;
        self.steps.push(Step::File(path.to_path_buf()));
        file.write_all(contents).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", path.display()))
    }

    /// Replaces the contents of an existing file through a temporary file and a rename (keeping
    /// its mode), remembering the original contents.
    pub fn replace_file(&mut self, path: &Path, contents: &[u8]) -> Result<()> {
        let original = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        replace(path, contents)?;
        self.steps.push(Step::Replaced { path: path.to_path_buf(), original });
        Ok(())
    }

    /// Keeps everything written.
    pub fn commit(mut self) {
        self.committed = true;
    }

    /// Undoes every step, newest first; what cannot be undone is reported on stderr.
    fn rollback(&mut self) {
        for step in self.steps.drain(..).rev() {
            let result = match &step {
                Step::File(p) => std::fs::remove_file(p).map_err(|e| (p.clone(), e)),
                Step::Dir(p) => std::fs::remove_dir(p).map_err(|e| (p.clone(), e)),
                Step::Replaced { path, original } => {
                    replace(path, original).map_err(|e| (path.clone(), std::io::Error::other(format!("{e:#}"))))
                }
            };
            if let Err((p, e)) = result {
                eprintln!("postern quickstart: could not undo {}: {e}", p.display());
            }
        }
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if !self.committed {
            self.rollback();
        }
    }
}

fn replace(path: &Path, contents: &[u8]) -> Result<()> {
    let mode = std::fs::metadata(path).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.quickstart-{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode.unwrap_or(0o600)).open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolls_back_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let edited = dir.path().join("edited");
        std::fs::write(&edited, "before").unwrap();
        {
            let mut t = Transaction::new();
            t.create_file(&dir.path().join("a/b/new"), b"x", 0o600).unwrap();
            t.replace_file(&edited, b"after").unwrap();
            assert_eq!(std::fs::read_to_string(&edited).unwrap(), "after");
            let err = t.create_file(&edited, b"y", 0o600).unwrap_err();
            assert!(format!("{err:#}").contains("never overwrites"), "{err:#}");
        }
        assert!(!dir.path().join("a").exists());
        assert_eq!(std::fs::read_to_string(&edited).unwrap(), "before");
        let mut t = Transaction::new();
        t.create_file(&dir.path().join("kept"), b"x", 0o600).unwrap();
        t.commit();
        assert!(dir.path().join("kept").exists());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
