//! Reading a crate's sources: which modules it has, in which files, and which module paths
//! each of them names.
//!
//! This is a reader, not a Rust parser: it drops comments and literals, splits the rest into
//! identifiers and punctuation, and follows `mod`, `use` and `crate::`/`super::`/`self::` paths.
//! That is all a layering check needs, and it keeps the tool free of dependencies so CI builds
//! it in seconds.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::CheckError;

/// A module path inside the crate, without the leading `crate` (the root is the empty path).
pub type ModulePath = Vec<String>;

/// One place where a module names a path of its own crate.
#[derive(Debug, Clone)]
pub struct Reference {
    /// The absolute path named, `crate` left out.
    pub target: ModulePath,
    /// The file and line it was read from, for the report.
    pub file: PathBuf,
    #[allow(missing_docs)]
    pub line: usize,
}

/// One module of the crate, from its own file or inline in another.
#[derive(Debug, Clone)]
pub struct Module {
    /// Where it sits in the crate.
    pub path: ModulePath,
    /// The file it is written in.
    pub file: PathBuf,
    /// Every path of the crate it names.
    pub references: Vec<Reference>,
}

/// Everything read from a crate's `src/`.
#[derive(Debug, Default)]
pub struct CrateSource {
    /// Every module, the root (empty path) first.
    pub modules: Vec<Module>,
    /// Each source file and its line count.
    pub files: Vec<(PathBuf, usize)>,
    /// Names the crate root re-exports (`pub use a::B;` in lib.rs), to what they name.
    pub root_aliases: BTreeMap<String, ModulePath>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Reads the crate whose root file is `src/lib.rs` (or `src/main.rs`) under `crate_dir`.
pub fn read_crate(crate_dir: &Path) -> Result<CrateSource, CheckError> {
    let src = crate_dir.join("src");
    let root = ["lib.rs", "main.rs"]
        .iter()
        .map(|name| src.join(name))
        .find(|file| file.is_file())
        .ok_or_else(|| CheckError::NoCrateRoot(src.clone()))?;
    let mut source = CrateSource::default();
    read_module_file(&root, &[], &src, &mut source)?;
    Ok(source)
}

/// Reads one file holding the module `path`; `dir` is where its child modules' files are.
fn read_module_file(file: &Path, path: &[String], dir: &Path, source: &mut CrateSource) -> Result<(), CheckError> {
    let text = fs::read_to_string(file).map_err(|error| CheckError::Read(file.to_path_buf(), error))?;
    source.files.push((file.to_path_buf(), text.lines().count()));
    let tokens = tokenize(&text);
    let mut modules: BTreeMap<ModulePath, Vec<Reference>> = BTreeMap::new();
    modules.insert(path.to_vec(), Vec::new());
    let mut children = Vec::new();
    // The inline modules (`mod tests { … }`) the reader is inside, with the brace depth each opened at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let current: ModulePath = path.iter().cloned().chain(inline.iter().map(|(name, _)| name.clone())).collect();
        let (token, line) = &tokens[i];
        match token {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, opened)| *opened == depth) {
                    inline.pop();
                }
            }
            Token::Ident(word) if word == "mod" => {
                if let Some((Token::Ident(name), _)) = tokens.get(i + 1) {
                    match tokens.get(i + 2).map(|(token, _)| token) {
                        Some(Token::Punct(';')) if inline.is_empty() => children.push(name.clone()),
                        Some(Token::Punct('{')) => {
                            inline.push((name.clone(), depth));
                            depth += 1;
                            let mut child = current.clone();
                            child.push(name.clone());
                            modules.entry(child).or_default();
                            i += 3;
                            continue;
                        }
                        _ => {}
                    }
                }
            }
            Token::Ident(word) if word == "use" && !previous_is_path_sep(&tokens, i) => {
                let end = (i..tokens.len()).find(|&j| tokens[j].0 == Token::Punct(';')).unwrap_or(tokens.len());
                let mut paths = Vec::new();
                use_tree(&tokens[i + 1..end], &mut Vec::new(), &mut paths);
                let is_pub =
                    i > 0 && tokens[..i].iter().rev().take(4).any(|(token, _)| *token == Token::Ident("pub".into()));
                for named in paths {
                    if let Some((target, alias)) = resolve(&named, &current, &children) {
                        if current.is_empty() && is_pub {
                            source.root_aliases.insert(alias, target.clone());
                        }
                        modules.get_mut(&current).expect("current module registered").push(Reference {
                            target,
                            file: file.to_path_buf(),
                            line: *line,
                        });
                    }
                }
                i = end + 1;
                continue;
            }
            Token::Ident(word)
                if matches!(word.as_str(), "crate" | "super" | "self")
                    && matches!(tokens.get(i + 1), Some((Token::PathSep, _)))
                    && !previous_is_path_sep(&tokens, i) =>
            {
                let mut named = vec![word.clone()];
                let mut j = i + 1;
                while let (Some((Token::PathSep, _)), Some((Token::Ident(next), _))) =
                    (tokens.get(j), tokens.get(j + 1))
                {
                    named.push(next.clone());
                    j += 2;
                }
                if let Some((target, _)) = resolve(&named, &current, &children) {
                    modules.get_mut(&current).expect("current module registered").push(Reference {
                        target,
                        file: file.to_path_buf(),
                        line: *line,
                    });
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    for (module_path, references) in modules {
        source.modules.push(Module { path: module_path, file: file.to_path_buf(), references });
    }
    for child in children {
        let candidates = [dir.join(format!("{child}.rs")), dir.join(&child).join("mod.rs")];
        let child_file = candidates
            .iter()
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| CheckError::MissingModule(file.to_path_buf(), child.clone()))?;
        let mut child_path = path.to_vec();
        child_path.push(child.clone());
        read_module_file(child_file, &child_path, &dir.join(&child), source)?;
    }
    Ok(())
}

fn previous_is_path_sep(tokens: &[(Token, usize)], i: usize) -> bool {
    i > 0 && tokens[i - 1].0 == Token::PathSep
}

/// Expands a `use` tree into the full paths it names (`a::{b, c::*}` gives `a::b` and `a::c`).
fn use_tree(tokens: &[(Token, usize)], prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    // Split at top-level commas, then read each branch.
    let mut start = 0;
    let mut depth = 0;
    for (index, (token, _)) in tokens.iter().enumerate() {
        match token {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => depth -= 1,
            Token::Punct(',') if depth == 0 => {
                use_branch(&tokens[start..index], prefix, out);
                start = index + 1;
            }
            _ => {}
        }
    }
    use_branch(&tokens[start..], prefix, out);
}

fn use_branch(tokens: &[(Token, usize)], prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let saved = prefix.len();
    let mut index = 0;
    while index < tokens.len() {
        match &tokens[index].0 {
            Token::Ident(word) if word == "as" => break,
            Token::Ident(word) => prefix.push(word.clone()),
            // `a::*` names every item of `a`: an import of `a`.
            Token::Punct('*') => {
                out.push(prefix.clone());
                prefix.truncate(saved);
                return;
            }
            Token::Punct('{') => {
                let close = tokens.len()
                    - 1
                    - tokens.iter().rev().position(|(token, _)| *token == Token::Punct('}')).unwrap_or(0);
                use_tree(&tokens[index + 1..close], prefix, out);
                prefix.truncate(saved);
                return;
            }
            _ => {}
        }
        index += 1;
    }
    if prefix.len() > saved {
        // `use a::b::{self}` names `a::b`.
        let mut path = prefix.clone();
        if path.last().is_some_and(|last| last == "self") && path.len() > 1 {
            path.pop();
        }
        out.push(path);
    }
    prefix.truncate(saved);
}

/// Makes a path named in module `current` absolute; `None` for a path of another crate. Also
/// returns the name it is known by (for re-exports).
fn resolve(named: &[String], current: &[String], children: &[String]) -> Option<(ModulePath, String)> {
    let first = named.first()?;
    let mut base: Vec<String> = match first.as_str() {
        "crate" => Vec::new(),
        "self" => current.to_vec(),
        "super" => current[..current.len().saturating_sub(1)].to_vec(),
        child if children.iter().any(|known| known == child) => {
            let mut base = current.to_vec();
            base.push(child.to_string());
            base.extend(named[1..].iter().cloned());
            return Some((base, named.last()?.clone()));
        }
        _ => return None,
    };
    let mut rest = &named[1..];
    while rest.first().is_some_and(|segment| segment == "super") {
        base.pop();
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    let alias = base.last().cloned().unwrap_or_default();
    Some((base, alias))
}

/// Splits source text into identifiers, `::` and single punctuation characters, each with its
/// line, leaving out comments, string and character literals, lifetimes and numbers.
fn tokenize(text: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            }
        } else if (c == 'r' || c == 'b') && raw_string_start(&chars, i).is_some() {
            let (hashes, body) = raw_string_start(&chars, i).expect("checked");
            i = body;
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                line += usize::from(chars[i] == '\n');
                i += 1;
            }
        } else if c == '"' || (c == 'b' && next == Some('"')) {
            i += if c == 'b' { 2 } else { 1 };
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                line += usize::from(chars.get(i) == Some(&'\n'));
                i += 1;
            }
            i += 1;
        } else if c == '\'' {
            // `'x'` and `'\n'` are character literals; `'a` (no closing quote) is a lifetime.
            if next == Some('\\') {
                i += 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let word = word.strip_prefix("r#").map(str::to_string).unwrap_or(word);
            tokens.push((Token::Ident(word), line));
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.') {
                i += 1;
            }
        } else if c == ':' && next == Some(':') {
            tokens.push((Token::PathSep, line));
            i += 2;
        } else {
            tokens.push((Token::Punct(c), line));
            i += 1;
        }
    }
    tokens
}

/// At `r"`, `r#"`, `br"` or `br#"`: the number of `#` and where the body starts.
fn raw_string_start(chars: &[char], i: usize) -> Option<(usize, usize)> {
    let mut j = i;
    if chars.get(j) == Some(&'b') {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    // Not the tail of an identifier such as `bar"`.
    if i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_') {
        return None;
    }
    j += 1;
    let hashes = chars[j..].iter().take_while(|&&c| c == '#').count();
    (chars.get(j + hashes) == Some(&'"')).then_some((hashes, j + hashes + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idents(text: &str) -> Vec<String> {
        tokenize(text)
            .into_iter()
            .filter_map(|(token, _)| match token {
                Token::Ident(word) => Some(word),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn comments_literals_and_lifetimes_are_not_read_as_code() {
        let text = "// crate::a\n/* crate::b /* nested */ */ let s = \"crate::c\"; let r = r#\"crate::d\"#; \
                    let c = '\\''; fn f<'a>(x: &'a str) { crate::e::F }";
        assert_eq!(idents(text), ["let", "s", "let", "r", "let", "c", "fn", "f", "x", "str", "crate", "e", "F"]);
    }

    #[test]
    fn use_trees_expand_to_every_path_they_name() {
        let tokens = tokenize("crate::{a::{B, c::D as E}, f::{self, *}, g}");
        let mut out = Vec::new();
        use_tree(&tokens, &mut Vec::new(), &mut out);
        let joined: Vec<String> = out.iter().map(|path| path.join("::")).collect();
        assert_eq!(joined, ["crate::a::B", "crate::a::c::D", "crate::f", "crate::f", "crate::g"]);
    }

    #[test]
    fn super_and_self_resolve_against_the_module_they_are_written_in() {
        let here: Vec<String> = vec!["a".into(), "b".into()];
        let named = |text: &str| text.split("::").map(str::to_string).collect::<Vec<_>>();
        assert_eq!(resolve(&named("super::super::c::D"), &here, &[]).unwrap().0, named("c::D"));
        assert_eq!(resolve(&named("self::x"), &here, &[]).unwrap().0, named("a::b::x"));
        assert_eq!(resolve(&named("kid::Y"), &here, &["kid".into()]).unwrap().0, named("a::b::kid::Y"));
        assert!(resolve(&named("tokio::spawn"), &here, &[]).is_none());
    }
}
