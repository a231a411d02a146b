//! `br2k context add|ls|use|show|rm`: where and as whom to deploy.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Result, bail};
use br2k_deploy::context::{ClusterContext, Contexts, Resources, WorkerNode};
use clap::{Args, Subcommand};

use super::GlobalOpts;

#[derive(Subcommand, Debug)]
pub(crate) enum ContextCommand {
    /// Add (or replace) a Kubernetes context as its administrator hands it out. It is
    /// written as a kubeconfig context (kubectl reads it with KUBECONFIG=DIR/kubeconfig);
    /// the token file is named, never copied.
    Add(AddArgs),
    /// List the contexts (`local`, this machine, always exists).
    Ls(DirArg),
    /// Make a context the current one.
    Use(NameArgs),
    /// Show one context and its resources.
    Show(NameArgs),
    /// Remove a context (not `local`).
    Rm(NameArgs),
}

#[derive(Args, Debug)]
pub(crate) struct DirArg {
    /// Where contexts (and the keys br2k makes for them) are kept [default: ~/.br2k].
    #[arg(long, env = "BR2K_HOME", value_name = "DIR")]
    config_dir: Option<PathBuf>,
}

impl DirArg {
    /// The directory.
    pub(crate) fn dir(&self) -> Result<PathBuf> {
        match &self.config_dir {
            Some(dir) => Ok(dir.clone()),
            None => match std::env::var_os("HOME") {
                Some(home) => Ok(PathBuf::from(home).join(".br2k")),
                None => bail!("HOME is not set: pass --config-dir or set BR2K_HOME"),
            },
        }
    }

    /// The contexts kept there.
    pub(crate) fn contexts(&self) -> Result<Contexts> {
        Ok(Contexts::new(self.dir()?))
    }
}

#[derive(Args, Debug)]
pub(crate) struct NameArgs {
    /// The context's name.
    name: String,
    #[command(flatten)]
    dir: DirArg,
}

#[derive(Args, Debug)]
pub(crate) struct AddArgs {
    /// The context's name (lowercase letters, digits, '-').
    name: String,
    /// The cluster's API server, https://HOST:PORT.
    #[arg(long)]
    server: String,
    /// The namespace to deploy into.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The file holding the access token (read when deploying; never copied).
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// The cluster's CA certificate, when it is not signed by a public CA.
    #[arg(long, value_name = "FILE")]
    certificate_authority: Option<PathBuf>,
    /// A worker node for replicas, with its labels: NAME or NAME:key=value,key=value (repeat).
    #[arg(long = "node", value_name = "NODE", value_parser = parse_node)]
    nodes: Vec<WorkerNode>,
    /// A public endpoint clients reach the replicas at (repeat).
    #[arg(long = "endpoint", value_name = "URL")]
    endpoints: Vec<String>,
    /// The storage class for etcd and app volumes.
    #[arg(long)]
    storage_class: Option<String>,
    #[command(flatten)]
    dir: DirArg,
}

fn parse_node(text: &str) -> Result<WorkerNode, String> {
    let (name, labels) = text.split_once(':').unwrap_or((text, ""));
    let mut map = BTreeMap::new();
    for pair in labels.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} in {text:?} is not key=value (NAME:key=value,...)"))?;
        map.insert(key.to_owned(), value.to_owned());
    }
    Ok(WorkerNode { name: name.to_owned(), labels: map })
}

impl ContextCommand {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        match self {
            Self::Add(args) => {
                let context = ClusterContext {
                    name: args.name,
                    server: args.server,
                    namespace: args.namespace,
                    token_file: args.token_file,
                    certificate_authority: args.certificate_authority,
                    resources: Resources {
                        nodes: args.nodes,
                        endpoints: args.endpoints,
                        storage_class: args.storage_class,
                    },
                };
                let contexts = args.dir.contexts()?;
                contexts.add(&context)?;
                out.result(
                    &format!("added context {} ({} namespace {})", context.name, context.server, context.namespace),
                    &serde_json::to_value(contexts.get(&context.name)?)?,
                )
            }
            Self::Ls(dir) => {
                let all = dir.contexts()?.list()?;
                if global.json {
                    return out.result("", &serde_json::to_value(&all)?);
                }
                for context in all {
                    let mark = if context.current { "*" } else { " " };
                    out.result(
                        &format!("{mark} {}\t{}\t{}", context.name, context.server, context.namespace),
                        &serde_json::Value::Null,
                    )?;
                }
                Ok(())
            }
            Self::Use(args) => {
                args.dir.contexts()?.use_context(&args.name)?;
                out.result(&format!("now using context {}", args.name), &serde_json::json!({ "current": args.name }))
            }
            Self::Show(args) => {
                let context = args.dir.contexts()?.get(&args.name)?;
                let value = serde_json::to_value(&context)?;
                out.result(&serde_json::to_string_pretty(&value)?, &value)
            }
            Self::Rm(args) => {
                if !args.dir.contexts()?.remove(&args.name)? {
                    bail!("no context {:?} to remove (see `br2k context ls`)", args.name);
                }
                out.result(&format!("removed context {}", args.name), &serde_json::json!({ "removed": args.name }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_node;

    #[test]
    fn nodes_parse() {
        let node = parse_node("worker-1:br2k.io/node=true,zone=a").unwrap();
        assert_eq!(node.name, "worker-1");
        assert_eq!(node.labels["zone"], "a");
        assert!(parse_node("w:oops").unwrap_err().contains("key=value"));
        assert!(parse_node("w").unwrap().labels.is_empty());
    }
}
