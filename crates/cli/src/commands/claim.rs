//! `br2k claim NAME --reason TEXT`.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::GlobalOpts;

#[derive(Args, Debug)]
pub(crate) struct ClaimArgs {
    /// The service name.
    name: String,

    /// Why the service is considered dead (at most 256 bytes; goes on chain for everyone to read).
    #[arg(long, value_name = "TEXT")]
    reason: String,
}

impl ClaimArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let registry = global.open_registry_signed("filing a claim").await?;
        out.progress(format_args!("filing a claim against {:?} ...", self.name));
        let tx = registry.send_claim(&self.name, &self.reason).await?;
        out.transaction(
            &format!("claim filed against {:?}", self.name),
            tx,
            json!({ "service": self.name, "reason": self.reason, "claimant": registry.chain().sender() }),
        )
    }
}
