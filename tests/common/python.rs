//! Throwaway Python virtualenvs with the official clients and emulators
//! the tests drive, pinned so that a new release on PyPI cannot change
//! what a test sees between two runs. Raise a pin on purpose, and run the
//! suite when you do.

use std::path::{Path, PathBuf};
use std::process::Command;

/// PostHog's Python client.
pub const POSTHOG: &str = "posthog==7.91.1";
/// Segment's Python client.
pub const SEGMENT: &str = "segment-analytics-python==2.4.0";
/// The S3 emulator, with its server.
pub const MOTO: &str = "moto[server]==5.2.6";

/// Makes a virtualenv in `dir` with `packages` installed; its `bin`
/// folder.
pub fn venv(dir: &Path, packages: &[&str]) -> PathBuf {
    let venv = dir.join("venv");
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "python3 -m venv failed");
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pip install {} failed: {}",
        packages.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    venv.join("bin")
}
