//! What the HTTP/2 front (src/front.rs) adds to a request's round trip.
//!
//! One run measures, over a unix socket, sequential small POSTs to hyper's HTTP/2 server
//! (the server under tonic) served directly and served through
//! `kiln_server::front::normalise_authority`, alternating the two in rounds so both see
//! the same machine load. Prints the median round trip of each and their ratio.
//!
//! `cargo bench -p kiln-server --bench front [-- ROUNDS REQUESTS]`

use std::convert::Infallible;
use std::path::Path;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{UnixListener, UnixStream};

#[derive(Clone, Copy, Debug)]
enum Route {
    Direct,
    Fronted,
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let requests: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut direct = Vec::new();
        let mut fronted = Vec::new();
        for _ in 0..rounds {
            direct.push(round(dir.path(), Route::Direct, requests).await);
            fronted.push(round(dir.path(), Route::Fronted, requests).await);
        }
        let direct = median(&mut direct);
        let fronted = median(&mut fronted);
        println!("round trip, direct to h2:      {:>8.1} µs", micros(direct));
        println!("round trip, through the front: {:>8.1} µs", micros(fronted));
        println!(
            "ratio front/direct: {:.3} ({rounds} rounds of {requests} requests)",
            fronted.as_secs_f64() / direct.as_secs_f64()
        );
    });
}

/// Mean round trip of `requests` sequential requests on one connection.
async fn round(dir: &Path, route: Route, requests: usize) -> Duration {
    let socket = dir.join(format!("{route:?}.sock"));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let service = hyper::service::service_fn(
            |request: hyper::Request<hyper::body::Incoming>| async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                Ok::<_, Infallible>(hyper::Response::new(Full::new(body)))
            },
        );
        let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        let _ = match route {
            Route::Direct => {
                builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
            }
            Route::Fronted => {
                let stream = kiln_server::front::normalise_authority(stream);
                builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
            }
        };
    });
    let stream = UnixStream::connect(&socket).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let started = Instant::now();
    for _ in 0..requests {
        let request = hyper::Request::post("http://localhost/kiln.driver.v1.Driver/Get")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(
                b"\0\0\0\0\x0e\x0a\x0c0123456789ab",
            )))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    let elapsed = started.elapsed() / requests as u32;
    drop(sender);
    server.abort();
    elapsed
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}
