//! The SDK generates its bindings from a copy of the WIT inside the crate,
//! so the published crate builds on its own. The repository's `wit/` folder
//! stays the canonical one (the host and the docs read it), and this test
//! fails when the copy drifts from it.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

#[test]
fn every_vendored_wit_version_is_a_copy_of_the_canonical_one() {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR"));
    let vendored = sdk.join("wit");
    let canonical = sdk.join("../wit");
    let versions = entries(&vendored);
    assert!(!versions.is_empty(), "plugin-sdk/wit/ holds no WIT version");

    let mut problems = Vec::new();
    for version in &versions {
        let ours = files(&vendored.join(version));
        let theirs = files(&canonical.join(version));
        for file in ours.union(&theirs) {
            let path = version.join(file);
            let shown = path.display();
            match (ours.contains(file), theirs.contains(file)) {
                (true, false) => problems.push(format!("plugin-sdk/wit/{shown} is not in wit/")),
                (false, true) => problems.push(format!("plugin-sdk/wit/{shown} is missing")),
                _ => {
                    if read(&vendored.join(&path)) != read(&canonical.join(&path)) {
                        problems.push(format!("plugin-sdk/wit/{shown} differs from wit/{shown}"));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the SDK's WIT is not a copy of the canonical wit/ folder; copy it again with `cp -r wit/<version> plugin-sdk/wit/`:\n{}",
        problems.join("\n")
    );
}

/// The names in a folder.
fn entries(dir: &Path) -> BTreeSet<PathBuf> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| PathBuf::from(entry.expect("a readable entry").file_name()))
            .collect(),
        Err(err) => panic!("cannot read {}: {err}", dir.display()),
    }
}

/// Every file below `dir`, as a path relative to it; none if `dir` is
/// missing, so a version absent on one side shows as missing files.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    if dir.is_dir() {
        for name in entries(dir) {
            let path = dir.join(&name);
            if path.is_dir() {
                found.extend(files(&path).into_iter().map(|file| name.join(file)));
            } else {
                found.insert(name);
            }
        }
    }
    found
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}
