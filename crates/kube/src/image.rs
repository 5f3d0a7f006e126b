//! The supervisor image: one reproducible layer holding the static kiln-supervisor at
//! [`SUPERVISOR_PATH_IN_IMAGE`] and a static busybox at [`BUSYBOX_PATH_IN_IMAGE`] (whose
//! `cp` the pod's install-supervisor init container uses), written as an OCI image layout.
//!
//! The layout is written here with oci-spec types because kiln-image had no layout writer
//! when this was built; it should move there once it has one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest, Sha256};

use crate::render::{BUSYBOX_PATH_IN_IMAGE, SUPERVISOR_PATH_IN_IMAGE};
use crate::KubeError;

/// Largest binary put into the image.
pub const MAX_BINARY_SIZE: u64 = 256 << 20;

/// A built image: its blobs by digest, and the manifest that ties them together.
#[derive(Debug, Clone)]
pub struct SupervisorImage {
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    pub manifest: Vec<u8>,
    /// Config and layer, in that order: `(digest, bytes)`.
    pub blobs: Vec<(String, Vec<u8>)>,
}

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
            accepted: "oci:DIR or oci:DIR:TAG (an OCI image layout directory and optional tag)".to_owned(),
        };
        let rest = text.strip_prefix("oci:").ok_or_else(invalid)?;
        let (dir, tag) = rest.split_once(':').unwrap_or((rest, "latest"));
        if dir.is_empty() || !is_tag(tag) {
            return Err(invalid());
        }
        Ok(Self { dir: PathBuf::from(dir), tag: tag.to_owned() })
    }
}

/// An OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub(crate) fn is_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    (1..=128).contains(&bytes.len())
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Builds the image from the two static binaries. Each must be a statically linked
/// x86_64 ELF executable: the image has no libc or loader for anything else.
pub fn build_supervisor_image(supervisor: &Path, busybox: &Path) -> Result<SupervisorImage, KubeError> {
    let supervisor_bytes = read_static_binary(supervisor)?;
    let busybox_bytes = read_static_binary(busybox)?;

    let layer_tar =
        layer_tar(&[(SUPERVISOR_PATH_IN_IMAGE, &supervisor_bytes), (BUSYBOX_PATH_IN_IMAGE, &busybox_bytes)])
            .map_err(|e| KubeError::Image(format!("writing the layer: {e}")))?;
    let diff_id = sha256(&layer_tar);
    // Header mtime 0 and no file name: the same binaries always give the same digest.
    let mut gzip = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&layer_tar).map_err(|e| KubeError::Image(format!("compressing the layer: {e}")))?;
    let layer = gzip.finish().map_err(|e| KubeError::Image(format!("compressing the layer: {e}")))?;

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
        .rootfs(RootFsBuilder::default().typ("layers").diff_ids(vec![diff_id]).build().map_err(spec_err)?)
        .build()
        .map_err(spec_err)?;
    let config = config.to_string().map_err(spec_err)?.into_bytes();

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(MediaType::ImageConfig, &config)?)
        .layers(vec![descriptor(MediaType::ImageLayerGzip, &layer)?])
        .build()
        .map_err(spec_err)?;
    let manifest = manifest.to_string().map_err(spec_err)?.into_bytes();
    Ok(SupervisorImage {
        manifest_digest: sha256(&manifest),
        manifest,
        blobs: vec![(sha256(&config), config), (sha256(&layer), layer)],
    })
}

/// Writes `image` as an OCI image layout at `target.dir`, which must not exist yet. The
/// layout is built in a temporary directory beside it and renamed into place, so a
/// failure never leaves a half-written layout.
pub fn write_oci_layout(image: &SupervisorImage, target: &OciTarget) -> Result<(), KubeError> {
    let dir = &target.dir;
    let fail = |message: String| KubeError::OciLayout { path: dir.display().to_string(), message };
    if std::fs::symlink_metadata(dir).is_ok() {
        return Err(fail("already exists; give a new directory".to_owned()));
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dir.file_name().ok_or_else(|| fail("has no final component".to_owned()))?;
    let temp = parent.join(format!(".{}.kiln-tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = write_layout_files(image, &target.tag, &temp).and_then(|()| std::fs::rename(&temp, dir));
    if let Err(err) = result {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(fail(err.to_string()));
    }
    Ok(())
}

fn write_layout_files(image: &SupervisorImage, tag: &str, dir: &Path) -> std::io::Result<()> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let hex = |digest: &str| digest.trim_start_matches("sha256:").to_owned();
    for (digest, bytes) in &image.blobs {
        std::fs::write(blobs.join(hex(digest)), bytes)?;
    }
    std::fs::write(blobs.join(hex(&image.manifest_digest)), &image.manifest)?;
    let to_io = |e: oci_spec::OciSpecError| std::io::Error::other(e.to_string());
    let mut manifest = descriptor(MediaType::ImageManifest, &image.manifest).map_err(std::io::Error::other)?;
    manifest.set_annotations(Some(HashMap::from([("org.opencontainers.image.ref.name".to_owned(), tag.to_owned())])));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest])
        .build()
        .map_err(to_io)?;
    std::fs::write(dir.join("index.json"), index.to_string().map_err(to_io)?)?;
    let layout = OciLayoutBuilder::default().image_layout_version("1.0.0").build().map_err(to_io)?;
    std::fs::write(dir.join("oci-layout"), layout.to_string().map_err(to_io)?)?;
    Ok(())
}

fn descriptor(media_type: MediaType, bytes: &[u8]) -> Result<Descriptor, KubeError> {
    let digest: Sha256Digest = sha256(bytes)
        .trim_start_matches("sha256:")
        .parse()
        .map_err(|e: oci_spec::OciSpecError| KubeError::Image(e.to_string()))?;
    DescriptorBuilder::default()
        .media_type(media_type)
        .size(bytes.len() as u64)
        .digest(digest)
        .build()
        .map_err(|e| KubeError::Image(e.to_string()))
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A tar of `files` (absolute paths in the image) with their parent directories, owned
/// by root, mode 0755, mtime 0, in path order.
fn layer_tar(files: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut entries: Vec<(String, Option<&[u8]>)> = Vec::new();
    for (path, bytes) in files {
        let relative = path.trim_start_matches('/');
        let mut prefix = String::new();
        for component in relative.split('/').collect::<Vec<_>>().split_last().map_or(&[][..], |(_, dirs)| dirs) {
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
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    let u64_at = |at: usize| bytes.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
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
        let at = usize::try_from(phoff).ok().and_then(|o| o.checked_add(index * usize::from(phentsize)));
        match at.and_then(u32_at) {
            Some(PT_INTERP) => return Err("dynamically linked (it names a program interpreter)".to_owned()),
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
        assert_eq!(OciTarget::parse("oci:/tmp/x").unwrap(), OciTarget { dir: "/tmp/x".into(), tag: "latest".into() });
        assert_eq!(OciTarget::parse("oci:out:v1.2").unwrap(), OciTarget { dir: "out".into(), tag: "v1.2".into() });
        for bad in ["/tmp/x", "oci:", "oci:x:", "oci:x:-bad", "docker://x"] {
            assert!(OciTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn elf_checks() {
        assert!(check_static_elf(b"#!/bin/sh\n").unwrap_err().contains("not an ELF"));
        // This test binary is dynamically linked (the default for the gnu target).
        let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(check_static_elf(&own).unwrap_err().contains("dynamically linked"));
        assert!(check_static_elf(&own[..40]).unwrap_err().contains("truncated"));
        let busybox = Path::new("/bin/busybox");
        if busybox.is_file() {
            // Debian's busybox-static.
            check_static_elf(&std::fs::read(busybox).unwrap()).unwrap();
        }
    }

    #[test]
    fn layer_tar_lists_parents_first_and_is_reproducible() {
        let tar = layer_tar(&[("/kiln-supervisor", b"a"), ("/bin/busybox", b"bb")]).unwrap();
        assert_eq!(tar, layer_tar(&[("/kiln-supervisor", b"a"), ("/bin/busybox", b"bb")]).unwrap());
        let mut archive = tar::Archive::new(&tar[..]);
        let paths: Vec<String> =
            archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(paths, ["bin/", "bin/busybox", "kiln-supervisor"]);
    }
}
