//! `layer-check CRATE_DIR [--table FILE] [--max-lines N] [--edges]`: see the library's docs.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: layer-check CRATE_DIR [--table FILE] [--max-lines N] [--edges]

Reads the layers CRATE_DIR may use from the table under `<!-- layer-check: CRATE_DIR -->` in
FILE (default docs/architecture.md), reads the crate's sources, and fails when a module imports
one of a higher layer, modules import each other in a circle, a module is in no layer, or a
source file is longer than N lines. --edges also prints every import between modules.

Example: layer-check crates/replication --max-lines 700";

fn main() -> ExitCode {
    let mut crate_dir = None;
    let mut table = PathBuf::from("docs/architecture.md");
    let mut max_lines = None;
    let mut print_edges = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--table" => match args.next() {
                Some(file) => table = PathBuf::from(file),
                None => return usage_error("--table needs a file"),
            },
            "--max-lines" => match args.next().map(|value| value.parse::<usize>()) {
                Some(Ok(limit)) if limit > 0 => max_lines = Some(limit),
                _ => return usage_error("--max-lines needs a positive whole number"),
            },
            "--edges" => print_edges = true,
            flag if flag.starts_with('-') => return usage_error(&format!("unknown flag {flag}")),
            dir if crate_dir.is_none() => crate_dir = Some(dir.trim_end_matches('/').to_string()),
            extra => return usage_error(&format!("one crate at a time (got {extra} too)")),
        }
    }
    let Some(crate_dir) = crate_dir else {
        return usage_error("name the crate's directory");
    };
    let text = match std::fs::read_to_string(&table) {
        Ok(text) => text,
        Err(error) => return failure(&format!("cannot read the layer table {}: {error}", table.display())),
    };
    let outcome = layer_check::read_layers(&table, &text, &crate_dir).and_then(|layers| {
        let source = layer_check::read_crate(std::path::Path::new(&crate_dir))?;
        Ok(layer_check::check(&source, &layers, max_lines))
    });
    let report = match outcome {
        Ok(report) => report,
        Err(error) => return failure(&error.to_string()),
    };
    print!("layer-check {crate_dir} (layers from {}): {report}", table.display());
    if print_edges {
        for edge in &report.edges {
            println!("edge: {} -> {} ({}:{}, {})", edge.from, edge.to, edge.file.display(), edge.line, edge.named);
        }
    }
    if report.passes() {
        ExitCode::SUCCESS
    } else {
        eprintln!("layer-check: {crate_dir} breaks its layers (above); docs/architecture.md says why each rule holds");
        ExitCode::FAILURE
    }
}

fn usage_error(why: &str) -> ExitCode {
    eprintln!("layer-check: {why}\n\n{USAGE}");
    ExitCode::from(2)
}

fn failure(why: &str) -> ExitCode {
    eprintln!("layer-check: {why}");
    ExitCode::FAILURE
}
