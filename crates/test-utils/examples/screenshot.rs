//! Saves a screenshot of a web page once it shows what it should (how the README's
//! dashboard screenshots are made):
//!
//! ```text
//! cargo run -p br2k-test-utils --example screenshot -- URL OUT.png [JS-CONDITION] [HEIGHT]
//! ```
//!
//! JS-CONDITION is evaluated in the page until it is truthy (default: `true`); HEIGHT is
//! the viewport's height in pixels (default 1000; the width is 1280).

use std::time::Duration;

use br2k_test_utils::Browser;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: screenshot URL OUT.png [JS-CONDITION] [HEIGHT]";
    let url = args.next().ok_or(usage)?;
    let out = args.next().ok_or(usage)?;
    let condition = args.next().unwrap_or_else(|| "true".into());
    let height = args.next().map(|h| h.parse::<u32>()).transpose().map_err(|e| format!("HEIGHT: {e}"))?;
    let browser = Browser::launch()?;
    let mut page = browser.open(&url)?;
    page.set_viewport(1280, height.unwrap_or(1000))?;
    page.wait_for("the page's condition", &condition, Duration::from_secs(30))?;
    page.screenshot(std::path::Path::new(&out))?;
    eprintln!("saved {out}");
    Ok(())
}
