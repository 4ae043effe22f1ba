//! Errors of the operator verbs and their one mapping to exit codes.
//!
//! | exit | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | runtime failure: a service unreachable or failing (HTTP 5xx, no answer) |
//! | 2 | bad usage or input (also HTTP 400); nothing was sent for input the CLI can check itself |
//! | 3 | not found (HTTP 404: unknown volume, unit, sled) |
//! | 4 | conflict (HTTP 409: a name taken with another spec, a volume still attached; a device in use) |
//! | 5 | authentication (HTTP 401: missing or wrong token) |
//!
//! [`CliError::exit_code`] is the only place that decides these.

use std::process::ExitCode;

use thiserror::Error;

/// Why an operator verb failed.
#[derive(Debug, Error)]
pub enum CliError {
    /// Bad flags or values, caught before anything was sent.
    #[error("{0}")]
    Usage(String),
    /// The zonal API answered with an error status.
    #[error("{message}")]
    Api {
        status: u16,
        /// The API's stable error code (`volume_not_found`, ...).
        code: String,
        message: String,
    },
    /// A service did not answer (connect refused, timeout, dropped).
    #[error("{0}")]
    Unavailable(String),
    /// Something named on the command line does not exist (checked by the
    /// CLI itself, e.g. a sled missing from the unit).
    #[error("{0}")]
    NotFound(String),
    /// Something is already in use (a device another agent holds).
    #[error("{0}")]
    Conflict(String),
    /// Anything else that went wrong at run time.
    #[error("{0}")]
    Runtime(String),
}

/// Exit codes (see the module docs).
pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_CONFLICT: u8 = 4;
pub const EXIT_AUTH: u8 = 5;

impl CliError {
    /// The exit code of every error: the one place that decides it.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::NotFound(_) => EXIT_NOT_FOUND,
            CliError::Conflict(_) => EXIT_CONFLICT,
            CliError::Unavailable(_) | CliError::Runtime(_) => EXIT_RUNTIME,
            CliError::Api { status, .. } => match status {
                400 | 413 | 422 => EXIT_USAGE,
                401 | 403 => EXIT_AUTH,
                404 => EXIT_NOT_FOUND,
                409 => EXIT_CONFLICT,
                _ => EXIT_RUNTIME,
            },
        }
    }

    /// One line for stderr.
    pub fn line(&self) -> String {
        match self {
            CliError::Api {
                status: 401,
                message,
                ..
            } => format!(
                "{message} (HTTP 401; pass --token, set RACKBLOCK_TOKEN, or run where rackblock-data/zonal-token is)"
            ),
            CliError::Api {
                status,
                code,
                message,
            } => format!("{message} (HTTP {status} {code})"),
            other => other.to_string(),
        }
    }
}

/// Prints `rackblock <verb>: <error>` and returns its exit code.
pub fn report(verb: &str, error: &CliError) -> ExitCode {
    eprintln!("rackblock {verb}: {}", error.line());
    ExitCode::from(error.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16) -> CliError {
        CliError::Api {
            status,
            code: "x".into(),
            message: "m".into(),
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(api(400).exit_code(), 2);
        assert_eq!(api(401).exit_code(), 5);
        assert_eq!(api(404).exit_code(), 3);
        assert_eq!(api(409).exit_code(), 4);
        assert_eq!(api(500).exit_code(), 1);
        assert_eq!(api(501).exit_code(), 1);
        assert_eq!(api(503).exit_code(), 1);
        assert_eq!(CliError::Usage("u".into()).exit_code(), 2);
        assert_eq!(CliError::NotFound("n".into()).exit_code(), 3);
        assert_eq!(CliError::Conflict("c".into()).exit_code(), 4);
        assert_eq!(CliError::Unavailable("n".into()).exit_code(), 1);
    }
}
