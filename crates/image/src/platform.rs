//! Platforms (`os/arch[/variant]`): parsing `--platform`, the host's platform, and picking
//! an image index entry.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Error;

/// An OCI platform in Go's GOOS/GOARCH vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]` (e.g. `linux/arm64/v8`).
    pub fn parse(input: &str) -> Result<Platform, Error> {
        let parts: Vec<&str> = input.split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| valid(p)) {
            return Err(Error::InvalidPlatform {
                input: input.to_owned(),
                reason:
                    "expected OS/ARCH[/VARIANT] in lowercase, e.g. linux/amd64 or linux/arm64/v8"
                        .into(),
            });
        }
        Ok(Platform {
            os: parts[0].to_owned(),
            architecture: parts[1].to_owned(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }

    /// The platform this kiln binary runs on.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            other => (other, None),
        };
        Platform {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// Whether an index entry for `offered` can serve a request for `self`. A request
    /// without a variant takes any variant; arm64 without a variant means v8.
    pub fn accepts(&self, offered: &Platform) -> bool {
        if self.os != offered.os || self.architecture != offered.architecture {
            return false;
        }
        let normal = |p: &Platform| match (p.architecture.as_str(), p.variant.as_deref()) {
            ("arm64", None) => Some("v8".to_owned()),
            (_, v) => v.map(str::to_owned),
        };
        match &self.variant {
            None => true,
            Some(_) => normal(self) == normal(offered),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Picks the entry for `wanted` among `offered` (index order); an exact variant match wins
/// over an entry that merely accepts. Returns the position in `offered`.
pub fn select(wanted: &Platform, offered: &[Platform]) -> Result<usize, Error> {
    offered
        .iter()
        .position(|p| p == wanted)
        .or_else(|| offered.iter().position(|p| wanted.accepts(p)))
        .ok_or_else(|| Error::NoMatchingPlatform {
            wanted: wanted.to_string(),
            offered: offered.iter().map(ToString::to_string).collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(p("linux/arm64/v8").to_string(), "linux/arm64/v8");
        assert_eq!(p("linux/amd64").variant, None);
        for bad in ["linux", "linux/", "Linux/amd64", "a/b/c/d", "linux//v8", ""] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Platform::host().os, "linux");
    }

    #[test]
    fn selection() {
        let offered = [p("linux/amd64"), p("linux/arm64/v8"), p("linux/arm/v7")];
        assert_eq!(select(&p("linux/amd64"), &offered).unwrap(), 0);
        assert_eq!(select(&p("linux/arm64"), &offered).unwrap(), 1);
        assert_eq!(
            select(&p("linux/arm64/v8"), &[p("linux/arm64")]).unwrap(),
            0
        );
        assert_eq!(select(&p("linux/arm/v7"), &offered).unwrap(), 2);
        let err = select(&p("linux/s390x"), &offered).unwrap_err().to_string();
        assert!(
            err.contains("linux/s390x") && err.contains("linux/arm64/v8"),
            "{err}"
        );
        assert!(select(&p("linux/arm/v6"), &offered).is_err());
    }
}
