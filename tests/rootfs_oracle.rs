//! Differential oracle for the rootfs builder: for every fixture image, `kiln build
//! --merged` (run as an unprivileged user) is loop-mounted read-only and compared with
//! `umoci unpack` of the same image, path by path: type, mode, uid, gid, size, content
//! hash, symlink target, device number, xattrs, hardlink grouping and mtime. The
//! identity files and /sandbox are checked against kiln-identity's expected output.
//! Needs root (umoci, mount), as CI runs it.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_e2e::{fixtures, kiln_bin, require_root, run_ok, ImageFixture};
use kiln_identity::{choose_shell, write_sandbox_accounts, AccountFiles};
use sha2::{Digest, Sha256};

const UID: u32 = 10001;
const GID: u32 = 10001;
/// The unprivileged user kiln runs as in this test.
const NOBODY: u32 = 65534;
const TIMEOUT: Duration = Duration::from_secs(600);
/// Paths the identity edit writes; compared against kiln-identity instead of umoci.
const IDENTITY_PATHS: [&str; 5] = [
    "etc/passwd",
    "etc/group",
    "etc/gshadow",
    "etc/shadow",
    "sandbox",
];

/// Everything compared about one path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Size and sha256 of regular files.
    content: Option<(u64, String)>,
    symlink: Option<PathBuf>,
    rdev: Option<u64>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    mtime: (i64, i64),
}

struct Tree {
    entries: BTreeMap<PathBuf, Entry>,
    /// Paths sharing an inode (regular files with more than one link).
    hardlinks: BTreeSet<BTreeSet<PathBuf>>,
}

fn walk(root: &Path) -> Tree {
    let mut entries = BTreeMap::new();
    let mut inodes: BTreeMap<u64, BTreeSet<PathBuf>> = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let path = root.join(&rel);
        let meta =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        if ft.is_dir() {
            for child in fs::read_dir(&path).unwrap() {
                pending.push(rel.join(child.unwrap().file_name()));
            }
        }
        if ft.is_file() && meta.nlink() > 1 {
            inodes.entry(meta.ino()).or_default().insert(rel.clone());
        }
        let entry = Entry {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            content: ft.is_file().then(|| (meta.len(), sha256_file(&path))),
            symlink: ft.is_symlink().then(|| fs::read_link(&path).unwrap()),
            rdev: (ft.is_char_device() || ft.is_block_device()).then(|| meta.rdev()),
            xattrs: xattrs(&path),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        };
        entries.insert(rel, entry);
    }
    Tree {
        entries,
        hardlinks: inodes.into_values().filter(|g| g.len() > 1).collect(),
    }
}

fn sha256_file(path: &Path) -> String {
    let mut file = fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 1 << 16];
    // SAFETY: the buffers outlive the calls and their lengths are passed.
    let len = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(len >= 0, "llistxattr {}", path.display());
    let mut out = BTreeMap::new();
    for name in names[..len as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 1 << 16];
        // SAFETY: as above.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(n >= 0, "lgetxattr {}", path.display());
        value.truncate(n as usize);
        out.insert(name.to_vec(), value);
    }
    out
}

/// Whether `path` resolves to a regular file inside `root`, following symlinks with
/// absolute targets relative to `root` (never the host's).
fn image_file_exists(root: &Path, path: &str) -> bool {
    let mut current = PathBuf::from(path.trim_start_matches('/'));
    for _ in 0..40 {
        let mut resolved = PathBuf::new();
        let mut redirected = None;
        let components: Vec<_> = current.components().collect();
        for (i, comp) in components.iter().enumerate() {
            resolved.push(comp);
            match fs::symlink_metadata(root.join(&resolved)) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = fs::read_link(root.join(&resolved)).unwrap();
                    let base = if target.is_absolute() {
                        PathBuf::new()
                    } else {
                        resolved.parent().unwrap().to_owned()
                    };
                    let mut next = base.join(target.strip_prefix("/").unwrap_or(&target));
                    for rest in &components[i + 1..] {
                        next.push(rest);
                    }
                    redirected = Some(next);
                    break;
                }
                Ok(m) if i + 1 == components.len() => return m.is_file(),
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        match redirected {
            Some(next) => current = normalize(&next),
            None => return false,
        }
    }
    false
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for comp in path.components() {
        match comp {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(c) => out.push(c),
            _ => {}
        }
    }
    out
}

/// Unmounts on drop, so a failed assertion leaves no mount behind.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn compare(fixture: &ImageFixture) {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // kiln runs as nobody: give it a copy of the layout and directories it owns.
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(&fixture.oci_gzip.path)
            .arg(dir.join("layout")),
        TIMEOUT,
    );
    for sub in ["root", "out"] {
        fs::create_dir(dir.join(sub)).unwrap();
    }
    fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    run_ok(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{NOBODY}:{NOBODY}"))
            .arg(dir.join("layout"))
            .arg(dir.join("root"))
            .arg(dir.join("out")),
        TIMEOUT,
    );
    let image = dir.join("out/merged.erofs");
    let source = format!(
        "oci:{}:{}",
        dir.join("layout").display(),
        fixture.oci_gzip.tag
    );
    let ids = ["--uid", &UID.to_string(), "--gid", &GID.to_string()].map(String::from);
    let output = kiln_as_nobody(dir, |kiln| {
        kiln.arg("build")
            .arg(&source)
            .arg("--merged")
            .arg("-o")
            .arg(&image)
            .args(&ids)
    });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("merged.erofs"), "{stdout}");

    let reference = fixture.oci_gzip.unpack_with_umoci(&dir.join("umoci"));
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "erofs", "-o", "loop,ro"])
            .arg(&image)
            .arg(&mnt),
        TIMEOUT,
    );
    let _mount = Mount(mnt.clone());

    let ours = walk(&mnt);
    let theirs = walk(&reference);
    assert!(
        theirs.entries.len() > 20,
        "{}: umoci unpacked too little",
        fixture.name
    );
    eprintln!("{}: comparing {} paths", fixture.name, theirs.entries.len());
    let skip = |p: &PathBuf| IDENTITY_PATHS.iter().any(|i| p == Path::new(i));
    let mut differences = Vec::new();
    let paths: BTreeSet<&PathBuf> = ours.entries.keys().chain(theirs.entries.keys()).collect();
    for path in paths {
        if skip(path) {
            continue;
        }
        match (ours.entries.get(path), theirs.entries.get(path)) {
            (Some(a), Some(b)) => {
                let mut a_cmp = a;
                let dir_fix;
                if a.kind == "dir" && b.kind == "dir" && path.as_os_str().is_empty() {
                    // The mount point's own mtime is the image root's; umoci's root is the
                    // bundle directory it created.
                    dir_fix = Entry {
                        mtime: b.mtime,
                        ..a.clone()
                    };
                    a_cmp = &dir_fix;
                }
                if a_cmp != b {
                    differences.push(format!("{}: kiln {a:?} / umoci {b:?}", path.display()));
                }
            }
            (a, _) => differences.push(format!(
                "{}: only in {}",
                path.display(),
                if a.is_some() { "kiln" } else { "umoci" }
            )),
        }
    }
    assert!(
        differences.is_empty(),
        "{}: {} differences:\n{}",
        fixture.name,
        differences.len(),
        differences.join("\n")
    );
    let strip = |groups: &BTreeSet<BTreeSet<PathBuf>>| -> BTreeSet<BTreeSet<PathBuf>> {
        groups
            .iter()
            .map(|g| {
                g.iter()
                    .filter(|p| !skip(p))
                    .cloned()
                    .collect::<BTreeSet<_>>()
            })
            .filter(|g| g.len() > 1)
            .collect()
    };
    assert_eq!(
        strip(&ours.hardlinks),
        strip(&theirs.hardlinks),
        "{}: hardlink groups",
        fixture.name
    );

    // Identity files: what kiln-identity makes of the image's own files.
    let read = |name: &str| fs::read(reference.join("etc").join(name)).ok();
    let files = AccountFiles {
        passwd: read("passwd"),
        group: read("group"),
        gshadow: read("gshadow"),
        shadow: read("shadow"),
    };
    let shell = choose_shell(|s| image_file_exists(&reference, s));
    let expected =
        write_sandbox_accounts(&files, UID, GID, shell, kiln_identity::IdBounds::KILN).unwrap();
    for (name, bytes) in [
        ("passwd", &expected.passwd),
        ("group", &expected.group),
        ("gshadow", &expected.gshadow),
        ("shadow", &expected.shadow),
    ] {
        let got = fs::read(mnt.join("etc").join(name)).unwrap();
        assert_eq!(&got, bytes, "{}: /etc/{name}", fixture.name);
    }
    let home = fs::metadata(mnt.join("sandbox")).unwrap();
    assert!(home.is_dir());
    assert_eq!(
        (home.uid(), home.gid(), home.mode() & 0o7777),
        (UID, GID, 0o755)
    );

    // The guest's view: the identity layer over the root image with overlayfs must show
    // exactly the merged image.
    let output = kiln_as_nobody(dir, |kiln| {
        kiln.arg("--json").arg("build").arg(&source).args(&ids)
    });
    let built: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut mounts = Vec::new();
    for (name, key) in [("root-mnt", "root"), ("identity-mnt", "identity")] {
        let path = dir.join(name);
        fs::create_dir(&path).unwrap();
        let image = built[key].as_str().unwrap();
        run_ok(Command::new("fsck.erofs").arg(image), TIMEOUT);
        run_ok(
            Command::new("mount")
                .args(["-t", "erofs", "-o", "loop,ro"])
                .arg(image)
                .arg(&path),
            TIMEOUT,
        );
        mounts.push(Mount(path));
    }
    let overlay = dir.join("overlay");
    fs::create_dir(&overlay).unwrap();
    let lower = format!(
        "lowerdir={}:{}",
        dir.join("identity-mnt").display(),
        dir.join("root-mnt").display()
    );
    run_ok(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &lower])
            .arg(&overlay),
        TIMEOUT,
    );
    let _overlay = Mount(overlay.clone());
    let layered = walk(&overlay);
    let merged = walk(&mnt);
    let overlay_differences: Vec<String> = merged
        .entries
        .keys()
        .chain(layered.entries.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|p| merged.entries.get(*p) != layered.entries.get(*p))
        .map(|p| {
            format!(
                "{}: merged {:?} / overlay {:?}",
                p.display(),
                merged.entries.get(p),
                layered.entries.get(p)
            )
        })
        .collect();
    assert!(
        overlay_differences.is_empty(),
        "{}: identity layer over root image differs from the merged image:\n{}",
        fixture.name,
        overlay_differences.join("\n")
    );
    assert_eq!(
        merged.hardlinks, layered.hardlinks,
        "{}: hardlink groups under overlayfs",
        fixture.name
    );
    drop(_overlay);
    drop(mounts);
    drop(_mount);

    // Every image kiln produced passes fsck.erofs (kiln ran it too, before publishing).
    run_ok(Command::new("fsck.erofs").arg(&image), TIMEOUT);
}

/// Runs kiln as the unprivileged user with `--root DIR/root`.
fn kiln_as_nobody(
    dir: &Path,
    args: impl FnOnce(&mut Command) -> &mut Command,
) -> std::process::Output {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(kiln_bin())
        .arg("--root")
        .arg(dir.join("root"));
    run_ok(args(&mut command), TIMEOUT)
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn merged_images_match_umoci_on_every_fixture() {
    require_root();
    let mut compared = 0;
    for fixture in fixtures().images() {
        compare(fixture);
        compared += 1;
    }
    assert!(compared >= 2, "the demo and layers fixtures at least");
}
