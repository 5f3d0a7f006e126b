//! Which uid/gid the sandbox runs as: configuration, then SCC annotations, then the default.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Serialize, Serializer};

use crate::{
    parse_supplemental_groups, parse_uid_range, quote, IdBlock, IdBounds, IdentityError,
    DEFAULT_SANDBOX_GID, DEFAULT_SANDBOX_UID, SUPPLEMENTAL_GROUPS_ANNOTATION, UID_RANGE_ANNOTATION,
};

/// Where a resolved id came from. Serialises (and displays) as `config`, the annotation
/// name, or `default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdSource {
    /// Explicitly configured (`--uid`/`--gid`, a config file, a gateway request).
    Config,
    /// Taken from this namespace annotation.
    Annotation(&'static str),
    /// Nothing gave an id: [`DEFAULT_SANDBOX_UID`] / [`DEFAULT_SANDBOX_GID`].
    Default,
}

impl IdSource {
    /// `config`, the annotation name, or `default`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Annotation(name) => name,
            Self::Default => "default",
        }
    }
}

impl fmt::Display for IdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for IdSource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One resolved id and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResolvedId {
    pub value: u32,
    pub source: IdSource,
}

/// The sandbox's uid and gid, plus the namespace's SCC blocks when it has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedIdentity {
    pub uid: ResolvedId,
    pub gid: ResolvedId,
    /// The first block of [`UID_RANGE_ANNOTATION`], when present (the Kubernetes renderer
    /// takes further uids from it, e.g. `uid_block.end()`).
    pub uid_block: Option<IdBlock>,
    /// Every block of [`SUPPLEMENTAL_GROUPS_ANNOTATION`]; empty when absent.
    pub supplemental_groups: Vec<IdBlock>,
    /// Things that are allowed but likely wrong, e.g. a configured uid outside the
    /// namespace's uid range (an OpenShift SCC would reject the pod).
    pub warnings: Vec<String>,
}

/// Resolves the sandbox identity.
///
/// Precedence: an explicit uid/gid wins; else UID = start of the uid-range block and
/// GID = start of the first supplemental-groups block (uid-range start when that
/// annotation is absent); else 10001:10001. Both annotations, when present, must parse
/// even if explicit ids override them. A result outside kiln's bounds ([`IdBounds::KILN`],
/// which lie within Kubernetes' limit: this resolves for the Kubernetes renderer and
/// kiln's CLI) is an error naming its source.
pub fn resolve_identity(
    explicit_uid: Option<u32>,
    explicit_gid: Option<u32>,
    annotations: &BTreeMap<String, String>,
) -> Result<ResolvedIdentity, IdentityError> {
    let uid_block = annotations
        .get(UID_RANGE_ANNOTATION)
        .map(|v| parse_uid_range(v))
        .transpose()?;
    let supplemental_groups = annotations
        .get(SUPPLEMENTAL_GROUPS_ANNOTATION)
        .map(|v| parse_supplemental_groups(v))
        .transpose()?
        .unwrap_or_default();

    let uid = match (explicit_uid, uid_block) {
        (Some(value), _) => ResolvedId {
            value,
            source: IdSource::Config,
        },
        (None, Some(block)) => ResolvedId {
            value: block.start(),
            source: IdSource::Annotation(UID_RANGE_ANNOTATION),
        },
        (None, None) => ResolvedId {
            value: DEFAULT_SANDBOX_UID,
            source: IdSource::Default,
        },
    };
    let gid = match (explicit_gid, supplemental_groups.first(), uid_block) {
        (Some(value), _, _) => ResolvedId {
            value,
            source: IdSource::Config,
        },
        (None, Some(block), _) => ResolvedId {
            value: block.start(),
            source: IdSource::Annotation(SUPPLEMENTAL_GROUPS_ANNOTATION),
        },
        (None, None, Some(block)) => ResolvedId {
            value: block.start(),
            source: IdSource::Annotation(UID_RANGE_ANNOTATION),
        },
        (None, None, None) => ResolvedId {
            value: DEFAULT_SANDBOX_GID,
            source: IdSource::Default,
        },
    };

    check_bounds("uid", uid, annotations)?;
    check_bounds("gid", gid, annotations)?;

    let mut warnings = Vec::new();
    if let Some(block) = uid_block.filter(|b| !b.contains(uid.value)) {
        warnings.push(format!(
            "uid {} from {} lies outside the namespace's uid range {block} ({UID_RANGE_ANNOTATION}); \
             an SCC with MustRunAsRange will reject the pod",
            uid.value, uid.source
        ));
    }
    if !supplemental_groups.is_empty() && !supplemental_groups.iter().any(|b| b.contains(gid.value))
    {
        warnings.push(format!(
            "gid {} from {} lies outside every block of {SUPPLEMENTAL_GROUPS_ANNOTATION}; \
             an SCC with MustRunAs will reject it as fsGroup or supplemental group",
            gid.value, gid.source
        ));
    }
    Ok(ResolvedIdentity {
        uid,
        gid,
        uid_block,
        supplemental_groups,
        warnings,
    })
}

fn check_bounds(
    what: &'static str,
    id: ResolvedId,
    annotations: &BTreeMap<String, String>,
) -> Result<(), IdentityError> {
    let bounds = IdBounds::KILN;
    if bounds.contains(id.value) {
        return Ok(());
    }
    let origin = match id.source {
        IdSource::Config => "the configuration".to_owned(),
        IdSource::Default => "the default".to_owned(),
        IdSource::Annotation(name) => {
            let value = annotations
                .get(name)
                .map(String::as_bytes)
                .unwrap_or_default();
            format!("annotation {name}={}", quote(value))
        }
    };
    Err(IdentityError::OutOfRange {
        what,
        value: id.value,
        origin,
        bounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ids(r: &ResolvedIdentity) -> (u32, IdSource, u32, IdSource) {
        (r.uid.value, r.uid.source, r.gid.value, r.gid.source)
    }

    const UID: IdSource = IdSource::Annotation(UID_RANGE_ANNOTATION);
    const GROUPS: IdSource = IdSource::Annotation(SUPPLEMENTAL_GROUPS_ANNOTATION);

    #[test]
    fn default_without_anything() {
        let r = resolve_identity(None, None, &BTreeMap::new()).unwrap();
        assert_eq!(
            ids(&r),
            (10001, IdSource::Default, 10001, IdSource::Default)
        );
        assert_eq!(
            (r.uid_block, r.supplemental_groups.len(), r.warnings.len()),
            (None, 0, 0)
        );
    }

    #[test]
    fn explicit_wins_over_annotations() {
        let a = annotations(&[
            (UID_RANGE_ANNOTATION, "5000/10"),
            (SUPPLEMENTAL_GROUPS_ANNOTATION, "6000/10"),
        ]);
        let r = resolve_identity(Some(5001), Some(6002), &a).unwrap();
        assert_eq!(ids(&r), (5001, IdSource::Config, 6002, IdSource::Config));
        assert_eq!(r.uid_block, IdBlock::new(5000, 10));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let r = resolve_identity(Some(1234), None, &a).unwrap();
        assert_eq!(ids(&r), (1234, IdSource::Config, 6000, GROUPS));
        let r = resolve_identity(None, Some(1234), &a).unwrap();
        assert_eq!(ids(&r), (5000, UID, 1234, IdSource::Config));
    }

    #[test]
    fn annotations_give_block_starts() {
        let a = annotations(&[
            (UID_RANGE_ANNOTATION, "1000680000/10000"),
            (SUPPLEMENTAL_GROUPS_ANNOTATION, "1000690000/10000,2000-3000"),
        ]);
        let r = resolve_identity(None, None, &a).unwrap();
        assert_eq!(ids(&r), (1_000_680_000, UID, 1_000_690_000, GROUPS));
        assert_eq!(r.uid_block.unwrap().end(), 1_000_689_999);
        assert_eq!(r.supplemental_groups.len(), 2);
    }

    #[test]
    fn gid_falls_back_to_uid_range() {
        let a = annotations(&[(UID_RANGE_ANNOTATION, "1000680000-1000689999")]);
        let r = resolve_identity(None, None, &a).unwrap();
        assert_eq!(ids(&r), (1_000_680_000, UID, 1_000_680_000, UID));
    }

    #[test]
    fn supplemental_groups_alone_sets_gid_only() {
        let a = annotations(&[(SUPPLEMENTAL_GROUPS_ANNOTATION, "7000/1")]);
        let r = resolve_identity(None, None, &a).unwrap();
        assert_eq!(ids(&r), (10001, IdSource::Default, 7000, GROUPS));
    }

    #[test]
    fn unrelated_annotations_are_ignored() {
        let a = annotations(&[
            ("openshift.io/sa.scc.mcs", "s0:c26,c5"),
            ("x", "not a block"),
        ]);
        let r = resolve_identity(None, None, &a).unwrap();
        assert_eq!(
            ids(&r),
            (10001, IdSource::Default, 10001, IdSource::Default)
        );
    }

    #[test]
    fn malformed_annotation_is_an_error_even_when_overridden() {
        for (name, value) in [
            (UID_RANGE_ANNOTATION, "abc"),
            (SUPPLEMENTAL_GROUPS_ANNOTATION, "1000/10,"),
        ] {
            let a = annotations(&[(name, value)]);
            for (uid, gid) in [(None, None), (Some(5000), Some(5000))] {
                let err = resolve_identity(uid, gid, &a).unwrap_err();
                assert!(
                    matches!(err, IdentityError::InvalidAnnotation { annotation, .. } if annotation == name)
                );
            }
        }
    }

    #[test]
    fn out_of_bounds_errors_name_their_source() {
        let a = annotations(&[(UID_RANGE_ANNOTATION, "500/10")]);
        let err = resolve_identity(None, None, &a).unwrap_err().to_string();
        assert_eq!(
            err,
            "uid 500 from annotation openshift.io/sa.scc.uid-range=\"500/10\" is outside the sandbox \
             range 1000..=2000000000"
        );
        // Start within Kubernetes' limit but above the sandbox maximum.
        let a = annotations(&[
            (UID_RANGE_ANNOTATION, "5000/10"),
            (SUPPLEMENTAL_GROUPS_ANNOTATION, "2100000000/10"),
        ]);
        let err = resolve_identity(None, None, &a).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "gid 2100000000 from annotation openshift.io/sa.scc.supplemental-groups="
            ),
            "{err}"
        );
        // Above Kubernetes' limit.
        let a = annotations(&[(UID_RANGE_ANNOTATION, "3000000000/10")]);
        let err = resolve_identity(None, None, &a).unwrap_err().to_string();
        assert!(
            err.contains("uid 3000000000 from annotation openshift.io/sa.scc.uid-range"),
            "{err}"
        );
        // gid falling back to the uid range names that annotation.
        let a = annotations(&[(UID_RANGE_ANNOTATION, "999/10")]);
        let err = resolve_identity(Some(5000), None, &a)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("gid 999 from annotation openshift.io/sa.scc.uid-range"),
            "{err}"
        );
        let err = resolve_identity(Some(0), None, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("uid 0 from the configuration is outside"),
            "{err}"
        );
        let err = resolve_identity(None, Some(u32::MAX), &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("gid 4294967295 from the configuration is outside"),
            "{err}"
        );
    }

    #[test]
    fn configured_ids_outside_scc_blocks_warn() {
        let a = annotations(&[
            (UID_RANGE_ANNOTATION, "5000/10"),
            (SUPPLEMENTAL_GROUPS_ANNOTATION, "6000/10"),
        ]);
        let r = resolve_identity(Some(10001), Some(10001), &a).unwrap();
        assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
        assert!(r.warnings[0]
            .starts_with("uid 10001 from config lies outside the namespace's uid range 5000/10"));
        assert!(r.warnings[1].starts_with("gid 10001 from config lies outside every block of"));
    }

    #[test]
    fn sources_serialise_as_names() {
        assert_eq!(IdSource::Config.as_str(), "config");
        assert_eq!(IdSource::Default.to_string(), "default");
        assert_eq!(UID.as_str(), "openshift.io/sa.scc.uid-range");
    }
}
