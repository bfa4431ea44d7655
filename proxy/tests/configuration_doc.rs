//! `docs/configuration.md` kept true to the code.
//!
//! - every ```` ```toml ```` example parses with the gateway's own raw types
//!   ([`proxy::config::raw::RawFile`], which refuse unknown keys), so a misspelt or
//!   invented key fails here;
//! - every key in the doc's tables appears in at least one example, with a value of the
//!   type its row states (durations and rates parsed as the gateway parses them);
//! - every field of the `Raw*` structs in `proxy/src/config/raw.rs` (read as source, at
//!   test time) is a row of a table, and every row is such a field; and the examples,
//!   together, use every one of them.
//!
//! The doc's key tables are the Markdown tables whose header starts with `| key |`. A
//! table's section is given by the code spans of the heading above it (`` `[listener]` ``,
//! `` `provider.limit` and `provider.consumer_limit` ``); a heading without one holds the
//! top-level keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proxy::config::raw::RawFile;
use toml::Value;

const DOC: &str = "docs/configuration.md";
const RAW: &str = "proxy/src/config/raw.rs";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the proxy crate lives in the workspace")
        .to_owned()
}

fn read(relative: &str) -> String {
    let path = workspace().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn report(what: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{what}: {} problem(s)\n  - {}",
        failures.len(),
        failures.join("\n  - ")
    );
}

// ---------------------------------------------------------------------------------------
// The doc: fenced TOML examples and key tables.

/// One ```` ```toml ```` block; `line` is the fence's line in the doc (1-based).
#[derive(Debug)]
struct Example {
    line: usize,
    text: String,
}

/// One row of a key table.
#[derive(Debug)]
struct Row {
    line: usize,
    key: String,
    ty: String,
}

/// One key table with the section paths its heading names (`""`: top level).
#[derive(Debug)]
struct KeyTable {
    heading: String,
    paths: Vec<String>,
    rows: Vec<Row>,
}

#[derive(Debug, Default)]
struct Doc {
    examples: Vec<Example>,
    tables: Vec<KeyTable>,
}

impl Doc {
    /// Every row as (full key path, table heading, row).
    fn rows(&self) -> impl Iterator<Item = (String, &KeyTable, &Row)> {
        self.tables.iter().flat_map(|t| {
            t.paths
                .iter()
                .flat_map(move |p| t.rows.iter().map(move |r| (join(p, &r.key), t, r)))
        })
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The contents of the `` `code spans` `` of a line.
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// Table cells, with `\|` kept inside its cell.
fn cells(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.trim().trim_start_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    if out.last().is_some_and(|c| c.trim().is_empty()) {
        out.pop();
    }
    out.into_iter().map(|c| c.trim().to_owned()).collect()
}

fn parse_doc(text: &str) -> Doc {
    let mut doc = Doc::default();
    let mut heading = String::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            // A fence: its contents are neither headings nor tables.
            let fence_line = i + 1;
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l.trim() == "```" {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            if info.trim() == "toml" {
                doc.examples.push(Example {
                    line: fence_line,
                    text: body,
                });
            }
        } else if trimmed.starts_with('#') {
            heading = trimmed.trim_start_matches('#').trim().to_owned();
        } else if trimmed.starts_with('|')
            && cells(trimmed)
                .first()
                .is_some_and(|c| c.eq_ignore_ascii_case("key"))
        {
            let header = cells(trimmed);
            assert!(
                header.len() >= 2 && header[1].eq_ignore_ascii_case("type"),
                "{DOC} line {}: a key table's columns are `key | type | default | meaning`",
                i + 1
            );
            lines.next(); // |---|---|
            let mut rows = Vec::new();
            while let Some((j, l)) = lines.next_if(|(_, l)| l.trim_start().starts_with('|')) {
                let c = cells(l);
                let key = c.first().and_then(|k| code_spans(k).first().copied());
                let (Some(key), Some(ty)) = (key, c.get(1)) else {
                    panic!(
                        "{DOC} line {}: a key table's row starts with the key in `backticks`, then its type",
                        j + 1
                    );
                };
                rows.push(Row {
                    line: j + 1,
                    key: key.to_owned(),
                    ty: ty.clone(),
                });
            }
            let mut paths: Vec<String> = code_spans(&heading)
                .into_iter()
                .map(|s| s.trim_matches(|c| c == '[' || c == ']').trim().to_owned())
                .filter(|s| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                })
                .collect();
            if paths.is_empty() {
                paths.push(String::new());
            }
            doc.tables.push(KeyTable {
                heading: heading.clone(),
                paths,
                rows,
            });
        }
    }
    doc
}

fn doc() -> Doc {
    let doc = parse_doc(&read(DOC));
    assert!(!doc.examples.is_empty(), "{DOC} has no ```toml example");
    assert!(
        !doc.tables.is_empty(),
        "{DOC} has no `| key | type | ...` table"
    );
    doc
}

/// Every key path used in the examples (tables and arrays of tables included, array
/// elements under their array's path), with each value given to it and the example's line.
fn example_values(doc: &Doc) -> BTreeMap<String, Vec<(usize, Value)>> {
    fn walk(
        line: usize,
        prefix: &str,
        table: &toml::Table,
        out: &mut BTreeMap<String, Vec<(usize, Value)>>,
    ) {
        for (k, v) in table {
            let path = join(prefix, k);
            out.entry(path.clone()).or_default().push((line, v.clone()));
            match v {
                Value::Table(t) => walk(line, &path, t, out),
                Value::Array(items) => {
                    for item in items {
                        if let Value::Table(t) = item {
                            walk(line, &path, t, out);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = BTreeMap::new();
    for ex in &doc.examples {
        if let Ok(table) = toml::from_str::<toml::Table>(&ex.text) {
            walk(ex.line, "", &table, &mut out);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// raw.rs, read as source.

#[derive(Debug)]
struct Field {
    line: usize,
    name: String,
    /// The name in TOML (`#[serde(rename = "...")]` honoured).
    key: String,
    ty: String,
    flatten: bool,
}

/// Every `pub struct Raw...` of raw.rs with its `pub` fields.
fn raw_structs(src: &str) -> BTreeMap<String, Vec<Field>> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, Vec<Field>)> = None;
    let mut rename: Option<String> = None;
    let mut flatten = false;
    let mut struct_attrs = String::new();
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if current.is_none() {
            if t.starts_with("#[") {
                struct_attrs.push_str(t);
            } else if let Some(rest) = t.strip_prefix("pub struct ") {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    !struct_attrs.contains("rename_all"),
                    "{RAW} line {}: {name} uses rename_all, which this test does not read yet",
                    i + 1
                );
                if name.starts_with("Raw") && t.ends_with('{') {
                    current = Some((name, Vec::new()));
                }
                struct_attrs.clear();
            } else if !t.starts_with("///") {
                struct_attrs.clear();
            }
            continue;
        }
        if t == "}" {
            let (name, fields) = current.take().unwrap();
            out.insert(name, fields);
            continue;
        }
        if t.starts_with("#[serde(") {
            if let Some(rest) = t.split("rename = \"").nth(1) {
                rename = rest.split('"').next().map(str::to_owned);
            }
            flatten |= t.contains("flatten");
            continue;
        }
        if let Some(rest) = t.strip_prefix("pub ")
            && let Some((name, ty)) = rest.split_once(':')
        {
            let name = name.trim().trim_start_matches("r#").to_owned();
            current.as_mut().unwrap().1.push(Field {
                line: i + 1,
                key: rename.take().unwrap_or_else(|| name.clone()),
                name,
                ty: ty.trim().trim_end_matches(',').to_owned(),
                flatten: std::mem::take(&mut flatten),
            });
        }
    }
    assert!(current.is_none(), "{RAW}: a struct is not closed");
    out
}

/// The first `Raw...` type named in a field's type, if it is one of raw.rs's structs.
fn raw_type<'a>(ty: &str, structs: &'a BTreeMap<String, Vec<Field>>) -> Option<&'a str> {
    ty.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .find_map(|word| structs.get_key_value(word).map(|(k, _)| k.as_str()))
}

/// What the program accepts at one key path.
#[derive(Debug)]
struct Expected {
    /// `RawStruct.field`, for messages.
    origin: String,
    line: usize,
    /// A table (or list of tables) of its own: documented by a row or a heading.
    table: bool,
}

/// Every key path the raw types accept, from `RawFile` down.
fn expected_keys(structs: &BTreeMap<String, Vec<Field>>) -> BTreeMap<String, Expected> {
    fn walk(
        structs: &BTreeMap<String, Vec<Field>>,
        name: &str,
        prefix: &str,
        depth: usize,
        reached: &mut BTreeSet<String>,
        out: &mut BTreeMap<String, Expected>,
    ) {
        assert!(
            depth < 16,
            "{RAW}: the Raw structs nest too deep (a cycle?)"
        );
        reached.insert(name.to_owned());
        for f in &structs[name] {
            let inner = raw_type(&f.ty, structs);
            if f.flatten {
                let inner = inner
                    .unwrap_or_else(|| panic!("{RAW} line {}: flatten on a non-Raw type", f.line));
                walk(structs, inner, prefix, depth + 1, reached, out);
                continue;
            }
            let path = join(prefix, &f.key);
            out.insert(
                path.clone(),
                Expected {
                    origin: format!("{name}.{}", f.name),
                    line: f.line,
                    table: inner.is_some(),
                },
            );
            if let Some(inner) = inner {
                walk(structs, inner, &path, depth + 1, reached, out);
            }
        }
    }
    assert!(
        structs.contains_key("RawFile"),
        "{RAW}: no `pub struct RawFile`; has the parser of this test gone stale?"
    );
    let mut out = BTreeMap::new();
    let mut reached = BTreeSet::new();
    walk(structs, "RawFile", "", 0, &mut reached, &mut out);
    let unreached: Vec<_> = structs.keys().filter(|s| !reached.contains(*s)).collect();
    assert!(
        unreached.is_empty(),
        "{RAW}: {unreached:?} not reachable from RawFile by this test's reading of field types"
    );
    for (name, fields) in structs {
        assert!(!fields.is_empty(), "{RAW}: {name} read with no field");
    }
    out
}

fn raw() -> BTreeMap<String, Expected> {
    expected_keys(&raw_structs(&read(RAW)))
}

// ---------------------------------------------------------------------------------------
// The checks.

/// (a) Each example is a configuration file as the gateway reads it: unknown keys, wrong
/// types and missing required keys of the sections it holds all fail.
#[test]
fn every_toml_example_parses_as_a_configuration_file() {
    let doc = doc();
    let failures: Vec<String> = doc
        .examples
        .iter()
        .filter_map(|ex| {
            toml::from_str::<RawFile>(&ex.text).err().map(|e| {
                format!(
                    "{DOC} line {}: the ```toml example is not a valid configuration file: {}",
                    ex.line,
                    e.to_string().trim_end().replace('\n', "\n      ")
                )
            })
        })
        .collect();
    report("examples that do not parse", &failures);
}

/// (b) Every key in a table appears in at least one example.
#[test]
fn every_key_in_the_tables_appears_in_an_example() {
    let doc = doc();
    let used = example_values(&doc);
    let failures: Vec<String> = doc
        .rows()
        .filter(|(path, _, _)| !used.contains_key(path))
        .map(|(path, table, row)| {
            format!(
                "{DOC} line {}: key `{path}` (table under \"{}\") appears in no ```toml example",
                row.line, table.heading
            )
        })
        .collect();
    report("documented keys without an example", &failures);
}

/// What a row's type says a value looks like; `None` when the value fits.
fn type_mismatch(ty: &str, value: &Value) -> Option<String> {
    let t = ty.to_ascii_lowercase();
    let fits = if t.starts_with("list") {
        value.is_array()
    } else if t.starts_with("inline table") {
        value.is_table()
    } else if t.starts_with("integer") {
        value.is_integer()
    } else if t.starts_with("bool") {
        value.is_bool()
    } else if t.starts_with("number") {
        value.is_float() || value.is_integer()
    } else if t.starts_with("date") {
        matches!(value, Value::Datetime(d) if d.date.is_some() && d.time.is_none() && d.offset.is_none())
    } else if t.starts_with("duration") {
        return match value.as_str() {
            Some(s) if proxy::config::parse_duration(s).is_some() => None,
            _ => Some(format!("{value} is not a duration the gateway parses")),
        };
    } else if t.starts_with("rate") {
        return match value.as_str() {
            Some(s) if proxy::config::parse_rate(s, None).is_some() => None,
            _ => Some(format!("{value} is not a rate the gateway parses")),
        };
    } else {
        // string, path, URL, CIDR...: a string.
        value.is_str()
    };
    (!fits).then(|| format!("{value} is not of the stated type `{ty}`"))
}

/// The examples give each key a value of the type its row states.
#[test]
fn example_values_have_the_types_the_tables_state() {
    let doc = doc();
    let used = example_values(&doc);
    let mut failures = Vec::new();
    for (path, _, row) in doc.rows() {
        for (line, value) in used.get(&path).into_iter().flatten() {
            if let Some(why) = type_mismatch(&row.ty, value) {
                failures.push(format!(
                    "{DOC} line {line} (example) against line {} (row): `{path}`: {why}",
                    row.line
                ));
            }
        }
    }
    report("example values of the wrong type", &failures);
}

/// (c) Every key raw.rs accepts is in a table, and every row is a key raw.rs accepts.
#[test]
fn the_tables_and_raw_rs_name_the_same_keys() {
    let doc = doc();
    let expected = raw();
    let rows: BTreeMap<String, usize> = doc.rows().map(|(p, _, r)| (p, r.line)).collect();
    let headings: BTreeSet<&str> = doc
        .tables
        .iter()
        .flat_map(|t| t.paths.iter().map(String::as_str))
        .filter(|p| !p.is_empty())
        .collect();
    let mut failures = Vec::new();
    for (path, e) in &expected {
        let documented = rows.contains_key(path) || (e.table && headings.contains(path.as_str()));
        if !documented {
            let (section, key) = path.rsplit_once('.').unwrap_or(("(top level)", path));
            failures.push(format!(
                "{RAW} line {}: {} (key `{path}`) is in no table of {DOC}: add a row `{key}` to the table of `{section}`{}",
                e.line,
                e.origin,
                if e.table { ", or a table headed with its path" } else { "" }
            ));
        }
    }
    for (path, line) in &rows {
        if !expected.contains_key(path) {
            failures.push(format!(
                "{DOC} line {line}: key `{path}` is not a field of any Raw struct in {RAW}"
            ));
        }
    }
    for path in headings {
        if !expected.get(path).is_some_and(|e| e.table) {
            failures.push(format!(
                "{DOC}: the heading naming `{path}` is not a table of {RAW}"
            ));
        }
    }
    report("keys in raw.rs and the doc's tables that differ", &failures);
}

/// The examples, together, use every key raw.rs accepts, every section included.
#[test]
fn the_examples_together_use_every_key_of_raw_rs() {
    let doc = doc();
    let used = example_values(&doc);
    let failures: Vec<String> = raw()
        .iter()
        .filter(|(path, _)| !used.contains_key(*path))
        .map(|(path, e)| {
            format!(
                "{RAW} line {}: {} (key `{path}`) is used by no ```toml example in {DOC}",
                e.line, e.origin
            )
        })
        .collect();
    report("keys without an example", &failures);
}

/// The test's own readers, on known input.
#[test]
fn the_readers_read_what_they_should() {
    let structs = raw_structs(
        "#[derive(Deserialize)]\npub struct RawFile {\n    /// doc\n    pub a: Option<RawB>,\n    #[serde(rename = \"c-d\")]\n    pub c: Vec<String>,\n}\n\npub struct RawB {\n    pub e: u32,\n}\n",
    );
    let keys = expected_keys(&structs);
    assert_eq!(
        keys.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a", "a.e", "c-d"]
    );
    assert!(keys["a"].table && !keys["a.e"].table);

    let doc = parse_doc(
        "# T\n\n| key | type | default | meaning |\n|---|---|---|---|\n| `x` | string `a \\| b` | | |\n\n## `[s]` and `t.u`\n\n| key | type | default | meaning |\n|---|---|---|---|\n| `y` | bool | | |\n\n```text\n# not a heading\n```\n\n```toml\nx = \"1\"\n```\n",
    );
    assert_eq!(doc.examples.len(), 1);
    assert_eq!(doc.examples[0].line, 17);
    let rows: Vec<String> = doc.rows().map(|(p, _, _)| p).collect();
    assert_eq!(rows, ["x", "s.y", "t.u.y"]);
    assert_eq!(doc.tables[0].rows[0].ty, "string `a | b`");
}
