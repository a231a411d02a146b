//! `br2k image build|ls|push|pull|rm` and `br2k image-registry add|ls|rm|login`: OCI
//! images built from a service's binary (no Docker daemon) and the registries that hold them.

use std::path::PathBuf;

use anyhow::Result;
use anyhow::{Context, bail};
use br2k_oci::image::{ImageSpec, ImageStore};
use br2k_oci::registry::{Credentials, PASSWORD_ENV, RegistryClient, RegistryEntry, RegistryList, USERNAME_ENV};
use clap::{Args, Subcommand};

use super::GlobalOpts;

#[derive(Subcommand, Debug)]
pub(crate) enum ImageCommand {
    /// Build an OCI image from a compiled binary: one layer with the binary and the shared
    /// libraries it loads, its entrypoint and port in the config. Reproducible: the same
    /// binary gives the same digest.
    Build(BuildArgs),
    /// List the images built into the store.
    Ls(StoreArg),
    /// Push an image (NAME:TAG from the store) to a container registry.
    Push(PushArgs),
    /// Pull an image by digest from a container registry into the store.
    Pull(PullArgs),
    /// Remove an image from the store (blobs no other image uses are deleted; registries
    /// are not touched).
    Rm(ImageRmArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ImageRmArgs {
    /// The image, `NAME:TAG`, as `br2k image ls` shows it.
    image: String,

    #[command(flatten)]
    store: StoreArg,
}

#[derive(Args, Debug)]
pub(crate) struct PushArgs {
    /// The image, `NAME:TAG`, as `br2k image ls` shows it.
    image: String,

    /// The container registry's name (see `br2k image-registry ls`).
    #[arg(long, value_name = "REGISTRY")]
    to: String,

    /// The repository in the registry [default: the image name].
    #[arg(long)]
    repository: Option<String>,

    #[command(flatten)]
    store: StoreArg,
}

#[derive(Args, Debug)]
pub(crate) struct PullArgs {
    /// The manifest digest (`sha256:...`).
    digest: String,

    /// The container registry's name.
    #[arg(long, value_name = "REGISTRY")]
    from: String,

    /// The repository in the registry.
    #[arg(long)]
    repository: String,

    /// The name to record it under [default: the repository].
    #[arg(long)]
    name: Option<String>,

    /// The tag to record it under.
    #[arg(long, default_value = "pulled")]
    tag: String,

    #[command(flatten)]
    store: StoreArg,
}

/// `br2k image-registry`: the project's container registries (in STORE/registry.json).
#[derive(Subcommand, Debug)]
pub(crate) enum RegistryCommand {
    /// Add (or replace) a container registry. Credentials are never stored here: they come
    /// from BR2K_REGISTRY_USERNAME / BR2K_REGISTRY_PASSWORD or Docker's config.json.
    Add(AddArgs),
    /// List the container registries.
    Ls(StoreArg),
    /// Remove a container registry.
    Rm(RmArgs),
    /// Check credentials against a registry and store them in Docker's config.json (0600),
    /// as `docker login` does. The password comes from stdin (--password-stdin) or
    /// BR2K_REGISTRY_PASSWORD, never from a flag.
    Login(LoginArgs),
}

#[derive(Args, Debug)]
pub(crate) struct LoginArgs {
    /// The registry's name.
    name: String,
    /// The user name [default: BR2K_REGISTRY_USERNAME].
    #[arg(long, short)]
    username: Option<String>,
    /// Read the password from standard input (e.g. `cat token | br2k image-registry login ...`).
    #[arg(long)]
    password_stdin: bool,
    #[command(flatten)]
    store: StoreArg,
}

#[derive(Args, Debug)]
pub(crate) struct AddArgs {
    /// Its name in this project.
    name: String,
    /// Its URL, e.g. https://harbor.example.org.
    url: String,
    /// Allow plain http:// (images and credentials travel unencrypted).
    #[arg(long)]
    plain_http: bool,
    #[command(flatten)]
    store: StoreArg,
}

#[derive(Args, Debug)]
pub(crate) struct RmArgs {
    /// The registry's name.
    name: String,
    #[command(flatten)]
    store: StoreArg,
}

impl LoginArgs {
    async fn run(self, out: &crate::output::Output) -> Result<()> {
        let entry = registries(&self.store.store).get(&self.name)?;
        let username = match self.username {
            Some(username) => username,
            None => std::env::var(USERNAME_ENV)
                .with_context(|| format!("no user name: pass --username or set {USERNAME_ENV}"))?,
        };
        let password = if self.password_stdin {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        } else {
            std::env::var(PASSWORD_ENV).with_context(|| {
                format!("no password: pipe it in with --password-stdin, or set {PASSWORD_ENV} (never a flag: the process list shows flags)")
            })?
        };
        if password.is_empty() {
            bail!("the password is empty");
        }
        let credentials = Credentials { username, password };
        out.progress(format_args!(
            "image-registry: checking the credentials of {:?} against {}",
            credentials.username, entry.url
        ));
        RegistryClient::new(&entry.url, entry.plain_http, Some(credentials.clone()))?.check_access().await?;
        let path = credentials.save_to_docker_config(&entry.host())?;
        out.result(
            &format!(
                "logged in to {} as {:?}; credentials stored in {} (mode 0600)",
                entry.url,
                credentials.username,
                path.display()
            ),
            &serde_json::json!({ "registry": entry.name, "username": credentials.username, "config": path }),
        )
    }
}

fn registries(store: &std::path::Path) -> RegistryList {
    RegistryList::new(store.join("registry.json"))
}

impl RegistryCommand {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        match self {
            Self::Add(args) => {
                let entry = RegistryEntry { name: args.name, url: args.url, plain_http: args.plain_http };
                registries(&args.store.store).add(entry.clone())?;
                out.result(&format!("added {} ({})", entry.name, entry.url), &serde_json::to_value(&entry)?)
            }
            Self::Ls(args) => {
                let all = registries(&args.store).list()?;
                if global.json {
                    return out.result("", &serde_json::to_value(&all)?);
                }
                for entry in all {
                    let plain = if entry.plain_http { "  (plain http allowed)" } else { "" };
                    out.result(&format!("{}\t{}{plain}", entry.name, entry.url), &serde_json::Value::Null)?;
                }
                Ok(())
            }
            Self::Login(args) => args.run(&out).await,
            Self::Rm(args) => {
                if !registries(&args.store.store).remove(&args.name)? {
                    bail!("no container registry {:?} to remove (see `br2k image-registry ls`)", args.name);
                }
                out.result(&format!("removed {}", args.name), &serde_json::json!({ "removed": args.name }))
            }
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct StoreArg {
    /// The image store: images.json and the blobs.
    #[arg(long, env = "BR2K_IMAGE_STORE", value_name = "DIR", default_value = ".br2k")]
    pub(crate) store: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct BuildArgs {
    /// The service's compiled binary (e.g. target/release/br2k-logserver).
    binary: PathBuf,

    /// Image name (lowercase; '/'-separated parts), e.g. `br2k/logserver`.
    #[arg(long)]
    name: String,

    /// Tag.
    #[arg(long, default_value = "latest")]
    tag: String,

    /// The port the app listens on, exposed in the image config.
    #[arg(long, default_value_t = 8080)]
    port: u16,

    #[command(flatten)]
    store: StoreArg,
}

impl ImageCommand {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        match self {
            Self::Build(args) => {
                let store = ImageStore::new(&args.store.store);
                out.progress(format_args!("image: building {}:{} from {}", args.name, args.tag, args.binary.display()));
                let spec = ImageSpec { binary: args.binary, name: args.name, tag: args.tag, port: args.port };
                let record = store.build(&spec)?;
                out.result(
                    &format!("{}@{} ({} bytes)", record.reference(), record.digest, record.size),
                    &serde_json::to_value(&record)?,
                )
            }
            Self::Ls(args) => {
                let images = ImageStore::new(&args.store).list()?;
                if global.json {
                    return out.result("", &serde_json::to_value(&images)?);
                }
                if images.is_empty() {
                    out.progress(format_args!(
                        "no images in {} yet: `br2k image build BINARY --name NAME`",
                        args.store.display()
                    ));
                }
                for image in images {
                    out.result(
                        &format!("{}\t{}\t{} bytes", image.reference(), image.digest, image.size),
                        &serde_json::Value::Null,
                    )?;
                }
                Ok(())
            }
            Self::Push(args) => {
                let store = ImageStore::new(&args.store.store);
                let (name, tag) = args.image.rsplit_once(':').unwrap_or((&args.image, "latest"));
                let record = store.find(name, tag)?.with_context(|| {
                    format!("no image {name}:{tag} in {}; build it with `br2k image build`", args.store.store.display())
                })?;
                let entry = registries(&args.store.store).get(&args.to)?;
                let repository = args.repository.unwrap_or_else(|| record.name.clone());
                out.progress(format_args!(
                    "image: pushing {} to {} as {repository}:{tag}",
                    record.reference(),
                    entry.url
                ));
                let digest = entry.client()?.push(&store, &record, &repository).await?;
                let reference = format!("{}/{repository}@{digest}", entry.host());
                out.result(
                    &reference,
                    &serde_json::json!({ "reference": reference, "digest": digest, "registry": entry.name }),
                )
            }
            Self::Rm(args) => {
                let store = ImageStore::new(&args.store.store);
                let (name, tag) = args.image.rsplit_once(':').unwrap_or((&args.image, "latest"));
                let Some(removed) = store.remove(name, tag)? else {
                    bail!("no image {name}:{tag} in {} (see `br2k image ls`)", args.store.store.display());
                };
                out.result(
                    &format!("removed {}@{}", removed.reference(), removed.digest),
                    &serde_json::to_value(&removed)?,
                )
            }
            Self::Pull(args) => {
                let store = ImageStore::new(&args.store.store);
                let entry = registries(&args.store.store).get(&args.from)?;
                let name = args.name.unwrap_or_else(|| args.repository.clone());
                out.progress(format_args!("image: pulling {}/{}@{}", entry.url, args.repository, args.digest));
                let record = entry.client()?.pull(&store, &args.repository, &args.digest, &name, &args.tag).await?;
                out.result(
                    &format!("{}@{} ({} bytes, every blob checked)", record.reference(), record.digest, record.size),
                    &serde_json::to_value(&record)?,
                )
            }
        }
    }
}
