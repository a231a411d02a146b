//! `br2k service-registry ...`: the registry contract itself.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use super::GlobalOpts;
use crate::deployments::{Deployments, RecordedRegistry};

#[derive(Subcommand, Debug)]
pub(crate) enum RegistryCommand {
    /// Deploy a new ServiceRegistry, print its address and record it in
    /// `<deployments>/<chain-id>.json` so later commands find it without --registry.
    Deploy(DeployArgs),
}

impl RegistryCommand {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        match self {
            Self::Deploy(args) => args.run(global).await,
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct DeployArgs {
    /// Seconds a claimant must wait between two claims against one service.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    claim_cooldown: u64,
}

impl DeployArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let signer = global.wallet.require_signer("deploying the registry")?;
        let chain = global.chain.connect(Some(signer)).await?;
        let deployments = Deployments::new(&global.registry.deployments);
        if let Ok(Some(previous)) = deployments.load(chain.chain_id()) {
            out.progress(format_args!(
                "replacing the registry {} recorded in {}",
                previous.address,
                deployments.path(chain.chain_id()).display()
            ));
        }
        out.progress(format_args!("deploying the ServiceRegistry on chain {} ...", chain.chain_id()));
        let deployed = chain.deploy_registry(self.claim_cooldown).await?;
        let recorded = RecordedRegistry {
            address: deployed.address,
            claim_cooldown: deployed.claim_cooldown,
            block: deployed.tx.block,
            tx_hash: deployed.tx.hash,
        };
        let path = deployments
            .store(chain.chain_id(), recorded)
            .with_context(|| format!("the registry is deployed at {} but could not be recorded", deployed.address))?;
        out.progress(format_args!(
            "deployed at {} (transaction {}, block {}, gas {}); recorded in {}",
            deployed.address,
            deployed.tx.hash,
            deployed.tx.block,
            deployed.tx.gas_used,
            path.display()
        ));
        out.result(
            &deployed.address.to_string(),
            &json!({
                "address": deployed.address,
                "chainId": chain.chain_id(),
                "claimCooldown": deployed.claim_cooldown,
                "txHash": deployed.tx.hash,
                "block": deployed.tx.block,
                "gasUsed": deployed.tx.gas_used,
                "deploymentsFile": path,
            }),
        )
    }
}
