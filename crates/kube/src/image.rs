//! The supervisor image: one reproducible layer holding the static kiln-supervisor at
//! [`SUPERVISOR_PATH_IN_IMAGE`] and a static busybox at [`BUSYBOX_PATH_IN_IMAGE`] (whose
//! `cp` the pod's install-supervisor init container uses). This module makes the layer and
//! the config; kiln-image writes the OCI layout and pushes.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use kiln_image::{DockerRef, NewLayer, OciImage};
use oci_spec::image::{Arch, ConfigBuilder, ImageConfigurationBuilder, Os, RootFsBuilder};

use crate::render::{BUSYBOX_PATH_IN_IMAGE, SUPERVISOR_PATH_IN_IMAGE};
use crate::KubeError;

/// Largest binary put into the image.
pub const MAX_BINARY_SIZE: u64 = 256 << 20;

/// Where `-o oci:DIR[:TAG]` writes: a directory and the tag recorded in its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciTarget {
    pub dir: PathBuf,
    pub tag: String,
}

impl OciTarget {
    /// Parses `oci:DIR` or `oci:DIR:TAG` (tag `latest` when absent), as skopeo names
    /// layouts; DIR cannot hold a `:`.
    pub fn parse(text: &str) -> Result<Self, KubeError> {
        let invalid = || KubeError::InvalidSetting {
            key: "output".to_owned(),
            value: text.to_owned(),
            accepted: "oci:DIR or oci:DIR:TAG (an OCI image layout directory and optional tag)"
                .to_owned(),
        };
        let rest = text.strip_prefix("oci:").ok_or_else(invalid)?;
        let (dir, tag) = rest.split_once(':').unwrap_or((rest, "latest"));
        if dir.is_empty() || !kiln_image::is_tag(tag) {
            return Err(invalid());
        }
        Ok(Self {
            dir: PathBuf::from(dir),
            tag: tag.to_owned(),
        })
    }
}

/// Parses a `--push` destination `HOST[:PORT]/REPOSITORY[:TAG]` (tag `latest` when
/// absent). It must name its registry (a first component with a `.` or `:`, or
/// `localhost`): a push never guesses a default registry.
pub fn parse_push_target(text: &str) -> Result<DockerRef, KubeError> {
    let invalid = |why: String| KubeError::InvalidSetting {
        key: "--push".to_owned(),
        value: text.to_owned(),
        accepted: format!("HOST[:PORT]/REPOSITORY[:TAG] with an explicit registry host ({why})"),
    };
    let name = text.strip_prefix("docker://").unwrap_or(text);
    let first = name.split_once('/').map_or("", |(first, _)| first);
    if !(first.contains('.') || first.contains(':') || first == "localhost") {
        return Err(invalid("the first component is not a host".to_owned()));
    }
    if name.contains('@') {
        return Err(invalid(
            "a digest cannot be pushed to; give a tag".to_owned(),
        ));
    }
    DockerRef::parse(name).map_err(|e| invalid(e.to_string()))
}

/// Builds the image from the two static binaries. Each must be a statically linked
/// x86_64 ELF executable: the image has no libc or loader for anything else.
pub fn build_supervisor_image(supervisor: &Path, busybox: &Path) -> Result<OciImage, KubeError> {
    let supervisor_bytes = read_static_binary(supervisor)?;
    let busybox_bytes = read_static_binary(busybox)?;

    let layer_tar = layer_tar(&[
        (SUPERVISOR_PATH_IN_IMAGE, &supervisor_bytes),
        (BUSYBOX_PATH_IN_IMAGE, &busybox_bytes),
    ])
    .map_err(|e| KubeError::Image(format!("writing the layer: {e}")))?;
    let diff_id = kiln_image::Digest::sha256_of(&layer_tar).to_string();
    // Header mtime 0 and no file name: the same binaries always give the same digest.
    let mut gzip = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&layer_tar)
        .map_err(|e| KubeError::Image(format!("compressing the layer: {e}")))?;
    let layer = gzip
        .finish()
        .map_err(|e| KubeError::Image(format!("compressing the layer: {e}")))?;

    let spec_err = |e: oci_spec::OciSpecError| KubeError::Image(e.to_string());
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .entrypoint(vec![SUPERVISOR_PATH_IN_IMAGE.to_owned()])
                .env(vec!["PATH=/bin".to_owned()])
                .build()
                .map_err(spec_err)?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()
                .map_err(spec_err)?,
        )
        .build()
        .map_err(spec_err)?;
    let layer = NewLayer {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".to_owned(),
        bytes: layer,
    };
    OciImage::build(&config, vec![layer]).map_err(|e| KubeError::Image(e.to_string()))
}

/// A tar of `files` (absolute paths in the image) with their parent directories, owned
/// by root, mode 0755, mtime 0, in path order.
fn layer_tar(files: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut entries: Vec<(String, Option<&[u8]>)> = Vec::new();
    for (path, bytes) in files {
        let relative = path.trim_start_matches('/');
        let mut prefix = String::new();
        for component in relative
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, dirs)| dirs)
        {
            prefix.push_str(component);
            prefix.push('/');
            if !entries.iter().any(|(p, _)| *p == prefix) {
                entries.push((prefix.clone(), None));
            }
        }
        entries.push((relative.to_owned(), Some(bytes)));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_mode(0o755);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        match bytes {
            Some(bytes) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(bytes.len() as u64);
                builder.append_data(&mut header, &path, bytes)?;
            }
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder.append_data(&mut header, &path, std::io::empty())?;
            }
        }
    }
    builder.into_inner()
}

/// Reads a binary and checks that it is a static x86_64 ELF executable: ELF64
/// little-endian, machine x86-64, type EXEC or DYN (static-pie), and no PT_INTERP
/// program header (no dynamic loader needed).
fn read_static_binary(path: &Path) -> Result<Vec<u8>, KubeError> {
    let bytes = crate::read_bounded(path, MAX_BINARY_SIZE)?;
    check_static_elf(&bytes).map_err(|reason| KubeError::ImageInput {
        path: path.display().to_string(),
        message: format!("{reason}; expected a statically linked x86_64 Linux executable"),
    })?;
    Ok(bytes)
}

fn check_static_elf(bytes: &[u8]) -> Result<(), String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".to_owned());
    }
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".to_owned());
    }
    match u16_at(16) {
        Some(2 | 3) => {}
        _ => return Err("not an executable (ELF type is neither EXEC nor DYN)".to_owned()),
    }
    if u16_at(18) != Some(62) {
        return Err("not built for x86-64".to_owned());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return Err("truncated ELF header".to_owned());
    };
    for index in 0..usize::from(phnum) {
        let at = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(index * usize::from(phentsize)));
        match at.and_then(u32_at) {
            Some(PT_INTERP) => {
                return Err("dynamically linked (it names a program interpreter)".to_owned())
            }
            Some(_) => {}
            None => return Err("truncated program headers".to_owned()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_targets() {
        assert_eq!(
            OciTarget::parse("oci:/tmp/x").unwrap(),
            OciTarget {
                dir: "/tmp/x".into(),
                tag: "latest".into()
            }
        );
        assert_eq!(
            OciTarget::parse("oci:out:v1.2").unwrap(),
            OciTarget {
                dir: "out".into(),
                tag: "v1.2".into()
            }
        );
        for bad in ["/tmp/x", "oci:", "oci:x:", "oci:x:-bad", "docker://x"] {
            assert!(OciTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn push_targets() {
        let t = parse_push_target("127.0.0.1:5000/kiln/kiln-supervisor:0.1").unwrap();
        assert_eq!(t.to_string(), "127.0.0.1:5000/kiln/kiln-supervisor:0.1");
        assert_eq!(
            parse_push_target("docker://registry.example/sup")
                .unwrap()
                .tag
                .as_deref(),
            Some("latest")
        );
        for bad in [
            "kiln-supervisor:1",
            "library/x",
            "r.example/X",
            "r.example/x@sha256:00",
            "r.example/",
            "r.example/x:",
        ] {
            assert!(parse_push_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn elf_checks() {
        assert!(check_static_elf(b"#!/bin/sh\n")
            .unwrap_err()
            .contains("not an ELF"));
        // This test binary is dynamically linked (the default for the gnu target).
        let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(check_static_elf(&own)
            .unwrap_err()
            .contains("dynamically linked"));
        assert!(check_static_elf(&own[..40])
            .unwrap_err()
            .contains("truncated"));
        let busybox = Path::new("/bin/busybox");
        if busybox.is_file() {
            // Debian's busybox-static.
            check_static_elf(&std::fs::read(busybox).unwrap()).unwrap();
        }
    }

    #[test]
    fn layer_tar_lists_parents_first_and_is_reproducible() {
        let tar = layer_tar(&[("/kiln-supervisor", b"a"), ("/bin/busybox", b"bb")]).unwrap();
        assert_eq!(
            tar,
            layer_tar(&[("/kiln-supervisor", b"a"), ("/bin/busybox", b"bb")]).unwrap()
        );
        let mut archive = tar::Archive::new(&tar[..]);
        let paths: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(paths, ["bin/", "bin/busybox", "kiln-supervisor"]);
    }
}
