//! The stand-in for OpenShell's supervisor (tests/standin, NOT OpenShell's supervisor),
//! built as a static binary for the guest, and the gRPC server on the host's loopback
//! that it reports to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use kiln_openshell_standin::standin_report_server::{StandinReport, StandinReportServer};
use kiln_openshell_standin::{ReportAck, SupervisorReport};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::{run_with_timeout, workspace_root};

const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// `openshell-sandbox-standin`, built static (glibc with crt-static, as kiln-init is) on
/// first use in this process, in a target dir of its own beside this test's.
pub fn openshell_standin() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let target = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .join("standin-target");
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
        cargo
            .current_dir(workspace_root())
            .args([
                "build",
                "-q",
                "-p",
                "kiln-openshell-standin",
                "--bin",
                "openshell-sandbox-standin",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env("CARGO_TARGET_DIR", &target);
        let output = run_with_timeout(&mut cargo, BUILD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            output.status.success(),
            "building the stand-in failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        target.join("x86_64-unknown-linux-gnu/debug/openshell-sandbox-standin")
    })
}

/// The test's report server: every report the stand-ins send arrives on `reports`.
pub struct ReportServer {
    pub address: SocketAddr,
    pub reports: mpsc::UnboundedReceiver<SupervisorReport>,
}

struct Collector(mpsc::UnboundedSender<SupervisorReport>);

#[tonic::async_trait]
impl StandinReport for Collector {
    async fn report(
        &self,
        request: Request<SupervisorReport>,
    ) -> Result<Response<ReportAck>, Status> {
        let _ = self.0.send(request.into_inner());
        Ok(Response::new(ReportAck {}))
    }
}

impl ReportServer {
    /// Serves on a free port of 127.0.0.1 from the current tokio runtime.
    pub async fn start() -> ReportServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (tx, reports) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(StandinReportServer::new(Collector(tx)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        ReportServer { address, reports }
    }

    /// The next report, within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> SupervisorReport {
        tokio::time::timeout(timeout, self.reports.recv())
            .await
            .expect("a report from the stand-in in time")
            .expect("the report server runs")
    }
}
