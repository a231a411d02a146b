//! Contexts: where and as whom to deploy. A context is a kubeconfig context
//! (cluster server, namespace, a token *file*), so kubectl and other tooling read it too,
//! plus br2k's own per-context resources (worker nodes with their labels, public
//! endpoints, storage class). `local` always exists and means the local backend.
//!
//! The token is never copied: the kubeconfig names the administrator's token file
//! (`tokenFile`), which is read when a deployment needs it. Files written here are created
//! with mode 0600 all the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DeployError, Result};

/// The context that always exists: this machine, the local backend.
pub const LOCAL: &str = "local";

/// A worker node the service may run on, and the labels it carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerNode {
    /// The Kubernetes node name.
    pub name: String,
    /// Its labels (br2k selects nodes by label).
    pub labels: BTreeMap<String, String>,
}

/// br2k's resources of one context (what kubeconfig has no place for).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Worker nodes to place replicas on.
    pub nodes: Vec<WorkerNode>,
    /// Public endpoints clients reach the replicas at.
    pub endpoints: Vec<String>,
    /// Storage class for etcd and app volumes.
    pub storage_class: Option<String>,
}

/// A Kubernetes context as given by its administrator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterContext {
    /// Its name.
    pub name: String,
    /// The API server, `https://...`.
    pub server: String,
    /// The namespace services are deployed into.
    pub namespace: String,
    /// The file holding the access token (read when needed, never copied).
    pub token_file: PathBuf,
    /// The cluster's CA certificate file, if not a public CA.
    pub certificate_authority: Option<PathBuf>,
    /// br2k's resources.
    pub resources: Resources,
}

/// A context as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContextInfo {
    /// Its name.
    pub name: String,
    /// `local` or the API server.
    pub server: String,
    /// The namespace (empty for local).
    pub namespace: String,
    /// Whether it is the current one.
    pub current: bool,
    /// br2k's resources.
    pub resources: Resources,
}

/// The contexts in a directory: `kubeconfig` (a kubeconfig file in JSON, which kubectl
/// reads) and `contexts.json` (br2k's resources and the current context).
#[derive(Clone, Debug)]
pub struct Contexts {
    dir: PathBuf,
}

#[derive(Default, Serialize, Deserialize)]
struct ResourcesFile {
    current: Option<String>,
    contexts: BTreeMap<String, Resources>,
}

impl Contexts {
    /// The contexts kept in `dir` (usually `~/.br2k`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The kubeconfig file br2k writes (point `KUBECONFIG` at it to use kubectl).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Adds (or replaces) a context after checking it.
    ///
    /// # Errors
    /// A bad name, server, namespace, node or label; a token file that cannot be read or
    /// is empty; files that cannot be written.
    pub fn add(&self, context: &ClusterContext) -> Result<()> {
        check_context(context)?;
        let mut kubeconfig = self.load_kubeconfig()?;
        let name = context.name.clone();
        let entry = |list: &mut Vec<serde_json::Value>, value: serde_json::Value| {
            list.retain(|v| v["name"] != name.as_str());
            list.push(value);
        };
        let mut cluster = serde_json::json!({ "server": context.server });
        if let Some(ca) = &context.certificate_authority {
            cluster["certificate-authority"] = serde_json::json!(absolute(ca)?);
        }
        entry(array(&mut kubeconfig, "clusters"), serde_json::json!({ "name": name, "cluster": cluster }));
        entry(
            array(&mut kubeconfig, "users"),
            serde_json::json!({ "name": name, "user": { "tokenFile": absolute(&context.token_file)? } }),
        );
        entry(
            array(&mut kubeconfig, "contexts"),
            serde_json::json!({ "name": name, "context": { "cluster": name, "user": name, "namespace": context.namespace } }),
        );
        self.save_private(&self.kubeconfig_path(), &kubeconfig)?;
        let mut resources = self.load_resources()?;
        resources.contexts.insert(name, context.resources.clone());
        self.save_private(&self.dir.join("contexts.json"), &serde_json::to_value(&resources).expect("serializes"))
    }

    /// Every context, `local` first.
    ///
    /// # Errors
    /// Files that cannot be read or parsed.
    pub fn list(&self) -> Result<Vec<ContextInfo>> {
        let kubeconfig = self.load_kubeconfig()?;
        let resources = self.load_resources()?;
        let current = resources.current.clone().unwrap_or_else(|| LOCAL.to_owned());
        let mut out = vec![ContextInfo {
            name: LOCAL.into(),
            server: "local".into(),
            namespace: String::new(),
            current: current == LOCAL,
            resources: Resources::default(),
        }];
        for context in kubeconfig["contexts"].as_array().into_iter().flatten() {
            let Some(name) = context["name"].as_str() else { continue };
            let cluster = kubeconfig["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["name"] == context["context"]["cluster"]);
            out.push(ContextInfo {
                name: name.to_owned(),
                server: cluster.and_then(|c| c["cluster"]["server"].as_str()).unwrap_or_default().to_owned(),
                namespace: context["context"]["namespace"].as_str().unwrap_or_default().to_owned(),
                current: current == name,
                resources: resources.contexts.get(name).cloned().unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// The context called `name`.
    ///
    /// # Errors
    /// An unknown name (the error lists the known ones).
    pub fn get(&self, name: &str) -> Result<ContextInfo> {
        let all = self.list()?;
        all.iter().find(|c| c.name == name).cloned().ok_or_else(|| {
            let known: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
            DeployError::Invalid(format!(
                "no context {name:?} (known: {}); add it with `br2k context add`",
                known.join(", ")
            ))
        })
    }

    /// Makes `name` the current context (also kubeconfig's `current-context`).
    ///
    /// # Errors
    /// An unknown name; files that cannot be written.
    pub fn use_context(&self, name: &str) -> Result<()> {
        self.get(name)?;
        let mut resources = self.load_resources()?;
        resources.current = Some(name.to_owned());
        self.save_private(&self.dir.join("contexts.json"), &serde_json::to_value(&resources).expect("serializes"))?;
        if name != LOCAL {
            let mut kubeconfig = self.load_kubeconfig()?;
            kubeconfig["current-context"] = serde_json::json!(name);
            self.save_private(&self.kubeconfig_path(), &kubeconfig)?;
        }
        Ok(())
    }

    /// Removes context `name` (never `local`); whether it was there.
    ///
    /// # Errors
    /// `local`; files that cannot be written.
    pub fn remove(&self, name: &str) -> Result<bool> {
        if name == LOCAL {
            return Err(DeployError::Invalid("the local context always exists and cannot be removed".into()));
        }
        let mut kubeconfig = self.load_kubeconfig()?;
        let mut removed = false;
        for key in ["clusters", "users", "contexts"] {
            let list = array(&mut kubeconfig, key);
            let before = list.len();
            list.retain(|v| v["name"] != name);
            removed |= list.len() != before;
        }
        if kubeconfig["current-context"] == name {
            kubeconfig.as_object_mut().expect("an object").remove("current-context");
        }
        self.save_private(&self.kubeconfig_path(), &kubeconfig)?;
        let mut resources = self.load_resources()?;
        resources.contexts.remove(name);
        if resources.current.as_deref() == Some(name) {
            resources.current = None;
        }
        self.save_private(&self.dir.join("contexts.json"), &serde_json::to_value(&resources).expect("serializes"))?;
        Ok(removed)
    }

    fn load_kubeconfig(&self) -> Result<serde_json::Value> {
        let path = self.kubeconfig_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                DeployError::Invalid(format!("{} is not the kubeconfig br2k writes (JSON): {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::json!({
                "apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": [],
            })),
            Err(e) => Err(DeployError::io(format!("read {}", path.display()), e)),
        }
    }

    fn load_resources(&self) -> Result<ResourcesFile> {
        let path = self.dir.join("contexts.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| DeployError::Invalid(format!("{} is not br2k's contexts file: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ResourcesFile::default()),
            Err(e) => Err(DeployError::io(format!("read {}", path.display()), e)),
        }
    }

    /// Writes `value` to `path`, mode 0600.
    fn save_private(&self, path: &Path, value: &serde_json::Value) -> Result<()> {
        let text = serde_json::to_string_pretty(value).expect("serializes") + "\n";
        Ok(br2k_oci::private_file::write(path, text.as_bytes())?)
    }
}

fn array<'a>(value: &'a mut serde_json::Value, key: &str) -> &'a mut Vec<serde_json::Value> {
    if !value[key].is_array() {
        value[key] = serde_json::json!([]);
    }
    value[key].as_array_mut().expect("just made an array")
}

fn absolute(path: &Path) -> Result<String> {
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .map_err(|e| DeployError::io(format!("resolve {}", path.display()), e))
}

fn check_context(c: &ClusterContext) -> Result<()> {
    let bad = |what: String| Err(DeployError::Invalid(what));
    if c.name == LOCAL {
        return bad("\"local\" is the built-in context of the local backend; choose another name".into());
    }
    if !is_dns_label(&c.name, 63) {
        return bad(format!("context name {:?} must be lowercase letters, digits and '-' (at most 63)", c.name));
    }
    if !c.server.starts_with("https://") || reqwest::Url::parse(&c.server).is_err() {
        return bad(format!("server {:?} must be an https:// URL of the cluster's API server", c.server));
    }
    if !is_dns_label(&c.namespace, 63) {
        return bad(format!("namespace {:?} must be lowercase letters, digits and '-' (at most 63)", c.namespace));
    }
    match std::fs::read_to_string(&c.token_file) {
        Ok(token) if !token.trim().is_empty() => {}
        Ok(_) => return bad(format!("token file {} is empty", c.token_file.display())),
        Err(e) => return bad(format!("cannot read the token file {}: {e}", c.token_file.display())),
    }
    if let Some(ca) = &c.certificate_authority
        && !ca.is_file()
    {
        return bad(format!("certificate authority file {} does not exist", ca.display()));
    }
    for node in &c.resources.nodes {
        if node.name.is_empty() || node.name.len() > 253 {
            return bad(format!("worker node name {:?} must be 1-253 characters", node.name));
        }
        for (key, value) in &node.labels {
            let key_name = key.rsplit('/').next().unwrap_or(key);
            let ok_part = |s: &str, max: usize| {
                s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            };
            if key_name.is_empty() || !ok_part(key_name, 63) || !ok_part(value, 63) {
                return bad(format!("label {key}={value} on node {} is not a valid Kubernetes label", node.name));
            }
        }
    }
    for endpoint in &c.resources.endpoints {
        if reqwest::Url::parse(endpoint).is_err() {
            return bad(format!("endpoint {endpoint:?} is not a URL"));
        }
    }
    Ok(())
}

fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn context(dir: &Path) -> ClusterContext {
        let token = dir.join("token");
        std::fs::write(&token, "s3cret-token\n").unwrap();
        ClusterContext {
            name: "lab".into(),
            server: "https://10.0.0.1:6443".into(),
            namespace: "br2k".into(),
            token_file: token,
            certificate_authority: None,
            resources: Resources {
                nodes: vec![WorkerNode {
                    name: "worker-1".into(),
                    labels: BTreeMap::from([("br2k.io/node".to_owned(), "true".to_owned())]),
                }],
                endpoints: vec!["http://203.0.113.7:30080".into()],
                storage_class: Some("standard".into()),
            },
        }
    }

    #[test]
    fn a_context_is_a_kubeconfig_context_with_a_token_file_never_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let contexts = Contexts::new(dir.path().join("br2k"));
        contexts.add(&context(dir.path())).unwrap();
        let text = std::fs::read_to_string(contexts.kubeconfig_path()).unwrap();
        assert!(!text.contains("s3cret"), "the token is read, never copied: {text}");
        let kubeconfig: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(kubeconfig["kind"], "Config");
        assert_eq!(kubeconfig["users"][0]["user"]["tokenFile"], dir.path().join("token").display().to_string());
        assert_eq!(kubeconfig["contexts"][0]["context"]["namespace"], "br2k");
        for file in ["kubeconfig", "contexts.json"] {
            let mode = std::fs::metadata(dir.path().join("br2k").join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }

        let all = contexts.list().unwrap();
        assert_eq!(all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["local", "lab"]);
        assert!(all[0].current, "local is current until another is used");
        contexts.use_context("lab").unwrap();
        let lab = contexts.get("lab").unwrap();
        assert!(lab.current);
        assert_eq!(lab.resources.nodes[0].labels["br2k.io/node"], "true");
        assert_eq!(lab.resources.storage_class.as_deref(), Some("standard"));

        assert!(contexts.remove("lab").unwrap());
        assert!(contexts.get("local").unwrap().current, "back to local");
        assert!(!contexts.remove("lab").unwrap());
        assert!(contexts.remove("local").is_err());
    }

    #[test]
    fn bad_contexts_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let contexts = Contexts::new(dir.path().join("br2k"));
        let base = context(dir.path());
        let cases: Vec<(ClusterContext, &str)> = vec![
            (ClusterContext { name: "local".into(), ..base.clone() }, "built-in"),
            (ClusterContext { name: "Lab".into(), ..base.clone() }, "context name"),
            (ClusterContext { server: "http://10.0.0.1".into(), ..base.clone() }, "https://"),
            (ClusterContext { namespace: "a_b".into(), ..base.clone() }, "namespace"),
            (ClusterContext { token_file: dir.path().join("missing"), ..base.clone() }, "cannot read the token file"),
        ];
        for (context, expected) in cases {
            let err = contexts.add(&context).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        assert!(contexts.get("nope").unwrap_err().to_string().contains("known: local"));
        assert!(!dir.path().join("br2k/kubeconfig").exists(), "nothing written for refused contexts");
    }
}
