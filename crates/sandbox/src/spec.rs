//! Turning the image's config and the user's overrides into the workload's run spec.

use kiln_protocol::{Identity, RunAs, RunSpec, TerminalSize, DEFAULT_PATH};

use crate::error::{Error, ErrorKind};

/// The parts of an image's config that decide how its workload starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
}

impl ImageDefaults {
    /// The run fields of an image's config (all empty when it has no `config`).
    pub fn from_config(config: &oci_spec::image::ImageConfiguration) -> Self {
        let Some(config) = config.config() else {
            return Self::default();
        };
        Self {
            entrypoint: config.entrypoint().clone().unwrap_or_default(),
            cmd: config.cmd().clone().unwrap_or_default(),
            env: config.env().clone().unwrap_or_default(),
            working_dir: config.working_dir().clone(),
        }
    }
}

/// What the user changed on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--entrypoint`: replaces the image's entrypoint and drops its Cmd, as Docker does.
    /// An empty string clears the entrypoint.
    pub entrypoint: Option<String>,
    /// Arguments after the image reference; replace the image's Cmd when non-empty.
    pub cmd: Vec<String>,
    /// `-e` and `--env-file` assignments, in order; later ones win.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
}

/// A run spec that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("no command to run: the image has no Entrypoint or Cmd; give a command after the image reference")]
    NoCommand,
    #[error("working directory {0:?} must be an absolute path")]
    RelativeWorkdir(String),
    #[error("{what} contains a NUL byte: {value:?}")]
    Nul { what: &'static str, value: String },
}

// Every spec error is about what the caller asked to run.
impl From<SpecError> for Error {
    fn from(err: SpecError) -> Self {
        Error::new(ErrorKind::InvalidInput, err)
    }
}

/// Builds the run spec of the main workload.
pub fn build_run_spec(
    image: &ImageDefaults,
    overrides: &Overrides,
    identity: Identity,
    terminal: Option<TerminalSize>,
) -> Result<RunSpec, SpecError> {
    let argv: Vec<String> = match &overrides.entrypoint {
        Some(entrypoint) => {
            let mut argv: Vec<String> = Some(entrypoint.clone())
                .filter(|e| !e.is_empty())
                .into_iter()
                .collect();
            argv.extend(overrides.cmd.iter().cloned());
            argv
        }
        None => {
            let cmd = if overrides.cmd.is_empty() {
                &image.cmd
            } else {
                &overrides.cmd
            };
            image.entrypoint.iter().chain(cmd).cloned().collect()
        }
    };
    if argv.is_empty() {
        return Err(SpecError::NoCommand);
    }

    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: &str| match env.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value.to_owned(),
        None => env.push((key.to_owned(), value.to_owned())),
    };
    for entry in &image.env {
        // An entry without '=' in an image config is meaningless; skip it as runtimes do.
        if let Some((key, value)) = entry.split_once('=') {
            set(key, value);
        }
    }
    for (key, value) in &overrides.env {
        set(key, value);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    if terminal.is_some() && !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), "xterm".into()));
    }

    let cwd = overrides
        .working_dir
        .clone()
        .or_else(|| image.working_dir.clone())
        .filter(|d| !d.is_empty());
    if let Some(dir) = &cwd {
        if !dir.starts_with('/') {
            return Err(SpecError::RelativeWorkdir(dir.clone()));
        }
    }

    let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    for (what, values) in [("command", &argv), ("environment", &env)] {
        if let Some(value) = values.iter().find(|v| v.contains('\0')) {
            return Err(SpecError::Nul {
                what,
                value: value.clone(),
            });
        }
    }
    Ok(RunSpec {
        argv,
        env,
        cwd,
        identity,
        tty: terminal.is_some(),
        terminal,
        task: None,
        openshell: None,
    })
}

/// The identity of the workload: `--user sandbox` runs as the image's sandbox account with
/// the configured ids; `--user N` runs as uid N (no passwd lookup) with the sandbox gid.
pub fn identity(run_as: &kiln_identity::RunAs, sandbox_uid: u32, sandbox_gid: u32) -> Identity {
    match run_as {
        kiln_identity::RunAs::Sandbox => Identity {
            run_as: RunAs::Sandbox,
            uid: sandbox_uid,
            gid: sandbox_gid,
        },
        kiln_identity::RunAs::Id(uid) => Identity {
            run_as: RunAs::Uid,
            uid: *uid,
            gid: sandbox_gid,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageDefaults {
        ImageDefaults {
            entrypoint: vec!["/bin/tini".into(), "--".into()],
            cmd: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["PATH=/bin".into(), "A=image".into(), "BROKEN".into()],
            working_dir: Some("/app".into()),
        }
    }

    fn sandbox() -> Identity {
        identity(&kiln_identity::RunAs::Sandbox, 10001, 10001)
    }

    #[test]
    fn image_config_is_the_default() {
        let spec = build_run_spec(&image(), &Overrides::default(), sandbox(), None).unwrap();
        assert_eq!(spec.argv, ["/bin/tini", "--", "sh", "-c", "echo hi"]);
        assert_eq!(spec.env, ["PATH=/bin", "A=image"]);
        assert_eq!(spec.cwd.as_deref(), Some("/app"));
        assert!(!spec.tty);
    }

    #[test]
    fn flags_override_the_image() {
        let overrides = Overrides {
            entrypoint: None,
            cmd: vec!["id".into()],
            env: vec![("A".into(), "flag".into()), ("B".into(), "2".into())],
            working_dir: Some("/tmp".into()),
        };
        let spec = build_run_spec(&image(), &overrides, sandbox(), None).unwrap();
        assert_eq!(spec.argv, ["/bin/tini", "--", "id"]);
        assert_eq!(spec.env, ["PATH=/bin", "A=flag", "B=2"]);
        assert_eq!(spec.cwd.as_deref(), Some("/tmp"));
    }

    #[test]
    fn entrypoint_flag_drops_the_image_cmd() {
        let overrides = Overrides {
            entrypoint: Some("/bin/echo".into()),
            ..Overrides::default()
        };
        let spec = build_run_spec(&image(), &overrides, sandbox(), None).unwrap();
        assert_eq!(spec.argv, ["/bin/echo"]);
        let overrides = Overrides {
            entrypoint: Some(String::new()),
            cmd: vec!["ls".into()],
            ..Overrides::default()
        };
        assert_eq!(
            build_run_spec(&image(), &overrides, sandbox(), None)
                .unwrap()
                .argv,
            ["ls"]
        );
    }

    #[test]
    fn missing_command_and_bad_workdir_are_errors() {
        let empty = ImageDefaults::default();
        assert_eq!(
            build_run_spec(&empty, &Overrides::default(), sandbox(), None),
            Err(SpecError::NoCommand)
        );
        let overrides = Overrides {
            working_dir: Some("rel".into()),
            ..Overrides::default()
        };
        assert!(matches!(
            build_run_spec(&image(), &overrides, sandbox(), None),
            Err(SpecError::RelativeWorkdir(_))
        ));
    }

    #[test]
    fn defaults_for_path_and_term() {
        let image = ImageDefaults {
            cmd: vec!["sh".into()],
            ..ImageDefaults::default()
        };
        let spec = build_run_spec(
            &image,
            &Overrides::default(),
            sandbox(),
            Some(TerminalSize { rows: 24, cols: 80 }),
        )
        .unwrap();
        assert!(spec.env.contains(&format!("PATH={DEFAULT_PATH}")));
        assert!(spec.env.contains(&"TERM=xterm".to_owned()));
        assert!(spec.tty);
    }

    #[test]
    fn numeric_user_keeps_the_sandbox_gid() {
        let id = identity(&kiln_identity::RunAs::Id(4242), 10001, 20002);
        assert_eq!((id.run_as, id.uid, id.gid), (RunAs::Uid, 4242, 20002));
    }
}
