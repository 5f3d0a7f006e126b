//! Exit codes and error reporting at the CLI edge.

use std::process::ExitCode;

/// Exit code for input the user can fix (bad flag values, malformed files).
pub const EXIT_USAGE: u8 = 2;
/// Exit code for any other failure of kiln itself.
pub const EXIT_FAILURE: u8 = 1;

/// An error that carries the exit code the process should end with.
#[derive(Debug)]
pub struct CommandError {
    pub code: u8,
    pub error: anyhow::Error,
}

impl CommandError {
    /// Bad input from the user: exit code 2.
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self { code: EXIT_USAGE, error: error.into() }
    }

    /// A failure that is not the user's input: exit code 1.
    pub fn failure(error: impl Into<anyhow::Error>) -> Self {
        Self { code: EXIT_FAILURE, error: error.into() }
    }
}

impl<E: Into<anyhow::Error>> From<E> for CommandError {
    fn from(error: E) -> Self {
        Self::failure(error)
    }
}

pub type CommandResult = Result<ExitCode, CommandError>;

/// Prints the error chain on stderr and returns its exit code.
pub fn report(err: &CommandError) -> ExitCode {
    eprintln!("kiln: error: {:#}", err.error);
    ExitCode::from(err.code)
}
