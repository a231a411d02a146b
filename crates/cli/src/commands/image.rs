//! `br2k image build|ls`: OCI images built from a service's binary (no Docker daemon).

use std::path::PathBuf;

use anyhow::Result;
use br2k_deploy::image::{ImageSpec, ImageStore};
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
}

#[derive(Args, Debug)]
pub(crate) struct StoreArg {
    /// The image store: images.json and the blobs.
    #[arg(long, env = "BR2K_IMAGE_STORE", value_name = "DIR", default_value = ".br2k")]
    store: PathBuf,
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
        }
    }
}
