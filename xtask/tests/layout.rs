//! README.md's Layout section names every crate and every top-level folder, and nothing that is
//! not there.

use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The paths the Layout block lists: the first word of each line that ends with `/`.
fn listed() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("## Layout")
        .nth(1)
        .expect("README.md has a ## Layout section");
    let block = section
        .split("```")
        .nth(1)
        .expect("the Layout section starts with a code block");
    block
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.ends_with('/') && !l_is_continuation(w))
        .map(|w| w.trim_end_matches('/').to_string())
        .collect()
}

fn l_is_continuation(word: &str) -> bool {
    // Continuation lines start with prose, not a path.
    !word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

/// Every crate folder and every top-level folder that git would track.
fn present() -> BTreeSet<String> {
    let ignored = ["target", "out", ".git", ".venv", "venv"];
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(root()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_dir()
            && !ignored
                .iter()
                .any(|i| name == *i || name.starts_with(".venv"))
        {
            if name == "crates" {
                for c in std::fs::read_dir(e.path()).unwrap() {
                    let c = c.unwrap();
                    if c.file_type().unwrap().is_dir() {
                        out.insert(format!("crates/{}", c.file_name().to_string_lossy()));
                    }
                }
            } else {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn readme_layout_matches_the_tree() {
    let listed = listed();
    let present = present();
    let missing: Vec<_> = present.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&present).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "README.md's Layout section is out of date: not listed {missing:?}, listed but absent {stale:?}"
    );
}

#[test]
fn include_paths_stay_inside_their_crate() {
    // `cargo package` ships a crate's folder only: an include_str!/include_bytes! that reaches
    // outside it builds here and fails for a registry user.
    for c in std::fs::read_dir(root().join("crates")).unwrap() {
        let krate = c.unwrap().path().canonicalize().unwrap();
        let mut stack = vec![krate.join("src")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                if p.extension().is_none_or(|x| x != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap();
                for (i, _) in text.match_indices("include_") {
                    let rest = &text[i..];
                    let Some(arg) = rest
                        .strip_prefix("include_str!(\"")
                        .or_else(|| rest.strip_prefix("include_bytes!(\""))
                    else {
                        continue;
                    };
                    let rel = &arg[..arg.find('"').unwrap()];
                    let target = p
                        .parent()
                        .unwrap()
                        .join(rel)
                        .canonicalize()
                        .unwrap_or_else(|e| panic!("{}: include of {rel}: {e}", p.display()));
                    assert!(
                        target.starts_with(&krate),
                        "{} includes {rel}, outside its crate {}",
                        p.display(),
                        krate.display()
                    );
                }
            }
        }
    }
}
