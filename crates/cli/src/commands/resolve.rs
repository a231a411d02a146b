//! `br2k resolve NAME`.

use anyhow::Result;
use clap::Args;

use super::GlobalOpts;
use crate::output::resolved_json;

#[derive(Args, Debug)]
pub(crate) struct ResolveArgs {
    /// The service name.
    name: String,
}

impl ResolveArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let registry = global.open_registry().await?;
        let resolved = registry.service_location(&self.name).await?;
        if resolved.location.is_empty() {
            out.progress(format_args!(
                "{} has no location yet (state {}): no leader has published itself",
                self.name, resolved.state
            ));
        }
        out.result(&resolved.location, &resolved_json(&resolved))
    }
}
