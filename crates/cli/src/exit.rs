//! Exit codes and error reporting at the CLI edge.

use std::process::ExitCode;

/// Exit code for input the user can fix (bad flag values, malformed files).
pub const EXIT_USAGE: u8 = 2;
/// Exit code for any other failure of kiln itself.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of `kiln run` when kiln itself failed (bad flags, pull, build or boot
/// failure), as `docker run` uses it; other codes are the workload's.
pub const EXIT_RUN_FAILURE: u8 = 125;

/// An error that carries the exit code the process should end with.
#[derive(Debug)]
pub struct CommandError {
    pub code: u8,
    pub error: anyhow::Error,
}

impl CommandError {
    /// Bad input from the user: exit code 2.
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: EXIT_USAGE,
            error: error.into(),
        }
    }

    /// A failure that is not the user's input: exit code 1.
    pub fn failure(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: EXIT_FAILURE,
            error: error.into(),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for CommandError {
    fn from(error: E) -> Self {
        Self::failure(error)
    }
}

pub type CommandResult = Result<ExitCode, CommandError>;

/// A kiln-sandbox error outside `kiln run` and `kiln exec` (which exit 125 on any of
/// kiln's own failures): input the user can fix exits 2, everything else 1.
pub fn sandbox_error(err: kiln_sandbox::Error) -> CommandError {
    match err.kind() {
        kiln_sandbox::ErrorKind::InvalidInput => CommandError::usage(err),
        _ => CommandError::failure(err),
    }
}

/// The exit code of a workload that ended with `result`, printing why it could not start
/// when it could not (the code alone, 127 or 126, does not say what was missing).
pub fn workload_exit(result: &kiln_protocol::WorkloadResult) -> ExitCode {
    if let kiln_protocol::WorkloadResult::StartFailed { message, .. } = result {
        eprintln!("kiln: {message}");
    }
    ExitCode::from(result.exit_code().clamp(0, 255) as u8)
}

/// Prints the error chain on stderr and returns its exit code.
pub fn report(err: &CommandError) -> ExitCode {
    eprintln!("kiln: error: {:#}", err.error);
    ExitCode::from(err.code)
}

/// Reports a command-line parse error. `kiln run` exits 125 on bad flags (the workload's
/// codes own the rest of the range, as with `docker run`); other commands exit 2.
pub fn parse_failure(err: &clap::Error) -> ExitCode {
    let _ = err.print();
    if !err.use_stderr() {
        return ExitCode::SUCCESS; // --help and --version
    }
    if subcommand(std::env::args().skip(1)).as_deref() == Some("run") {
        ExitCode::from(EXIT_RUN_FAILURE)
    } else {
        ExitCode::from(EXIT_USAGE)
    }
}

/// The subcommand word of an argument list: the first argument that is neither an
/// option nor the value of a global option that takes one.
fn subcommand(args: impl Iterator<Item = String>) -> Option<String> {
    let mut args = args;
    while let Some(arg) = args.next() {
        if arg == "--root" {
            args.next();
        } else if !arg.starts_with('-') {
            return Some(arg);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::subcommand;

    fn words(args: &[&str]) -> Option<String> {
        subcommand(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn finds_the_subcommand_after_global_options() {
        assert_eq!(words(&["run", "--bogus"]).as_deref(), Some("run"));
        assert_eq!(
            words(&["--root", "/r", "-q", "run"]).as_deref(),
            Some("run")
        );
        assert_eq!(words(&["--root=/r", "pull", "x"]).as_deref(), Some("pull"));
        assert_eq!(words(&["--json"]), None);
    }
}
