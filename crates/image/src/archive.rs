//! Read-only access to the files of an OCI layout directory or of a tarball (`oci-archive`,
//! `docker-archive`) without unpacking it: a tarball is indexed once (name to offset and
//! size) and entries are read in place. Names come from the image, so they are only ever
//! looked up in that index, never resolved against the host filesystem.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::Error;

#[derive(Debug)]
pub(crate) enum Files {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        entries: HashMap<String, (u64, u64)>,
    },
}

impl Files {
    /// Indexes the regular files of tarball `path`.
    pub(crate) fn tar(path: &Path) -> Result<Files, Error> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(Error::io(format!("opening {shown}")))?;
        let mut archive = tar::Archive::new(file);
        let mut entries = HashMap::new();
        for entry in archive
            .entries_with_seek()
            .map_err(Error::io(format!("reading tarball {shown}")))?
        {
            let entry = entry.map_err(Error::io(format!("reading tarball {shown}")))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry
                .path()
                .map_err(Error::io(format!("reading tarball {shown}")))?;
            let name = normalize(&name.to_string_lossy());
            entries.insert(name, (entry.raw_file_position(), entry.size()));
        }
        Ok(Files::Tar {
            path: path.to_owned(),
            entries,
        })
    }

    /// Where the files come from, for messages.
    pub(crate) fn origin(&self) -> &Path {
        match self {
            Files::Dir(p) | Files::Tar { path: p, .. } => p,
        }
    }

    /// Opens `name` (a path relative to the layout or tarball root) positioned at its start;
    /// returns the file and the entry's size.
    pub(crate) fn open(&self, name: &str) -> Result<(File, u64), Error> {
        let missing = || {
            Error::invalid(
                self.origin().display().to_string(),
                format!("has no file {name:?}"),
            )
        };
        match self {
            Files::Dir(dir) => {
                let path = dir.join(name);
                let file = File::open(&path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => missing(),
                    _ => Error::Io {
                        context: format!("opening {}", path.display()),
                        source: e,
                    },
                })?;
                let size = file
                    .metadata()
                    .map_err(Error::io(format!("reading {}", path.display())))?
                    .len();
                Ok((file, size))
            }
            Files::Tar { path, entries } => {
                let (offset, size) = *entries.get(&normalize(name)).ok_or_else(missing)?;
                let mut file =
                    File::open(path).map_err(Error::io(format!("opening {}", path.display())))?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(Error::io(format!("reading {}", path.display())))?;
                Ok((file, size))
            }
        }
    }

    /// Reads a whole small file (index.json, manifest.json, configs), at most `cap` bytes.
    pub(crate) fn read(&self, name: &str, cap: u64) -> Result<Vec<u8>, Error> {
        let (file, size) = self.open(name)?;
        let what = format!("{} in {}", name, self.origin().display());
        if size > cap {
            return Err(Error::TooLarge {
                what,
                limit: cap,
                actual: size,
                why: "metadata cap",
            });
        }
        let mut bytes = Vec::new();
        file.take(size)
            .read_to_end(&mut bytes)
            .map_err(Error::io(format!("reading {what}")))?;
        Ok(bytes)
    }
}

/// `./a//b` and `a/b` name the same entry.
fn normalize(name: &str) -> String {
    name.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}
