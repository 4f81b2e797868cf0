//! The request bodies that carry private and secret parameters. `Secret`
//! serializes as `<redacted>` and the model leaves `os_params` out of a
//! serialized spec or patch, so nothing can leak them by printing a
//! request; the body sent to the server is the one place their values must
//! go, and here they are written out, once, with an explicit `expose()`.

use std::collections::BTreeMap;

use cradle_model::Secret;
use cradle_model::api::{InstancePatch, InstanceSpec, OsParamsPatch, OsParamsSpec};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

/// `POST /v1/instances`.
pub(crate) fn instance_spec(spec: &InstanceSpec) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        #[serde(flatten)]
        spec: &'a InstanceSpec,
        os_params: SpecParams<'a>,
    }
    to_vec(&Body {
        spec,
        os_params: SpecParams(&spec.os_params),
    })
}

/// `PATCH /v1/instances/{key}`: a removal is `null`.
pub(crate) fn instance_patch(patch: &InstancePatch) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        #[serde(flatten)]
        patch: &'a InstancePatch,
        os_params: PatchParams<'a>,
    }
    to_vec(&Body {
        patch,
        os_params: PatchParams(&patch.os_params),
    })
}

pub(crate) fn to_vec(v: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(v).expect("request bodies are plain data and serialize")
}

struct SpecParams<'a>(&'a OsParamsSpec);

impl Serialize for SpecParams<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("public", &p.public)?;
        m.serialize_entry("private", &Exposed(&p.private))?;
        m.serialize_entry("secret", &Exposed(&p.secret))?;
        m.end()
    }
}

struct PatchParams<'a>(&'a OsParamsPatch);

impl Serialize for PatchParams<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let mut m = s.serialize_map(None)?;
        if !p.public.is_empty() {
            m.serialize_entry("public", &p.public)?;
        }
        if !p.private.is_empty() {
            m.serialize_entry("private", &ExposedPatch(&p.private))?;
        }
        if !p.secret.is_empty() {
            m.serialize_entry("secret", &ExposedPatch(&p.secret))?;
        }
        m.end()
    }
}

struct Exposed<'a>(&'a BTreeMap<String, Secret<String>>);

impl Serialize for Exposed<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v.expose())))
    }
}

struct ExposedPatch<'a>(&'a BTreeMap<String, Option<Secret<String>>>);

impl Serialize for ExposedPatch<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(
            self.0
                .iter()
                .map(|(k, v)| (k, v.as_ref().map(|v| v.expose()))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_values_go_in_the_body_and_nowhere_else() {
        let mut spec = InstanceSpec {
            name: "a".into(),
            ..Default::default()
        };
        spec.os_params.public.insert("p".into(), "pub".into());
        spec.os_params
            .private
            .insert("q".into(), Secret::new("priv-canary".into()));
        spec.os_params
            .secret
            .insert("s".into(), Secret::new("secret-canary".into()));
        let body: serde_json::Value = serde_json::from_slice(&instance_spec(&spec)).unwrap();
        assert_eq!(body["name"], "a");
        assert_eq!(body["os_params"]["public"]["p"], "pub");
        assert_eq!(body["os_params"]["private"]["q"], "priv-canary");
        assert_eq!(body["os_params"]["secret"]["s"], "secret-canary");
        // The spec itself serializes without them.
        let plain = serde_json::to_string(&spec).unwrap();
        assert!(
            !plain.contains("canary") && !plain.contains("os_params"),
            "{plain}"
        );

        let mut patch = InstancePatch::default();
        patch
            .os_params
            .secret
            .insert("s".into(), Some(Secret::new("new-canary".into())));
        patch.os_params.private.insert("q".into(), None);
        let body: serde_json::Value = serde_json::from_slice(&instance_patch(&patch)).unwrap();
        assert_eq!(body["os_params"]["secret"]["s"], "new-canary");
        assert!(body["os_params"]["private"]["q"].is_null());
        assert!(body["os_params"].get("public").is_none());
    }
}
