//! Compiled components on disk, keyed by the component's sha256 and the
//! engine's compatibility hash, so a restart or a second process skips
//! Cranelift and a host upgrade never loads stale machine code.
//!
//! A compiled component is machine code the server runs without checking
//! it (wasmtime's `deserialize_file` is `unsafe` for that reason), so
//! whoever can write the cache can run code as the server. The cache is
//! used only where no one else can: the directory and each file must be
//! owned by the server's user and writable by no one else, and so must
//! every directory above it (root's may be too, and a sticky one such as
//! `/tmp` may be writable by all). Otherwise the server compiles afresh,
//! says why once, and writes nothing there.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Once;

use wasmtime::Engine;
use wasmtime::component::Component;

pub struct ComponentCache {
    dir: Option<PathBuf>,
    /// The warning about an untrustworthy directory, given once.
    warned: Once,
}

/// `$SLUICE_CACHE_DIR`, else `$XDG_CACHE_HOME/sluice/components`, else
/// `~/.cache/sluice/components`. The server and the test suite share it.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SLUICE_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("sluice").join("components"))
}

impl ComponentCache {
    pub fn new(dir: Option<PathBuf>) -> Self {
        ComponentCache {
            dir,
            warned: Once::new(),
        }
    }

    /// The compiled component for `bytes`, from disk if it is there.
    pub fn component(
        &self,
        engine: &Engine,
        bytes: &[u8],
        sha256: &str,
    ) -> wasmtime::Result<Component> {
        let Some(dir) = &self.dir else {
            return Component::new(engine, bytes);
        };
        if let Err(why) = prepare(dir) {
            self.warned.call_once(|| {
                tracing::warn!(
                    dir = %dir.display(),
                    "not using the compiled-component cache: {why}; compiling every plugin afresh \
                     (make the directory and its parents owned by the server's user and writable \
                     by no one else, e.g. `chmod 700`, or set SLUICE_CACHE_DIR elsewhere)"
                );
            });
            return Component::new(engine, bytes);
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let path = dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()));
        if path.exists() {
            if let Err(why) = private(&path, false) {
                tracing::warn!(path = %path.display(), "discarding a compiled component: {why}");
                let _ = std::fs::remove_file(&path);
                return self.compile(engine, bytes, &path);
            }
            // SAFETY: the file was written by `Component::serialize` of an
            // engine with the same compatibility hash (it is in the name),
            // and it, its directory and every directory above are writable
            // by this user alone (checked just above and in `prepare`).
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(component) => return Ok(component),
                Err(err) => {
                    tracing::warn!(path = %path.display(), "discarding unreadable compiled component: {err:#}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        self.compile(engine, bytes, &path)
    }

    fn compile(&self, engine: &Engine, bytes: &[u8], path: &Path) -> wasmtime::Result<Component> {
        let component = Component::new(engine, bytes)?;
        if let Err(err) = store(path, &component.serialize()?) {
            // The cache only saves time; a read-only disk must not stop a load.
            tracing::warn!(path = %path.display(), "failed to cache compiled component: {err:#}");
        }
        Ok(component)
    }
}

/// Creates `dir` (mode 0700) if it is missing, and checks that it and
/// every directory above it are safe to load machine code from.
fn prepare(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| format!("it could not be created: {err}"))?;
    }
    let dir = dir
        .canonicalize()
        .map_err(|err| format!("it could not be read: {err}"))?;
    private(&dir, true)?;
    for parent in dir.ancestors().skip(1) {
        private(parent, true)?;
    }
    Ok(())
}

/// Whether no user but this one (and root, for directories) can change
/// `path`: owned by us, or a directory owned by root; and writable by no
/// one else, unless it is a sticky directory (where others cannot rename
/// or remove what is ours).
fn private(path: &Path, is_dir: bool) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|err| format!("{} could not be read: {err}", path.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let us = unsafe { libc::geteuid() };
    let owner_ok = meta.uid() == us || (is_dir && meta.uid() == 0);
    if !owner_ok {
        return Err(format!(
            "{} is owned by user {}, not by the server's user {us}",
            path.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode();
    let sticky = is_dir && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(format!(
            "{} is writable by {} (mode {:o})",
            path.display(),
            if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Writes through a temporary file and a rename, so a concurrent reader
/// never sees half a file.
fn store(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache path has a parent");
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("component"),
        uuid::Uuid::new_v4()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut file, bytes)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn engine() -> Engine {
        Engine::default()
    }

    /// The smallest component there is.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    fn cached(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|entries| entries.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_private_directory_is_created_and_used() {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let dir = root.path().join("components");
        let cache = ComponentCache::new(Some(dir.clone()));
        cache.component(&engine(), EMPTY_COMPONENT, "abc").unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let files = cached(&dir);
        assert_eq!(files.len(), 1, "{files:?}");
        let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Loaded from the file the second time.
        cache.component(&engine(), EMPTY_COMPONENT, "abc").unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_not_loaded_from_or_written_to() {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let dir = root.path().join("components");
        ComponentCache::new(Some(dir.clone()))
            .component(&engine(), EMPTY_COMPONENT, "abc")
            .unwrap();
        let planted = cached(&dir).remove(0);
        std::fs::write(&planted, b"not machine code anyone should run").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(prepare(&dir).unwrap_err().contains("writable by everyone"));
        // Compiled afresh; the planted file is neither loaded nor replaced.
        ComponentCache::new(Some(dir.clone()))
            .component(&engine(), EMPTY_COMPONENT, "abc")
            .unwrap();
        assert_eq!(
            std::fs::read(&planted).unwrap(),
            b"not machine code anyone should run"
        );
    }

    #[test]
    fn a_cached_file_others_can_write_is_discarded() {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let dir = root.path().join("components");
        let cache = ComponentCache::new(Some(dir.clone()));
        cache.component(&engine(), EMPTY_COMPONENT, "abc").unwrap();
        let file = cached(&dir).remove(0);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(
            private(&file, false)
                .unwrap_err()
                .contains("writable by everyone")
        );
        cache.component(&engine(), EMPTY_COMPONENT, "abc").unwrap();
        // Replaced by a fresh, private one.
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
