//! `kiln kube ...`: the Kubernetes pod of a sandbox (kiln-kube).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_kube::pss::{self, ContainerVerdict};
use kiln_kube::{
    ConfigFile, ConfigOverrides, Egress, KubeError, NamespaceInfo, OciTarget, SandboxConfig,
    Topology, WorkspaceConfig,
};

use crate::exit::{CommandError, CommandResult};
use crate::globals::Globals;
use crate::pull::image_error;

#[derive(Debug, Args)]
pub struct KubeArgs {
    #[command(subcommand)]
    command: KubeCommand,
}

#[derive(Debug, Subcommand)]
enum KubeCommand {
    /// Print the sandbox pod as YAML for `kubectl apply -f -` (JSON with --json), or with
    /// --check its Pod Security Standards level, container by container.
    Render(Box<RenderArgs>),
    /// Build the OCI image holding the static kiln-supervisor (and the static busybox whose
    /// `cp` installs it in the pod); write it as an OCI layout and/or push it.
    SupervisorImage(SupervisorImageArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("destination").required(true).multiple(true).args(["output", "push"]))]
struct SupervisorImageArgs {
    /// The static kiln-supervisor binary (scripts/build-supervisor builds it).
    #[arg(long, env = "KILN_SUPERVISOR_BIN", value_name = "FILE")]
    supervisor: PathBuf,

    /// A static busybox (Debian's busybox-static).
    #[arg(long, value_name = "FILE", default_value = "/bin/busybox")]
    busybox: PathBuf,

    /// Write an OCI image layout: oci:DIR or oci:DIR:TAG (DIR must not exist).
    #[arg(short, long, value_name = "oci:DIR[:TAG]")]
    output: Option<String>,

    /// Push to a registry: HOST[:PORT]/REPOSITORY[:TAG] (plain HTTP for loopback hosts).
    #[arg(long, value_name = "REF")]
    push: Option<String>,

    /// Registry credentials for --push, USER:PASSWORD, overriding ~/.docker/config.json and
    /// containers auth files (as for `kiln pull`).
    #[arg(
        long,
        env = "KILN_REGISTRY_CREDS",
        value_name = "USER:PASSWORD",
        requires = "push"
    )]
    creds: Option<String>,

    /// Reach this registry (HOST or HOST:PORT) over plain HTTP or unverified TLS; loopback
    /// registries need no flag (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST", requires = "push")]
    insecure_registries: Vec<String>,
}

#[derive(Debug, Args)]
struct RenderArgs {
    /// TOML configuration file; flags override its settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Namespace object as `kubectl get ns NAME -o json` prints it (`-` reads stdin); its
    /// OpenShift SCC annotations decide the ids the configuration does not give.
    #[arg(long, value_name = "FILE", conflicts_with = "cluster")]
    namespace_json: Option<PathBuf>,

    /// Read the namespace from the cluster of the current kubeconfig; a failed read is an error.
    #[arg(long)]
    cluster: bool,

    /// Print the Pod Security Standards verdict per container instead of the pod.
    #[arg(long)]
    check: bool,

    /// Agent image (the sandbox's workload image).
    #[arg(long, value_name = "REF")]
    image: Option<String>,

    /// Namespace of the pod.
    #[arg(long, value_name = "NAME")]
    namespace: Option<String>,

    /// Pod name (also the app.kubernetes.io/instance label).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Sandbox uid (1000-2000000000); wins over SCC annotations.
    #[arg(long, value_name = "N")]
    uid: Option<String>,

    /// Sandbox gid (1000-2000000000); wins over SCC annotations.
    #[arg(long, value_name = "N")]
    gid: Option<String>,

    /// Supervisor topology: combined or sidecar.
    #[arg(long, value_name = "TOPOLOGY")]
    topology: Option<String>,

    /// Image holding the static kiln-supervisor (`kiln kube supervisor-image --push REF`).
    #[arg(long, value_name = "REF")]
    supervisor_image: Option<String>,

    /// RuntimeClass of the pod (e.g. kata, gvisor).
    #[arg(long, value_name = "NAME")]
    runtime_class: Option<String>,

    /// Workspace claim size (e.g. 10Gi), mounted at /sandbox and seeded from the image.
    #[arg(long, value_name = "QUANTITY", conflicts_with = "no_workspace")]
    workspace_size: Option<String>,

    /// Storage class of the workspace claim.
    #[arg(long, value_name = "NAME", conflicts_with = "no_workspace")]
    storage_class: Option<String>,

    /// No workspace volume, even if the configuration file has one.
    #[arg(long)]
    no_workspace: bool,

    /// Network egress: enforce (kiln's enforcer decides every connection and DNS query)
    /// or none (no egress at all: a NetworkPolicy, no NET_ADMIN).
    #[arg(long, value_name = "enforce|none")]
    egress: Option<String>,

    /// Network policy file (OpenShell's network_policies), validated and rendered into a
    /// ConfigMap the enforcer reads.
    #[arg(long, value_name = "FILE", conflicts_with = "policy_configmap")]
    policy: Option<PathBuf>,

    /// An existing ConfigMap holding the network policy under the key policy.yaml.
    #[arg(long, value_name = "NAME")]
    policy_configmap: Option<String>,

    /// Extra environment for the workload, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,

    /// The workload's argv (replaces the configuration's `command`).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

pub fn run(globals: &Globals, args: KubeArgs) -> CommandResult {
    match args.command {
        KubeCommand::Render(args) => render(globals, *args),
        KubeCommand::SupervisorImage(args) => supervisor_image(globals, args),
    }
}

fn render(globals: &Globals, args: RenderArgs) -> CommandResult {
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)
            .context("--config")
            .map_err(CommandError::usage)?,
        None => ConfigFile::default(),
    };
    let namespace_json = args.namespace_json.clone();
    let cluster = args.cluster;
    let check = args.check;
    let config = SandboxConfig::resolve(file, overrides(args)?).map_err(CommandError::usage)?;

    let namespace: Option<NamespaceInfo> = match (namespace_json, cluster) {
        (Some(path), _) => {
            let bytes = kiln_kube::read_bounded(&path, kiln_kube::MAX_NAMESPACE_JSON_SIZE)
                .context("--namespace-json")
                .map_err(CommandError::usage)?;
            let origin = if path.as_os_str() == "-" {
                "stdin".to_owned()
            } else {
                path.display().to_string()
            };
            Some(kiln_kube::namespace_from_json(&origin, &bytes).map_err(usage)?)
        }
        (None, true) => {
            let name = config.namespace.as_deref().ok_or_else(|| {
                CommandError::usage(anyhow::anyhow!(
                    "--cluster needs the namespace name: pass --namespace or set `namespace`"
                ))
            })?;
            Some(kiln_kube::namespace_from_cluster(name).map_err(CommandError::failure)?)
        }
        (None, false) => None,
    };

    let rendered = kiln_kube::render_pod(&config, namespace.as_ref()).map_err(usage)?;
    if !globals.quiet {
        for warning in &rendered.warnings {
            eprintln!("kiln: warning: {warning}");
        }
    }
    if check {
        let verdicts = pss::check_pod(&rendered.pod);
        let needs = pss::admission_needs(&rendered.pod, &verdicts);
        if globals.json {
            let report = serde_json::json!({ "containers": verdicts, "admission_needs": needs });
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_verdicts(&verdicts);
            for need in &needs {
                println!("{need}");
            }
        }
    } else if globals.json {
        let items = rendered.to_json();
        let value = match <[serde_json::Value; 1]>::try_from(items) {
            Ok([pod]) => pod,
            Err(items) => serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items }),
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", rendered.to_yaml().map_err(CommandError::failure)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn supervisor_image(globals: &Globals, args: SupervisorImageArgs) -> CommandResult {
    let output = args
        .output
        .as_deref()
        .map(OciTarget::parse)
        .transpose()
        .map_err(CommandError::usage)?;
    let push = args
        .push
        .as_deref()
        .map(kiln_kube::parse_push_target)
        .transpose()
        .map_err(CommandError::usage)?;
    if let Some(creds) = &args.creds {
        if !creds.contains(':') {
            return Err(CommandError::usage(anyhow::anyhow!(
                "invalid --creds: expected USER:PASSWORD"
            )));
        }
    }
    let image =
        kiln_kube::build_supervisor_image(&args.supervisor, &args.busybox).map_err(usage)?;
    if let Some(target) = &output {
        kiln_image::write_oci_layout(&image, &target.dir, &target.tag).map_err(image_error)?;
    }
    if let Some(target) = &push {
        let options = kiln_image::PushOptions {
            creds: args.creds.clone(),
            insecure_registries: args.insecure_registries.clone(),
        };
        kiln_image::push(&image, target, &options).map_err(image_error)?;
    }
    if globals.json {
        let summary = serde_json::json!({
            "manifest_digest": image.manifest_digest().to_string(),
            "oci_layout": output.as_ref().map(|t| format!("oci:{}:{}", t.dir.display(), t.tag)),
            "pushed": push.as_ref().map(|t| t.to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        if let Some(target) = &output {
            println!("wrote oci:{}:{}", target.dir.display(), target.tag);
        }
        if let Some(target) = &push {
            println!("pushed {target}");
        }
        println!("manifest {}", image.manifest_digest());
    }
    Ok(ExitCode::SUCCESS)
}

/// Bad input (configuration, namespace object, annotations) exits 2; the rest 1.
fn usage(err: KubeError) -> CommandError {
    match err {
        KubeError::Cluster { .. } | KubeError::Yaml(_) | KubeError::Image(_) => {
            CommandError::failure(err)
        }
        _ => CommandError::usage(err),
    }
}

fn overrides(args: RenderArgs) -> Result<ConfigOverrides, CommandError> {
    let id = |flag: &str, value: Option<String>| {
        value
            .map(|v| {
                kiln_identity::parse_sandbox_id(&v, kiln_identity::IdBounds::KILN)
                    .with_context(|| flag.to_owned())
            })
            .transpose()
            .map_err(CommandError::usage)
    };
    let mut env = BTreeMap::new();
    for assignment in &args.env {
        let (key, value) = assignment.split_once('=').ok_or_else(|| {
            CommandError::usage(anyhow::anyhow!(
                "invalid --env {assignment:?}: expected KEY=VALUE"
            ))
        })?;
        env.insert(key.to_owned(), value.to_owned());
    }
    let settings = ConfigFile {
        image: args.image,
        namespace: args.namespace,
        name: args.name,
        command: (!args.command.is_empty()).then_some(args.command),
        sandbox_uid: id("--uid", args.uid)?,
        sandbox_gid: id("--gid", args.gid)?,
        supervisor_topology: args
            .topology
            .as_deref()
            .map(Topology::parse)
            .transpose()
            .map_err(CommandError::usage)?,
        supervisor_image: args.supervisor_image,
        runtime_class: args.runtime_class,
        workspace: args.workspace_size.map(|size| WorkspaceConfig {
            size,
            storage_class: None,
        }),
        resources: None,
        env: (!env.is_empty()).then_some(env),
        egress: args
            .egress
            .as_deref()
            .map(Egress::parse)
            .transpose()
            .map_err(CommandError::usage)?,
        policy: args.policy,
        policy_configmap: args.policy_configmap,
    };
    Ok(ConfigOverrides {
        settings,
        storage_class: args.storage_class,
        no_workspace: args.no_workspace,
    })
}

fn print_verdicts(verdicts: &[ContainerVerdict]) {
    println!("pod meets: {}", pss::pod_level(verdicts));
    for verdict in verdicts {
        let kind = match verdict.kind {
            pss::ContainerKind::InitContainer => "init container",
            pss::ContainerKind::Container => "container",
            pss::ContainerKind::EphemeralContainer => "ephemeral container",
        };
        println!("{kind} {}: {}", verdict.name, verdict.level);
        for v in &verdict.violations {
            println!("  not {}: {}: {} {}", v.level, v.rule, v.field, v.detail);
        }
    }
}
