//! The parts of the OCI image and Docker v2 formats an image pull reads: indexes (and
//! Docker manifest lists), image manifests, and the image configuration.

use std::collections::BTreeMap;

use serde::Deserialize;

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Every manifest kind a pull accepts, for the `Accept` header.
pub const ACCEPTED: [&str; 4] = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of what it points at.
    #[serde(default)]
    pub media_type: String,
    /// Its digest (`sha256:…`).
    pub digest: String,
    /// Its size, bytes.
    pub size: u64,
    /// Where a non-distributable layer is fetched from instead (never followed).
    #[serde(default)]
    pub urls: Vec<String>,
    /// The platform of a manifest in an index.
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// The platform of an index entry.
#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `linux`, …
    pub os: String,
}

/// An index or a manifest list.
#[derive(Debug, Deserialize)]
pub struct Index {
    /// The manifests, one per platform (or attestations, which have `unknown`).
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Deserialize)]
pub struct Manifest {
    /// The image configuration.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// A manifest document, by what it turned out to be.
#[derive(Debug)]
pub enum Document {
    /// An index: pick a platform's manifest from it.
    Index(Index),
    /// An image manifest.
    Manifest(Manifest),
}

impl Document {
    /// Reads a manifest body by its media type (the response's `Content-Type`, else the
    /// body's own `mediaType`, else its shape).
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            #[serde(default)]
            media_type: Option<String>,
            #[serde(default)]
            schema_version: Option<u32>,
            #[serde(default)]
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe =
            serde_json::from_slice(body).map_err(|e| format!("not a JSON manifest: {e}"))?;
        if probe.schema_version == Some(1) {
            return Err("Docker schema 1 manifests are not supported (push the image again with a current tool)".into());
        }
        let declared = content_type
            .map(|c| c.split(';').next().unwrap_or_default().trim().to_string())
            .filter(|c| ACCEPTED.contains(&c.as_str()))
            .or(probe.media_type);
        let is_index = match declared.as_deref() {
            Some(OCI_INDEX | DOCKER_LIST) => true,
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
            Some(other) => return Err(format!("unsupported manifest type `{other}`")),
            None => probe.manifests.is_some(),
        };
        if is_index {
            serde_json::from_slice(body)
                .map(Document::Index)
                .map_err(|e| format!("malformed index: {e}"))
        } else {
            serde_json::from_slice(body)
                .map(Document::Manifest)
                .map_err(|e| format!("malformed manifest: {e}"))
        }
    }
}

impl Index {
    /// The manifest for `os`/`architecture`, if the index has one.
    pub fn pick(&self, os: &str, architecture: &str) -> Option<&Descriptor> {
        self.manifests.iter().find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == architecture)
        })
    }
}

/// The image configuration file (only what a template uses).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfigFile {
    /// `amd64`, …
    #[serde(default)]
    pub architecture: String,
    /// `linux`, …
    #[serde(default)]
    pub os: String,
    /// How to run it.
    #[serde(default)]
    pub config: Option<RunConfig>,
}

/// How the image is meant to run.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `NAME=value` pairs.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// The working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default)]
    pub user: Option<String>,
    /// The entrypoint.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Arguments to the entrypoint (or the command, without one).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Ports it listens on (`8080/tcp`).
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

impl RunConfig {
    /// The environment as pairs (entries without `=` are dropped).
    pub fn env_pairs(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .flatten()
            .filter_map(|e| e.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Entrypoint then command: what the image runs.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        argv.extend(self.cmd.clone().unwrap_or_default());
        argv
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn documents_are_told_apart_by_type_or_shape() {
        let index = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","size":1,"platform":{"architecture":"arm64","os":"linux"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bb","size":1,"platform":{"architecture":"amd64","os":"linux"}}]}"#;
        let Document::Index(i) = Document::parse(None, index).unwrap() else {
            panic!("not an index")
        };
        assert_eq!(i.pick("linux", "amd64").unwrap().digest, "sha256:bb");
        assert!(i.pick("windows", "amd64").is_none());

        let manifest = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:cc","size":2},"layers":[]}"#;
        assert!(matches!(
            Document::parse(Some(DOCKER_MANIFEST), manifest).unwrap(),
            Document::Manifest(_)
        ));
        let err = Document::parse(None, br#"{"schemaVersion":1,"fsLayers":[]}"#).unwrap_err();
        assert!(err.contains("schema 1"), "{err}");
        let err = Document::parse(
            Some("application/vnd.foo+json"),
            br#"{"mediaType":"application/vnd.foo+json"}"#,
        )
        .unwrap_err();
        assert!(err.contains("unsupported"), "{err}");
    }

    #[test]
    fn run_config_gives_env_and_argv() {
        let c: ConfigFile = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1","B=x=y","junk"],"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"WorkingDir":"/app","User":"app"}}"#,
        )
        .unwrap();
        let rc = c.config.unwrap();
        assert_eq!(rc.env_pairs().get("B").map(String::as_str), Some("x=y"));
        assert_eq!(rc.env_pairs().len(), 2);
        assert_eq!(rc.argv(), ["/bin/sh", "-c", "echo hi"]);
    }
}
