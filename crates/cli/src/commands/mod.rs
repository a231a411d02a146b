//! The command tree. Each subcommand is an `XArgs` struct with its `run`.

mod backup;
mod claim;
mod context;
mod dashboard;
mod deploy;
mod history;
mod image;
mod manager;
mod members;
mod registry;
mod resolve;
mod service;
mod status;
mod testbed;
mod tx;
mod up;
mod users;
mod watch;

pub(crate) use testbed::ChecksFailed;

use anyhow::Result;
use br2k_resolver::RegistryClient;
use clap::{Args, Parser, Subcommand};

use crate::opts::{ChainOpts, RegistryOpts, WalletOpts};
use crate::output::Output;

const EXAMPLES: &str = "\
Examples:
  anvil &                                        # a local chain on http://127.0.0.1:8545
  export ETH_PRIVATE_KEY=0x...                   # the key that signs (or --keystore)
  br2k service-registry deploy                   # records deployments/<chain-id>.json
  br2k service register logserver --replicas 3
  br2k service operator add logserver 0x70997970C51812dc3A010C7d01b50e0d17dc79C8
  br2k resolve logserver --json
  br2k watch logserver --rpc-url ws://127.0.0.1:8545
  br2k claim logserver --reason 'no answer for 30 s'
  br2k up                                        # 3 local replicas, a local chain; Ctrl-C stops
  br2k testbed --fault pause --target leader     # the paper's evaluation, Table 2";

/// br2k keeps blockchain application services alive: N replicas kept consistent through
/// leader changes, the leader's location published in an on-chain service registry, and
/// recovery from container images when clients report the service dead.
#[derive(Parser, Debug)]
#[command(name = "br2k", version, after_help = EXAMPLES, max_term_width = 100)]
pub(crate) struct Cli {
    #[command(flatten)]
    global: GlobalOpts,

    #[command(subcommand)]
    command: Command,
}

/// Options every command accepts.
#[derive(Args, Debug)]
pub(crate) struct GlobalOpts {
    /// Print results as JSON (one document per result) instead of words.
    #[arg(long, global = true)]
    json: bool,

    /// Print no progress on stderr (results and errors still print).
    #[arg(long, short, global = true)]
    quiet: bool,

    #[command(flatten)]
    chain: ChainOpts,

    #[command(flatten)]
    wallet: WalletOpts,

    #[command(flatten)]
    registry: RegistryOpts,
}

impl GlobalOpts {
    const fn output(&self) -> Output {
        Output::new(self.json, self.quiet)
    }

    /// The registry, for a command that only reads.
    async fn open_registry(&self) -> Result<RegistryClient> {
        let chain = self.chain.connect(None).await?;
        self.registry.open(&chain, &self.output()).await
    }

    /// The registry with the signing key, for a command that sends `action`.
    async fn open_registry_signed(&self, action: &str) -> Result<RegistryClient> {
        let signer = self.wallet.require_signer(action)?;
        let chain = self.chain.connect(Some(signer)).await?;
        self.registry.open(&chain, &self.output()).await
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Deploy the ServiceRegistry contract.
    #[command(subcommand, name = "service-registry")]
    ServiceRegistry(registry::RegistryCommand),
    /// Register and manage services in the registry.
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// Print where a service is served (its leader's location).
    Resolve(resolve::ResolveArgs),
    /// Report on chain that a service is not serving, so its manager recovers it.
    Claim(claim::ClaimArgs),
    /// Print a service's location each time it changes, until interrupted.
    Watch(watch::WatchArgs),
    /// Run a service's replicas on this machine, with a local chain and registry.
    Up(up::UpArgs),
    /// Stop a service started with `br2k up --detach`.
    Down(up::DownArgs),
    /// A running service's etcd members (voter or learner, health, LPI, lag) and any change in progress.
    Members(members::MembersArgs),
    /// Grow or shrink a running service to N replicas, one etcd member at a time, nothing lost.
    Scale(members::ScaleArgs),
    /// Replace one replica of a running service (dead or alive) by a fresh one.
    Replace(members::ReplaceArgs),
    /// Run the paper's evaluation under real faults and print its Table 2.
    Testbed(testbed::TestbedArgs),
    /// Build, list, push and pull OCI images of a service (no Docker daemon needed).
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// The project's container registries (URLs only; never credentials).
    #[command(subcommand, name = "image-registry")]
    ImageRegistry(image::RegistryCommand),
    /// Deploy a service from an image, on this machine or on Kubernetes, and record it on chain.
    Deploy(deploy::DeployArgs),
    /// Where and as whom to deploy: kubeconfig contexts plus br2k's resources; `local` always exists.
    #[command(subcommand)]
    Context(context::ContextCommand),
    /// One view of a service: registry header, recovery info, replicas, in-doubt requests, open claims.
    Status(status::StatusArgs),
    /// A live web page of services: overview, a page per service (replicas, traffic, timeline), updated by itself.
    Dashboard(dashboard::DashboardArgs),
    /// Send requests to a deployed service as the paper's users do; optionally check it.
    Users(users::UsersArgs),
    /// The manager daemon: recovers the services this key manages when they stop serving.
    #[command(subcommand)]
    Manager(manager::ManagerCommand),
    /// A service's backups: those in its container registry, the one recorded on chain.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// A service's unsettled blockchain transactions, and a way out for a stuck one (cancel).
    #[command(subcommand)]
    Tx(tx::TxCommand),
}

impl Cli {
    /// The log filter when RUST_LOG is not set: warnings, and a daemon's own steps.
    pub(crate) const fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Manager(_) => "warn,br2k_manager=info,kube_client=off",
            _ => "warn,kube_client=off",
        }
    }

    /// Runs the chosen command.
    pub(crate) async fn run(self) -> Result<()> {
        let global = &self.global;
        match self.command {
            Command::ServiceRegistry(command) => command.run(global).await,
            Command::Service(command) => command.run(global).await,
            Command::Resolve(args) => args.run(global).await,
            Command::Claim(args) => args.run(global).await,
            Command::Watch(args) => args.run(global).await,
            Command::Up(args) => args.run(global).await,
            Command::Down(args) => args.run(global).await,
            Command::Members(args) => args.run(global).await,
            Command::Scale(args) => args.run(global).await,
            Command::Replace(args) => args.run(global).await,
            Command::Testbed(args) => args.run(global).await,
            Command::Image(command) => command.run(global).await,
            Command::ImageRegistry(command) => command.run(global).await,
            Command::Deploy(args) => args.run(global).await,
            Command::Context(command) => command.run(global).await,
            Command::Manager(command) => command.run(global).await,
            Command::Users(args) => args.run(global).await,
            Command::Status(args) => args.run(global).await,
            Command::Dashboard(args) => args.run(global).await,
            Command::Backup(command) => command.run(global).await,
            Command::Tx(command) => command.run(global).await,
        }
    }
}

/// An error and its causes in one line. The chain stops at a resolver error, whose message
/// is complete by design (its sources are for programs, not for people), and leaves out a
/// cause whose text the message before it already includes.
pub(crate) fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let is_complete = cause.downcast_ref::<br2k_resolver::Error>().is_some();
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
        if is_complete {
            break;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn describe_skips_causes_already_quoted() {
        let inner = std::io::Error::other("connection refused");
        let err = anyhow::Error::new(inner).context("could not reach x: connection refused").context("deploy failed");
        assert_eq!(describe(&err), "deploy failed: could not reach x: connection refused");
    }
}
