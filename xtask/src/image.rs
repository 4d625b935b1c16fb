//! `cargo xtask image`: lb's container image, built without a registry or a base image.
//!
//! The image holds a single file, a statically linked (musl) `lb`, so it needs no base image:
//! this writes the OCI image layout (the format podman, skopeo and `docker load` read) directly,
//! as a directory and as an `oci-archive` tarball. The Dockerfile stays for users with a registry.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{cargo, run, setup};

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// lb's version; the workspace shares one version, so xtask's is lb's.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const BINARY_IN_IMAGE: &str = "/usr/local/bin/lb";

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// Builds the image into `out_dir`: `lb-VERSION.oci/` (OCI layout) and `lb-VERSION.oci.tar`
/// (the same as an oci-archive).
pub fn image(out_dir: &Path) -> Result<()> {
    // lb embeds the eBPF programs, built with nightly and bpf-linker.
    setup::setup()?;
    ensure_rust_target(MUSL_TARGET)?;
    // ring's C and assembly are compiled with musl-gcc for the musl target.
    setup::ensure_debian_packages(&[("musl-gcc", "musl-tools")])?;
    if nix::unistd::geteuid().is_root() {
        // To load and run the image here (the image test does); building it does not need podman.
        setup::ensure_debian_packages(&[("podman", "podman")])?;
    }

    let binary_path = build_static_lb()?;
    let binary = std::fs::read(&binary_path).with_context(|| format!("reading {}", binary_path.display()))?;
    if needs_dynamic_loader(&binary).with_context(|| format!("reading {} as ELF", binary_path.display()))? {
        bail!("{} is dynamically linked: it would not run in an image without a base", binary_path.display());
    }

    let files = oci_layout(&binary)?;
    let name = format!("lb-{VERSION}.oci");
    let layout_dir = out_dir.join(&name);
    let archive_path = out_dir.join(format!("{name}.tar"));
    write_layout_dir(&layout_dir, &files)?;
    let archive = tar_archive(files.iter().map(|(path, bytes)| (path.as_str(), bytes.as_slice(), 0o644)))?;
    std::fs::write(&archive_path, archive).with_context(|| format!("writing {}", archive_path.display()))?;

    eprintln!("xtask: lb {VERSION} image (a static lb, no base image):");
    eprintln!("  {}  oci-archive: `podman load -i` it (as localhost/lb:{VERSION})", archive_path.display());
    eprintln!("  {}/  the same as an OCI image layout directory", layout_dir.display());
    Ok(())
}

fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("listing rustup's installed targets")?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|line| line == target) {
        return Ok(());
    }
    eprintln!("xtask: adding the {target} target (lb's static binary for the image)");
    run(Command::new("rustup").args(["target", "add", target]))
}

/// `cargo build --release` for the musl target; returns where cargo put `lb`.
fn build_static_lb() -> Result<PathBuf> {
    let mut cmd = cargo(&[
        "build",
        "--release",
        "--target",
        MUSL_TARGET,
        "--package",
        "lb-userspace",
        "--bin",
        "lb",
        // Diagnostics still go to the terminal; stdout carries the artifacts' paths.
        "--message-format=json-render-diagnostics",
    ]);
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("cargo build's stdout")?;
    let mut executable = None;
    for line in BufReader::new(stdout).lines() {
        let message: Value = serde_json::from_str(&line?).context("parsing cargo's JSON messages")?;
        if message["reason"] == "compiler-artifact" && message["target"]["name"] == "lb" {
            executable = message["executable"].as_str().map(PathBuf::from).or(executable);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    executable.with_context(|| format!("{cmd:?} reported no `lb` executable"))
}

/// True if the ELF executable has a PT_INTERP header, i.e. needs ld.so and shared libraries.
fn needs_dynamic_loader(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let bytes = |at: usize, len: usize| {
        at.checked_add(len).and_then(|end| elf.get(at..end)).context("truncated ELF file")
    };
    // Magic, 64-bit class, little-endian: the only layout the offsets below are for.
    if bytes(0, 6)? != b"\x7fELF\x02\x01" {
        bail!("not a 64-bit little-endian ELF file");
    }
    let u16_at = |at| -> Result<usize> { Ok(u16::from_le_bytes(bytes(at, 2)?.try_into()?).into()) };
    let program_headers = usize::try_from(u64::from_le_bytes(bytes(0x20, 8)?.try_into()?))?;
    let (header_size, header_count) = (u16_at(0x36)?, u16_at(0x38)?);
    for index in 0..header_count {
        let at = index.checked_mul(header_size).and_then(|offset| offset.checked_add(program_headers));
        let p_type =
            u32::from_le_bytes(bytes(at.context("ELF program header offset overflows")?, 4)?.try_into()?);
        if p_type == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A content-addressed file of the layout, named by its sha256.
struct Blob {
    media_type: &'static str,
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(media_type: &'static str, bytes: Vec<u8>) -> Self {
        let hex: String = Sha256::digest(&bytes).iter().map(|byte| format!("{byte:02x}")).collect();
        Blob { media_type, digest: format!("sha256:{hex}"), bytes }
    }

    fn json(media_type: &'static str, value: &Value) -> Result<Self> {
        Ok(Self::new(media_type, serde_json::to_vec(value)?))
    }

    fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len() })
    }

    fn path(&self) -> String {
        format!("blobs/{}", self.digest.replace(':', "/"))
    }
}

/// The files of an OCI image layout holding one image: `lb` as its only layer.
fn oci_layout(binary: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let binary_path = BINARY_IN_IMAGE.trim_start_matches('/');
    let layer = Blob::new(LAYER_MEDIA_TYPE, tar_archive([(binary_path, binary, 0o755)])?);
    let labels = json!({
        "org.opencontainers.image.title": "lb",
        "org.opencontainers.image.description": "lb: a kube-proxy replacement whose data plane is eBPF",
        "org.opencontainers.image.version": VERSION,
        "org.opencontainers.image.licenses": env!("CARGO_PKG_LICENSE"),
    });
    let config = Blob::json(
        CONFIG_MEDIA_TYPE,
        &json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": [BINARY_IN_IMAGE],
                "Cmd": ["run", "--help"],
                "Env": ["PATH=/usr/local/bin"],
                "Labels": labels,
            },
            // The layer is not compressed, so its digest is also its diff ID.
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
            "history": [{ "created_by": "cargo xtask image" }],
        }),
    )?;
    let manifest = Blob::json(
        MANIFEST_MEDIA_TYPE,
        &json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(),
            "layers": [layer.descriptor()],
            "annotations": labels,
        }),
    )?;
    let mut manifest_descriptor = manifest.descriptor();
    // The name loaders give the image: podman loads it as localhost/lb:VERSION, the name
    // deploy/daemonset.yaml runs. ref.name is the OCI spec's (a tag), the other containerd's.
    manifest_descriptor["annotations"] = json!({
        "org.opencontainers.image.ref.name": VERSION,
        "io.containerd.image.name": format!("lb:{VERSION}"),
    });
    let index =
        json!({ "schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [manifest_descriptor] });

    let mut files = vec![
        ("oci-layout".to_string(), serde_json::to_vec(&json!({ "imageLayoutVersion": "1.0.0" }))?),
        ("index.json".to_string(), serde_json::to_vec(&index)?),
    ];
    files.extend([layer, config, manifest].into_iter().map(|blob| (blob.path(), blob.bytes)));
    Ok(files)
}

fn write_layout_dir(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    // Blobs of an earlier build would linger in blobs/sha256 otherwise.
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing the old {}", dir.display()))?;
    }
    for (path, bytes) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A tar of `files` (relative path, contents, mode) and their parent directories, owned by root
/// and dated 0, so that the same input gives the same bytes and the same digests.
fn tar_archive<'a>(files: impl IntoIterator<Item = (&'a str, &'a [u8], u32)>) -> Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    let mut directories_written = Vec::new();
    for (path, bytes, mode) in files {
        let parents: Vec<&Path> =
            Path::new(path).ancestors().skip(1).filter(|dir| *dir != Path::new("")).collect();
        for dir in parents.into_iter().rev() {
            if !directories_written.contains(&dir) {
                append(&mut archive, dir, tar::EntryType::Directory, 0o755, &[])?;
                directories_written.push(dir);
            }
        }
        append(&mut archive, Path::new(path), tar::EntryType::Regular, mode, bytes)?;
    }
    archive.into_inner().context("finishing the tar archive")
}

fn append(
    archive: &mut tar::Builder<Vec<u8>>,
    path: &Path,
    kind: tar::EntryType,
    mode: u32,
    bytes: &[u8],
) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(bytes.len().try_into()?);
    archive
        .append_data(&mut header, path, bytes)
        .with_context(|| format!("adding {} to a tar", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_names_every_blob_by_its_digest() {
        let files = oci_layout(b"\x7fELF not really").unwrap();
        let paths: Vec<&str> = files.iter().map(|(path, _)| path.as_str()).collect();
        assert_eq!(paths[..2], ["oci-layout", "index.json"]);
        for (path, bytes) in &files[2..] {
            assert_eq!(*path, Blob::new(LAYER_MEDIA_TYPE, bytes.clone()).path());
        }
    }

    #[test]
    fn the_layer_is_reproducible() {
        assert_eq!(oci_layout(b"lb").unwrap(), oci_layout(b"lb").unwrap());
    }

    #[test]
    fn a_binary_with_an_interpreter_needs_the_dynamic_loader() {
        let host_binary = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries for the gnu host target are dynamically linked.
        assert!(needs_dynamic_loader(&host_binary).unwrap());
        assert!(needs_dynamic_loader(b"#!/bin/sh").is_err());
    }
}
