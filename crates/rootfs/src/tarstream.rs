//! Reads tar entries from a stream: the `tar` crate parses each 512-byte header, this
//! module merges PAX (`x`) records and GNU long names (`L`, `K`) into the entry they
//! describe, with every extension header bounded before it is read into memory.
//!
//! The `tar` crate's own entry iterator reads extension headers of any size into
//! memory, which a hostile layer could use to exhaust it; hence this loop.

use std::io::{self, Read};

use kiln_erofs::{Timestamp, Xattr};
use tar::{Header, PaxExtensions};

use crate::error::EntryError;

const BLOCK: u64 = 512;

/// One tar entry with PAX and GNU extensions applied. Its data follows in the stream.
#[derive(Debug)]
pub(crate) struct TarEntry {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub type_flag: u8,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub size: u64,
    pub device: (u32, u32),
    /// `SCHILY.xattr.*` records, last value of a name wins, in first-seen order.
    pub xattrs: Vec<Xattr>,
}

/// Bounds on extension headers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeaderLimits {
    /// Largest PAX header (local or global).
    pub max_pax: u64,
    /// Longest path or link name (GNU long names are this plus a NUL).
    pub max_path: u64,
}

/// Error while reading: an I/O error of the underlying stream (decoding, limits) or a
/// malformed entry.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    Entry(EntryError),
}

impl From<io::Error> for ReadError {
    fn from(err: io::Error) -> Self {
        ReadError::Io(err)
    }
}

impl From<EntryError> for ReadError {
    fn from(err: EntryError) -> Self {
        ReadError::Entry(err)
    }
}

fn corrupt(msg: impl Into<String>) -> ReadError {
    ReadError::Entry(EntryError::Corrupt(msg.into()))
}

/// A tar stream read entry by entry.
pub(crate) struct TarReader<R> {
    inner: R,
    limits: HeaderLimits,
    /// Data bytes of the current entry not read yet.
    data_left: u64,
    /// Padding after the current entry's data.
    padding: u64,
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(inner: R, limits: HeaderLimits) -> Self {
        TarReader {
            inner,
            limits,
            data_left: 0,
            padding: 0,
        }
    }

    pub(crate) fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The current entry's data not read yet; reading past it is impossible.
    pub(crate) fn data(&mut self) -> EntryData<'_, R> {
        EntryData { reader: self }
    }

    /// The next entry, after skipping what is left of the current one; `None` at the end
    /// of the archive (a zero block, or the end of the stream between entries).
    pub(crate) fn next_entry(&mut self) -> Result<Option<TarEntry>, ReadError> {
        self.skip(self.data_left + self.padding)?;
        self.data_left = 0;
        self.padding = 0;

        let mut pax: Option<Vec<u8>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut block = [0u8; BLOCK as usize];
        let header = loop {
            let extensions_pending = pax.is_some() || long_name.is_some() || long_link.is_some();
            let got = read_full(&mut self.inner, &mut block)?;
            if got == 0 || block.iter().all(|&b| b == 0) {
                if extensions_pending {
                    return Err(corrupt("extension headers without the entry they describe"));
                }
                if got != 0 && got != block.len() {
                    return Err(corrupt("the layer ends inside a tar header"));
                }
                return Ok(None);
            }
            if got != block.len() {
                return Err(corrupt("the layer ends inside a tar header"));
            }
            let header = Header::from_byte_slice(&block);
            check_checksum(header)?;
            let size = header
                .entry_size()
                .map_err(|e| corrupt(format!("bad size field: {e}")))?;
            let (slot, what, max) = match header.entry_type().as_byte() {
                b'x' => (&mut pax, "PAX header", self.limits.max_pax),
                b'g' => {
                    // Global records would apply to every later entry; layers do not use
                    // them for anything an image keeps, so they are skipped (bounded).
                    if size > self.limits.max_pax {
                        return Err(EntryError::HeaderTooLarge {
                            what: "global PAX header",
                            size,
                            max: self.limits.max_pax,
                        }
                        .into());
                    }
                    self.skip(padded(size))?;
                    continue;
                }
                b'L' => (&mut long_name, "GNU long name", self.limits.max_path + 1),
                b'K' => (
                    &mut long_link,
                    "GNU long link name",
                    self.limits.max_path + 1,
                ),
                _ => break header.clone(),
            };
            if slot.is_some() {
                return Err(corrupt(format!("two {what}s for one entry")));
            }
            if size > max {
                return Err(EntryError::HeaderTooLarge { what, size, max }.into());
            }
            let mut bytes = vec![0; size as usize];
            self.inner.read_exact(&mut bytes)?;
            self.skip(padded(size) - size)?;
            *slot = Some(bytes);
        };
        let mut entry = entry_from_header(&header)?;
        if let Some(mut name) = long_name {
            trim_nuls(&mut name);
            entry.path = name;
        }
        if let Some(mut link) = long_link {
            trim_nuls(&mut link);
            entry.link = link;
        }
        if let Some(pax) = pax {
            apply_pax(&mut entry, &pax)?;
        }
        self.data_left = entry.size;
        self.padding = padded(entry.size) - entry.size;
        Ok(Some(entry))
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        if copied != n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

/// The data of the current entry: reads end where the entry's data ends.
pub(crate) struct EntryData<'r, R> {
    reader: &'r mut TarReader<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = buf
            .len()
            .min(self.reader.data_left.min(usize::MAX as u64) as usize);
        if max == 0 {
            return Ok(0);
        }
        let n = self.reader.inner.read(&mut buf[..max])?;
        self.reader.data_left -= n as u64;
        Ok(n)
    }
}

fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK) * BLOCK
}

fn trim_nuls(bytes: &mut Vec<u8>) {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn check_checksum(header: &Header) -> Result<(), ReadError> {
    let bytes = header.as_bytes();
    let sum: u32 = bytes[..148]
        .iter()
        .chain(&bytes[156..])
        .map(|&b| u32::from(b))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    let stored = header
        .cksum()
        .map_err(|_| corrupt("unreadable header checksum"))?;
    if sum != stored {
        return Err(corrupt("header checksum mismatch"));
    }
    Ok(())
}

fn entry_from_header(header: &Header) -> Result<TarEntry, ReadError> {
    let old = header.as_old();
    let uid = numeric(&old.uid, header.uid(), "uid")?;
    let gid = numeric(&old.gid, header.gid(), "gid")?;
    let mtime = numeric(&old.mtime, header.mtime(), "mtime")?;
    let mode = numeric(&old.mode, header.mode().map(u64::from), "mode")?;
    let size = numeric(&old.size, header.entry_size(), "size")?;
    let type_flag = header.entry_type().as_byte();
    let device = match (header.as_ustar(), header.as_gnu()) {
        _ if !matches!(type_flag, b'3' | b'4') => (0, 0),
        (Some(h), _) => device(&h.dev_major, &h.dev_minor, header)?,
        (None, Some(h)) => device(&h.dev_major, &h.dev_minor, header)?,
        (None, None) => (0, 0),
    };
    Ok(TarEntry {
        path: header.path_bytes().into_owned(),
        link: header
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default(),
        type_flag,
        mode: (mode & 0o7777) as u32,
        uid: id(uid, "uid")?,
        gid: id(gid, "gid")?,
        mtime: Timestamp {
            sec: i64::try_from(mtime).map_err(|_| EntryError::BadNumber {
                field: "mtime",
                value: mtime.to_string().into_bytes(),
            })?,
            nsec: 0,
        },
        size,
        device,
        xattrs: Vec::new(),
    })
}

/// A numeric header field as the `tar` crate parses it (octal or base-256), with an
/// empty field (all NUL or spaces, as some writers leave unused fields) read as 0.
fn numeric(field: &[u8], parsed: io::Result<u64>, name: &'static str) -> Result<u64, EntryError> {
    if field.iter().all(|&b| b == 0 || b == b' ') {
        return Ok(0);
    }
    parsed.map_err(|_| EntryError::BadNumber {
        field: name,
        value: field.to_vec(),
    })
}

fn device(major: &[u8], minor: &[u8], header: &Header) -> Result<(u32, u32), EntryError> {
    let major = numeric(
        major,
        header.device_major().map(|d| u64::from(d.unwrap_or(0))),
        "device major",
    )?;
    let minor = numeric(
        minor,
        header.device_minor().map(|d| u64::from(d.unwrap_or(0))),
        "device minor",
    )?;
    Ok((id(major, "device major")?, id(minor, "device minor")?))
}

fn id(value: u64, field: &'static str) -> Result<u32, EntryError> {
    u32::try_from(value).map_err(|_| EntryError::BadNumber {
        field,
        value: value.to_string().into_bytes(),
    })
}

const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

fn apply_pax(entry: &mut TarEntry, pax: &[u8]) -> Result<(), ReadError> {
    for record in PaxExtensions::new(pax) {
        let record = record.map_err(|_| corrupt("malformed PAX record"))?;
        let (key, value) = (record.key_bytes(), record.value_bytes());
        match key {
            b"path" => entry.path = value.to_vec(),
            b"linkpath" => entry.link = value.to_vec(),
            b"size" => entry.size = decimal(value, "PAX size")?,
            b"uid" => entry.uid = id(decimal(value, "PAX uid")?, "PAX uid")?,
            b"gid" => entry.gid = id(decimal(value, "PAX gid")?, "PAX gid")?,
            b"mtime" => entry.mtime = pax_time(value)?,
            _ => {
                if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
                    match entry.xattrs.iter_mut().find(|x| x.name == name) {
                        Some(existing) => existing.value = value.to_vec(),
                        None => entry.xattrs.push(Xattr::new(name, value)),
                    }
                }
            }
        }
    }
    Ok(())
}

fn decimal(value: &[u8], field: &'static str) -> Result<u64, EntryError> {
    let bad = || EntryError::BadNumber {
        field,
        value: value.to_vec(),
    };
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)
}

/// A PAX time: `[-]SECONDS[.FRACTION]`, nanoseconds kept, more digits truncated.
fn pax_time(value: &[u8]) -> Result<Timestamp, EntryError> {
    let bad = || EntryError::BadNumber {
        field: "PAX mtime",
        value: value.to_vec(),
    };
    let (negative, rest) = match value.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (secs, frac) = match rest.iter().position(|&b| b == b'.') {
        Some(dot) => (&rest[..dot], &rest[dot + 1..]),
        None => (rest, &b""[..]),
    };
    if !frac.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let secs = i64::try_from(decimal(secs, "PAX mtime").map_err(|_| bad())?).map_err(|_| bad())?;
    let mut nsec: u32 = 0;
    for i in 0..9 {
        nsec = nsec * 10 + frac.get(i).map_or(0, |d| u32::from(d - b'0'));
    }
    Ok(if !negative {
        Timestamp { sec: secs, nsec }
    } else if nsec == 0 {
        Timestamp {
            sec: -secs,
            nsec: 0,
        }
    } else {
        Timestamp {
            sec: -secs - 1,
            nsec: 1_000_000_000 - nsec,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeaderLimits = HeaderLimits {
        max_pax: 1 << 16,
        max_path: 4096,
    };

    fn entries(tar: &[u8]) -> Result<Vec<(TarEntry, Vec<u8>)>, ReadError> {
        let mut reader = TarReader::new(tar, LIMITS);
        let mut out = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            let mut data = Vec::new();
            reader.data().read_to_end(&mut data)?;
            out.push((entry, data));
        }
        Ok(out)
    }

    #[test]
    fn pax_and_gnu_extensions_are_merged() {
        let mut builder = tar::Builder::new(Vec::new());
        let long = format!("{}/file", "d".repeat(200));
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o4755);
        header.set_uid(7);
        builder
            .append_data(&mut header, &long, &b"abc"[..])
            .unwrap();
        builder
            .append_pax_extensions([
                ("uid", &b"4000000000"[..]),
                ("mtime", b"-1.25"),
                ("SCHILY.xattr.security.capability", b"\x01\x02"),
                ("path", b"./pax/name"),
            ])
            .unwrap();
        let mut header = tar::Header::new_ustar();
        header.set_size(0);
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_path("short").unwrap();
        header.set_link_name("target").unwrap();
        header.set_cksum();
        builder.append(&header, io::empty()).unwrap();
        let tar = builder.into_inner().unwrap();

        let list = entries(&tar).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].0.path, long.as_bytes());
        assert_eq!(list[0].0.mode, 0o4755);
        assert_eq!(list[0].1, b"abc");
        let second = &list[1].0;
        assert_eq!(second.path, b"./pax/name");
        assert_eq!(second.link, b"target");
        assert_eq!(second.uid, 4_000_000_000);
        assert_eq!(
            second.mtime,
            Timestamp {
                sec: -2,
                nsec: 750_000_000
            }
        );
        assert_eq!(
            second.xattrs,
            vec![Xattr::new("security.capability", b"\x01\x02".to_vec())]
        );
    }

    #[test]
    fn base256_numbers_are_read() {
        let mut header = tar::Header::new_gnu();
        header.set_path("big").unwrap();
        header.set_size(0);
        header.set_uid(3_000_000_000);
        header.set_mtime(u64::from(u32::MAX) * 4);
        header.set_cksum();
        let mut tar = header.as_bytes().to_vec();
        tar.extend([0; 1024]);
        let list = entries(&tar).unwrap();
        assert_eq!(list[0].0.uid, 3_000_000_000);
        assert_eq!(list[0].0.mtime.sec, i64::from(u32::MAX) * 4);
    }

    #[test]
    fn oversized_extension_headers_are_refused_before_reading() {
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([("comment", &vec![b'x'; 1 << 17][..])])
            .unwrap();
        let tar = builder.into_inner().unwrap();
        assert!(matches!(
            entries(&tar),
            Err(ReadError::Entry(EntryError::HeaderTooLarge { .. }))
        ));
    }

    #[test]
    fn bad_checksum_and_truncation_are_errors() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(10);
        builder
            .append_data(&mut header, "f", &[1u8; 10][..])
            .unwrap();
        let mut tar = builder.into_inner().unwrap();
        let mut broken = tar.clone();
        broken[0] = b'g';
        assert!(matches!(
            entries(&broken),
            Err(ReadError::Entry(EntryError::Corrupt(_)))
        ));
        tar.truncate(512 + 5);
        assert!(entries(&tar).is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time(b"12").unwrap(), Timestamp { sec: 12, nsec: 0 });
        assert_eq!(
            pax_time(b"1.1234567899").unwrap(),
            Timestamp {
                sec: 1,
                nsec: 123_456_789
            }
        );
        assert!(pax_time(b"1.x").is_err());
        assert!(pax_time(b"").is_err());
        assert!(pax_time(b"--1").is_err());
    }
}
