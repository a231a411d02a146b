//! `br2k watch NAME`.

use std::time::Duration;

use anyhow::Result;
use br2k_resolver::{Error, Resolver, ResolverConfig};
use clap::Args;
use futures::StreamExt;

use super::GlobalOpts;
use crate::output::resolved_json;

#[derive(Args, Debug)]
pub(crate) struct WatchArgs {
    /// The service name.
    name: String,

    /// Milliseconds between two polls for events on an http(s) endpoint (a ws(s) endpoint
    /// pushes them instead).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    poll_interval: u64,

    /// Exit after printing this many locations (the current one counts); default: run until interrupted.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

impl WatchArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let registry = global.open_registry().await?;
        let chain = registry.chain();
        let mode = if chain.is_pubsub() { "subscribed to" } else { "polling" };
        let config = ResolverConfig {
            timeouts: chain.timeouts(),
            poll_interval: Duration::from_millis(self.poll_interval),
            ..ResolverConfig::default()
        };
        let resolver = Resolver::new(registry, config);
        out.progress(format_args!("watching {:?} ({mode} the registry's events; Ctrl-C stops)", self.name));

        let mut changes = std::pin::pin!(resolver.watch(&self.name));
        let mut printed = 0;
        loop {
            let next = tokio::select! {
                next = changes.next() => next,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            match next {
                None => return Ok(()),
                // A service that does not exist will not start to exist by waiting.
                Some(Err(e @ Error::UnknownService { .. })) => return Err(e.into()),
                Some(Err(e)) => out.progress(format_args!("warning: {e} (still watching)")),
                Some(Ok(resolved)) => {
                    let shown = if resolved.location.is_empty() { "(no location)" } else { &resolved.location };
                    out.result(
                        &format!("{shown} (epoch {}, state {})", resolved.epoch, resolved.state),
                        &resolved_json(&resolved),
                    )?;
                    printed += 1;
                    if self.count.is_some_and(|count| printed >= count) {
                        return Ok(());
                    }
                }
            }
        }
    }
}
