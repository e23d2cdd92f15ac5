//! The shape of the code, checked: what `docs/ARCHITECTURE.md` states about rooms and arrows.
//! Read from the sources, outside comments and test modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A source file's code: comment lines and a trailing `#[cfg(test)] mod tests { .. }` left out.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(cut) => &text[..cut],
        None => &text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `tests.rs`, or a file of a `tests/` folder beside it (its submodules).
fn is_test_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "tests.rs")
        || path
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|n| n == "tests")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `crate::X` references of each top-level module of baton-core (a folder counts as its module).
fn arrows() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut arrows: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files.iter().filter(|f| !is_test_file(f)) {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel.iter().next().unwrap().to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if top == "lib" {
            continue;
        }
        let code = code(file);
        let targets = arrows.entry(top.clone()).or_default();
        for name in crate_references(&code) {
            if name != top {
                targets.insert(name);
            }
        }
    }
    arrows
}

/// The top-level modules `code` names as `crate::NAME`, or inside a grouped
/// `use crate::{a, b::c, ..}` (nested groups included).
fn crate_references(code: &str) -> BTreeSet<String> {
    let word = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect()
    };
    let mut names = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + 7..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group's top-level items: split at commas outside nested braces.
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        names.insert(word(&group[start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(word(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            names.insert(word(rest));
        }
    }
    names.retain(|n| !n.is_empty() && n != "self");
    names
}

#[test]
fn grouped_imports_count_as_arrows() {
    let code = "use crate::{a, b::{C, d}, e::f};\nlet x = crate::g::h();\nuse crate::{self as me};";
    let names: Vec<String> = crate_references(code).into_iter().collect();
    assert_eq!(names, ["a", "b", "e", "g"]);
}

#[test]
fn baton_core_modules_form_no_cycle() {
    let arrows = arrows();
    assert!(arrows.contains_key("master") && arrows.contains_key("supervisor"));
    fn visit(
        node: &str,
        arrows: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        path.push(node.to_string());
        for next in arrows.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, arrows, path) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    for node in arrows.keys() {
        let cycle = visit(node, &arrows, &mut Vec::new());
        assert!(cycle.is_none(), "{cycle:?} in {arrows:#?}");
    }
}

#[test]
fn the_state_machine_and_the_configuration_do_not_name_the_upgrade_format() {
    let arrows = arrows();
    for module in ["supervisor", "config", "codec", "histogram", "intent"] {
        let targets = &arrows[module];
        for forbidden in ["upgrade", "master"] {
            assert!(
                !targets.contains(forbidden),
                "{module} refers to crate::{forbidden}: {targets:?}"
            );
        }
    }
    assert!(
        !arrows["supervisor"].contains("config"),
        "the state machine decides with its own model, not the configuration"
    );
}

#[test]
fn rooms_stay_small_and_say_what_they_touch() {
    let mut files = Vec::new();
    for krate in [
        "baton",
        "baton-core",
        "baton-proto",
        "baton-sys",
        "baton-worker",
    ] {
        rust_files(
            &workspace().join("crates").join(krate).join("src"),
            &mut files,
        );
    }
    assert!(files.len() > 30, "{files:?}");
    let mut too_long = Vec::new();
    for file in files.iter().filter(|f| !is_test_file(f)) {
        let text = std::fs::read_to_string(file).unwrap();
        let lines = match text.find("#[cfg(test)]\nmod tests {") {
            Some(cut) => text[..cut].lines().count(),
            None => text.lines().count(),
        };
        let name = file.to_string_lossy();
        let limit = if name.ends_with("baton-core/src/master.rs") {
            600
        } else {
            800
        };
        if lines > limit {
            too_long.push(format!("{name}: {lines} lines (limit {limit})"));
        }
        assert!(
            !code(file).contains("use super::*;"),
            "{name}: imports say what a room touches; no `use super::*`"
        );
    }
    assert!(too_long.is_empty(), "{too_long:#?}");
}

/// One door into the state machine: outside its own tests, `Supervisor::handle` is called in
/// one place, the master's `feed`, which runs the per-event hooks around it (issue 29).
#[test]
fn the_state_machine_has_one_door() {
    let mut files = Vec::new();
    rust_files(&workspace().join("crates/baton-core/src"), &mut files);
    let callers: Vec<String> = files
        .iter()
        .filter(|f| !is_test_file(f))
        .flat_map(|f| {
            let code = code(f);
            let name = f.to_string_lossy().into_owned();
            code.lines()
                .filter(|l| l.contains("supervisor.handle(") || l.contains(".handle(Instant"))
                .map(|l| format!("{name}: {}", l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(callers.len(), 1, "{callers:#?}");
    assert!(callers[0].contains("master/main_loop.rs"), "{callers:#?}");
}

/// docs/ARCHITECTURE.md names files and folders; every one exists (the map is kept honest).
/// A name is looked up from the workspace's root, from each crate's `src/`, and from `docs/`.
#[test]
fn every_path_the_architecture_page_names_exists() {
    let root = workspace();
    let text = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let lines = text.lines().count();
    assert!(
        lines <= 200,
        "ARCHITECTURE.md is a short map: {lines} lines"
    );
    let mut roots = vec![root.clone(), root.join("docs")];
    for krate in std::fs::read_dir(root.join("crates")).unwrap() {
        let krate = krate.unwrap().path();
        roots.push(krate.join("src"));
    }
    let mut named = BTreeSet::new();
    for quoted in text.split('`').skip(1).step_by(2) {
        let looks_like_a_path = quoted.ends_with('/')
            || [".rs", ".md", ".json", ".toml", ".yaml", ".sh"]
                .iter()
                .any(|e| quoted.ends_with(e));
        if looks_like_a_path && !quoted.contains(' ') {
            named.insert(quoted.to_string());
        }
    }
    for link in text.split("](").skip(1) {
        let target = link.split(')').next().unwrap_or("");
        if !target.starts_with("http") && !target.is_empty() {
            named.insert(target.split('#').next().unwrap_or("").to_string());
        }
    }
    assert!(named.len() > 20, "{named:?}");
    let missing: Vec<&String> = named
        .iter()
        .filter(|n| !roots.iter().any(|r| r.join(n).exists()))
        .collect();
    assert!(
        missing.is_empty(),
        "named in ARCHITECTURE.md, not found: {missing:?}"
    );
}

/// Every third-party dependency is declared once, in the workspace's manifest: a member names
/// it with `workspace = true` (or `.workspace = true`), never with a version of its own.
#[test]
fn dependencies_are_declared_once_in_the_workspace() {
    let root = workspace();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members: Vec<String> = manifest
        .split("members = [")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap()
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(members.len() >= 8, "{members:?}");
    let mut own = Vec::new();
    for member in &members {
        let text = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
        let mut in_dependencies = false;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                in_dependencies = line.contains("dependencies");
                continue;
            }
            if in_dependencies
                && !line.starts_with('#')
                && line.contains('=')
                && !line.contains("workspace = true")
                && !line.contains(".workspace")
                && !line.starts_with("workspace")
            {
                own.push(format!("{member}: {line}"));
            }
        }
    }
    assert!(
        own.is_empty(),
        "declare these in [workspace.dependencies]: {own:#?}"
    );
}

/// Log event names are written once, in `baton_proto::event`: the master logs them through its
/// constants (no `event = "..."` literal in the crates' code), and the harness reads its log by
/// them.
#[test]
fn log_event_names_are_written_once() {
    let mut files = Vec::new();
    for krate in ["baton", "baton-core", "baton-sys", "baton-worker"] {
        rust_files(
            &workspace().join("crates").join(krate).join("src"),
            &mut files,
        );
    }
    let literal: Vec<String> = files
        .iter()
        .filter(|f| !is_test_file(f))
        .filter(|f| code(f).contains("event = \""))
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    assert!(
        literal.is_empty(),
        "event names written as text: {literal:#?}"
    );
    let constants =
        std::fs::read_to_string(workspace().join("crates/baton-proto/src/event.rs")).unwrap();
    assert!(constants.contains("pub const RELOAD_SUCCEEDED: &str = \"reload_succeeded\";"));
}
