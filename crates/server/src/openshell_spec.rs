//! What kiln makes of an OpenShell `DriverSandbox`: the checks ValidateSandboxCreate and
//! CreateSandbox share, and the sandbox they describe in kiln's terms.
//!
//! The rules follow OpenShell's contract and its own VM driver: the gateway's sandbox id
//! keys the sandbox; the sandbox's environment wins over the template's; the command is
//! an exact argv; a GPU request, an agent socket path or a `platform_config` are things a
//! kiln VM does not offer (FAILED_PRECONDITION, as OpenShell's drivers answer); CPU and
//! memory are Kubernetes quantities (see [`crate::quantity`]), the limit sizing the VM when
//! given and the request otherwise, since a VM's size is its ceiling. kiln has no
//! per-sandbox driver settings, so every `driver_config` key is refused by name.
//!
//! Everything here comes from the gateway and is bounded: labels by count and size; the
//! environment and argv are bounded again by kiln-sandbox when the sandbox is created.

use std::collections::BTreeMap;

use tonic::Status;

use crate::openshell_proto::{DriverSandbox, DriverSandboxTemplate};
use crate::quantity;

/// Most labels a sandbox may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_LEN: usize = 256;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 1024;
/// Longest sandbox id, in bytes (kiln's sandbox names allow no more).
pub const MAX_SANDBOX_ID_LEN: usize = 128;

/// A checked `DriverSandbox`, as kiln will create it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPlan {
    /// The gateway's sandbox id, which names the kiln sandbox.
    pub id: String,
    /// The gateway's name for the sandbox (reported back, not used as a key).
    pub name: String,
    /// The image reference to boot: the template's, else the server's default.
    pub image: String,
    /// The template's environment with the sandbox's own over it.
    pub environment: BTreeMap<String, String>,
    /// The workload's argv, exactly as given; empty means the image's own.
    pub command: Vec<String>,
    pub tty: bool,
    /// Whole vCPUs, when the spec gives a CPU quantity.
    pub vcpus: Option<u32>,
    /// MiB of memory, when the spec gives a memory quantity.
    pub memory_mib: Option<u32>,
    pub labels: BTreeMap<String, String>,
}

/// Checks `sandbox` and reads it into a plan; `default_image` stands in for a template
/// without an image. Errors name the field at fault and say what is accepted.
pub fn plan(sandbox: &DriverSandbox, default_image: &str) -> Result<SandboxPlan, Status> {
    check_id(&sandbox.id)?;
    let spec = sandbox
        .spec
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("sandbox.spec is required"))?;
    if spec
        .resource_requirements
        .as_ref()
        .is_some_and(|r| r.gpu.is_some())
    {
        return Err(Status::failed_precondition(
            "spec.resource_requirements.gpu: kiln's VM sandboxes have no GPUs; \
             accepted: a sandbox without a GPU request",
        ));
    }
    let default_template = DriverSandboxTemplate::default();
    let template = spec.template.as_ref().unwrap_or(&default_template);
    check_template(template)?;

    let image = match template.image.trim() {
        "" => default_image.trim(),
        image => image,
    };
    if image.is_empty() {
        return Err(Status::failed_precondition(
            "spec.template.image is empty and this server has no default image; \
             accepted: an OCI image reference",
        ));
    }

    let mut environment = template
        .environment
        .clone()
        .into_iter()
        .collect::<BTreeMap<_, _>>();
    environment.extend(spec.environment.clone());

    let (vcpus, memory_mib) = match &template.resources {
        None => (None, None),
        Some(resources) => (
            sized(
                "spec.template.resources.cpu",
                &resources.cpu_limit,
                &resources.cpu_request,
                quantity::vcpus,
            )?,
            sized(
                "spec.template.resources.memory",
                &resources.memory_limit,
                &resources.memory_request,
                quantity::memory_mib,
            )?,
        ),
    };

    Ok(SandboxPlan {
        id: sandbox.id.clone(),
        name: sandbox.name.clone(),
        image: image.to_owned(),
        environment,
        command: spec.command.clone(),
        tty: spec.tty,
        vcpus,
        memory_mib,
        labels: labels(template)?,
    })
}

/// The sandbox id names kiln's sandbox, so it follows kiln's name rules.
fn check_id(id: &str) -> Result<(), Status> {
    let fits = !id.is_empty()
        && id.len() <= MAX_SANDBOX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if fits {
        return Ok(());
    }
    let shown: String = id.chars().take(MAX_SANDBOX_ID_LEN).collect();
    Err(Status::invalid_argument(format!(
        "sandbox.id {shown:?}: accepted: 1 to {MAX_SANDBOX_ID_LEN} of A-Z a-z 0-9 . _ -"
    )))
}

fn check_template(template: &DriverSandboxTemplate) -> Result<(), Status> {
    if !template.agent_socket_path.is_empty() {
        return Err(Status::failed_precondition(
            "spec.template.agent_socket_path: kiln's VM sandboxes have no agent socket; \
             accepted: empty",
        ));
    }
    if template.platform_config.is_some() {
        return Err(Status::failed_precondition(
            "spec.template.platform_config: kiln has no platform settings; accepted: unset",
        ));
    }
    if let Some(config) = &template.driver_config {
        if let Some(key) = config.fields.keys().next() {
            let shown: String = key.chars().take(MAX_LABEL_KEY_LEN).collect();
            return Err(Status::invalid_argument(format!(
                "spec.template.driver_config has the unknown key {shown:?}; accepted: no keys \
                 (kiln has no per-sandbox driver settings)"
            )));
        }
    }
    Ok(())
}

/// The limit when given, else the request, read by `parse`.
fn sized(
    what: &str,
    limit: &str,
    request: &str,
    parse: fn(&str, &str) -> Result<u32, quantity::QuantityError>,
) -> Result<Option<u32>, Status> {
    let (field, value) = match (limit, request) {
        ("", "") => return Ok(None),
        ("", request) => (format!("{what}_request"), request),
        (limit, _) => (format!("{what}_limit"), limit),
    };
    parse(&field, value)
        .map(Some)
        .map_err(|err| Status::failed_precondition(err.to_string()))
}

fn labels(template: &DriverSandboxTemplate) -> Result<BTreeMap<String, String>, Status> {
    if template.labels.len() > MAX_LABELS {
        return Err(Status::invalid_argument(format!(
            "spec.template.labels has {} labels; accepted: at most {MAX_LABELS}",
            template.labels.len()
        )));
    }
    for (key, value) in &template.labels {
        if key.is_empty() || key.len() > MAX_LABEL_KEY_LEN || value.len() > MAX_LABEL_VALUE_LEN {
            let shown: String = key.chars().take(MAX_LABEL_KEY_LEN).collect();
            return Err(Status::invalid_argument(format!(
                "spec.template.labels[{shown:?}]: accepted: a key of 1 to {MAX_LABEL_KEY_LEN} \
                 bytes and a value of at most {MAX_LABEL_VALUE_LEN} bytes"
            )));
        }
    }
    Ok(template.labels.clone().into_iter().collect())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prost_types::{value::Kind, Struct, Value};
    use tonic::Code;

    use super::*;
    use crate::openshell_proto::{
        DriverResourceRequirements, DriverSandboxSpec, GpuResourceRequirements,
        ResourceRequirements,
    };

    fn sandbox(template: DriverSandboxTemplate) -> DriverSandbox {
        DriverSandbox {
            id: "sb-1".into(),
            name: "first".into(),
            spec: Some(DriverSandboxSpec {
                template: Some(template),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn refused(sandbox: &DriverSandbox, code: Code, naming: &str) {
        let status = plan(sandbox, "").expect_err(naming);
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(naming), "{status:?}");
        assert!(status.message().contains("accepted"), "{status:?}");
    }

    #[test]
    fn a_full_spec_becomes_a_plan() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut request = sandbox(DriverSandboxTemplate {
            image: " docker.io/library/alpine:3.20 ".into(),
            environment: env(&[("A", "template"), ("B", "template")]),
            labels: env(&[("team", "kiln")]),
            resources: Some(DriverResourceRequirements {
                cpu_request: "500m".into(),
                cpu_limit: "2".into(),
                memory_request: "512Mi".into(),
                memory_limit: String::new(),
            }),
            ..Default::default()
        });
        let spec = request.spec.as_mut().unwrap();
        spec.environment = env(&[("B", "sandbox"), ("C", "sandbox")]);
        spec.command = vec!["sh".into(), "-c".into(), "echo 'a b' $X".into()];
        spec.tty = true;
        spec.sandbox_token = "secret".into();

        let plan = plan(&request, "unused").unwrap();
        assert_eq!(
            plan,
            SandboxPlan {
                id: "sb-1".into(),
                name: "first".into(),
                image: "docker.io/library/alpine:3.20".into(),
                environment: [("A", "template"), ("B", "sandbox"), ("C", "sandbox")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .into(),
                command: vec!["sh".into(), "-c".into(), "echo 'a b' $X".into()],
                tty: true,
                vcpus: Some(2),
                memory_mib: Some(512),
                labels: [("team".to_owned(), "kiln".to_owned())].into(),
            }
        );
        // The token is not part of the plan, so nothing that prints a plan can leak it.
        assert!(!format!("{plan:?}").contains("secret"));
    }

    #[test]
    fn the_default_image_stands_in_for_a_missing_one() {
        let plan = plan(&sandbox(DriverSandboxTemplate::default()), "alpine").unwrap();
        assert_eq!(plan.image, "alpine");
        assert_eq!((plan.vcpus, plan.memory_mib), (None, None));
        refused(
            &sandbox(DriverSandboxTemplate::default()),
            Code::FailedPrecondition,
            "spec.template.image",
        );
    }

    #[test]
    fn gpu_requests_are_refused_as_the_contract_says() {
        let mut request = sandbox(DriverSandboxTemplate {
            image: "alpine".into(),
            ..Default::default()
        });
        request.spec.as_mut().unwrap().resource_requirements = Some(ResourceRequirements {
            gpu: Some(GpuResourceRequirements { count: None }),
        });
        refused(&request, Code::FailedPrecondition, "gpu");
    }

    #[test]
    fn unknown_driver_config_keys_are_refused_by_name() {
        let config = Struct {
            fields: [(
                "gpu_device_ids".to_owned(),
                Value {
                    kind: Some(Kind::StringValue("0000:2d:00.0".into())),
                },
            )]
            .into(),
        };
        let request = sandbox(DriverSandboxTemplate {
            image: "alpine".into(),
            driver_config: Some(config),
            ..Default::default()
        });
        refused(&request, Code::InvalidArgument, "\"gpu_device_ids\"");
        // An empty config asks for nothing.
        let request = sandbox(DriverSandboxTemplate {
            image: "alpine".into(),
            driver_config: Some(Struct::default()),
            ..Default::default()
        });
        assert!(plan(&request, "").is_ok());
    }

    #[test]
    fn bad_quantities_name_their_field() {
        for (cpu_request, memory_limit, naming) in [
            ("1e3", "", "spec.template.resources.cpu_request \"1e3\""),
            ("", "4GB", "spec.template.resources.memory_limit \"4GB\""),
            ("0", "", "spec.template.resources.cpu_request \"0\""),
        ] {
            let request = sandbox(DriverSandboxTemplate {
                image: "alpine".into(),
                resources: Some(DriverResourceRequirements {
                    cpu_request: cpu_request.into(),
                    memory_limit: memory_limit.into(),
                    ..Default::default()
                }),
                ..Default::default()
            });
            refused(&request, Code::FailedPrecondition, naming);
        }
    }

    #[test]
    fn what_a_vm_does_not_offer_is_refused() {
        let template = || DriverSandboxTemplate {
            image: "alpine".into(),
            ..Default::default()
        };
        refused(
            &sandbox(DriverSandboxTemplate {
                agent_socket_path: "/run/agent.sock".into(),
                ..template()
            }),
            Code::FailedPrecondition,
            "agent_socket_path",
        );
        refused(
            &sandbox(DriverSandboxTemplate {
                platform_config: Some(Struct::default()),
                ..template()
            }),
            Code::FailedPrecondition,
            "platform_config",
        );
        let mut no_spec = sandbox(template());
        no_spec.spec = None;
        let status = plan(&no_spec, "alpine").unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    #[test]
    fn ids_follow_kilns_name_rules() {
        for id in [
            "",
            "a/b",
            "../x",
            "a b",
            &"x".repeat(MAX_SANDBOX_ID_LEN + 1),
        ] {
            let mut request = sandbox(DriverSandboxTemplate {
                image: "alpine".into(),
                ..Default::default()
            });
            request.id = id.to_owned();
            refused(&request, Code::InvalidArgument, "sandbox.id");
        }
    }

    #[test]
    fn labels_are_bounded() {
        let many = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        refused(
            &sandbox(DriverSandboxTemplate {
                image: "alpine".into(),
                labels: many,
                ..Default::default()
            }),
            Code::InvalidArgument,
            "spec.template.labels",
        );
        let long = [("k".to_owned(), "v".repeat(MAX_LABEL_VALUE_LEN + 1))].into();
        refused(
            &sandbox(DriverSandboxTemplate {
                image: "alpine".into(),
                labels: long,
                ..Default::default()
            }),
            Code::InvalidArgument,
            "spec.template.labels[\"k\"]",
        );
    }
}
