//! Builds a root image from layer blobs on disk, or only decodes them, for
//! scripts/bench-build:
//!
//!     build_layers OUT.erofs gzip:LAYER1 zstd:LAYER2 ...
//!     build_layers --decode-only gzip:LAYER1 ...
//!
//! Prints the stage timings (or the decoded bytes) on stdout.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;
use std::process::ExitCode;

use kiln_image::Compression;
use kiln_rootfs::{build_root_image, BuildOptions, Layer};

fn parse(arg: &str) -> Result<(Compression, &str), String> {
    let (kind, path) = arg
        .split_once(':')
        .ok_or(format!("{arg}: expected KIND:PATH"))?;
    let compression = match kind {
        "gzip" => Compression::Gzip,
        "zstd" => Compression::Zstd,
        "none" => Compression::None,
        _ => return Err(format!("{arg}: KIND is gzip, zstd or none")),
    };
    Ok((compression, path))
}

/// Decompresses with the same libraries and features the builder uses.
fn decode(compression: Compression, path: &str) -> io::Result<u64> {
    let file = BufReader::with_capacity(1 << 16, File::open(path)?);
    let mut reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file)?),
    };
    io::copy(&mut reader, &mut io::sink())
}

fn run(args: &[String]) -> Result<(), String> {
    let (out, blobs) = match args {
        [flag, blobs @ ..] if flag == "--decode-only" => (None, blobs),
        [out, blobs @ ..] => (Some(out), blobs),
        [] => return Err("usage: build_layers (OUT | --decode-only) KIND:PATH...".into()),
    };
    let blobs = blobs
        .iter()
        .map(|a| parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(out) = out else {
        let mut total = 0;
        for (compression, path) in blobs {
            total += decode(compression, path).map_err(|e| format!("{path}: {e}"))?;
        }
        println!("decoded {total} bytes");
        return Ok(());
    };
    let mut layers = Vec::new();
    for (compression, path) in blobs {
        let file = File::open(path).map_err(|e| format!("{path}: {e}"))?;
        layers.push(Layer::new(path, compression, file));
    }
    let report = build_root_image(layers, Path::new(out), &BuildOptions::default())
        .map_err(|e| e.to_string())?;
    let t = &report.timings;
    println!(
        "entries {} decode {:.3} apply {:.3} write {:.3} verify {:.3}",
        report.apply.entries,
        t.decode.as_secs_f64(),
        t.apply.as_secs_f64(),
        t.write.as_secs_f64(),
        t.verify.as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("build_layers: {e}");
            ExitCode::from(2)
        }
    }
}
