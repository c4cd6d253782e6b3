//! `sluice plugin build`: compiles plugin crates to `wasm32-unknown-unknown`
//! in one cargo invocation, encodes each core module as a component and
//! embeds its `plugin.toml`.
//!
//! Two toolchains work. The usual one is rustup with the
//! `wasm32-unknown-unknown` target installed. Where rustup cannot download
//! targets (offline machines), Debian's `rustc-web`, `cargo-web`,
//! `rust-web-src` and `lld` packages build the standard library from source
//! with `-Zbuild-std`. Nothing is installed behind the author's back: if
//! neither is there, the error says what to run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::model::manifest::{MANIFEST_SECTION, Manifest};

/// The target every plugin is compiled for.
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Where the offline fallback toolchain lives (Debian packages).
const FALLBACK_RUSTC: &str = "/usr/bin/rustc";
const FALLBACK_CARGO: &str = "/usr/bin/cargo";

/// Which compiler builds the plugins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toolchain {
    /// rustup's toolchain with the wasm target installed.
    Rustup,
    /// Debian's rustc/cargo, building std from source.
    Fallback,
}

/// What to build and where to put it.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Plugin crate directories, each with `Cargo.toml` and `plugin.toml`.
    pub paths: Vec<PathBuf>,
    /// Where `NAME.wasm` goes; by default each plugin's own directory.
    pub out_dir: Option<PathBuf>,
    /// Force a toolchain instead of detecting one.
    pub toolchain: Option<Toolchain>,
}

/// One built plugin.
#[derive(Clone, Debug)]
pub struct Built {
    pub name: String,
    pub version: String,
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: usize,
}

struct Plugin {
    dir: PathBuf,
    manifest: Manifest,
    manifest_text: String,
    package: String,
    lib_name: String,
    workspace_root: PathBuf,
    target_dir: PathBuf,
}

#[derive(Deserialize)]
struct Metadata {
    packages: Vec<Package>,
    workspace_root: PathBuf,
    target_directory: PathBuf,
}

#[derive(Deserialize)]
struct Package {
    name: String,
    version: String,
    manifest_path: PathBuf,
    targets: Vec<Target>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    crate_types: Vec<String>,
}

/// Picks the toolchain: `SLUICE_WASM_TOOLCHAIN=rustup|fallback` if set,
/// else rustup when its wasm target is installed, else the Debian fallback
/// when it is complete, else an error that says what to install.
pub fn detect_toolchain() -> anyhow::Result<Toolchain> {
    match std::env::var("SLUICE_WASM_TOOLCHAIN").as_deref() {
        Ok("rustup") => return Ok(Toolchain::Rustup),
        Ok("fallback") => return Ok(Toolchain::Fallback),
        Ok(other) if !other.is_empty() => {
            bail!("SLUICE_WASM_TOOLCHAIN must be `rustup` or `fallback`, not `{other}`")
        }
        _ => {}
    }
    if rustup_target_installed() {
        return Ok(Toolchain::Rustup);
    }
    let missing = fallback_missing();
    if missing.is_empty() {
        return Ok(Toolchain::Fallback);
    }
    bail!(
        "no Rust toolchain for {WASM_TARGET} found. Install one of:\n  \
         - with rustup and network access: rustup target add {WASM_TARGET}\n  \
         - offline on Debian: apt-get install -y rustc-web cargo-web rust-web-src lld\n\
         (the offline fallback is missing: {})",
        missing.join(", ")
    )
}

fn rustup_target_installed() -> bool {
    let Ok(output) = Command::new("rustc")
        .args(["--print", "target-libdir", "--target", WASM_TARGET])
        .output()
    else {
        return false;
    };
    if !output.status.success() {
        return false;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
    })
}

fn fallback_missing() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !Path::new(FALLBACK_RUSTC).exists() {
        missing.push("/usr/bin/rustc (rustc-web)");
    }
    if !Path::new(FALLBACK_CARGO).exists() {
        missing.push("/usr/bin/cargo (cargo-web)");
    }
    if !Path::new("/usr/lib/rustlib/src/rust/library/std").exists() {
        missing.push("the standard library sources (rust-web-src)");
    }
    if which("wasm-ld").is_none() {
        missing.push("wasm-ld (lld)");
    }
    missing
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

fn load_plugin(dir: &Path) -> anyhow::Result<Plugin> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("failed to find the plugin directory {}", dir.display()))?;
    let manifest_path = dir.join("plugin.toml");
    let manifest_text = std::fs::read_to_string(&manifest_path).with_context(|| {
        format!(
            "failed to read {}: a plugin directory needs a plugin.toml (`sluice plugin new NAME` makes one)",
            manifest_path.display()
        )
    })?;
    let manifest = Manifest::parse(&manifest_text)
        .map_err(|err| anyhow::anyhow!("{} is invalid: {err}", manifest_path.display()))?;

    let cargo_toml = dir.join("Cargo.toml");
    let output = Command::new("cargo")
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(&cargo_toml)
        .output()
        .context("failed to run `cargo metadata`; is cargo on PATH?")?;
    if !output.status.success() {
        bail!(
            "`cargo metadata` failed for {}:\n{}",
            cargo_toml.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let metadata: Metadata =
        serde_json::from_slice(&output.stdout).context("failed to read `cargo metadata` output")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.manifest_path == cargo_toml)
        .with_context(|| format!("no package at {}", cargo_toml.display()))?;
    let lib = package
        .targets
        .iter()
        .find(|t| t.crate_types.iter().any(|c| c == "cdylib"))
        .with_context(|| {
            format!(
                "{} must build a cdylib: add `crate-type = [\"cdylib\"]` under [lib]",
                cargo_toml.display()
            )
        })?;
    if package.version != manifest.version.to_string() {
        eprintln!(
            "warning: {} says version {} but Cargo.toml says {}; the plugin is published as {}",
            manifest_path.display(),
            manifest.version,
            package.version,
            manifest.id()
        );
    }
    Ok(Plugin {
        lib_name: lib.name.replace('-', "_"),
        package: package.name,
        dir,
        manifest,
        manifest_text,
        workspace_root: metadata.workspace_root,
        target_dir: metadata.target_directory,
    })
}

/// Builds the plugins: one cargo invocation per cargo workspace (normally
/// one), then one component per plugin.
pub fn build(options: &BuildOptions) -> anyhow::Result<Vec<Built>> {
    let paths = if options.paths.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        options.paths.clone()
    };
    let plugins = paths
        .iter()
        .map(|p| load_plugin(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let toolchain = match options.toolchain {
        Some(toolchain) => toolchain,
        None => detect_toolchain()?,
    };

    let mut by_workspace: BTreeMap<&Path, Vec<&Plugin>> = BTreeMap::new();
    for plugin in &plugins {
        by_workspace
            .entry(&plugin.workspace_root)
            .or_default()
            .push(plugin);
    }
    let mut built = Vec::new();
    for group in by_workspace.values() {
        let target_dir = group[0].target_dir.join("sluice-wasm");
        compile(toolchain, &group[0].workspace_root, &target_dir, group)?;
        for plugin in group {
            let core_path = target_dir
                .join(WASM_TARGET)
                .join("release")
                .join(format!("{}.wasm", plugin.lib_name));
            let out_dir = options
                .out_dir
                .clone()
                .unwrap_or_else(|| plugin.dir.clone());
            built.push(package(plugin, &core_path, &out_dir)?);
        }
    }
    Ok(built)
}

fn compile(
    toolchain: Toolchain,
    workspace: &Path,
    target_dir: &Path,
    plugins: &[&Plugin],
) -> anyhow::Result<()> {
    let mut command = match toolchain {
        Toolchain::Rustup => Command::new("cargo"),
        Toolchain::Fallback => {
            let mut command = Command::new(FALLBACK_CARGO);
            command
                .env("RUSTC", FALLBACK_RUSTC)
                .env("RUSTC_BOOTSTRAP", "1")
                .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", "wasm-ld")
                .env_remove("RUSTUP_TOOLCHAIN");
            command
        }
    };
    command
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--target",
            WASM_TARGET,
            "--target-dir",
        ])
        .arg(target_dir)
        // A panic in a plugin must become a trap the host reports, not an
        // attempt to unwind through the component boundary.
        .args(["--config", "profile.release.panic=\"abort\""]);
    if toolchain == Toolchain::Fallback {
        command.arg("-Zbuild-std=std,panic_abort");
    }
    for plugin in plugins {
        command.args(["-p", &plugin.package]);
    }
    let status = command.status().with_context(|| {
        format!(
            "failed to start {}",
            if toolchain == Toolchain::Rustup {
                "cargo"
            } else {
                FALLBACK_CARGO
            }
        )
    })?;
    if !status.success() {
        bail!("compiling the plugins failed (cargo's errors are above)");
    }
    Ok(())
}

fn package(plugin: &Plugin, core_path: &Path, out_dir: &Path) -> anyhow::Result<Built> {
    let core = std::fs::read(core_path)
        .with_context(|| format!("failed to read the compiled module {}", core_path.display()))?;
    let component = encode_component(&core, &plugin.manifest_text).with_context(|| {
        format!(
            "failed to turn {} into a component; does the crate call `register_plugin!`?",
            plugin.manifest.id()
        )
    })?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("failed to create {}", out_dir.display()))?;
    let path = out_dir.join(format!("{}.wasm", plugin.manifest.name));
    std::fs::write(&path, &component)
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(Built {
        name: plugin.manifest.name.clone(),
        version: plugin.manifest.version.to_string(),
        path,
        sha256: hex::encode(Sha256::digest(&component)),
        bytes: component.len(),
    })
}

/// Encodes a core module (with the component type that wit-bindgen
/// embedded) as a component, and appends `plugin.toml` as a custom section.
pub fn encode_component(core: &[u8], manifest_text: &str) -> anyhow::Result<Vec<u8>> {
    let mut component = wit_component::ComponentEncoder::default()
        .module(core)?
        .validate(true)
        .encode()?;
    component.push(0); // custom section id
    wasm_encoder::Encode::encode(
        &wasm_encoder::CustomSection {
            name: MANIFEST_SECTION.into(),
            data: manifest_text.as_bytes().into(),
        },
        &mut component,
    );
    Ok(component)
}
