//! The gateway's modules import each other without cycles: no module imports another
//! that imports it back, directly or through others.
//!
//! Every `.rs` file under `src/` is a module (`src/a/b.rs` and `src/a/b/mod.rs` are
//! `a::b`). A module depends on another when its code names it by a path: `crate::x::y`,
//! `super::y`, `self::y`, or a child module's name; a path is taken to the deepest module
//! it names. Comments and string literals are ignored; `mod x;` declarations are not
//! imports. Test modules inside a file count as the file's own code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`""` for the crate root) → its source file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut out = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        match parts.last().map(String::as_str) {
            // The binary is a crate of its own, above the library.
            Some("main") if parts.len() == 1 => continue,
            Some("lib") if parts.len() == 1 => parts.clear(),
            Some("mod") => {
                parts.pop();
            }
            _ => {}
        }
        out.insert(parts.join("::"), file);
    }
    out
}

/// The source without comments, string and character literals (kept as blanks).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'r' && (b[i..].starts_with(b"r\"") || b[i..].starts_with(b"r#")) {
            // Raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while j < b.len() && b[j] == b'#' {
                hashes += 1;
                j += 1;
            }
            if j < b.len() && b[j] == b'"' {
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                j += 1;
                while j < b.len() && !b[j..].starts_with(&close) {
                    j += 1;
                }
                i = j + close.len();
                out.push_str("\"\"");
            } else {
                out.push('r');
                i += 1;
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    out.push_str("' '");
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = src[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Every path written in the code, `use` trees expanded: `a::{b, c::d}` gives `a::b` and
/// `a::c::d`; each with the inline modules it is written in.
fn paths(code: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    // Tokens: identifiers, `::`, `{`, `}`, `,`, and anything else as a separator.
    let mut tokens: Vec<String> = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if is_ident(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
            continue;
        }
        if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push("::".into());
            i += 2;
            continue;
        }
        if matches!(c, '{' | '}' | ',') {
            tokens.push(c.to_string());
        } else if !c.is_whitespace() {
            tokens.push(" ".into());
        }
        i += 1;
    }
    // Expands the path starting at token `at` with `prefix`; returns where it ended.
    fn expand(
        tokens: &[String],
        mut at: usize,
        mut prefix: Vec<String>,
        out: &mut Vec<Vec<String>>,
    ) -> usize {
        loop {
            let Some(t) = tokens.get(at) else {
                out.push(prefix);
                return at;
            };
            if t == "{" && prefix.last().is_some() {
                // A group after `::`.
                at += 1;
                loop {
                    match tokens.get(at).map(String::as_str) {
                        Some("}") => return at + 1,
                        Some(",") => at += 1,
                        None => return at,
                        Some(_) => at = expand(tokens, at, prefix.clone(), out),
                    }
                }
            }
            if t.chars().all(|c| c.is_alphanumeric() || c == '_') && t != "::" {
                prefix.push(t.clone());
                at += 1;
                if tokens.get(at).map(String::as_str) == Some("::") {
                    at += 1;
                    continue;
                }
                out.push(prefix);
                return at;
            }
            out.push(prefix);
            return at;
        }
    }
    // Paths are seen from the inline module they are written in (`mod tests { .. }`):
    // its names are pushed before each path, so `super` inside it is the file's module.
    let mut out = Vec::new();
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut at = 0;
    while at < tokens.len() {
        let t = tokens[at].as_str();
        if t == "mod"
            && tokens.get(at + 2).map(String::as_str) == Some("{")
            && let Some(name) = tokens.get(at + 1)
        {
            inline.push((name.clone(), depth + 1));
            at += 2;
            continue;
        }
        if t == "{" {
            depth += 1;
            at += 1;
            continue;
        }
        if t == "}" {
            depth = depth.saturating_sub(1);
            while inline.last().is_some_and(|(_, d)| *d > depth) {
                inline.pop();
            }
            at += 1;
            continue;
        }
        let starts_path = t.chars().all(|c| c.is_alphanumeric() || c == '_')
            && tokens.get(at + 1).map(String::as_str) == Some("::")
            && (at == 0 || tokens[at - 1] != "::");
        if starts_path {
            let mut found = Vec::new();
            let end = expand(&tokens, at, Vec::new(), &mut found);
            let prefix: Vec<String> = inline.iter().map(|(n, _)| n.clone()).collect();
            out.extend(
                found
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| (prefix.clone(), p)),
            );
            at = end.max(at + 1);
        } else {
            at += 1;
        }
    }
    out
}

/// The deepest module a path names, seen from module `from` (a file's module) and the
/// inline modules `inline` within it.
fn resolve(
    from: &str,
    inline: &[String],
    path: &[String],
    modules: &BTreeMap<String, PathBuf>,
) -> Option<String> {
    let file_depth = if from.is_empty() {
        0
    } else {
        from.split("::").count()
    };
    let mut base: Vec<String> = if from.is_empty() {
        Vec::new()
    } else {
        from.split("::").map(str::to_owned).collect()
    };
    base.extend(inline.iter().cloned());
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        // A child module named directly (`use call::Call;` in its parent).
        Some(_) if base.len() > file_depth => return None,
        Some(first) => {
            let mut child = base.clone();
            child.push(first.to_owned());
            if !modules.contains_key(&child.join("::")) {
                return None;
            }
        }
        None => return None,
    }
    // Still inside an inline module of the file: the path names something of the file.
    if base.len() > file_depth {
        return None;
    }
    let mut best = None;
    let mut cur = base;
    if modules.contains_key(&cur.join("::")) && !cur.is_empty() {
        best = Some(cur.join("::"));
    }
    for seg in rest {
        cur.push(seg.clone());
        if modules.contains_key(&cur.join("::")) {
            best = Some(cur.join("::"));
        } else {
            break;
        }
    }
    best
}

fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules(src);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        let deps = edges.entry(module.clone()).or_default();
        for (inline, path) in paths(&code) {
            if let Some(to) = resolve(module, &inline, &path, &modules)
                && to != *module
            {
                deps.insert(to);
            }
        }
    }
    edges
}

/// A cycle through the graph, if there is one, as the modules along it.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        at: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(at.to_owned(), Mark::Open);
        stack.push(at.to_owned());
        for next in edges.get(at).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = stack.iter().position(|m| m == next).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(next, edges, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(at.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in edges.keys() {
        if marks.get(m).copied().unwrap_or(Mark::New) == Mark::New
            && let Some(c) = visit(m, edges, &mut marks, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = graph(&src);
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "import cycle: {}\n(each module imports the next; break the cycle by moving what \
             the lower module needs below both)",
            cycle
                .iter()
                .map(|m| if m.is_empty() { "crate" } else { m })
                .collect::<Vec<_>>()
                .join(" -> ")
        );
    }
}

#[test]
fn transport_knows_nothing_of_the_gateway() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = graph(&src);
    // What transport may use: itself, and the leaf modules below every layer.
    let allowed = ["transport", "headers", "limits", "xml"];
    for (module, deps) in &edges {
        if !module.starts_with("transport") {
            continue;
        }
        for dep in deps {
            let top = dep.split("::").next().unwrap_or_default();
            assert!(
                allowed.contains(&top),
                "{module} uses {dep}: transport sits below the call and may only use {allowed:?}"
            );
        }
    }
}

/// The checker itself finds what it must: a two-module cycle through `super`, a cycle
/// through a `use` group, and nothing in code that only mentions paths in comments and
/// strings.
#[test]
fn the_checker_sees_cycles_and_only_code() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).unwrap();
    let write = |p: &str, s: &str| std::fs::write(src.join(p), s).unwrap();
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n");
    write("a/mod.rs", "pub mod x;\nuse x::Thing;\n");
    write(
        "a/x.rs",
        "// crate::b is only mentioned\nconst S: &str = \"crate::c::Z\";\n",
    );
    write("b.rs", "use crate::{a::x::Thing, c};\n");
    write("c.rs", "fn f() -> char { 'x' }\n");
    assert_eq!(find_cycle(&graph(src)), None);
    write("a/x.rs", "use super::super::b::Y;\n");
    assert_eq!(
        find_cycle(&graph(src)).map(|c| c.len()),
        Some(3),
        "a::x -> b -> a::x"
    );
    write("a/x.rs", "");
    write("c.rs", "fn f() { crate::b::g() }\n");
    write("b.rs", "use crate::{a::x::Thing, c::{self, h}};\n");
    let cycle = find_cycle(&graph(src)).unwrap();
    assert!(cycle.contains(&"b".to_owned()) && cycle.contains(&"c".to_owned()));
}
