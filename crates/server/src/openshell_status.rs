//! kiln's view of a sandbox in OpenShell's terms: the `DriverSandboxStatus` conditions the
//! gateway derives its phase from, and provisioning progress as platform events carrying
//! OpenShell's progress metadata.
//!
//! The gateway reads the conditions this way: `deleting` wins; then a `Suspended`
//! condition with status `True` means stopped; then `Ready`: `True` is ready, `False`
//! with a transient reason (such as `Starting`) is provisioning, `False` with any other
//! reason is an error. kiln's statuses map onto that:
//!
//! | kiln status | conditions |
//! |---|---|
//! | created (booting) | Ready False `Starting` |
//! | running | Ready True `Running` |
//! | exited (stopped, or the workload ended) | Suspended True `ComputeStopped`, Ready False `ComputeStopped` |
//! | failed | Ready False `VmFailed` with kiln's message |
//! | being deleted | Ready False `Deleting`, and `deleting` set |

use std::collections::HashMap;

use kiln_sandbox::{SandboxInfo, Status};

use crate::openshell_proto::{DriverCondition, DriverPlatformEvent, DriverSandboxStatus};
use crate::proto::event::Kind;
use crate::proto::{PullingLayer, ResolvingImage};

/// OpenShell's progress metadata keys and steps, as its gateway reads them.
const ACTIVE_STEP: &str = "openshell.progress.active_step";
const ACTIVE_DETAIL: &str = "openshell.progress.active_detail";
const COMPLETE_STEP: &str = "openshell.progress.complete_step";
const COMPLETE_LABEL: &str = "openshell.progress.complete_label";
const STEP_PULLING_IMAGE: &str = "pulling_image";
const STEP_STARTING_SANDBOX: &str = "starting_sandbox";

/// The platform events' source.
const SOURCE: &str = "kiln";

/// The status of sandbox `info`; `name` is the gateway's name for it.
pub fn driver_status(info: &SandboxInfo, name: &str, deleting: bool) -> DriverSandboxStatus {
    let at = |unix: Option<u64>| rfc3339(unix.unwrap_or(info.created_unix));
    let ready = |status: &str, reason: &str, message: &str, time: String| DriverCondition {
        r#type: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: time,
    };
    let conditions = if deleting {
        vec![ready(
            "False",
            "Deleting",
            "the sandbox is being deleted",
            rfc3339(now_unix()),
        )]
    } else {
        match &info.status {
            Status::Created => vec![ready(
                "False",
                "Starting",
                "the VM is starting",
                at(info.started_unix),
            )],
            Status::Running => vec![ready(
                "True",
                "Running",
                "the VM runs",
                at(info.started_unix),
            )],
            Status::Exited { exit_code, .. } => {
                let message =
                    format!("the VM is stopped (workload exit code {exit_code}); its disk is kept");
                let time = at(info.ended_unix);
                vec![
                    DriverCondition {
                        r#type: "Suspended".into(),
                        ..ready("True", "ComputeStopped", &message, time.clone())
                    },
                    ready("False", "ComputeStopped", &message, time),
                ]
            }
            Status::Failed { message } => {
                vec![ready("False", "VmFailed", message, at(info.ended_unix))]
            }
        }
    };
    DriverSandboxStatus {
        sandbox_name: name.to_owned(),
        instance_id: info.id.clone(),
        agent_fd: String::new(),
        sandbox_fd: String::new(),
        conditions,
        deleting,
    }
}

/// The status of a sandbox kiln has not recorded yet: still provisioning (pulling, building),
/// or failed before its VM was recorded, with kiln's message.
pub fn pending_status(name: &str, failure: Option<&str>) -> DriverSandboxStatus {
    let (reason, message) = match failure {
        None => ("Starting", "the image is being prepared"),
        Some(message) => ("VmFailed", message),
    };
    DriverSandboxStatus {
        sandbox_name: name.to_owned(),
        conditions: vec![DriverCondition {
            r#type: "Ready".into(),
            status: "False".into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: rfc3339(now_unix()),
        }],
        ..Default::default()
    }
}

/// A provisioning step (as kiln's event hub carries it) as an OpenShell platform event,
/// or `None` for the events the gateway learns from the status instead.
pub fn progress_event(kind: &Kind, timestamp_ms: i64) -> Option<DriverPlatformEvent> {
    let mut metadata = HashMap::new();
    let mut set = |key: &str, value: String| metadata.insert(key.to_owned(), value);
    let (reason, message) = match kind {
        Kind::ResolvingImage(ResolvingImage { reference }) => {
            set(ACTIVE_STEP, STEP_PULLING_IMAGE.into());
            set(ACTIVE_DETAIL, reference.clone());
            set("image_ref", reference.clone());
            ("Pulling", format!("resolving image {reference}"))
        }
        Kind::PullingLayer(PullingLayer {
            index,
            count,
            digest,
            downloaded_bytes,
            size_bytes,
        }) => {
            set(ACTIVE_STEP, STEP_PULLING_IMAGE.into());
            set(
                ACTIVE_DETAIL,
                format!("layer {index}/{count}: {downloaded_bytes} of {size_bytes} bytes"),
            );
            set("layer_index", index.to_string());
            set("layer_total", count.to_string());
            set("layer_digest", digest.clone());
            set("layer_size_bytes", size_bytes.to_string());
            (
                "PullingLayer",
                format!("pulling layer {index}/{count} ({digest})"),
            )
        }
        Kind::BuildingRootImage(_) => {
            set(COMPLETE_STEP, STEP_PULLING_IMAGE.into());
            set(COMPLETE_LABEL, "Image pulled".into());
            set(ACTIVE_STEP, STEP_STARTING_SANDBOX.into());
            set(ACTIVE_DETAIL, "Building the root image".into());
            ("Pulled", "building the root image".into())
        }
        Kind::BuildingIdentityLayer(_) => {
            set(ACTIVE_STEP, STEP_STARTING_SANDBOX.into());
            set(ACTIVE_DETAIL, "Writing the sandbox identity".into());
            ("PreparingRootfs", "writing the sandbox identity".into())
        }
        Kind::Booting(_) => {
            set(ACTIVE_STEP, STEP_STARTING_SANDBOX.into());
            set(ACTIVE_DETAIL, "Booting the VM".into());
            ("Started", "booting the VM".into())
        }
        _ => return None,
    };
    Some(DriverPlatformEvent {
        timestamp_ms,
        source: SOURCE.into(),
        r#type: "Normal".into(),
        reason: reason.into(),
        message,
        metadata,
    })
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `unix` seconds as RFC 3339 in UTC (`1970-01-01T00:00:00.000Z`).
fn rfc3339(unix: u64) -> String {
    kiln_policy::rfc3339_utc(unix.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_times_are_rfc3339() {
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn progress_events_carry_openshells_metadata() {
        let pulling = progress_event(
            &Kind::ResolvingImage(ResolvingImage {
                reference: "docker.io/library/alpine:3.20".into(),
            }),
            7,
        )
        .unwrap();
        assert_eq!(
            (
                pulling.source.as_str(),
                pulling.reason.as_str(),
                pulling.timestamp_ms
            ),
            ("kiln", "Pulling", 7)
        );
        assert_eq!(pulling.metadata[ACTIVE_STEP], "pulling_image");
        assert_eq!(
            pulling.metadata[ACTIVE_DETAIL],
            "docker.io/library/alpine:3.20"
        );
        let layer = progress_event(
            &Kind::PullingLayer(PullingLayer {
                index: 2,
                count: 3,
                digest: "sha256:ab".into(),
                downloaded_bytes: 10,
                size_bytes: 20,
            }),
            8,
        )
        .unwrap();
        assert_eq!(layer.metadata["layer_index"], "2");
        assert_eq!(layer.metadata["layer_total"], "3");
        assert_eq!(layer.metadata[ACTIVE_DETAIL], "layer 2/3: 10 of 20 bytes");
        let built = progress_event(&Kind::BuildingRootImage(Default::default()), 9).unwrap();
        assert_eq!(built.metadata[COMPLETE_STEP], "pulling_image");
        assert_eq!(built.metadata[ACTIVE_STEP], "starting_sandbox");
        let booting = progress_event(&Kind::Booting(Default::default()), 10).unwrap();
        assert_eq!(booting.metadata[ACTIVE_STEP], "starting_sandbox");
        assert!(progress_event(&Kind::Running(Default::default()), 11).is_none());
    }
}
