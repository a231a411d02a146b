//! `br2k service ...`: a service's record in the registry.

use alloy::primitives::{Address, B256};
use anyhow::{Result, bail};
use br2k_bindings::IServiceRegistry::Body;
use br2k_bindings::ServiceState;
use clap::{Args, Subcommand};
use serde_json::json;

use super::GlobalOpts;
use crate::opts::parse_address;

#[derive(Subcommand, Debug)]
pub(crate) enum ServiceCommand {
    /// Register a service; the signing key becomes its manager.
    Register(RegisterArgs),
    /// Print everything the registry holds about a service.
    Info(NameArg),
    /// Allow or disallow replica keys to publish the service's location.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Set a service's state (manager only).
    State(StateArgs),
    /// Publish a leader location by hand (manager or operator); replicas do this themselves.
    Location(LocationArgs),
    /// Start handing a service to another manager (who must then `accept`).
    Transfer(TransferArgs),
    /// Accept a service handed to the signing key.
    Accept(NameArg),
}

impl ServiceCommand {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        match self {
            Self::Register(args) => args.run(global).await,
            Self::Info(args) => info(global, &args.name).await,
            Self::Operator(command) => command.run(global).await,
            Self::State(args) => args.run(global).await,
            Self::Location(args) => args.run(global).await,
            Self::Transfer(args) => args.run(global).await,
            Self::Accept(args) => accept(global, &args.name).await,
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct NameArg {
    /// The service name.
    name: String,
}

#[derive(Args, Debug)]
pub(crate) struct RegisterArgs {
    /// The service name (1-64 letters, digits, '-', '_', '.'); its id is keccak256(name).
    #[arg(value_parser = crate::opts::parse_service_name)]
    name: String,

    /// How many replicas the service runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    replicas: u32,

    /// Where to deploy it: a context name (never a credential).
    #[arg(long, default_value = "local")]
    context: String,

    /// The container registry holding its images.
    #[arg(long, value_name = "URL", default_value = "")]
    image_registry: String,

    /// The image reference (`name:tag`).
    #[arg(long, value_name = "REF", default_value = "")]
    image: String,

    /// The image's manifest digest: `sha256:<64 hex>` or `0x<64 hex>`.
    #[arg(long, value_name = "DIGEST", value_parser = parse_digest)]
    image_digest: Option<B256>,
}

/// Parses an OCI digest (`sha256:...`) or a 0x-prefixed 32-byte hex value.
fn parse_digest(text: &str) -> Result<B256, String> {
    let hex = text.strip_prefix("sha256:").unwrap_or(text);
    hex.parse::<B256>()
        .map_err(|_| format!("{text:?} is not a digest: expected sha256:<64 hex digits> or 0x<64 hex digits>"))
}

impl RegisterArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let registry = global.open_registry_signed("registering a service").await?;
        let deployer = registry.chain().sender().unwrap_or_default();
        let body = Body {
            deployer,
            context: self.context,
            replicas: self.replicas,
            containerRegistry: self.image_registry,
            image: self.image,
            imageDigest: self.image_digest.unwrap_or_default(),
        };
        out.progress(format_args!("registering {:?} in {} ...", self.name, registry.address()));
        let tx = registry.register(&self.name, body).await?;
        let id = br2k_resolver::service_id(&self.name);
        out.transaction(
            &format!("registered {:?} (id {id}), manager {deployer}", self.name),
            tx,
            json!({ "service": self.name, "id": id, "manager": deployer }),
        )
    }
}

async fn info(global: &GlobalOpts, name: &str) -> Result<()> {
    let out = global.output();
    let registry = global.open_registry().await?;
    let info = registry.info(name).await?;
    let operators = registry.operators(name).await?;

    let body = &info.recovery;
    let or_dash = |text: &str| if text.is_empty() { "-".to_owned() } else { text.to_owned() };
    let pending = (info.pending_manager != Address::ZERO).then_some(info.pending_manager);
    let digest = (body.imageDigest != B256::ZERO).then(|| format!("sha256:{}", alloy::hex::encode(body.imageDigest)));
    let rows = [
        ("name", info.name.clone()),
        ("id", info.id.to_string()),
        ("state", info.state.to_string()),
        ("location", or_dash(&info.location)),
        ("epoch", info.epoch.to_string()),
        ("updated at", format!("{} (unix time)", info.updated_at)),
        ("manager", info.manager.to_string()),
        ("pending manager", pending.map_or_else(|| "-".into(), |a| a.to_string())),
        ("operators", if operators.is_empty() { "-".into() } else { join(&operators) }),
        ("deployer", body.deployer.to_string()),
        ("context", or_dash(&body.context)),
        ("replicas", body.replicas.to_string()),
        ("image registry", or_dash(&body.containerRegistry)),
        ("image", or_dash(&body.image)),
        ("image digest", digest.clone().unwrap_or_else(|| "-".into())),
    ];
    let human = rows.iter().map(|(k, v)| format!("{k:<16}{v}")).collect::<Vec<_>>().join("\n");
    let json = json!({
        "name": info.name,
        "id": info.id,
        "state": info.state.as_str(),
        "location": info.location,
        "epoch": info.epoch,
        "updatedAt": info.updated_at,
        "manager": info.manager,
        "pendingManager": pending,
        "operators": operators,
        "recoveryInfo": {
            "deployer": body.deployer,
            "context": body.context,
            "replicas": body.replicas,
            "containerRegistry": body.containerRegistry,
            "image": body.image,
            "imageDigest": digest,
        },
    });
    out.result(&human, &json)
}

fn join(addresses: &[Address]) -> String {
    addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

#[derive(Subcommand, Debug)]
pub(crate) enum OperatorCommand {
    /// Allow ADDRESS (a replica's key) to publish the service's location.
    Add(OperatorArgs),
    /// Disallow ADDRESS.
    Rm(OperatorArgs),
    /// List the operators.
    Ls(NameArg),
}

#[derive(Args, Debug)]
pub(crate) struct OperatorArgs {
    /// The service name.
    name: String,
    /// The operator's address.
    #[arg(value_parser = parse_address)]
    address: Address,
}

impl OperatorCommand {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let (args, allowed) = match self {
            Self::Add(args) => (args, true),
            Self::Rm(args) => (args, false),
            Self::Ls(args) => return list_operators(global, &args.name).await,
        };
        let verb = if allowed { "adding" } else { "removing" };
        let out = global.output();
        let registry = global.open_registry_signed(&format!("{verb} an operator")).await?;
        out.progress(format_args!("{verb} operator {} of {:?} ...", args.address, args.name));
        let tx = registry.set_operator(&args.name, args.address, allowed).await?;
        let what = if allowed { "may now publish" } else { "may no longer publish" };
        out.transaction(
            &format!("{} {what} the location of {:?}", args.address, args.name),
            tx,
            json!({ "service": args.name, "operator": args.address, "allowed": allowed }),
        )
    }
}

async fn list_operators(global: &GlobalOpts, name: &str) -> Result<()> {
    let out = global.output();
    let registry = global.open_registry().await?;
    // Fail on an unknown service rather than print an empty list.
    registry.service_location(name).await?;
    let operators = registry.operators(name).await?;
    let human = operators.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    out.result(&human, &json!(operators))
}

#[derive(Args, Debug)]
pub(crate) struct StateArgs {
    /// The service name.
    name: String,
    /// The new state: registered, running, recovering or stopped.
    state: ServiceState,
}

impl StateArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        if self.state == ServiceState::None {
            bail!("a service cannot be set to state none: use registered, running, recovering or stopped");
        }
        let out = global.output();
        let registry = global.open_registry_signed("setting the state").await?;
        out.progress(format_args!("setting {:?} to {} ...", self.name, self.state));
        let tx = registry.set_state(&self.name, self.state).await?;
        out.transaction(
            &format!("{:?} is now {}", self.name, self.state),
            tx,
            json!({ "service": self.name, "state": self.state.as_str() }),
        )
    }
}

#[derive(Args, Debug)]
pub(crate) struct LocationArgs {
    /// The service name.
    name: String,
    /// The leader's location (a URL clients send requests to).
    location: String,
    /// The epoch to publish it with; must be above the stored one (unless --reset).
    #[arg(long)]
    epoch: u64,
    /// Set the location and epoch outright, even below the stored epoch (manager only):
    /// the way out when the epoch is stuck where no leader can exceed it, for example
    /// after a leaked operator key published 18446744073709551615. Remove that operator
    /// first; the next leader then publishes above EPOCH as usual.
    #[arg(long)]
    reset: bool,
}

impl LocationArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let registry = global.open_registry_signed("publishing a location").await?;
        let verb = if self.reset { "resetting to" } else { "publishing" };
        out.progress(format_args!("{verb} {} for {:?} at epoch {} ...", self.location, self.name, self.epoch));
        let tx = if self.reset {
            registry.reset_location(&self.name, &self.location, self.epoch).await?
        } else {
            registry.update_location(&self.name, &self.location, self.epoch).await?
        };
        out.transaction(
            &format!("{:?} is served at {} (epoch {})", self.name, self.location, self.epoch),
            tx,
            json!({ "service": self.name, "location": self.location, "epoch": self.epoch }),
        )
    }
}

#[derive(Args, Debug)]
pub(crate) struct TransferArgs {
    /// The service name.
    name: String,
    /// The manager-to-be; it must run `br2k service accept NAME` with its own key.
    #[arg(value_parser = parse_address)]
    next_manager: Address,
}

impl TransferArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let registry = global.open_registry_signed("transferring a service").await?;
        out.progress(format_args!("handing {:?} to {} ...", self.name, self.next_manager));
        let tx = registry.transfer_manager(&self.name, self.next_manager).await?;
        out.transaction(
            &format!("{} may now accept {:?} with `br2k service accept {}`", self.next_manager, self.name, self.name),
            tx,
            json!({ "service": self.name, "pendingManager": self.next_manager }),
        )
    }
}

async fn accept(global: &GlobalOpts, name: &str) -> Result<()> {
    let out = global.output();
    let registry = global.open_registry_signed("accepting a service").await?;
    let manager = registry.chain().sender().unwrap_or_default();
    out.progress(format_args!("accepting {name:?} ..."));
    let tx = registry.accept_manager(name).await?;
    out.transaction(
        &format!(
            "{manager} now manages {name:?}; the previous manager's operators were removed: allow your replicas' \
             keys with `br2k service operator add {name} ADDRESS`"
        ),
        tx,
        json!({ "service": name, "manager": manager }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_in_both_spellings() {
        let hex = "ab".repeat(32);
        let expected: B256 = format!("0x{hex}").parse().unwrap();
        assert_eq!(parse_digest(&format!("sha256:{hex}")), Ok(expected));
        assert_eq!(parse_digest(&format!("0x{hex}")), Ok(expected));
        let err = parse_digest("sha256:abc").unwrap_err();
        assert!(err.contains("is not a digest"), "{err}");
    }
}
