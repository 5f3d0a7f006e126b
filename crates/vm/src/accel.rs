//! Choosing hardware acceleration (KVM) or software emulation (TCG).
//!
//! `/dev/kvm` opening is not proof that KVM can run our guest: nested setups exist where
//! VM creation works but a stock kernel dies early with "KVM internal error ... emulation
//! failure". So `auto` boots the real guest once under KVM (the probe is the caller's,
//! since only it knows how to boot a guest) and caches the verdict per host boot, keyed by
//! `/proc/sys/kernel/random/boot_id`. A failing KVM ends the probe as soon as QEMU says
//! so: QEMU either exits, or stops the VM in its `internal-error` state, which
//! [`crate::qemu`] answers by quitting QEMU; a deadline only bounds a guest that spins.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::VmError;

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the user asked for with `--accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelRequest {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelRequest {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!(
                "invalid accelerator {other:?}: expected auto, kvm or tcg"
            )),
        }
    }
}

/// The outcome of booting the guest once under KVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The guest reached its init under KVM.
    Booted,
    /// It did not; the text says what happened (e.g. the VMM's "KVM internal error").
    Failed(String),
}

/// The chosen accelerator and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelVerdict {
    pub accel: Accel,
    pub reason: String,
    /// True when the verdict came from this host boot's cache rather than a new probe.
    #[serde(skip)]
    pub cached: bool,
}

/// The device whose usability decides between KVM and TCG.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Resolves `request` to an accelerator.
///
/// `cache_dir` holds one verdict file per host boot; `probe` is called at most once, only
/// for `auto` when `/dev/kvm` opens and no verdict is cached for this boot.
pub fn resolve(
    request: AccelRequest,
    cache_dir: &Path,
    probe: impl FnOnce() -> ProbeOutcome,
) -> Result<AccelVerdict, VmError> {
    resolve_with(
        request,
        cache_dir,
        Path::new(KVM_DEVICE),
        &current_boot_id(),
        probe,
    )
}

fn resolve_with(
    request: AccelRequest,
    cache_dir: &Path,
    kvm_device: &Path,
    boot_id: &str,
    probe: impl FnOnce() -> ProbeOutcome,
) -> Result<AccelVerdict, VmError> {
    let tcg = |reason: String| AccelVerdict {
        accel: Accel::Tcg,
        reason,
        cached: false,
    };
    match request {
        AccelRequest::Tcg => return Ok(tcg("requested with --accel tcg".into())),
        AccelRequest::Kvm => {
            open_kvm(kvm_device).map_err(VmError::KvmUnavailable)?;
            return Ok(AccelVerdict {
                accel: Accel::Kvm,
                reason: "requested with --accel kvm".into(),
                cached: false,
            });
        }
        AccelRequest::Auto => {}
    }
    if let Err(why) = open_kvm(kvm_device) {
        return Ok(tcg(why));
    }
    // A verdict another user planted could only pick the accelerator, but the directory
    // is kiln's own all the same.
    kiln_hostfs::private_dir(cache_dir, "")?;
    let cache_file = cache_file(cache_dir, boot_id);
    if let Some(mut verdict) = read_cached(&cache_file) {
        verdict.cached = true;
        return Ok(verdict);
    }
    let verdict = match probe() {
        ProbeOutcome::Booted => AccelVerdict {
            accel: Accel::Kvm,
            reason: format!("{} works: the guest booted under KVM", kvm_device.display()),
            cached: false,
        },
        ProbeOutcome::Failed(why) => tcg(format!(
            "{} opens but cannot boot the guest ({why}); using TCG software emulation",
            kvm_device.display()
        )),
    };
    let json = serde_json::to_vec_pretty(&verdict).expect("verdict serialises");
    kiln_hostfs::write_file(&cache_file, &json)?;
    Ok(verdict)
}

/// Opens the KVM device read-write, as a VMM would; the error says why it cannot.
pub fn open_kvm(device: &Path) -> Result<(), String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map(drop)
        .map_err(|err| {
            format!(
                "cannot open {}: {err}; using TCG software emulation",
                device.display()
            )
        })
}

/// This host boot's id; a constant fallback only disables cross-boot safety, not caching.
fn current_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .ok()
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        .unwrap_or_else(|| "unknown-boot".to_owned())
}

fn cache_file(cache_dir: &Path, boot_id: &str) -> PathBuf {
    cache_dir.join(format!("accel-{boot_id}.json"))
}

/// The verdict in `path`, when it is a file kiln wrote (another user's, or one others
/// could write, is ignored with a warning: the probe runs again).
fn read_cached(path: &Path) -> Option<AccelVerdict> {
    let mut bytes = Vec::new();
    match kiln_hostfs::open_own(path) {
        Ok(file) => file.take(64 << 10).read_to_end(&mut bytes).ok()?,
        Err(err) if err.is_not_found() => return None,
        Err(err) => {
            tracing::warn!("ignoring the acceleration cache: {err}");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(verdict) => Some(verdict),
        Err(err) => {
            tracing::warn!(
                "ignoring unreadable acceleration cache {}: {err}",
                path.display()
            );
            None
        }
    }
}

/// This host boot's cached verdict in `cache_dir`, if a probe already ran.
pub fn cached_verdict(cache_dir: &Path) -> Option<AccelVerdict> {
    let mut verdict = read_cached(&cache_file(cache_dir, &current_boot_id()))?;
    verdict.cached = true;
    Some(verdict)
}

/// Where `resolve` keeps its verdicts under kiln's root directory.
pub fn cache_dir(root: &Path) -> PathBuf {
    root.join("accel")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for /dev/kvm: the real device's openability is a host property, so the
    /// decision logic is tested against an ordinary file (openable) and a missing path.
    fn fake_device(dir: &Path, present: bool) -> PathBuf {
        let path = dir.join("kvm");
        if present {
            std::fs::write(&path, b"").unwrap();
        }
        path
    }

    #[test]
    fn explicit_tcg_never_probes() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake_device(dir.path(), true);
        let v = resolve_with(AccelRequest::Tcg, dir.path(), &dev, "b1", || {
            panic!("probed")
        })
        .unwrap();
        assert_eq!(v.accel, Accel::Tcg);
    }

    #[test]
    fn explicit_kvm_without_device_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake_device(dir.path(), false);
        let err = resolve_with(AccelRequest::Kvm, dir.path(), &dev, "b1", || {
            panic!("probed")
        })
        .unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
    }

    #[test]
    fn auto_without_device_falls_back_without_probing() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake_device(dir.path(), false);
        let v = resolve_with(AccelRequest::Auto, dir.path(), &dev, "b1", || {
            panic!("probed")
        })
        .unwrap();
        assert_eq!(v.accel, Accel::Tcg);
        assert!(v.reason.contains("cannot open"));
    }

    #[test]
    fn auto_probes_once_per_boot_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake_device(dir.path(), true);
        let failed = || ProbeOutcome::Failed("KVM internal error".into());
        let first = resolve_with(AccelRequest::Auto, dir.path(), &dev, "b1", failed).unwrap();
        assert_eq!(first.accel, Accel::Tcg);
        assert!(!first.cached);
        assert!(first.reason.contains("KVM internal error"));

        let again = resolve_with(AccelRequest::Auto, dir.path(), &dev, "b1", || {
            panic!("probed twice")
        })
        .unwrap();
        assert_eq!(again.accel, Accel::Tcg);
        assert!(again.cached);

        // A new host boot probes again.
        let next_boot = resolve_with(AccelRequest::Auto, dir.path(), &dev, "b2", || {
            ProbeOutcome::Booted
        })
        .unwrap();
        assert_eq!(next_boot.accel, Accel::Kvm);
    }

    #[test]
    fn corrupt_cache_is_reprobed() {
        let dir = tempfile::tempdir().unwrap();
        let dev = fake_device(dir.path(), true);
        std::fs::write(dir.path().join("accel-b1.json"), b"{not json").unwrap();
        let v = resolve_with(AccelRequest::Auto, dir.path(), &dev, "b1", || {
            ProbeOutcome::Booted
        })
        .unwrap();
        assert_eq!(v.accel, Accel::Kvm);
    }

    #[test]
    fn a_verdict_others_could_write_is_ignored_and_a_shared_cache_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dev = fake_device(dir.path(), true);
        let cache = dir.path().join("accel");
        let failed = || ProbeOutcome::Failed("KVM internal error".into());
        resolve_with(AccelRequest::Auto, &cache, &dev, "b1", failed).unwrap();
        let verdict = cache.join("accel-b1.json");
        std::fs::set_permissions(&verdict, std::fs::Permissions::from_mode(0o666)).unwrap();
        let v = resolve_with(AccelRequest::Auto, &cache, &dev, "b1", || {
            ProbeOutcome::Booted
        })
        .unwrap();
        assert_eq!(v.accel, Accel::Kvm, "probed again");
        assert!(!v.cached);

        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err =
            resolve_with(AccelRequest::Auto, &cache, &dev, "b2", || panic!("probed")).unwrap_err();
        assert!(err.to_string().contains("mode 777"), "{err}");
    }

    #[test]
    fn request_parsing_names_accepted_values() {
        assert_eq!("auto".parse::<AccelRequest>().unwrap(), AccelRequest::Auto);
        let err = "KVM".parse::<AccelRequest>().unwrap_err();
        assert!(err.contains("auto, kvm or tcg"), "{err}");
    }
}
