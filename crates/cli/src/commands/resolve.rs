//! `br2k resolve NAME`.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::GlobalOpts;

#[derive(Args, Debug)]
pub(crate) struct ResolveArgs {
    /// The service name.
    name: String,
}

impl ResolveArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let chain = global.chain.connect(None).await?;
        let registry = global.registry.open(&chain, &out).await?;
        let resolved = registry.service_location(&self.name).await?;
        if resolved.location.is_empty() {
            out.progress(format_args!(
                "{} has no location yet (state {}): no leader has published itself",
                self.name, resolved.state
            ));
        }
        out.result(
            &resolved.location,
            &json!({ "location": resolved.location, "epoch": resolved.epoch, "state": resolved.state.as_str() }),
        )
    }
}
