//! `layer-check`: holds a crate to the layers its architecture document allows.
//!
//! The allowed layers are written once, as a table in a Markdown document under a marker line
//! `<!-- layer-check: crates/NAME -->` (see `docs/architecture.md`). Each row is a layer, lowest
//! first, naming its modules in backticks. The check reads the crate's sources and fails when
//!
//! - a module imports a module of a higher layer (an *upward* edge),
//! - modules import each other in a circle (a *cycle*, even within one layer),
//! - a module of the crate is in no layer, or the table names a module that does not exist,
//! - a source file is longer than `--max-lines`.
//!
//! A module listed in the table owns its submodules: they may import each other freely, as a
//! Rust module and its children do. The crate root (`lib.rs`) is the facade above every layer.

mod source;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

pub use source::{CrateSource, ModulePath, read_crate};

/// Why the check could not run at all (as opposed to finding the crate in breach).
///
/// No error crate: the tool has no dependencies, so CI builds it in a second.
#[derive(Debug)]
pub enum CheckError {
    /// The directory has no `src/lib.rs` nor `src/main.rs`.
    NoCrateRoot(PathBuf),
    /// A file could not be read.
    Read(PathBuf, std::io::Error),
    /// A `mod name;` whose file is not there.
    MissingModule(PathBuf, String),
    /// The document has no table under the crate's marker.
    #[allow(missing_docs)]
    NoTable { document: PathBuf, marker: String },
    /// A row of the table that cannot be read.
    #[allow(missing_docs)]
    BadRow { document: PathBuf, line: usize, why: String },
}

impl std::error::Error for CheckError {}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoCrateRoot(src) => {
                write!(f, "{} has neither lib.rs nor main.rs: pass a crate's directory", src.display())
            }
            Self::Read(file, error) => write!(f, "cannot read {}: {error}", file.display()),
            Self::MissingModule(file, name) => {
                write!(
                    f,
                    "{} declares `mod {name};` but neither {name}.rs nor {name}/mod.rs exists beside it",
                    file.display()
                )
            }
            Self::NoTable { document, marker } => write!(
                f,
                "{} has no layer table: add a line `{marker}` followed by a Markdown table whose rows are \
                 `| N name | `module`, `module` | … |`, lowest layer first",
                document.display()
            ),
            Self::BadRow { document, line, why } => write!(f, "{}:{line}: {why}", document.display()),
        }
    }
}

/// One row of the table: a layer and the modules in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// Its number: a module may import modules of its own rank or lower.
    pub rank: u32,
    /// Its name, for the report.
    pub name: String,
    /// The modules in it, each owning its submodules.
    pub modules: Vec<ModulePath>,
}

/// Reads the layer table for `crate_dir` (as written in the marker, e.g. `crates/replication`).
pub fn read_layers(document: &Path, text: &str, crate_dir: &str) -> Result<Vec<Layer>, CheckError> {
    let marker = format!("<!-- layer-check: {crate_dir} -->");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|line| line.trim() == marker)
        .ok_or_else(|| CheckError::NoTable { document: document.to_path_buf(), marker: marker.clone() })?;
    let mut layers: Vec<Layer> = Vec::new();
    for (offset, line) in lines[start + 1..].iter().enumerate() {
        let line_number = start + offset + 2;
        let trimmed = line.trim();
        if trimmed.is_empty() && layers.is_empty() {
            continue;
        }
        if !trimmed.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = trimmed.trim_matches('|').split('|').map(str::trim).collect();
        let first = cells.first().copied().unwrap_or_default();
        let digits: String = first.chars().take_while(char::is_ascii_digit).collect();
        let Ok(rank) = digits.parse::<u32>() else {
            continue; // the header and the |---| line
        };
        let bad = |why: String| CheckError::BadRow { document: document.to_path_buf(), line: line_number, why };
        if layers.last().is_some_and(|last| last.rank >= rank) {
            return Err(bad(format!(
                "layer {rank} comes after layer {}: list the layers lowest first",
                layers[layers.len() - 1].rank
            )));
        }
        let modules: Vec<ModulePath> = cells
            .get(1)
            .copied()
            .unwrap_or_default()
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|module| module.split("::").map(str::to_string).collect())
            .collect();
        if modules.is_empty() {
            return Err(bad(format!(
                "layer {rank} names no module: put its modules in backticks in the second column"
            )));
        }
        let name = first[digits.len()..].trim_matches(|c: char| c == '.' || c.is_whitespace()).to_string();
        layers.push(Layer { rank, name, modules });
    }
    if layers.is_empty() {
        return Err(CheckError::NoTable { document: document.to_path_buf(), marker });
    }
    Ok(layers)
}

/// One import that breaks the layering, with where it was read.
#[derive(Debug, Clone)]
pub struct Edge {
    /// The importing module and the imported one, as the table names them.
    pub from: String,
    #[allow(missing_docs)]
    pub to: String,
    /// Where the import was first read, and the path it names.
    pub file: PathBuf,
    #[allow(missing_docs)]
    pub line: usize,
    #[allow(missing_docs)]
    pub named: String,
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// The modules of the table (each owning its submodules) and their layers.
    pub modules: BTreeMap<String, (u32, String)>,
    /// Every import between two of those modules, the first place it was read.
    pub edges: Vec<Edge>,
    /// Sets of modules that import each other in a circle.
    pub cycles: Vec<Vec<String>>,
    /// Imports from a module to one of a higher layer.
    pub upward: Vec<Edge>,
    /// Modules of the crate the table does not place, and table entries the crate does not have.
    pub unplaced: Vec<String>,
    #[allow(missing_docs)]
    pub missing: Vec<String>,
    /// Source files over the line limit, and the largest file.
    pub too_long: Vec<(PathBuf, usize)>,
    #[allow(missing_docs)]
    pub largest: Option<(PathBuf, usize)>,
}

impl Report {
    /// Whether the crate keeps to its layers.
    pub fn passes(&self) -> bool {
        self.cycles.is_empty()
            && self.upward.is_empty()
            && self.unplaced.is_empty()
            && self.missing.is_empty()
            && self.too_long.is_empty()
    }
}

fn join(path: &[String]) -> String {
    path.join("::")
}

/// Checks `source` against `layers`; `max_lines` bounds every source file when given.
pub fn check(source: &CrateSource, layers: &[Layer], max_lines: Option<usize>) -> Report {
    let mut report = Report::default();
    let placed: Vec<(ModulePath, u32, String)> = layers
        .iter()
        .flat_map(|layer| layer.modules.iter().map(move |module| (module.clone(), layer.rank, layer.name.clone())))
        .collect();
    for (module, rank, name) in &placed {
        report.modules.insert(join(module), (*rank, name.clone()));
        if !source.modules.iter().any(|found| &found.path == module) {
            report.missing.push(join(module));
        }
    }
    // The table module that owns `path`: the longest one that is a prefix of it.
    let owner = |path: &[String]| -> Option<&ModulePath> {
        placed
            .iter()
            .map(|(module, _, _)| module)
            .filter(|module| path.starts_with(module))
            .max_by_key(|module| module.len())
    };
    // Modules the table places beneath a path that only groups them (`roles` for `roles::leader`).
    let beneath = |path: &[String]| -> Vec<&ModulePath> {
        placed
            .iter()
            .map(|(module, _, _)| module)
            .filter(|module| module.starts_with(path) && module.len() > path.len())
            .collect()
    };
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for module in &source.modules {
        if module.path.is_empty() {
            continue; // the crate root, above every layer
        }
        let Some(from) = owner(&module.path) else {
            // A module that only groups placed ones is fine; a child of an unplaced module
            // is reported with its parent.
            let parent_unplaced =
                report.unplaced.iter().any(|unplaced| join(&module.path).starts_with(&format!("{unplaced}::")));
            if beneath(&module.path).is_empty() && !parent_unplaced {
                report.unplaced.push(join(&module.path));
            }
            continue;
        };
        for reference in &module.references {
            let mut target = reference.target.clone();
            if let Some(first) = target.first()
                && !source.modules.iter().any(|known| known.path.len() == 1 && &known.path[0] == first)
                && let Some(aliased) = source.root_aliases.get(first)
            {
                target.splice(0..1, aliased.iter().cloned());
            }
            let targets: Vec<&ModulePath> = match owner(&target) {
                Some(to) => vec![to],
                None => beneath(&target),
            };
            for to in targets {
                if to == from {
                    continue;
                }
                let key = (join(from), join(to));
                if seen.insert(key.clone()) {
                    report.edges.push(Edge {
                        from: key.0,
                        to: key.1,
                        file: reference.file.clone(),
                        line: reference.line,
                        named: format!("crate::{}", join(&reference.target)),
                    });
                }
            }
        }
    }
    let rank = |module: &str| report.modules.get(module).map(|(rank, _)| *rank).unwrap_or(0);
    report.upward = report.edges.iter().filter(|edge| rank(&edge.from) < rank(&edge.to)).cloned().collect();
    report.cycles = strongly_connected(&report.modules.keys().cloned().collect::<Vec<_>>(), &report.edges)
        .into_iter()
        .filter(|component| component.len() > 1)
        .collect();
    for (file, lines) in &source.files {
        if report.largest.as_ref().is_none_or(|(_, most)| lines > most) {
            report.largest = Some((file.clone(), *lines));
        }
        if max_lines.is_some_and(|limit| *lines > limit) {
            report.too_long.push((file.clone(), *lines));
        }
    }
    report
}

/// Tarjan's algorithm: the strongly connected components of the import graph.
fn strongly_connected(nodes: &[String], edges: &[Edge]) -> Vec<Vec<String>> {
    struct State<'a> {
        next: usize,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
        adjacent: BTreeMap<&'a str, Vec<&'a str>>,
    }
    fn visit<'a>(node: &'a str, state: &mut State<'a>) {
        state.index.insert(node, state.next);
        state.low.insert(node, state.next);
        state.next += 1;
        state.stack.push(node);
        state.on_stack.insert(node);
        for next in state.adjacent.get(node).cloned().unwrap_or_default() {
            if !state.index.contains_key(next) {
                visit(next, state);
                let low = state.low[node].min(state.low[next]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(next) {
                let low = state.low[node].min(state.index[next]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(top) = state.stack.pop() {
                state.on_stack.remove(top);
                component.push(top.to_string());
                if top == node {
                    break;
                }
            }
            component.sort();
            state.out.push(component);
        }
    }
    let mut adjacent: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for edge in edges {
        adjacent.entry(edge.from.as_str()).or_default().push(edge.to.as_str());
    }
    let mut state = State {
        next: 0,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
        adjacent,
    };
    for node in nodes {
        if !state.index.contains_key(node.as_str()) {
            visit(node, &mut state);
        }
    }
    state.out
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (largest, largest_lines) =
            self.largest.as_ref().map(|(file, lines)| (file.display().to_string(), *lines)).unwrap_or_default();
        let in_cycles: usize = self.cycles.iter().map(Vec::len).sum();
        writeln!(
            f,
            "modules: {}  edges: {}  cycles: {} ({} modules in them)  upward edges: {}  largest file: {largest} ({largest_lines} lines)",
            self.modules.len(),
            self.edges.len(),
            self.cycles.len(),
            in_cycles,
            self.upward.len(),
        )?;
        for edge in &self.upward {
            let (from_rank, from_layer) = &self.modules[&edge.from];
            let (to_rank, to_layer) = &self.modules[&edge.to];
            writeln!(
                f,
                "upward: {}:{}: `{}` (layer {from_rank} {from_layer}) names {} of `{}` (layer {to_rank} {to_layer})",
                edge.file.display(),
                edge.line,
                edge.from,
                edge.named,
                edge.to
            )?;
        }
        for cycle in &self.cycles {
            writeln!(f, "cycle: {} import each other in a circle; for example:", cycle.join(", "))?;
            for edge in self.edges.iter().filter(|edge| cycle.contains(&edge.from) && cycle.contains(&edge.to)) {
                writeln!(
                    f,
                    "    {} -> {} ({}:{}, {})",
                    edge.from,
                    edge.to,
                    edge.file.display(),
                    edge.line,
                    edge.named
                )?;
            }
        }
        for module in &self.unplaced {
            writeln!(
                f,
                "unplaced: module `{module}` is in no layer: add it to the table (or to the module that owns it)"
            )?;
        }
        for module in &self.missing {
            writeln!(f, "missing: the table names `{module}`, which the crate does not have: correct the table")?;
        }
        for (file, lines) in &self.too_long {
            writeln!(f, "too long: {} has {lines} lines: split it along what its parts own", file.display())?;
        }
        Ok(())
    }
}
