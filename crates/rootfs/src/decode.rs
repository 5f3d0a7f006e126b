//! Decompressing one layer blob as a stream, bounded against decompression bombs.

use std::cell::Cell;
use std::fmt;
use std::io::{self, BufReader, Read};
use std::rc::Rc;
use std::time::{Duration, Instant};

use kiln_image::Compression;

use crate::error::EntryError;
use crate::Limits;

/// Why decoding stopped early; carried inside an `io::Error` through the tar reader and
/// turned back into an [`EntryError`] by [`classify`].
#[derive(Debug)]
enum DecodeLimit {
    Total { max: u64 },
    Ratio { max_ratio: u64 },
}

impl fmt::Display for DecodeLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeLimit::Total { max } => write!(f, "decompressed size over {max} bytes"),
            DecodeLimit::Ratio { max_ratio } => write!(f, "compression ratio over {max_ratio}"),
        }
    }
}

impl std::error::Error for DecodeLimit {}

/// Turns an I/O error of the decoded stream into what went wrong with the layer.
pub(crate) fn classify(err: io::Error) -> EntryError {
    match err.get_ref().and_then(|e| e.downcast_ref::<DecodeLimit>()) {
        Some(DecodeLimit::Total { max }) => EntryError::DecompressedTooLarge { max: *max },
        Some(DecodeLimit::Ratio { max_ratio }) => EntryError::RatioTooHigh {
            max_ratio: *max_ratio,
        },
        None if err.kind() == io::ErrorKind::UnexpectedEof => {
            EntryError::Corrupt("the layer ends in the middle of an entry".into())
        }
        None => EntryError::Decompress(err),
    }
}

/// Counts the compressed bytes the decoder consumed.
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Compressed and decompressed bytes of layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sizes {
    pub(crate) compressed: u64,
    pub(crate) decompressed: u64,
}

/// The decompressed tar stream of one layer, with its limits and the time spent decoding.
pub(crate) struct LayerStream<'a> {
    decoder: Box<dyn Read + 'a>,
    compressed: Rc<Cell<u64>>,
    decompressed: u64,
    /// What the layers before this one read and gave.
    earlier_layers: Sizes,
    max_total: u64,
    max_ratio: u64,
    ratio_grace: u64,
    decode_time: Duration,
}

impl<'a> LayerStream<'a> {
    pub(crate) fn new(
        blob: impl Read + 'a,
        compression: Compression,
        earlier_layers: Sizes,
        limits: &Limits,
    ) -> io::Result<Self> {
        let compressed = Rc::new(Cell::new(0));
        let counted = Counted {
            inner: blob,
            count: compressed.clone(),
        };
        let decoder: Box<dyn Read + 'a> = match compression {
            Compression::None => Box::new(BufReader::with_capacity(1 << 16, counted)),
            // Several gzip members in one blob are one stream, as Go's reader sees them.
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
                BufReader::with_capacity(1 << 16, counted),
            )),
            // The default decoder refuses frames needing a window over 128 MiB, which
            // bounds its memory.
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(counted)?),
        };
        Ok(LayerStream {
            decoder,
            compressed,
            decompressed: 0,
            earlier_layers,
            max_total: limits.max_uncompressed_bytes,
            max_ratio: limits.max_compression_ratio,
            ratio_grace: limits.ratio_grace_bytes,
            decode_time: Duration::ZERO,
        })
    }

    /// Blob bytes read and decompressed bytes given by this layer so far.
    pub(crate) fn sizes(&self) -> Sizes {
        Sizes {
            compressed: self.compressed.get(),
            decompressed: self.decompressed,
        }
    }

    /// Time spent inside the decompressor (and reading the blob).
    pub(crate) fn decode_time(&self) -> Duration {
        self.decode_time
    }
}

impl Read for LayerStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let start = Instant::now();
        let n = self.decoder.read(buf);
        self.decode_time += start.elapsed();
        let n = n?;
        self.decompressed += n as u64;
        let decompressed = self.earlier_layers.decompressed + self.decompressed;
        if decompressed > self.max_total {
            return Err(io::Error::other(DecodeLimit::Total {
                max: self.max_total,
            }));
        }
        // Over the whole image, so that spreading a bomb over many layers, each under the
        // grace, does not escape the bound.
        let compressed = self.earlier_layers.compressed + self.compressed.get();
        if decompressed > self.ratio_grace && decompressed / compressed.max(1) > self.max_ratio {
            return Err(io::Error::other(DecodeLimit::Ratio {
                max_ratio: self.max_ratio,
            }));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn gzip_members_concatenate_and_limits_apply() {
        let mut blob = gzip(b"hello ");
        blob.extend(gzip(b"world"));
        let limits = Limits::default();
        let mut out = String::new();
        LayerStream::new(&blob[..], Compression::Gzip, Sizes::default(), &limits)
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");

        // Why reading the whole of `blob` fails, after the `earlier` layers.
        let failure = |blob: &[u8], earlier: Sizes, limits: &Limits| {
            let err = LayerStream::new(blob, Compression::Gzip, earlier, limits)
                .unwrap()
                .read_to_end(&mut Vec::new())
                .unwrap_err();
            classify(err)
        };
        let small = Limits {
            max_uncompressed_bytes: 5,
            ..Limits::default()
        };
        assert!(matches!(
            failure(&blob, Sizes::default(), &small),
            EntryError::DecompressedTooLarge { max: 5 }
        ));

        let zeros = gzip(&vec![0; 1 << 20]);
        let tight = Limits {
            max_compression_ratio: 10,
            ratio_grace_bytes: 1000,
            ..Limits::default()
        };
        assert!(matches!(
            failure(&zeros, Sizes::default(), &tight),
            EntryError::RatioTooHigh { max_ratio: 10 }
        ));

        // Earlier layers count: a layer under the grace on its own is refused when the
        // image as a whole is past it at too high a ratio.
        let earlier = Sizes {
            compressed: 100,
            decompressed: 5000,
        };
        assert!(matches!(
            failure(&gzip(&vec![0; 1000]), earlier, &tight),
            EntryError::RatioTooHigh { max_ratio: 10 }
        ));
    }
}
