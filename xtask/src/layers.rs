//! The layer rule of `hyp/`: each folder imports only the folders below it.
//!
//! The allowed edges live in one place, `hyp/src/layers.txt`, next to the
//! folder docs (each folder's `mod.rs`). This reads every `crate::<folder>`
//! path in hyp's sources (code, not comments) and reports each one that points
//! at a folder its own folder may not use. `cargo xtask test` runs it through
//! the unit tests below, so an upward import fails CI.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Which layers each layer may use (from `layers.txt`).
#[derive(Debug)]
pub struct Table {
    allowed: BTreeMap<String, Vec<String>>,
}

impl Table {
    /// Parses `layer: used layers...` lines; `#` starts a comment.
    pub fn parse(text: &str) -> Result<Table, String> {
        let mut allowed = BTreeMap::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (layer, uses) = line
                .split_once(':')
                .ok_or_else(|| format!("layers.txt: no ':' in '{line}'"))?;
            let uses = uses.split_whitespace().map(str::to_string).collect();
            allowed.insert(layer.trim().to_string(), uses);
        }
        Ok(Table { allowed })
    }

    fn may_use(&self, from: &str, to: &str) -> bool {
        from == to
            || self
                .allowed
                .get(from)
                .is_some_and(|uses| uses.iter().any(|u| u == "*" || u == to))
    }
}

/// The layer a source file belongs to: its folder under `src/`, or `main`.
fn layer_of(rel: &Path) -> String {
    match rel.components().count() {
        1 => "main".to_string(),
        _ => rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// The layers named by `crate::<name>` paths in code (comments skipped).
/// Macros exported at the crate root (`crate::println!`) belong to `arch`.
pub fn imports(source: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let tail = &rest[at + "crate::".len()..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let layer = match name.as_str() {
                "print" | "println" => "arch".to_string(),
                _ => name,
            };
            if !layer.is_empty() {
                found.push((n + 1, layer));
            }
            rest = tail;
        }
    }
    found
}

/// Every upward import in `src` (hyp's `src/` folder), as readable lines.
pub fn violations(src: &Path, table: &Table) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut files = Vec::new();
    collect_rs(src, &mut files)?;
    files.sort();
    for file in files {
        let rel = file.strip_prefix(src).map_err(|e| e.to_string())?;
        let from = layer_of(rel);
        let text = fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        for (line, to) in imports(&text) {
            if table.allowed.contains_key(&to) && !table.may_use(&from, &to) {
                out.push(format!("{}:{line}: {from} -> {to}", rel.display()));
            }
        }
    }
    Ok(out)
}

/// Checks the workspace's `hyp/src` against its `layers.txt` (a step of
/// `cargo xtask test`, before anything is built).
pub fn check() -> Result<(), String> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hyp/src");
    let text = fs::read_to_string(src.join("layers.txt"))
        .map_err(|e| format!("hyp/src/layers.txt: {e}"))?;
    let bad = violations(&src, &Table::parse(&text)?)?;
    if bad.is_empty() {
        println!("xtask: hyp layers: no upward import");
        return Ok(());
    }
    Err(format!(
        "hyp imports against hyp/src/layers.txt:\n{}",
        bad.join("\n")
    ))
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<(), String> {
    for entry in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyp_src() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../hyp/src")
    }

    fn table() -> Table {
        let text = fs::read_to_string(hyp_src().join("layers.txt")).expect("hyp/src/layers.txt");
        Table::parse(&text).expect("layers.txt parses")
    }

    #[test]
    fn hyp_has_no_upward_imports() {
        let bad = violations(&hyp_src(), &table()).unwrap();
        assert!(
            bad.is_empty(),
            "imports against hyp/src/layers.txt:\n{}",
            bad.join("\n")
        );
    }

    #[test]
    fn every_folder_is_in_the_table() {
        let table = table();
        for entry in fs::read_dir(hyp_src()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    table.allowed.contains_key(&name),
                    "{name} not in layers.txt"
                );
            }
        }
    }

    #[test]
    fn an_upward_import_is_reported() {
        let table = Table::parse("arch:\nmm: arch\nvm: arch mm\n").unwrap();
        let dir = std::env::temp_dir().join(format!("layers-test-{}", std::process::id()));
        fs::create_dir_all(dir.join("mm")).unwrap();
        fs::write(
            dir.join("mm/a.rs"),
            "use crate::arch::x;\n// crate::vm in a comment\n",
        )
        .unwrap();
        assert!(violations(&dir, &table).unwrap().is_empty());
        fs::write(
            dir.join("mm/b.rs"),
            "fn f() { crate::vm::get(1); crate::println!(); }\n",
        )
        .unwrap();
        let bad = violations(&dir, &table).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(bad, vec!["mm/b.rs:1: mm -> vm".to_string()]);
    }
}
