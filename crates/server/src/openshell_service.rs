//! The `openshell.compute.v1.ComputeDriver` service: OpenShell's gateway drives kiln's
//! sandbox lifecycle through it.
//!
//! A sandbox the gateway creates is a kiln sandbox named by the gateway's sandbox id and
//! labelled with the gateway's name for it ([`NAME_LABEL`]); only sandboxes with that
//! label are the gateway's, so sandboxes made with kiln's own CLI or API stay out of its
//! lists. CreateSandbox checks the spec, answers, and provisions in the background (pull,
//! root image, boot): Watch reports each step as a platform event with OpenShell's
//! progress metadata and every status change as a snapshot. Until kiln has recorded the
//! sandbox the registry here stands in for it (provisioning, or failed with kiln's
//! message). Stop and Start succeed on a sandbox already stopped or running; the writable
//! disk is kept across both. Workspaces are the gateway's grouping only: kiln keeps
//! nothing per workspace, so Ensure and Delete succeed without doing anything.
//!
//! Events come from the hub the kiln driver API uses, so one server process may serve
//! both APIs on two sockets and each sees what the other did.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_image::PullOptions;
use kiln_sandbox::{
    CreateFields, CreateRequest, Field, FieldNames, NetworkMode, OpenShellSupervisor, SandboxInfo,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status as GrpcStatus};

use crate::convert::{self, ProtoNames};
use crate::openshell_env::{gateway_allow_host, supervisor_environment, SupervisorSettings};
use crate::openshell_proto as os;
use crate::openshell_proto::compute_driver_server::ComputeDriver;
use crate::openshell_spec::{self, SandboxPlan};
use crate::openshell_status::{driver_status, pending_status, progress_event};
use crate::proto::event::Kind;
use crate::service::{blocking, Shared};

/// The label that marks a kiln sandbox as the gateway's and keeps its name.
pub const NAME_LABEL: &str = "openshell.sandbox-name";

/// Stop's grace period before the VM is powered off.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Messages buffered per Watch stream before the producer waits.
const STREAM_BUFFER: usize = 64;

/// The driver's settings that no sandbox spec carries.
#[derive(Debug, Clone, Default)]
pub struct OpenShellConfig {
    /// The image a sandbox boots when its template names none (empty: none).
    pub default_image: String,
    /// Ids of the `sandbox` user written into each image (`None`: kiln's default).
    pub sandbox_uid: Option<u32>,
    pub sandbox_gid: Option<u32>,
    /// OpenShell's supervisor, run in each sandbox as its main program (`None`: kiln's
    /// supervisor runs the sandbox's command itself).
    pub supervisor: Option<SupervisorConfig>,
}

/// OpenShell's supervisor binary and the gateway it dials.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Host path of the static `openshell-sandbox` binary
    /// ([`crate::openshell_env::check_supervisor_binary`] accepted it).
    pub binary: std::path::PathBuf,
    /// The gateway's URL as the host reaches it
    /// ([`crate::openshell_env::check_endpoint`] accepted it).
    pub endpoint: String,
    /// The TLS material of an `https` gateway
    /// ([`crate::openshell_env::read_tls_material`] read it).
    pub tls: Option<kiln_protocol::OpenShellTls>,
}

/// The supervisor's log level when the sandbox spec gives none.
const DEFAULT_SUPERVISOR_LOG_LEVEL: &str = "info";

/// What the service knows of a gateway sandbox beyond kiln's own records.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// The gateway's name for it.
    name: String,
    /// kiln's id, once kiln has recorded the sandbox.
    kiln_id: Option<String>,
    /// Why provisioning failed before kiln recorded it.
    failure: Option<String>,
    /// A Delete is removing it.
    deleting: bool,
    /// Deleted: kept so that every Watch stream can still tell its deletion from that of
    /// a sandbox that is not the gateway's (one small entry per id ever deleted; a new
    /// sandbox with the same id replaces it).
    deleted: bool,
}

/// The gateway's sandboxes by the gateway's id.
type Registry = Arc<Mutex<HashMap<String, Entry>>>;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct OpenShellService {
    shared: Arc<Shared>,
    config: Arc<OpenShellConfig>,
    registry: Registry,
}

/// How errors name the fields kiln-sandbox checks: by where they are in the contract.
struct ContractNames;

impl FieldNames for ContractNames {
    fn field(&self, field: Field) -> &'static str {
        match field {
            Field::Image => "spec.template.image",
            Field::Name => "sandbox.id",
            Field::Uid => "the driver's sandbox uid",
            Field::Gid => "the driver's sandbox gid",
            Field::Cpus => "spec.template.resources.cpu",
            Field::Memory => "spec.template.resources.memory",
            Field::Env => "spec.environment",
            Field::Command => "spec.command",
            Field::Labels => "spec.template.labels",
            // A sandbox spec never sets the others: named as kiln's driver API names them.
            other => ProtoNames.field(other),
        }
    }

    fn network(&self, mode: NetworkMode) -> &'static str {
        ProtoNames.network(mode)
    }
}

impl OpenShellService {
    pub fn new(shared: Arc<Shared>, config: OpenShellConfig) -> Self {
        OpenShellService {
            shared,
            config: Arc::new(config),
            registry: Registry::default(),
        }
    }

    /// Reads `sandbox` into a plan and a kiln create request, or says what is wrong.
    fn check(
        &self,
        sandbox: Option<&os::DriverSandbox>,
    ) -> Result<(SandboxPlan, CreateRequest), GrpcStatus> {
        let sandbox = sandbox.ok_or_else(|| GrpcStatus::invalid_argument("sandbox is required"))?;
        let plan = openshell_spec::plan(sandbox, &self.config.default_image)?;
        let mut labels: Vec<String> = plan
            .labels
            .iter()
            .filter(|(key, _)| *key != NAME_LABEL)
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        labels.push(format!("{NAME_LABEL}={}", plan.name));
        let spec = sandbox.spec.as_ref();
        let token = spec.map_or("", |spec| spec.sandbox_token.as_str());
        if token.len() > kiln_protocol::MAX_OPENSHELL_TOKEN_LEN {
            return Err(GrpcStatus::invalid_argument(format!(
                "spec.sandbox_token is {} bytes; at most {} are accepted",
                token.len(),
                kiln_protocol::MAX_OPENSHELL_TOKEN_LEN
            )));
        }
        let mut allow_host = Vec::new();
        let openshell = self.config.supervisor.as_ref().map(|supervisor| {
            let settings = SupervisorSettings {
                endpoint: supervisor.endpoint.clone(),
                log_level: DEFAULT_SUPERVISOR_LOG_LEVEL.into(),
                tls: supervisor.tls.is_some(),
                uid: self
                    .config
                    .sandbox_uid
                    .unwrap_or(kiln_identity::DEFAULT_SANDBOX_UID),
                gid: self
                    .config
                    .sandbox_gid
                    .unwrap_or(kiln_identity::DEFAULT_SANDBOX_GID),
            };
            let log_level = spec.map_or("", |spec| spec.log_level.as_str());
            let env = supervisor_environment(&plan, &settings, log_level, !token.is_empty());
            allow_host.extend(gateway_allow_host(&supervisor.endpoint));
            OpenShellSupervisor {
                binary: supervisor.binary.clone(),
                env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                token: (!token.is_empty()).then(|| token.to_owned()),
                tls: supervisor.tls.clone(),
            }
        });
        let machine = &self.shared.machine;
        let fields = CreateFields {
            image: plan.image.clone(),
            pull: PullOptions::default(),
            name: Some(plan.id.clone()),
            // The command is the whole argv: no entrypoint in front of it.
            entrypoint: (!plan.command.is_empty()).then(String::new),
            command: plan.command.clone(),
            env: plan
                .environment
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect(),
            lend_environment: false,
            uid: self.config.sandbox_uid.map(|id| id.to_string()),
            gid: self.config.sandbox_gid.map(|id| id.to_string()),
            // The gateway's ids follow OpenShell's rules, not kiln's narrower ones.
            id_bounds: Some(kiln_identity::IdBounds::OPENSHELL),
            cpus: plan.vcpus.map(|n| n.to_string()),
            memory: plan.memory_mib.map(|mib| format!("{mib}m")),
            network: NetworkMode::User,
            allow_host,
            openshell,
            labels,
            accel: machine.accel,
            rootfs_cache_max: machine.rootfs_cache_max,
            ..CreateFields::default()
        };
        let request = fields.validate(&ContractNames).map_err(convert::status)?;
        Ok((plan, request))
    }

    /// The gateway's sandbox `id`, as kiln has it now, or NOT_FOUND.
    async fn observe(&self, id: &str) -> Result<os::DriverSandbox, GrpcStatus> {
        let entry = self
            .registry
            .lock()
            .expect("registry lock")
            .get(id)
            .cloned();
        match entry {
            Some(Entry { deleted: true, .. }) => Err(not_found(id)),
            Some(Entry {
                kiln_id: None,
                name,
                failure,
                ..
            }) => Ok(pending(id, &name, failure.as_deref())),
            Some(Entry { deleting, .. }) => {
                let info = self.kiln_info(id).await?;
                Ok(snapshot(&info, deleting))
            }
            None => {
                let info = self.kiln_info(id).await?;
                remember(&self.registry, &info);
                Ok(snapshot(&info, false))
            }
        }
    }

    /// kiln's record of the gateway's sandbox `id`; NOT_FOUND for one that is not the
    /// gateway's (an id that happens to name or prefix another of kiln's sandboxes).
    async fn kiln_info(&self, id: &str) -> Result<SandboxInfo, GrpcStatus> {
        let (root, wanted) = (self.shared.root.clone(), id.to_owned());
        let info = blocking(move || kiln_sandbox::get(&root, &wanted))
            .await?
            .map_err(convert::status)?;
        if gateway_id(&info) == Some(id) {
            Ok(info)
        } else {
            Err(not_found(id))
        }
    }

    /// The gateway's id from a request carrying an id and a name: the id, else the
    /// sandbox with that name.
    async fn resolve(&self, id: &str, name: &str) -> Result<String, GrpcStatus> {
        if !id.is_empty() {
            return Ok(id.to_owned());
        }
        if name.is_empty() {
            return Err(GrpcStatus::invalid_argument(
                "sandbox_id and sandbox_name are both empty; accepted: either",
            ));
        }
        self.list_all()
            .await?
            .into_iter()
            .find(|sandbox| sandbox.name == name)
            .map(|sandbox| sandbox.id)
            .ok_or_else(|| GrpcStatus::not_found(format!("no sandbox is named {name:?}")))
    }

    async fn list_all(&self) -> Result<Vec<os::DriverSandbox>, GrpcStatus> {
        let root = self.shared.root.clone();
        let mut infos = blocking(move || kiln_sandbox::list(&root))
            .await?
            .map_err(convert::status)?;
        infos.retain(|info| gateway_id(info).is_some());
        infos.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        let registry = self.registry.lock().expect("registry lock");
        let mut sandboxes: Vec<_> = infos
            .iter()
            .map(|info| {
                let deleting = gateway_id(info)
                    .and_then(|id| registry.get(id))
                    .is_some_and(|entry| entry.deleting);
                snapshot(info, deleting)
            })
            .collect();
        sandboxes.extend(
            registry
                .iter()
                .filter(|(_, e)| e.kiln_id.is_none() && !e.deleted)
                .map(|(id, entry)| pending(id, &entry.name, entry.failure.as_deref())),
        );
        Ok(sandboxes)
    }

    /// Pull, build and boot in the background, reporting to the hub; a failure before
    /// kiln records the sandbox is kept in the registry for Get and Watch.
    fn provision(&self, plan: SandboxPlan, request: CreateRequest) {
        let (shared, registry) = (Arc::clone(&self.shared), Arc::clone(&self.registry));
        std::thread::spawn(move || {
            let id = plan.id;
            let events = |event| {
                shared
                    .hub
                    .publish("", Some(&id), convert::provision_event(event))
            };
            let created = match kiln_sandbox::create(&shared.root, request, &events) {
                Ok(info) => info,
                Err(err) => {
                    tracing::warn!("provisioning OpenShell sandbox {id}: {err}");
                    if let Some(entry) = registry.lock().expect("registry lock").get_mut(&id) {
                        entry.failure = Some(err.to_string());
                    }
                    shared
                        .hub
                        .publish("", Some(&id), pending_failure(err.to_string()));
                    return;
                }
            };
            // Deleted while it was being pulled: nothing of it may stay.
            let deleted = registry
                .lock()
                .expect("registry lock")
                .get(&id)
                .is_none_or(|entry| entry.deleted);
            if deleted {
                if let Err(err) = kiln_sandbox::remove(&shared.root, &created.id, true) {
                    tracing::warn!("removing deleted OpenShell sandbox {id}: {err}");
                }
                return;
            }
            remember(&registry, &created);
            let events = |event| {
                shared
                    .hub
                    .publish(&created.id, Some(&id), convert::provision_event(event))
            };
            let started = kiln_sandbox::start(
                &shared.root,
                &created.id,
                &shared.monitor_exe,
                &shared.machine.qemu,
                &events,
            );
            if let Err(err) = &started {
                tracing::warn!("booting OpenShell sandbox {id}: {err}");
            }
            if let Ok(info) = kiln_sandbox::get(&shared.root, &created.id) {
                shared
                    .hub
                    .publish(&info.id, Some(&id), convert::status_event(&info));
            }
        });
    }

    /// Runs a lifecycle call on sandbox `kiln_id` and publishes the status it leaves.
    async fn lifecycle(
        &self,
        kiln_id: String,
        gateway_id: &str,
        work: impl FnOnce(&Shared, &str) -> Result<SandboxInfo, kiln_sandbox::Error> + Send + 'static,
    ) -> Result<(), GrpcStatus> {
        let shared = Arc::clone(&self.shared);
        let id = gateway_id.to_owned();
        let outcome = blocking(move || {
            let outcome = work(&shared, &kiln_id);
            if let Ok(info) = kiln_sandbox::get(&shared.root, &kiln_id) {
                shared
                    .hub
                    .publish(&info.id, Some(&id), convert::status_event(&info));
            }
            outcome
        })
        .await?;
        outcome.map(drop).map_err(convert::status)
    }
}

/// A status event for a sandbox kiln has not recorded (so it has no kiln id); the Watch
/// translation reads the failure from the registry.
fn pending_failure(message: String) -> Kind {
    Kind::Failed(crate::proto::Failed { message })
}

fn not_found(id: &str) -> GrpcStatus {
    GrpcStatus::not_found(format!("no OpenShell sandbox has the id {id:?}"))
}

/// The gateway's id of a kiln sandbox, when it is one of the gateway's.
fn gateway_id(info: &SandboxInfo) -> Option<&str> {
    info.labels.get(NAME_LABEL)?;
    info.name.as_deref()
}

fn remember(registry: &Registry, info: &SandboxInfo) {
    let Some(id) = gateway_id(info) else { return };
    let mut registry = registry.lock().expect("registry lock");
    let entry = registry.entry(id.to_owned()).or_default();
    entry.name = info.labels[NAME_LABEL].clone();
    entry.kiln_id = Some(info.id.clone());
    entry.failure = None;
    entry.deleted = false;
}

fn snapshot(info: &SandboxInfo, deleting: bool) -> os::DriverSandbox {
    let name = info.labels.get(NAME_LABEL).cloned().unwrap_or_default();
    os::DriverSandbox {
        id: info.name.clone().unwrap_or_default(),
        status: Some(driver_status(info, &name, deleting)),
        name,
        ..Default::default()
    }
}

fn pending(id: &str, name: &str, failure: Option<&str>) -> os::DriverSandbox {
    os::DriverSandbox {
        id: id.to_owned(),
        name: name.to_owned(),
        status: Some(pending_status(name, failure)),
        ..Default::default()
    }
}

fn sandbox_event(sandbox: os::DriverSandbox) -> os::WatchSandboxesEvent {
    os::WatchSandboxesEvent {
        payload: Some(os::watch_sandboxes_event::Payload::Sandbox(
            os::WatchSandboxesSandboxEvent {
                sandbox: Some(sandbox),
            },
        )),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<os::WatchSandboxesEvent, GrpcStatus>> + Send>>;

#[tonic::async_trait]
impl ComputeDriver for OpenShellService {
    async fn get_capabilities(
        &self,
        _: Request<os::GetCapabilitiesRequest>,
    ) -> Result<Response<os::GetCapabilitiesResponse>, GrpcStatus> {
        Ok(Response::new(os::GetCapabilitiesResponse {
            driver_name: "kiln".into(),
            driver_version: env!("CARGO_PKG_VERSION").into(),
            default_image: self.config.default_image.clone(),
            // Sandboxes outlive this server (each runs under its own monitor), and Stop
            // and Start keep their disks: the gateway may stop and start them as it likes.
            gateway_manages_lifecycle: true,
        }))
    }

    async fn get_gateway_listener_requirements(
        &self,
        _: Request<os::GetGatewayListenerRequirementsRequest>,
    ) -> Result<Response<os::GetGatewayListenerRequirementsResponse>, GrpcStatus> {
        use os::gateway_listener_requirement::Selector;
        Ok(Response::new(os::GetGatewayListenerRequirementsResponse {
            requirements: vec![os::GatewayListenerRequirement {
                reason: format!(
                    "kiln's guests reach the host's loopback at {}: the gateway must listen \
                     on loopback",
                    crate::openshell_env::GUEST_HOST_ALIAS
                ),
                selector: Some(Selector::LoopbackInterface(
                    os::GatewayLoopbackInterfaceRequirement {},
                )),
            }],
        }))
    }

    async fn validate_sandbox_create(
        &self,
        request: Request<os::ValidateSandboxCreateRequest>,
    ) -> Result<Response<os::ValidateSandboxCreateResponse>, GrpcStatus> {
        self.check(request.into_inner().sandbox.as_ref())?;
        Ok(Response::new(os::ValidateSandboxCreateResponse {}))
    }

    async fn get_sandbox(
        &self,
        request: Request<os::GetSandboxRequest>,
    ) -> Result<Response<os::GetSandboxResponse>, GrpcStatus> {
        let request = request.into_inner();
        let id = self
            .resolve(&request.sandbox_id, &request.sandbox_name)
            .await?;
        let sandbox = self.observe(&id).await?;
        Ok(Response::new(os::GetSandboxResponse {
            sandbox: Some(sandbox),
        }))
    }

    async fn list_sandboxes(
        &self,
        _: Request<os::ListSandboxesRequest>,
    ) -> Result<Response<os::ListSandboxesResponse>, GrpcStatus> {
        Ok(Response::new(os::ListSandboxesResponse {
            sandboxes: self.list_all().await?,
        }))
    }

    async fn create_sandbox(
        &self,
        request: Request<os::CreateSandboxRequest>,
    ) -> Result<Response<os::CreateSandboxResponse>, GrpcStatus> {
        let (plan, create) = self.check(request.into_inner().sandbox.as_ref())?;
        let exists = match self.kiln_info(&plan.id).await {
            Ok(_) => true,
            Err(status) if status.code() == tonic::Code::NotFound => false,
            Err(status) => return Err(status),
        };
        {
            let mut registry = self.registry.lock().expect("registry lock");
            let pending = registry
                .get(&plan.id)
                .is_some_and(|entry| entry.kiln_id.is_none() && !entry.deleted);
            if exists || pending {
                return Err(GrpcStatus::already_exists(format!(
                    "a sandbox with the id {:?} exists; delete it first",
                    plan.id
                )));
            }
            registry.insert(
                plan.id.clone(),
                Entry {
                    name: plan.name.clone(),
                    ..Entry::default()
                },
            );
        }
        self.provision(plan, create);
        Ok(Response::new(os::CreateSandboxResponse {}))
    }

    async fn stop_sandbox(
        &self,
        request: Request<os::StopSandboxRequest>,
    ) -> Result<Response<os::StopSandboxResponse>, GrpcStatus> {
        let request = request.into_inner();
        let id = self
            .resolve(&request.sandbox_id, &request.sandbox_name)
            .await?;
        let info = self.kiln_info(&id).await?;
        if info.status == kiln_sandbox::Status::Running {
            self.lifecycle(info.id, &id, |s, kiln_id| {
                kiln_sandbox::stop(&s.root, kiln_id, STOP_GRACE)
            })
            .await?;
        }
        Ok(Response::new(os::StopSandboxResponse {}))
    }

    async fn start_sandbox(
        &self,
        request: Request<os::StartSandboxRequest>,
    ) -> Result<Response<os::StartSandboxResponse>, GrpcStatus> {
        let request = request.into_inner();
        let id = self
            .resolve(&request.sandbox_id, &request.sandbox_name)
            .await?;
        let info = self.kiln_info(&id).await?;
        if info.status != kiln_sandbox::Status::Running {
            let shared = Arc::clone(&self.shared);
            let gateway = id.clone();
            self.lifecycle(info.id, &id, move |s, kiln_id| {
                let events = |event| {
                    shared
                        .hub
                        .publish(kiln_id, Some(&gateway), convert::provision_event(event))
                };
                kiln_sandbox::start(&s.root, kiln_id, &s.monitor_exe, &s.machine.qemu, &events)
            })
            .await?;
        }
        Ok(Response::new(os::StartSandboxResponse {}))
    }

    async fn delete_sandbox(
        &self,
        request: Request<os::DeleteSandboxRequest>,
    ) -> Result<Response<os::DeleteSandboxResponse>, GrpcStatus> {
        let request = request.into_inner();
        let id = match self
            .resolve(&request.sandbox_id, &request.sandbox_name)
            .await
        {
            Ok(id) => id,
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Ok(Response::new(os::DeleteSandboxResponse { deleted: false }))
            }
            Err(status) => return Err(status),
        };
        let info = match self.kiln_info(&id).await {
            Ok(info) => info,
            Err(status) if status.code() == tonic::Code::NotFound => {
                // Not recorded by kiln: a failed (or still running) provisioning, which
                // sees the mark and removes what it made.
                let mut registry = self.registry.lock().expect("registry lock");
                let removed = match registry.get_mut(&id) {
                    Some(entry) if entry.kiln_id.is_none() && !entry.deleted => {
                        entry.deleted = true;
                        true
                    }
                    _ => false,
                };
                drop(registry);
                if removed {
                    self.shared
                        .hub
                        .publish("", Some(&id), Kind::Deleted(Default::default()));
                }
                return Ok(Response::new(os::DeleteSandboxResponse {
                    deleted: removed,
                }));
            }
            Err(status) => return Err(status),
        };
        {
            let mut registry = self.registry.lock().expect("registry lock");
            let entry = registry.entry(id.clone()).or_default();
            entry.deleting = true;
            entry.kiln_id = Some(info.id.clone());
        }
        let kiln_id = info.id.clone();
        let outcome = blocking({
            let shared = Arc::clone(&self.shared);
            move || kiln_sandbox::remove(&shared.root, &kiln_id, true)
        })
        .await?;
        if let Err(err) = outcome {
            if let Some(entry) = self.registry.lock().expect("registry lock").get_mut(&id) {
                entry.deleting = false;
            }
            return Err(convert::status(err));
        }
        if let Some(entry) = self.registry.lock().expect("registry lock").get_mut(&id) {
            entry.deleting = false;
            entry.deleted = true;
        }
        self.shared
            .hub
            .publish(&info.id, Some(&id), Kind::Deleted(Default::default()));
        Ok(Response::new(os::DeleteSandboxResponse { deleted: true }))
    }

    type WatchSandboxesStream = WatchStream;

    async fn watch_sandboxes(
        &self,
        _: Request<os::WatchSandboxesRequest>,
    ) -> Result<Response<WatchStream>, GrpcStatus> {
        // Subscribe before reading the current state, so nothing falls in between.
        let mut events = self.shared.hub.subscribe();
        let initial = self.list_all().await?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let service = self.clone();
        tokio::spawn(async move {
            for sandbox in initial {
                if tx.send(Ok(sandbox_event(sandbox))).await.is_err() {
                    return;
                }
            }
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    () = tx.closed() => return,
                };
                let translated = match event {
                    Ok(event) => service.translate(event).await,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        Some(Err(GrpcStatus::aborted(format!(
                            "this watcher fell {missed} events behind; watch again"
                        ))))
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(translated) = translated else {
                    continue;
                };
                let last = translated.is_err();
                if tx.send(translated).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ensure_workspace(
        &self,
        _: Request<os::EnsureWorkspaceRequest>,
    ) -> Result<Response<os::EnsureWorkspaceResponse>, GrpcStatus> {
        Ok(Response::new(os::EnsureWorkspaceResponse {}))
    }

    async fn delete_workspace(
        &self,
        _: Request<os::DeleteWorkspaceRequest>,
    ) -> Result<Response<os::DeleteWorkspaceResponse>, GrpcStatus> {
        Ok(Response::new(os::DeleteWorkspaceResponse {}))
    }
}

impl OpenShellService {
    /// A hub event in the contract's terms, or `None` for events of sandboxes that are not
    /// the gateway's and for what the gateway does not need.
    async fn translate(
        &self,
        event: crate::proto::Event,
    ) -> Option<Result<os::WatchSandboxesEvent, GrpcStatus>> {
        let kind = event.kind?;
        // The hub names sandboxes by kiln's id, and by the gateway's id as their name;
        // a deletion the status watcher noticed carries kiln's id only.
        let gateway = match event.name.as_str() {
            "" => {
                let registry = self.registry.lock().expect("registry lock");
                registry
                    .iter()
                    .find(|(_, e)| e.kiln_id.as_deref() == Some(&event.sandbox_id))
                    .map(|(id, _)| id.clone())?
            }
            name => name.to_owned(),
        };
        let ours = self
            .registry
            .lock()
            .expect("registry lock")
            .contains_key(&gateway);
        use os::watch_sandboxes_event::Payload;
        match &kind {
            Kind::Deleted(_) => ours.then(|| {
                Ok(os::WatchSandboxesEvent {
                    payload: Some(Payload::Deleted(os::WatchSandboxesDeletedEvent {
                        sandbox_id: gateway,
                    })),
                })
            }),
            Kind::Created(_)
            | Kind::Running(_)
            | Kind::Exited(_)
            | Kind::Failed(_)
            | Kind::State(_) => {
                match self.observe(&gateway).await {
                    Ok(sandbox) => Some(Ok(sandbox_event(sandbox))),
                    // Gone meanwhile (its deletion follows), or not the gateway's.
                    Err(_) => None,
                }
            }
            progress if ours => {
                let event = progress_event(progress, event.time_unix_ms as i64)?;
                Some(Ok(os::WatchSandboxesEvent {
                    payload: Some(Payload::PlatformEvent(os::WatchSandboxesPlatformEvent {
                        sandbox_id: gateway,
                        event: Some(event),
                    })),
                }))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_a_spec_sets_is_named_as_the_contract_names_it() {
        for (field, name) in [
            (Field::Image, "spec.template.image"),
            (Field::Env, "spec.environment"),
            (Field::Command, "spec.command"),
            (Field::Labels, "spec.template.labels"),
        ] {
            assert_eq!(ContractNames.field(field), name);
        }
    }
}
