//! `run_as_user` / `run_as_group` values and numeric sandbox ids.

use std::fmt;
use std::str::FromStr;

use crate::{quote, IdBounds, IdentityError, SANDBOX_USER};

/// Who the workload runs as: the `sandbox` account, or a numeric id within the bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunAs {
    /// The literal `sandbox`: the sandbox user (or group) written by [`crate::write_sandbox_accounts`].
    Sandbox,
    /// A canonical decimal id within the bounds it was parsed with.
    Id(u32),
}

impl RunAs {
    /// Parses a configured value; anything but `sandbox` or a canonical decimal id
    /// within `bounds` is an error quoting the input.
    pub fn parse(input: &[u8], bounds: IdBounds) -> Result<Self, IdentityError> {
        if input == SANDBOX_USER.as_bytes() {
            return Ok(Self::Sandbox);
        }
        let invalid = |reason: String| IdentityError::InvalidRunAs {
            input: quote(input),
            reason,
            bounds,
        };
        if std::str::from_utf8(input).is_err() {
            return Err(invalid("it is not UTF-8".to_owned()));
        }
        if !input.is_empty() && input.iter().all(u8::is_ascii_alphabetic) {
            return Err(invalid(
                "it is a name, and the only accepted name is \"sandbox\"".to_owned(),
            ));
        }
        parse_canonical_id(input, bounds)
            .map(Self::Id)
            .map_err(invalid)
    }
}

/// Parses within kiln's own bounds ([`IdBounds::KILN`]).
impl FromStr for RunAs {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.as_bytes(), IdBounds::KILN)
    }
}

impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sandbox => f.write_str(SANDBOX_USER),
            Self::Id(id) => write!(f, "{id}"),
        }
    }
}

/// Parses a numeric uid or gid (`--uid`, `--gid`): a canonical decimal id within
/// `bounds` (uids and gids share them).
pub fn parse_sandbox_id(input: &str, bounds: IdBounds) -> Result<u32, IdentityError> {
    parse_canonical_id(input.as_bytes(), bounds).map_err(|reason| IdentityError::InvalidId {
        input: quote(input.as_bytes()),
        reason,
        bounds,
    })
}

/// Only the one spelling `format!("{id}")` produces is accepted, so a value means the
/// same to every consumer (no octal/hex/exponent/sign/whitespace interpretations).
fn parse_canonical_id(input: &[u8], bounds: IdBounds) -> Result<u32, String> {
    if input.is_empty() {
        return Err("it is empty".to_owned());
    }
    if !input.iter().all(u8::is_ascii_digit) {
        return Err("it is not a plain decimal number".to_owned());
    }
    if input.len() > 1 && input[0] == b'0' {
        return Err("it has a leading zero".to_owned());
    }
    // More than 10 digits is above any u32; fewer parse into u64 without overflow.
    let value: u64 = if input.len() > 10 {
        u64::MAX
    } else {
        input
            .iter()
            .fold(0, |acc, d| acc * 10 + u64::from(d - b'0'))
    };
    if value < u64::from(bounds.min) {
        return Err(format!("it is below the minimum {}", bounds.min));
    }
    if value > u64::from(bounds.max) {
        return Err(format!("it is above the maximum {}", bounds.max));
    }
    Ok(value as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KILN: IdBounds = IdBounds::KILN;

    const REJECTED: &[&str] = &[
        "",
        "root",
        "Sandbox",
        "SANDBOX",
        "sandbox2",
        " sandbox",
        "sandbox\n",
        "0",
        "999",
        "2000000001",
        "4294967296",
        "99999999999999999999",
        "-1",
        "+1000",
        " 1000",
        "1000 ",
        "\t1000",
        "01000",
        "00",
        "1e3",
        "0x3e8",
        "1_000",
        "1,000",
        "1000.0",
        "１０００",
    ];

    #[test]
    fn accepts_sandbox_and_bounds() {
        assert_eq!(RunAs::parse(b"sandbox", KILN), Ok(RunAs::Sandbox));
        assert_eq!(RunAs::parse(b"1000", KILN), Ok(RunAs::Id(1000)));
        assert_eq!(RunAs::parse(b"10001", KILN), Ok(RunAs::Id(10001)));
        assert_eq!(
            RunAs::parse(b"2000000000", KILN),
            Ok(RunAs::Id(2_000_000_000))
        );
        assert_eq!("65534".parse::<RunAs>(), Ok(RunAs::Id(65534)));
        assert_eq!(parse_sandbox_id("1000", KILN), Ok(1000));
        assert_eq!(parse_sandbox_id("2000000000", KILN), Ok(2_000_000_000));
    }

    #[test]
    fn rejects_every_listed_input_quoting_it() {
        for input in REJECTED {
            let err = RunAs::parse(input.as_bytes(), KILN)
                .expect_err(input)
                .to_string();
            let quoted = quote(input.as_bytes());
            assert!(err.contains(&quoted), "{err:?} does not quote {quoted}");
            assert!(
                err.contains("accepted: \"sandbox\" or a decimal id from 1000 to 2000000000"),
                "{err}"
            );
        }
    }

    #[test]
    fn numeric_parser_rejects_sandbox_and_every_listed_input() {
        for input in REJECTED.iter().chain(&["sandbox"]) {
            let err = parse_sandbox_id(input, KILN).expect_err(input).to_string();
            assert!(err.contains(&quote(input.as_bytes())), "{err}");
            assert!(
                err.contains("accepted: a decimal id from 1000 to 2000000000"),
                "{err}"
            );
        }
    }

    #[test]
    fn rejects_non_utf8_with_escaped_bytes() {
        let err = RunAs::parse(b"10\xff01", KILN).unwrap_err();
        assert_eq!(
            err,
            IdentityError::InvalidRunAs {
                input: "\"10\\xff01\"".to_owned(),
                reason: "it is not UTF-8".to_owned(),
                bounds: KILN,
            }
        );
        assert!(err
            .to_string()
            .starts_with("invalid run-as value \"10\\xff01\": it is not UTF-8;"));
    }

    #[test]
    fn reasons_say_what_is_wrong() {
        let reason = |s: &str| match RunAs::parse(s.as_bytes(), KILN) {
            Err(IdentityError::InvalidRunAs { reason, .. }) => reason,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(reason("999"), "it is below the minimum 1000");
        assert_eq!(reason("2000000001"), "it is above the maximum 2000000000");
        assert_eq!(reason("4294967296"), "it is above the maximum 2000000000");
        assert_eq!(reason("01000"), "it has a leading zero");
        assert_eq!(reason("-1"), "it is not a plain decimal number");
        assert_eq!(reason(""), "it is empty");
        assert_eq!(
            reason("root"),
            "it is a name, and the only accepted name is \"sandbox\""
        );
    }

    #[test]
    fn display_round_trips() {
        for value in [RunAs::Sandbox, RunAs::Id(1000), RunAs::Id(123_456)] {
            assert_eq!(value.to_string().parse::<RunAs>(), Ok(value));
        }
    }

    #[test]
    fn openshell_bounds_accept_what_openshell_accepts() {
        let openshell = IdBounds::OPENSHELL;
        assert_eq!(parse_sandbox_id("1", openshell), Ok(1));
        assert_eq!(parse_sandbox_id("999", openshell), Ok(999));
        assert_eq!(parse_sandbox_id("4294967294", openshell), Ok(u32::MAX - 1));
        assert_eq!(RunAs::parse(b"65534", openshell), Ok(RunAs::Id(65534)));
        for refused in ["0", "4294967295", "4294967296", "01", "-1"] {
            let err = parse_sandbox_id(refused, openshell).expect_err(refused);
            assert!(
                err.to_string()
                    .contains("accepted: a decimal id from 1 to 4294967294"),
                "{err}"
            );
        }
        // kiln's own bounds stay as they were.
        assert!(parse_sandbox_id("999", KILN).is_err());
        assert!(parse_sandbox_id("2000000001", KILN).is_err());
    }
}
