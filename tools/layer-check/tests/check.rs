//! The check against small crates written for each rule, and its command line.

use std::fs;
use std::path::Path;
use std::process::Command;

const TABLE: &str = "\
# Architecture

<!-- layer-check: demo -->
| Layer | Modules | Owns |
|---|---|---|
| 1 records | `records` | data formats |
| 2 store | `store` | etcd access |
| 3 roles | `roles::follower`, `roles::leader` | the roles |
";

/// Writes a crate under `dir/demo` with the given files (paths relative to `src/`).
fn write_crate(dir: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let file = dir.join("demo/src").join(path);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(file, text).unwrap();
    }
    fs::write(dir.join("architecture.md"), TABLE).unwrap();
}

fn layered(extra_store: &str) -> Vec<(&'static str, String)> {
    vec![
        ("lib.rs", "mod records;\nmod store;\nmod roles;\npub use store::Store;\n".into()),
        ("records.rs", "pub struct Entry;\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n".into()),
        ("store.rs", format!("use crate::records::Entry;\npub struct Store(Entry);\n{extra_store}")),
        ("roles/mod.rs", "pub mod follower;\npub mod leader;\n".into()),
        ("roles/follower.rs", "use crate::{records::Entry, store::Store};\n".into()),
        ("roles/leader.rs", "use super::follower;\nfn f() -> crate::Store { todo!() }\n".into()),
    ]
}

fn run(dir: &Path, extra: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_layer-check"))
        .current_dir(dir)
        .args(["demo", "--table", "architecture.md"])
        .args(extra)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

fn files<'a>(list: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    list.iter().map(|(path, text)| (*path, text.as_str())).collect()
}

#[test]
fn a_crate_that_keeps_to_its_layers_passes_with_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    write_crate(dir.path(), &files(&layered("")));
    let (passed, text) = run(dir.path(), &["--edges"]);
    assert!(passed, "{text}");
    assert!(text.contains("modules: 4  edges: 5  cycles: 0 (0 modules in them)  upward edges: 0"), "{text}");
    // `crate::Store` is the root's re-export of the store's type: an edge to `store`.
    assert!(text.contains("edge: roles::leader -> store"), "{text}");
    assert!(text.contains("edge: roles::leader -> roles::follower"), "{text}");
}

#[test]
fn a_deliberate_upward_import_fails_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    write_crate(dir.path(), &files(&layered("fn leader() { crate::roles::leader::run(); }\n")));
    let (passed, text) = run(dir.path(), &[]);
    assert!(!passed, "{text}");
    assert!(text.contains("upward edges: 1"), "{text}");
    assert!(
        text.contains("upward: demo/src/store.rs:3: `store` (layer 2 store) names crate::roles::leader::run of `roles::leader` (layer 3 roles)"),
        "{text}"
    );
}

#[test]
fn modules_of_one_layer_that_import_each_other_are_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let mut list = layered("");
    list[4].1.push_str("use crate::roles::leader as other; // a comment naming crate::records is no import\n");
    write_crate(dir.path(), &files(&list));
    let (passed, text) = run(dir.path(), &[]);
    assert!(!passed, "{text}");
    assert!(text.contains("cycles: 1 (2 modules in them)  upward edges: 0"), "{text}");
    assert!(text.contains("cycle: roles::follower, roles::leader import each other in a circle"), "{text}");
}

#[test]
fn unplaced_modules_stale_rows_and_long_files_fail() {
    let dir = tempfile::tempdir().unwrap();
    let mut list = layered("");
    list[0].1 = "mod store;\nmod roles;\nmod extra;\n".into();
    list.push(("extra.rs", "fn a() {}\n#[cfg(test)]\nmod tests {}\n".into()));
    write_crate(dir.path(), &files(&list));
    let (passed, text) = run(dir.path(), &["--max-lines", "2"]);
    assert!(!passed, "{text}");
    assert!(text.contains("unplaced: module `extra` is in no layer"), "{text}");
    assert!(!text.contains("`extra::tests`"), "the child of an unplaced module is reported with it: {text}");
    assert!(text.contains("missing: the table names `records`"), "{text}");
    assert!(text.contains("too long: demo/src/extra.rs has 3 lines"), "{text}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_crate(dir.path(), &files(&layered("")));
    fs::write(dir.path().join("architecture.md"), "# no table here\n").unwrap();
    let (passed, text) = run(dir.path(), &[]);
    assert!(!passed);
    assert!(text.contains("has no layer table: add a line `<!-- layer-check: demo -->`"), "{text}");
    fs::write(dir.path().join("architecture.md"), TABLE.replace("| 2 store", "| 0 store")).unwrap();
    let (passed, text) = run(dir.path(), &[]);
    assert!(!passed);
    assert!(text.contains("architecture.md:7: layer 0 comes after layer 1"), "{text}");
    let (passed, text) = run(dir.path(), &["--max-lines", "none"]);
    assert!(!passed);
    assert!(text.contains("--max-lines needs a positive whole number"), "{text}");
}
