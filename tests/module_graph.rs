//! The library's modules depend on each other one way: no module imports from a module that imports it,
//! directly or through others. The graph is read from the sources (every `crate::`, `super::` and relative
//! `use` path of every module reachable from `src/lib.rs`), at the granularity of the top-level modules and
//! of their direct submodules (`models::unet`, `train::log`), and must have no cycle. docs/architecture.md
//! draws the layers this keeps apart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One library module: its path from the crate root and its source file.
struct Module {
    path: Vec<String>,
    file: PathBuf,
}

/// Every module reachable from `src/lib.rs` through `mod` declarations (files only: inline `mod tests { }`
/// blocks belong to their file's module).
fn library_modules(root: &Path) -> Vec<Module> {
    let mut out = Vec::new();
    let mut todo = vec![Module { path: Vec::new(), file: root.join("lib.rs") }];
    while let Some(module) = todo.pop() {
        let source = std::fs::read_to_string(&module.file).unwrap_or_else(|e| panic!("{}: {e}", module.file.display()));
        let code = strip_comments_and_strings(&source);
        // Children of `a/b.rs` or `a/b/mod.rs` live in `a/b/`; of `lib.rs`, in `src/`.
        let dir = match module.file.file_name().and_then(|n| n.to_str()) {
            Some("lib.rs") | Some("mod.rs") => module.file.parent().unwrap().to_path_buf(),
            _ => module.file.with_extension(""),
        };
        for name in declared_file_modules(&code) {
            let file = [dir.join(format!("{name}.rs")), dir.join(&name).join("mod.rs")]
                .into_iter()
                .find(|f| f.is_file())
                .unwrap_or_else(|| panic!("{}: `mod {name};` has no file", module.file.display()));
            let mut path = module.path.clone();
            path.push(name);
            todo.push(Module { path, file });
        }
        out.push(module);
    }
    out
}

/// Names of `mod name;` declarations (not `mod name { ... }`).
fn declared_file_modules(code: &str) -> Vec<String> {
    let tokens = tokenize(code);
    let mut out = Vec::new();
    for i in 0..tokens.len().saturating_sub(2) {
        if tokens[i] == "mod" && is_ident(&tokens[i + 1]) && tokens[i + 2] == ";" {
            out.push(tokens[i + 1].clone());
        }
    }
    out
}

/// The source with comments, string literals and char literals blanked (so a path in a doc comment or an
/// error message is not a dependency); lifetimes are kept.
fn strip_comments_and_strings(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
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
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars.get(i.wrapping_sub(1)).is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            while j < chars.len() {
                if chars[j] == '"' && (0..hashes).all(|h| chars.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}', '\''); anything else is a lifetime or a label.
            if next == Some('\\') {
                let mut j = i + 2;
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                if j == i + 2 {
                    j = i + 3; // '\''
                    while j < chars.len() && chars[j] != '\'' {
                        j += 1;
                    }
                }
                out.push_str("' '");
                i = j + 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                out.push_str("' '");
                i += 3;
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn is_ident(token: &str) -> bool {
    token.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_') && token.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// Identifiers, `::` and single punctuation characters.
fn tokenize(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push("::".into());
            i += 2;
        } else {
            tokens.push(c.to_string());
            i += 1;
        }
    }
    tokens
}

/// One path a module names: a leaf of a `use` tree (`public` for `pub use`, a re-export), or another path
/// that starts with `crate`, `super` or `self`, as its segments.
struct Reference {
    path: Vec<String>,
    is_use: bool,
    public: bool,
    /// The inline modules (`mod tests { ... }`) it is written in, outermost first.
    scope: Vec<String>,
}

fn references(code: &str) -> Vec<Reference> {
    let tokens = tokenize(code);
    let mut out = Vec::new();
    // Open inline modules with the brace depth inside them.
    let mut scope: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        let names = || scope.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        if tokens[i] == "{" {
            depth += 1;
            i += 1;
        } else if tokens[i] == "}" {
            if scope.last().is_some_and(|(_, d)| *d == depth) {
                scope.pop();
            }
            depth -= 1;
            i += 1;
        } else if tokens[i] == "mod" && tokens.get(i + 2).map(String::as_str) == Some("{") {
            scope.push((tokens[i + 1].clone(), depth + 1));
            i += 2;
        } else if tokens[i] == "use" {
            // `pub use` or `pub(crate) use`, etc.
            let public = (i >= 1 && tokens[i - 1] == "pub") || (i >= 4 && tokens[i - 1] == ")" && tokens[i - 4] == "pub");
            let mut j = i + 1;
            let mut paths = Vec::new();
            use_tree(&tokens, &mut j, &[], &mut paths);
            out.extend(paths.into_iter().map(|path| Reference { path, is_use: true, public, scope: names() }));
            i = j;
        } else if matches!(tokens[i].as_str(), "crate" | "super" | "self")
            && tokens.get(i + 1).map(String::as_str) == Some("::")
            && !(i > 0 && tokens[i - 1] == "::")
        {
            let mut path = vec![tokens[i].clone()];
            let mut j = i + 1;
            while tokens.get(j).map(String::as_str) == Some("::") && tokens.get(j + 1).is_some_and(|t| is_ident(t)) {
                path.push(tokens[j + 1].clone());
                j += 2;
            }
            out.push(Reference { path, is_use: false, public: false, scope: names() });
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Parses one use tree at `tokens[*i]` under `prefix`, pushing every leaf path.
fn use_tree(tokens: &[String], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    while *i < tokens.len() {
        match tokens[*i].as_str() {
            "{" => {
                *i += 1;
                while *i < tokens.len() && tokens[*i] != "}" {
                    use_tree(tokens, i, &path, out);
                    if tokens.get(*i).map(String::as_str) == Some(",") {
                        *i += 1;
                    }
                }
                *i += 1;
                return;
            }
            "::" => *i += 1,
            "as" => *i += 2,
            "*" => {
                *i += 1;
                out.push(path);
                return;
            }
            ";" => {
                *i += 1;
                out.push(path);
                return;
            }
            "," | "}" => {
                out.push(path);
                return;
            }
            t => {
                path.push(t.to_string());
                *i += 1;
            }
        }
    }
}

/// The modules of the library and what each re-exports (`pub use child::Item` in a `mod.rs`: item name ->
/// the module it comes from), so that `crate::runtime::Device` counts as a use of `runtime::device`.
struct Library {
    modules: BTreeSet<Vec<String>>,
    reexports: BTreeMap<Vec<String>, BTreeMap<String, Vec<String>>>,
}

impl Library {
    /// `path` as written in `module`, made absolute, down to the module that defines what it names; `None`
    /// for paths outside the library (`std::`, other crates, local items).
    fn resolve(&self, module: &[String], path: &[String], is_use: bool) -> Option<Vec<String>> {
        let (mut target, rest) = match path.first().map(String::as_str) {
            Some("crate") => (Vec::new(), &path[1..]),
            Some("self") => (module.to_vec(), &path[1..]),
            Some("super") => {
                let mut base = module.to_vec();
                let mut rest = path;
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop();
                    rest = &rest[1..];
                }
                (base, rest)
            }
            // A relative `use` of a child module (`pub use arena::Arena;` in runtime/mod.rs).
            Some(first) if is_use && self.modules.contains(&[module, &[first.to_string()]].concat()) => (module.to_vec(), path),
            _ => return None,
        };
        for (k, segment) in rest.iter().enumerate() {
            let mut longer = target.clone();
            longer.push(segment.clone());
            if self.modules.contains(&longer) {
                target = longer;
                continue;
            }
            if let Some(source) = self.reexports.get(&target).and_then(|r| r.get(segment)) {
                if *source != target {
                    let mut redirected = source.clone();
                    redirected.extend(rest[k + 1..].iter().cloned());
                    return self.resolve(&[], &[&["crate".to_string()][..], &redirected].concat(), false);
                }
            }
            break;
        }
        Some(target)
    }
}

/// The node of the graph a module belongs to: its first `depth` path segments.
fn node_of(path: &[String], depth: usize) -> String {
    path.iter().take(depth).cloned().collect::<Vec<_>>().join("::")
}

/// The edges between nodes, each with one place that makes it (file and the path written there).
fn dependency_graph(root: &Path, depth: usize) -> BTreeMap<String, BTreeMap<String, String>> {
    let modules: Vec<(Module, Vec<Reference>)> = library_modules(root)
        .into_iter()
        .map(|m| {
            let code = strip_comments_and_strings(&std::fs::read_to_string(&m.file).unwrap());
            let refs = references(&code);
            (m, refs)
        })
        .collect();
    let mut library = Library { modules: modules.iter().map(|(m, _)| m.path.clone()).collect(), reexports: BTreeMap::new() };
    // Re-exports first (one level: a re-export of a re-export resolves through the recursion in `resolve`).
    let mut reexports = BTreeMap::new();
    for (m, refs) in &modules {
        for r in refs.iter().filter(|r| r.public && r.is_use && r.scope.is_empty()) {
            let (Some(item), Some(source)) = (r.path.last(), library.resolve(&m.path, &r.path, true)) else { continue };
            reexports.entry(m.path.clone()).or_insert_with(BTreeMap::new).insert(item.clone(), source);
        }
    }
    library.reexports = reexports;
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (m, refs) in &modules {
        if m.path.is_empty() {
            continue; // lib.rs declares and re-exports; it sits above everything
        }
        let from = node_of(&m.path, depth);
        for r in refs {
            let Some(target) = library.resolve(&[&m.path[..], &r.scope].concat(), &r.path, r.is_use) else { continue };
            let to = node_of(&target, depth);
            if target.is_empty() || to == from {
                continue;
            }
            graph.entry(from.clone()).or_default().entry(to).or_insert_with(|| format!("{}: {}", m.file.display(), r.path.join("::")));
        }
    }
    graph
}

/// The strongly connected components with more than one node (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeMap<String, String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(edges) = s.graph.get(v) {
            for w in edges.keys() {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let low = s.low[w].min(s.low[v]);
                    s.low.insert(v, low);
                } else if s.on_stack.contains(w) {
                    let low = s.index[w].min(s.low[v]);
                    s.low.insert(v, low);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State { graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on_stack: BTreeSet::new(), out: Vec::new() };
    let nodes: BTreeSet<&str> = graph.iter().flat_map(|(k, v)| std::iter::once(k.as_str()).chain(v.keys().map(String::as_str))).collect();
    for v in nodes {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// The cycles of the graph at `depth`, each edge in them with the place that makes it.
fn cycle_report(depth: usize) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = dependency_graph(&root, depth);
    assert!(graph.contains_key("pipeline") && graph.contains_key("ops"), "the reader found no dependencies: {graph:?}");
    let mut report = String::new();
    for component in cycles(&graph) {
        report.push_str(&format!("cycle among {}:\n", component.join(", ")));
        for from in &component {
            for (to, place) in &graph[from] {
                if component.contains(to) {
                    report.push_str(&format!("  {from} -> {to}  ({place})\n"));
                }
            }
        }
    }
    report
}

#[test]
fn the_top_level_modules_have_no_dependency_cycle() {
    let report = cycle_report(1);
    assert!(report.is_empty(), "module dependency cycles:\n{report}");
}

#[test]
fn the_submodules_have_no_dependency_cycle() {
    let report = cycle_report(2);
    assert!(report.is_empty(), "module dependency cycles:\n{report}");
}

#[test]
fn the_reader_sees_through_comments_strings_and_use_trees() {
    let code = strip_comments_and_strings(
        "use crate::{a::b, c::{d, e as f}};\n// crate::x::y\nlet s = \"crate::z\"; let c = '\"'; fn g<'a>(x: &'a str) { super::h::i(); }",
    );
    let paths: Vec<Vec<String>> = references(&code).into_iter().map(|r| r.path).collect();
    let want: Vec<Vec<String>> = [&["crate", "a", "b"][..], &["crate", "c", "d"], &["crate", "c", "e"], &["super", "h", "i"]]
        .iter()
        .map(|p| p.iter().map(|s| s.to_string()).collect())
        .collect();
    assert_eq!(paths, want);
}
