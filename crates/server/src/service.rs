//! The Driver service: each RPC checks its request, calls kiln-sandbox's lifecycle on a
//! thread of its own (the lifecycle blocks, and pulls run their own tokio runtime), and
//! reports what happened to the event hub.

use std::collections::HashSet;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_sandbox::{ExecOutput, SandboxInfo, Status};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status as GrpcStatus, Streaming};

use crate::convert::{self, Machine};
use crate::events::Hub;
use crate::proto;
use crate::proto::driver_server::Driver;
use crate::proto::event::Kind;

/// How often the status watcher reads the sandboxes' state: the delay with which Watch
/// reports changes nobody asked this server for (a workload ending by itself, a monitor
/// dying, another kiln process starting or removing a sandbox).
const STATUS_POLL: Duration = Duration::from_millis(500);

/// Stop's grace period when the request gives none (as `kiln stop`).
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// Messages buffered per Watch or Exec stream before the producer waits.
const STREAM_BUFFER: usize = 64;

/// What every RPC shares.
#[derive(Debug)]
pub struct Shared {
    pub root: PathBuf,
    /// The kiln executable, run as `kiln monitor` for each started sandbox.
    pub monitor_exe: PathBuf,
    pub machine: Machine,
    pub hub: Hub,
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct DriverService {
    shared: Arc<Shared>,
}

/// Runs blocking `work` on a thread of its own (not a tokio thread: the lifecycle may
/// start a runtime of its own) and waits for it without blocking the runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, GrpcStatus> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    rx.await
        .map_err(|_| GrpcStatus::internal("the operation's thread panicked; see the server's log"))
}

impl DriverService {
    pub fn new(shared: Arc<Shared>) -> Self {
        DriverService { shared }
    }

    /// Runs a lifecycle call on its own thread; its error becomes a status.
    async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Shared) -> Result<T, kiln_sandbox::Error> + Send + 'static,
    ) -> Result<T, GrpcStatus> {
        let shared = Arc::clone(&self.shared);
        blocking(move || work(&shared))
            .await?
            .map_err(convert::status)
    }

    async fn get_info(&self, sandbox: &str) -> Result<SandboxInfo, GrpcStatus> {
        let sandbox = sandbox.to_owned();
        self.call(move |s| kiln_sandbox::get(&s.root, &sandbox))
            .await
    }

    fn publish_status(&self, info: &SandboxInfo) {
        publish_status(&self.shared, info);
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, GrpcStatus>> + Send>>;
type ExecStream = Pin<Box<dyn Stream<Item = Result<proto::ExecOutput, GrpcStatus>> + Send>>;

#[tonic::async_trait]
impl Driver for DriverService {
    async fn create(
        &self,
        request: Request<proto::CreateRequest>,
    ) -> Result<Response<proto::Sandbox>, GrpcStatus> {
        let create = convert::create_request(request.into_inner(), &self.shared.machine)?;
        let shared = Arc::clone(&self.shared);
        let info = self
            .call(move |s| {
                let name = create.name().map(str::to_owned);
                let events = |event| {
                    shared
                        .hub
                        .publish("", name.as_deref(), convert::provision_event(event))
                };
                kiln_sandbox::create(&s.root, create, &events)
            })
            .await?;
        self.publish_status(&info);
        Ok(Response::new(convert::sandbox(&info)))
    }

    async fn start(
        &self,
        request: Request<proto::StartRequest>,
    ) -> Result<Response<proto::Sandbox>, GrpcStatus> {
        let known = self.get_info(&request.into_inner().sandbox).await?;
        let shared = Arc::clone(&self.shared);
        let (id, name) = (known.id.clone(), known.name.clone());
        let result = self
            .call(move |s| {
                let events = |event| {
                    shared
                        .hub
                        .publish(&id, name.as_deref(), convert::provision_event(event))
                };
                kiln_sandbox::start(&s.root, &id, &s.monitor_exe, &s.machine.qemu, &events)
            })
            .await;
        // A failed boot is news too: report the status it left.
        let after = self.get_info(&known.id).await;
        if let Ok(info) = &after {
            self.publish_status(info);
        }
        result?;
        Ok(Response::new(convert::sandbox(&after?)))
    }

    async fn stop(
        &self,
        request: Request<proto::StopRequest>,
    ) -> Result<Response<proto::Sandbox>, GrpcStatus> {
        let request = request.into_inner();
        let known = self.get_info(&request.sandbox).await?;
        if known.status != Status::Running {
            return Err(not_running(&request.sandbox, &known));
        }
        let grace = match request.grace_seconds {
            0 => DEFAULT_STOP_GRACE,
            seconds => Duration::from_secs(seconds.into()),
        };
        let id = known.id.clone();
        let info = self
            .call(move |s| kiln_sandbox::stop(&s.root, &id, grace))
            .await?;
        self.publish_status(&info);
        Ok(Response::new(convert::sandbox(&info)))
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, GrpcStatus> {
        let request = request.into_inner();
        let known = self.get_info(&request.sandbox).await?;
        let id = known.id.clone();
        self.call(move |s| kiln_sandbox::remove(&s.root, &id, request.force))
            .await?;
        self.shared.hub.publish(
            &known.id,
            known.name.as_deref(),
            Kind::Deleted(proto::Deleted {}),
        );
        Ok(Response::new(proto::DeleteResponse {}))
    }

    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::Sandbox>, GrpcStatus> {
        let info = self.get_info(&request.into_inner().sandbox).await?;
        Ok(Response::new(convert::sandbox(&info)))
    }

    async fn list(
        &self,
        _: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, GrpcStatus> {
        let mut infos = self.call(|s| kiln_sandbox::list(&s.root)).await?;
        infos.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(Response::new(proto::ListResponse {
            sandboxes: infos.iter().map(convert::sandbox).collect(),
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<EventStream>, GrpcStatus> {
        let request = request.into_inner();
        // Subscribe before reading the current state, so nothing falls in between.
        let mut events = self.shared.hub.subscribe();
        let only = match request.sandbox.as_str() {
            "" => None,
            sandbox => Some(self.get_info(sandbox).await?),
        };
        let initial = match (&only, request.initial_state) {
            (_, false) => Vec::new(),
            (Some(info), true) => vec![info.clone()],
            (None, true) => self.call(|s| kiln_sandbox::list(&s.root)).await?,
        };
        let only = only.map(|info| info.id);
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            for info in initial {
                let event = proto::Event {
                    sandbox_id: info.id.clone(),
                    name: info.name.clone().unwrap_or_default(),
                    time_unix_ms: crate::events::now_ms(),
                    kind: Some(Kind::State(convert::sandbox(&info))),
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    () = tx.closed() => return,
                };
                let event = match event {
                    Ok(event) if only.as_ref().is_some_and(|id| *id != event.sandbox_id) => {
                        continue
                    }
                    Ok(event) => Ok(event),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        Err(GrpcStatus::aborted(format!(
                        "this watcher fell {missed} events behind; watch again (with initial_state)"
                    )))
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                // A watch of one sandbox ends with its deletion.
                let last = match &event {
                    Ok(event) => only.is_some() && matches!(event.kind, Some(Kind::Deleted(_))),
                    Err(_) => true,
                };
                if tx.send(event).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExecStream = ExecStream;

    async fn exec(
        &self,
        request: Request<Streaming<proto::ExecInput>>,
    ) -> Result<Response<ExecStream>, GrpcStatus> {
        let mut inputs = request.into_inner();
        let start = match inputs.message().await? {
            Some(proto::ExecInput {
                kind: Some(proto::exec_input::Kind::Start(start)),
            }) => start,
            _ => {
                return Err(GrpcStatus::invalid_argument(
                    "the first Exec message must be `start`",
                ))
            }
        };
        let (sandbox, exec) = convert::exec_request(start)?;
        let session = self
            .call(move |s| kiln_sandbox::exec(&s.root, &sandbox, exec))
            .await?;

        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let input = session.input();
        let runtime = tokio::runtime::Handle::current();
        // Client to sandbox: the session's writes block, so on a thread of their own.
        std::thread::spawn(move || {
            let mut eof_sent = false;
            loop {
                let message = match runtime.block_on(inputs.message()) {
                    Ok(Some(message)) => message,
                    // The client closed its side: no more stdin.
                    Ok(None) => break,
                    // The client went away: the process must not outlive the stream.
                    Err(_) => {
                        let _ = input.signal(libc::SIGKILL);
                        return;
                    }
                };
                use proto::exec_input::Kind as In;
                let sent = match message.kind {
                    Some(In::Stdin(bytes)) if !eof_sent => input.stdin(&bytes),
                    Some(In::StdinEof(_)) if !eof_sent => {
                        eof_sent = true;
                        input.close_stdin()
                    }
                    Some(In::Signal(signal)) => input.signal(signal),
                    Some(In::Resize(size)) => match convert::terminal_size(size) {
                        Ok(size) => input.resize(size),
                        Err(_) => Ok(()),
                    },
                    _ => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
            }
            if !eof_sent {
                let _ = input.close_stdin();
            }
        });
        // A client that goes away while its process is silent: nothing fails to send, so
        // watch the stream itself, until the session ends (`ended` is dropped).
        let (ended, session_end) = tokio::sync::oneshot::channel::<()>();
        let (watched, killer) = (tx.clone(), session.input());
        tokio::spawn(async move {
            tokio::select! {
                () = watched.closed() => {
                    std::thread::spawn(move || killer.signal(libc::SIGKILL));
                }
                _ = session_end => {}
            }
        });
        // Sandbox to client.
        let killer = session.input();
        std::thread::spawn(move || {
            let _ended = ended;
            let mut session = session;
            loop {
                let (output, last) = match session.next() {
                    Ok(ExecOutput::Stdout(bytes)) => {
                        (Ok(out(proto::exec_output::Kind::Stdout(bytes))), false)
                    }
                    Ok(ExecOutput::Stderr(bytes)) => {
                        (Ok(out(proto::exec_output::Kind::Stderr(bytes))), false)
                    }
                    Ok(ExecOutput::Exited(result)) => (
                        Ok(out(proto::exec_output::Kind::Exit(convert::workload_exit(
                            &result,
                        )))),
                        true,
                    ),
                    Err(err) => (Err(GrpcStatus::unavailable(err.to_string())), true),
                };
                if tx.blocking_send(output).is_err() {
                    let _ = killer.signal(libc::SIGKILL);
                    return;
                }
                if last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn out(kind: proto::exec_output::Kind) -> proto::ExecOutput {
    proto::ExecOutput { kind: Some(kind) }
}

fn not_running(given: &str, info: &SandboxInfo) -> GrpcStatus {
    let status = match info.status {
        Status::Created => "created, never started",
        Status::Running => "running",
        Status::Exited { .. } => "exited",
        Status::Failed { .. } => "failed",
    };
    GrpcStatus::failed_precondition(format!(
        "sandbox {given} ({}) is not running: it is {status}",
        info.id
    ))
}

/// Publishes every status change of the sandboxes under the root: what this server did
/// not cause (a workload ending, a monitor dying, another kiln process at work) reaches
/// Watch streams too. Every running sandbox also has a thread waiting for its monitor
/// to end, so that its exit is reported as soon as it happens.
#[derive(Debug, Default)]
pub struct StatusWatcher {
    known: HashSet<String>,
    waiting: Arc<Mutex<HashSet<String>>>,
}

impl StatusWatcher {
    /// One look at every sandbox; statuses equal to the last published are dropped by
    /// the hub.
    pub async fn poll(&mut self, shared: &Arc<Shared>) {
        let root = shared.root.clone();
        let infos = match blocking(move || kiln_sandbox::list(&root)).await {
            Ok(Ok(infos)) => infos,
            Ok(Err(err)) => return tracing::warn!("reading the sandboxes' state: {err}"),
            Err(err) => return tracing::warn!("reading the sandboxes' state: {}", err.message()),
        };
        let mut now = HashSet::new();
        for info in &infos {
            // A known sandbox reads as created again only while a start boots it: that
            // start reports its own progress.
            let starting = info.status == Status::Created && self.known.contains(&info.id);
            if !starting {
                publish_status(shared, info);
            }
            if info.status == Status::Running {
                self.wait_for_end(shared, &info.id);
                self.follow_network(shared, info);
            }
            now.insert(info.id.clone());
        }
        for gone in self.known.difference(&now) {
            shared
                .hub
                .publish(gone, None, Kind::Deleted(proto::Deleted {}));
        }
        self.known = now;
    }

    /// Reports how running sandbox `id` ended once its monitor is gone (unless a thread
    /// already waits for it).
    fn wait_for_end(&self, shared: &Arc<Shared>, id: &str) {
        if !self
            .waiting
            .lock()
            .expect("waiting lock")
            .insert(id.to_owned())
        {
            return;
        }
        let (shared, waiting, id) = (Arc::clone(shared), Arc::clone(&self.waiting), id.to_owned());
        std::thread::spawn(move || {
            match kiln_sandbox::wait(&shared.root, &id) {
                Ok(ended) if ended.status != Status::Created => publish_status(&shared, &ended),
                Ok(_) => {}
                Err(err) => tracing::debug!("waiting for sandbox {id}: {err}"),
            }
            waiting.lock().expect("waiting lock").remove(&id);
        });
    }

    /// Publishes each new network decision of running sandbox `info` as a Watch event
    /// until it stops (unless a thread already follows it).
    fn follow_network(&self, shared: &Arc<Shared>, info: &SandboxInfo) {
        let key = format!("network {}", info.id);
        if !self
            .waiting
            .lock()
            .expect("waiting lock")
            .insert(key.clone())
        {
            return;
        }
        let (shared, waiting) = (Arc::clone(shared), Arc::clone(&self.waiting));
        let (id, name) = (info.id.clone(), info.name.clone());
        // From this boot's start: the poll may notice the sandbox after its first decisions.
        let since = info.started_unix.unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.map_or(0, |elapsed| elapsed.as_secs())
        });
        std::thread::spawn(move || {
            let mut publish = |record: &kiln_policy::DecisionRecord| {
                let kind = convert::network_event(record);
                shared.hub.publish(&id, name.as_deref(), kind);
                Ok(())
            };
            let which = kiln_sandbox::NetworkLogs::Since(since);
            if let Err(err) = kiln_sandbox::network_logs(&shared.root, &id, which, &mut publish) {
                tracing::debug!("following sandbox {id}'s network decisions: {err}");
            }
            waiting.lock().expect("waiting lock").remove(&key);
        });
    }

    /// Polls forever.
    pub async fn run(mut self, shared: Arc<Shared>) {
        loop {
            tokio::time::sleep(STATUS_POLL).await;
            self.poll(&shared).await;
        }
    }
}

fn publish_status(shared: &Shared, info: &SandboxInfo) {
    shared
        .hub
        .publish(&info.id, info.name.as_deref(), convert::status_event(info));
}
