//! Streams one blob into the store: digest, size and (for layers) the uncompressed digest
//! are checked while the bytes arrive; the blob is published only when all of them match.

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::thread::JoinHandle;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::digest::{Digest, Hasher};
use crate::media::Compression;
use crate::store::Store;
use crate::{Error, MAX_UNCOMPRESSED_LAYER_SIZE};

const CHUNK: usize = 256 << 10;
/// Chunks queued for the decompressing thread before the download waits for it.
const PIPE_DEPTH: usize = 16;
/// Written bytes are handed to the kernel's writeback every this many bytes, so the
/// fsync before publishing finds little left to write.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// What a blob must be.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    /// How errors name the blob, e.g. `layer sha256:... of docker://...`.
    pub what: String,
    pub digest: Digest,
    pub size: u64,
    /// For layers: the config's diff_id and the blob's compression.
    pub layer: Option<(Digest, Compression)>,
}

/// How an ingest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The store already had it (perhaps another process just wrote it).
    Cached,
    Downloaded,
}

/// Makes sure blob `expected` is in the store. `open` is called only when the blob must
/// be fetched; `progress(bytes_so_far)` is called as bytes arrive.
pub(crate) async fn ingest<R, F, Fut>(
    store: &Store,
    expected: &Expected,
    open: F,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<Outcome, Error>
where
    R: AsyncRead + Unpin,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<R, Error>>,
{
    if store.has_blob(&expected.digest)? {
        check_cached_layer(store, expected).await?;
        return Ok(Outcome::Cached);
    }
    let lock = {
        let store = store.clone();
        let digest = expected.digest.clone();
        tokio::task::spawn_blocking(move || store.lock_blob(&digest))
            .await
            .expect("the lock task does not panic")?
    };
    if store.has_own_blob(&expected.digest)? {
        drop(lock);
        check_cached_layer(store, expected).await?;
        return Ok(Outcome::Cached);
    }
    let mut reader = open().await?;
    let mut temp = store.temp_blob(&expected.digest)?;
    let mut hasher = Hasher::new(expected.digest.algorithm());
    let mut pipe = match &expected.layer {
        Some((diff_id, compression)) if *compression != Compression::None => {
            Some(DiffPipe::start(*compression, diff_id.algorithm()))
        }
        _ => None,
    };
    let mut total: u64 = 0;
    let mut written_back: u64 = 0;
    let mut spare = vec![0u8; CHUNK];
    loop {
        // Chunks go to the decompressor whole and come back for reuse; without one, a
        // single buffer serves.
        let mut buf = match &pipe {
            Some(pipe) => pipe.buffer(),
            None => std::mem::take(&mut spare),
        };
        // Never read more than one byte past the descriptor's size.
        let room = (expected.size + 1 - total).min(CHUNK as u64) as usize;
        // Network streams yield small pieces: gather a whole chunk so hashing, writing
        // and handing over to the decompressor happen per chunk, not per piece.
        let mut n = 0;
        while n < room {
            let got = reader
                .read(&mut buf[n..room])
                .await
                .map_err(Error::io(format!("{}: reading", expected.what)))?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > expected.size {
            return Err(Error::TooLarge {
                what: expected.what.clone(),
                limit: expected.size,
                actual: total,
                why: "a blob may not exceed its descriptor's size",
            });
        }
        let chunk = &buf[..n];
        hasher.update(chunk);
        temp.file().write_all(chunk).map_err(Error::io(format!(
            "{}: writing the temp file",
            expected.what
        )))?;
        if total - written_back >= WRITEBACK_EVERY {
            start_writeback(temp.file(), written_back, total);
            written_back = total;
        }
        match &mut pipe {
            Some(pipe) => pipe.send(buf, n),
            None => spare = buf,
        }
        progress(total);
    }
    if total != expected.size {
        return Err(Error::SizeMismatch {
            what: expected.what.clone(),
            expected: expected.size,
            actual: total,
        });
    }
    let actual = hasher.finish();
    if actual != expected.digest {
        return Err(Error::DigestMismatch {
            what: expected.what.clone(),
            expected: expected.digest.clone(),
            actual,
        });
    }
    // The data reaches the disk while the decompressor drains; persist() then only
    // syncs what is left (metadata).
    let sync = {
        let file = temp.file().try_clone().map_err(Error::io(format!(
            "{}: reopening the temp file",
            expected.what
        )))?;
        tokio::task::spawn_blocking(move || file.sync_data())
    };
    if let Some((diff_id, _)) = &expected.layer {
        let uncompressed = match pipe {
            Some(pipe) => {
                let what = expected.what.clone();
                tokio::task::spawn_blocking(move || pipe.finish(&what))
                    .await
                    .expect("the decompression task does not panic")?
            }
            None => actual.clone(),
        };
        if &uncompressed != diff_id {
            return Err(Error::DiffIdMismatch {
                what: expected.what.clone(),
                expected: diff_id.clone(),
                actual: uncompressed,
            });
        }
        store.record_diff_id(&expected.digest, diff_id)?;
    }
    sync.await
        .expect("the sync task does not panic")
        .map_err(Error::io(format!(
            "{}: syncing the temp file",
            expected.what
        )))?;
    temp.persist(&store.blob_path(&expected.digest))?;
    drop(lock);
    Ok(Outcome::Downloaded)
}

/// A layer already in the store was verified against the diff_id of the config that
/// brought it; a new config must claim the same one.
async fn check_cached_layer(store: &Store, expected: &Expected) -> Result<(), Error> {
    let Some((diff_id, compression)) = &expected.layer else {
        return Ok(());
    };
    let known = match store.diff_id(&expected.digest) {
        Some(known) => known,
        None => {
            // Stored as another kind of blob before: compute it from the stored bytes.
            let store2 = store.clone();
            let (digest, compression, what) =
                (expected.digest.clone(), *compression, expected.what.clone());
            let algorithm = diff_id.algorithm();
            let computed = tokio::task::spawn_blocking(move || -> Result<Digest, Error> {
                let file = store2.open_blob(&digest)?;
                uncompressed_digest(compression, algorithm, file)
                    .map_err(Error::io(format!("{what}: decompressing the stored blob")))
            })
            .await
            .expect("the decompression task does not panic")?;
            if &computed == diff_id {
                store.record_diff_id(&expected.digest, diff_id)?;
            }
            computed
        }
    };
    if &known != diff_id {
        return Err(Error::DiffIdMismatch {
            what: expected.what.clone(),
            expected: diff_id.clone(),
            actual: known,
        });
    }
    Ok(())
}

/// Asks the kernel to start writing `file`'s bytes `from..to` to disk, without waiting.
fn start_writeback(file: &File, from: u64, to: u64) {
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for
    // the call's duration. A failure only means the final fsync has more to do.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            (to - from) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Digest of what `reader` decompresses to: gzip members and zstd frames are all read.
fn uncompressed_digest(
    compression: Compression,
    algorithm: crate::Algorithm,
    reader: impl Read,
) -> io::Result<Digest> {
    let mut sink = BoundedHasher::new(algorithm);
    let mut decoder = decoder(compression, io::BufReader::with_capacity(CHUNK, reader))?;
    io::copy(&mut decoder, &mut sink)?;
    Ok(sink.hasher.finish())
}

/// What `reader`'s bytes decompress to. The gzip decoder reads every member and the zstd
/// one every frame.
fn decoder<'a>(
    compression: Compression,
    reader: impl BufRead + 'a,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
    })
}

/// Hashes at most [`MAX_UNCOMPRESSED_LAYER_SIZE`] bytes, so a decompression bomb ends.
struct BoundedHasher {
    hasher: Hasher,
    written: u64,
}

impl BoundedHasher {
    fn new(algorithm: crate::Algorithm) -> BoundedHasher {
        BoundedHasher {
            hasher: Hasher::new(algorithm),
            written: 0,
        }
    }
}

impl Write for BoundedHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len() as u64;
        if self.written > MAX_UNCOMPRESSED_LAYER_SIZE {
            return Err(io::Error::other(format!(
                "uncompressed layer exceeds {MAX_UNCOMPRESSED_LAYER_SIZE} bytes"
            )));
        }
        self.hasher.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A buffer of [`CHUNK`] bytes on its way through the pipeline, of which `len` are data.
struct Chunk {
    buf: Vec<u8>,
    len: usize,
}

/// Buffers handed back by the stage that consumed them, for the stage that fills them.
struct Pool(Receiver<Vec<u8>>);

impl Pool {
    fn take(&self) -> Vec<u8> {
        self.0.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK])
    }
}

/// Decompresses on a thread of its own while the download goes on, and hashes the
/// decompressed bytes on a third, so inflating and hashing run in parallel. Buffers move
/// between the stages and come back, so nothing is copied or allocated per chunk.
struct DiffPipe {
    sender: Option<SyncSender<Chunk>>,
    pool: Pool,
    thread: JoinHandle<io::Result<Digest>>,
}

impl DiffPipe {
    fn start(compression: Compression, algorithm: crate::Algorithm) -> DiffPipe {
        let (sender, receiver) = sync_channel(PIPE_DEPTH);
        let (recycle, pool) = channel();
        let thread = std::thread::spawn(move || {
            let (out_sender, out_receiver) = sync_channel::<Chunk>(PIPE_DEPTH);
            let (out_recycle, out_pool) = channel();
            let hashing = std::thread::spawn(move || -> io::Result<Digest> {
                let mut sink = BoundedHasher::new(algorithm);
                for chunk in out_receiver {
                    sink.write_all(&chunk.buf[..chunk.len])?;
                    // The decompressor may be done and gone; the buffer is then dropped.
                    let _ = out_recycle.send(chunk.buf);
                }
                Ok(sink.hasher.finish())
            });
            let reader = ChannelReader {
                receiver,
                recycle,
                chunk: Chunk {
                    buf: Vec::new(),
                    len: 0,
                },
                pos: 0,
            };
            let decompressed = decoder(compression, reader).and_then(|mut decoder| {
                let out_pool = Pool(out_pool);
                loop {
                    let mut buf = out_pool.take();
                    // Decoders work on in-memory chunks: no EINTR to retry.
                    let len = decoder.read(&mut buf)?;
                    if len == 0 {
                        return Ok(());
                    }
                    if out_sender.send(Chunk { buf, len }).is_err() {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "the hashing thread stopped",
                        ));
                    }
                }
            });
            drop(out_sender);
            // The hasher's error (a bomb) explains a failed send better than the send does.
            let digest = hashing.join().expect("the hashing thread does not panic")?;
            decompressed.map(|_| digest)
        });
        DiffPipe {
            sender: Some(sender),
            pool: Pool(pool),
            thread,
        }
    }

    /// A buffer of [`CHUNK`] bytes to fill and [`send`](Self::send).
    fn buffer(&self) -> Vec<u8> {
        self.pool.take()
    }

    /// Hands the first `len` bytes of `buf` to the decompressor.
    fn send(&mut self, buf: Vec<u8>, len: usize) {
        if let Some(sender) = &self.sender {
            // The thread stopped early (bad data): its error comes out of finish().
            if sender.send(Chunk { buf, len }).is_err() {
                self.sender = None;
            }
        }
    }

    fn finish(mut self, what: &str) -> Result<Digest, Error> {
        self.sender = None;
        self.thread
            .join()
            .expect("the decompression thread does not panic")
            .map_err(Error::io(format!("{what}: decompressing")))
    }
}

/// The downloaded chunks as one stream for the decoder, read in place; each chunk goes
/// back to the download when the decoder is done with it.
struct ChannelReader {
    receiver: Receiver<Chunk>,
    recycle: Sender<Vec<u8>>,
    chunk: Chunk,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.chunk.len {
            match self.receiver.recv() {
                Ok(next) => {
                    let used = std::mem::replace(&mut self.chunk, next);
                    if !used.buf.is_empty() {
                        // The download may be over; the buffer is then dropped.
                        let _ = self.recycle.send(used.buf);
                    }
                    self.pos = 0;
                }
                Err(_) => return Ok(&[]),
            }
        }
        Ok(&self.chunk.buf[self.pos..self.chunk.len])
    }

    fn consume(&mut self, amount: usize) {
        self.pos = (self.pos + amount).min(self.chunk.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip_members(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for part in parts {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(part).unwrap();
            out.extend(enc.finish().unwrap());
        }
        out
    }

    fn zstd_frames(parts: &[&[u8]]) -> Vec<u8> {
        parts
            .iter()
            .flat_map(|p| zstd::encode_all(*p, 1).unwrap())
            .collect()
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn expected(blob: &[u8], uncompressed: &[u8], compression: Compression) -> Expected {
        Expected {
            what: "layer under test".into(),
            digest: Digest::sha256_of(blob),
            size: blob.len() as u64,
            layer: Some((Digest::sha256_of(uncompressed), compression)),
        }
    }

    fn ingest_bytes(store: &Store, exp: &Expected, bytes: &[u8]) -> Result<Outcome, Error> {
        let bytes = bytes.to_vec();
        run(ingest(
            store,
            exp,
            || async move { Ok(io::Cursor::new(bytes)) },
            &|_| {},
        ))
    }

    #[test]
    fn multi_member_gzip_and_multi_frame_zstd_verify() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        // Incompressible, so the compressed blob spans many chunks and buffers go round.
        let mut state = 0x2545_f491_u32;
        let big: Vec<u8> = (0..6 * CHUNK + 5)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        let whole = [&b"first member "[..], &big, b" third"].concat();
        let parts: [&[u8]; 3] = [b"first member ", &big, b" third"];
        for (blob, compression) in [
            (gzip_members(&parts), Compression::Gzip),
            (zstd_frames(&parts), Compression::Zstd),
            (whole.clone(), Compression::None),
        ] {
            let exp = expected(&blob, &whole, compression);
            assert_eq!(
                ingest_bytes(&store, &exp, &blob).unwrap(),
                Outcome::Downloaded
            );
            assert_eq!(std::fs::read(store.blob_path(&exp.digest)).unwrap(), blob);
            assert_eq!(
                ingest_bytes(&store, &exp, b"unused").unwrap(),
                Outcome::Cached
            );
        }
    }

    #[test]
    fn bad_blobs_are_rejected_and_leave_nothing() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let blob = gzip_members(&[b"content"]);
        let good = expected(&blob, b"content", Compression::Gzip);

        let mut corrupt = blob.clone();
        corrupt[12] ^= 0xff;
        let err = ingest_bytes(&store, &good, &corrupt)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer under test") && err.contains(&good.digest.to_string()),
            "{err}"
        );

        let err = ingest_bytes(&store, &good, &[&blob[..], b"x"].concat()).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
        let err = ingest_bytes(&store, &good, &blob[..blob.len() - 1]).unwrap_err();
        assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");

        let wrong_diff = expected(&blob, b"other content", Compression::Gzip);
        let err = ingest_bytes(&store, &wrong_diff, &blob).unwrap_err();
        assert!(matches!(err, Error::DiffIdMismatch { .. }), "{err}");
        let not_gzip = expected(b"plain", b"plain", Compression::Gzip);
        assert!(ingest_bytes(&store, &not_gzip, b"plain").is_err());

        assert!(!store.has_blob(&good.digest).unwrap());
        let leftovers: Vec<_> = std::fs::read_dir(store.dir().join("blobs/sha256"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // A cached layer claimed with another diff_id is refused too.
        ingest_bytes(&store, &good, &blob).unwrap();
        assert!(matches!(
            ingest_bytes(&store, &wrong_diff, &blob),
            Err(Error::DiffIdMismatch { .. })
        ));
    }
}
