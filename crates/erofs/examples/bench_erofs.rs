//! Times kiln-erofs against mkfs.erofs on the same generated directory tree, and
//! kiln-erofs on a tree ten times smaller (to show no step grows faster than linearly).
//! Run through scripts/bench-erofs. Prints ratios measured in this run; asserts nothing.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_erofs::{ImageOptions, ImageWriter, Metadata, NodeId, NodeKind, Timestamp, Tree};

const FILES_PER_DIR: usize = 100;

/// Writes `files` files of 0 to 12 KiB (a few of 256 KiB) in directories of 100.
fn generate(root: &Path, files: usize) {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 + i / 1000) as u8).collect();
    for i in 0..files {
        let dir = root.join(format!(
            "d{:03}/e{:03}",
            i / (FILES_PER_DIR * 100),
            (i / FILES_PER_DIR) % 100
        ));
        if i % FILES_PER_DIR == 0 {
            fs::create_dir_all(&dir).unwrap();
        }
        let size = if next() % 200 == 0 {
            chunk.len()
        } else {
            (next() % (12 * 1024)) as usize
        };
        File::create(dir.join(format!("file-{i}.dat")))
            .unwrap()
            .write_all(&chunk[..size])
            .unwrap();
    }
}

fn metadata(meta: &fs::Metadata) -> Metadata {
    Metadata {
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: Timestamp {
            sec: meta.mtime(),
            nsec: meta.mtime_nsec() as u32,
        },
        xattrs: Vec::new(),
    }
}

/// Builds an image of `source` with kiln-erofs, streaming each file into the image.
fn kiln_erofs(source: &Path, image: &Path) -> Duration {
    let start = Instant::now();
    let mut writer = ImageWriter::new(
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(image)
            .unwrap(),
        ImageOptions::default(),
    )
    .unwrap();
    let mut tree = Tree::new(metadata(&fs::metadata(source).unwrap())).unwrap();
    let mut pending: Vec<(std::path::PathBuf, NodeId)> = vec![(source.to_path_buf(), tree.root())];
    while let Some((dir, id)) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            let name = entry.file_name();
            let name = std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str());
            if meta.is_dir() {
                let child = tree
                    .add(id, name, NodeKind::Directory, metadata(&meta))
                    .unwrap();
                pending.push((entry.path(), child));
            } else {
                let data = writer
                    .append_data(File::open(entry.path()).unwrap(), meta.len())
                    .unwrap();
                tree.add(id, name, NodeKind::File(data), metadata(&meta))
                    .unwrap();
            }
        }
    }
    writer.finish(&tree).unwrap();
    start.elapsed()
}

fn mkfs_erofs(source: &Path, image: &Path) -> Duration {
    let start = Instant::now();
    let status = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(image)
        .arg(source)
        .status()
        .unwrap();
    assert!(status.success(), "mkfs.erofs failed");
    start.elapsed()
}

fn main() {
    let files: usize = std::env::args()
        .nth(1)
        .map_or(100_000, |n| n.parse().expect("FILES must be a number"));
    let work = tempfile::tempdir().unwrap();
    let (big, small) = (work.path().join("big"), work.path().join("small"));
    eprintln!(
        "generating {files} and {} files under {}",
        files / 10,
        work.path().display()
    );
    generate(&big, files);
    generate(&small, files / 10);

    let image = |name: &str| work.path().join(name);
    let baseline = mkfs_erofs(&big, &image("mkfs"));
    let mkfs_size = fs::metadata(image("mkfs")).unwrap().len();
    let ours = kiln_erofs(&big, &image("kiln"));
    let our_size = fs::metadata(image("kiln")).unwrap().len();
    let ours_small = kiln_erofs(&small, &image("kiln-small"));

    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "mkfs.erofs, {files} files:   {:.3} s, {mkfs_size} bytes",
        secs(baseline)
    );
    println!(
        "kiln-erofs, {files} files:   {:.3} s, {our_size} bytes",
        secs(ours)
    );
    println!(
        "kiln-erofs, {} files:    {:.3} s",
        files / 10,
        secs(ours_small)
    );
    println!(
        "speed-up vs mkfs.erofs:      {:.2}x",
        secs(baseline) / secs(ours)
    );
    println!(
        "10x files took:              {:.2}x the time",
        secs(ours) / secs(ours_small)
    );
}
