//! The policy file as written: OpenShell's sandbox policy YAML, every field it defines,
//! so that each one is either used or reported, and anything else is an error.
//!
//! These types only carry shapes; `model` checks values and builds the policy.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Error as _, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_norway::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    pub version: Option<u32>,
    #[serde(default)]
    pub filesystem_policy: Option<FilesystemDef>,
    #[serde(default)]
    pub landlock: Option<LandlockDef>,
    #[serde(default)]
    pub process: Option<ProcessDef>,
    #[serde(default)]
    pub network_policies: UniqueMap<EntryDef>,
    #[serde(default)]
    pub network_middlewares: UniqueMap<MiddlewareDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilesystemDef {
    #[serde(default)]
    pub include_workdir: Option<bool>,
    #[serde(default)]
    pub read_only: Vec<String>,
    #[serde(default)]
    pub read_write: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LandlockDef {
    #[serde(default)]
    pub compatibility: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProcessDef {
    #[serde(default)]
    pub run_as_user: Option<String>,
    #[serde(default)]
    pub run_as_group: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MiddlewareDef {
    #[serde(default)]
    pub name: Option<String>,
    pub middleware: String,
    #[serde(default)]
    pub order: Option<i32>,
    #[serde(default)]
    pub config: Option<Value>,
    #[serde(default)]
    pub on_error: Option<String>,
    pub endpoints: MiddlewareSelectorDef,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MiddlewareSelectorDef {
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EntryDef {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub endpoints: Option<Vec<EndpointDef>>,
    #[serde(default)]
    pub binaries: Option<Vec<BinaryDef>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BinaryDef {
    pub path: String,
    /// Deprecated in OpenShell and ignored there too.
    #[serde(default)]
    #[allow(dead_code, reason = "parsed for its shape only")]
    pub harness: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndpointDef {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub ports: Option<Vec<u16>>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub tls: Option<String>,
    #[serde(default)]
    pub enforcement: Option<String>,
    #[serde(default)]
    pub access: Option<String>,
    #[serde(default)]
    pub rules: Option<Vec<RuleDef>>,
    #[serde(default)]
    pub deny_rules: Option<Vec<MatchDef>>,
    #[serde(default)]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(default)]
    pub allow_encoded_slash: Option<bool>,
    #[serde(default)]
    pub websocket_credential_rewrite: Option<bool>,
    #[serde(default)]
    pub request_body_credential_rewrite: Option<bool>,
    #[serde(default)]
    pub allow_uninspected_credentials: Option<bool>,
    #[serde(default)]
    pub persisted_queries: Option<String>,
    #[serde(default)]
    pub graphql_persisted_queries: Option<UniqueMap<GraphqlOperationDef>>,
    #[serde(default)]
    pub graphql_max_body_bytes: Option<u32>,
    #[serde(default)]
    pub credential_signing: Option<String>,
    #[serde(default)]
    pub signing_service: Option<String>,
    #[serde(default)]
    pub signing_region: Option<String>,
    #[serde(default)]
    pub credential_binding: Option<CredentialBindingDef>,
    #[serde(default)]
    pub json_rpc: Option<BodyLimitDef>,
    #[serde(default)]
    pub mcp: Option<McpDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CredentialBindingDef {
    pub provider: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BodyLimitDef {
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "parsed for its shape; json-rpc is reported, not used"
    )]
    pub max_body_bytes: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct McpDef {
    #[serde(default)]
    #[allow(dead_code, reason = "parsed for its shape; mcp is reported, not used")]
    pub max_body_bytes: Option<u32>,
    #[serde(default)]
    #[allow(dead_code, reason = "parsed for its shape; mcp is reported, not used")]
    pub strict_tool_names: Option<bool>,
    #[serde(default)]
    pub allow_all_known_mcp_methods: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GraphqlOperationDef {
    pub operation_type: String,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "parsed for its shape; graphql is reported, not used"
    )]
    pub operation_name: Option<String>,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "parsed for its shape; graphql is reported, not used"
    )]
    pub fields: Vec<String>,
}

/// One `rules` item: `allow:` and the matcher under it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleDef {
    #[serde(default)]
    pub allow: Option<MatchDef>,
}

/// An allow clause or a deny rule: the fields of every protocol OpenShell knows.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MatchDef {
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub query: Option<UniqueMap<QueryMatcherDef>>,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub operation_type: Option<String>,
    #[serde(default)]
    pub operation_name: Option<String>,
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    #[serde(default)]
    pub tool: Option<Value>,
    #[serde(default)]
    pub params: Option<Value>,
}

/// `key: "glob"` or `key: { any: ["glob", ...] }`.
#[derive(Debug)]
pub(crate) enum QueryMatcherDef {
    Glob(String),
    Any(Vec<String>),
}

impl<'de> Deserialize<'de> for QueryMatcherDef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MatcherVisitor;
        impl<'de> Visitor<'de> for MatcherVisitor {
            type Value = QueryMatcherDef;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a glob string or {any: [glob, ...]}")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(QueryMatcherDef::Glob(v.to_string()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut any = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "any" {
                        return Err(A::Error::custom(format!(
                            "unknown field `{key}`, expected `any`"
                        )));
                    }
                    if any.replace(map.next_value::<Vec<String>>()?).is_some() {
                        return Err(A::Error::custom("duplicate field `any`"));
                    }
                }
                any.map(QueryMatcherDef::Any)
                    .ok_or_else(|| A::Error::custom("missing field `any`"))
            }
        }
        deserializer.deserialize_any(MatcherVisitor)
    }
}

/// A mapping that refuses a key given twice: YAML readers keep the last value, which
/// would drop an entry without a word.
#[derive(Debug)]
pub(crate) struct UniqueMap<V>(pub BTreeMap<String, V>);

impl<V> Default for UniqueMap<V> {
    fn default() -> Self {
        UniqueMap(BTreeMap::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = UniqueMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(A::Error::custom(format!("duplicate entry `{key}`")));
                    }
                    let value = map.next_value()?;
                    out.insert(key, value);
                }
                Ok(UniqueMap(out))
            }
        }
        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}
