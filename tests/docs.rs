//! The Markdown documentation can be navigated: every relative link in the repository's
//! Markdown files (`README.md`, `docs/*.md`, the chart's and the test server's READMEs)
//! points at a file or folder that exists, and every `#anchor` at a heading of the target
//! page, slugged as GitHub does. Every page in `docs/` is reachable from the README's map
//! and opens with a paragraph saying what it answers.
//!
//! Links are checked as GitHub renders them: nothing inside fenced code blocks or inline
//! code counts, and links with a scheme (`https:`, `mailto:`) are not followed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Folders that hold no documentation of this project: build output, installed packages,
/// dot-folders (`.git`, `.ci`).
fn skipped_dir(name: &str) -> bool {
    name.starts_with('.') || name == "target" || name == "node_modules"
}

/// Every Markdown file of the repository, relative to its root.
fn markdown_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(root().join(&dir))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.expect("a readable directory entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = dir.join(&name);
            let file_type = entry.file_type().expect("a file type");
            if file_type.is_dir() {
                if !skipped_dir(&name) {
                    dirs.push(path);
                }
            } else if name.ends_with(".md") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// GitHub's heading anchor: lowercase; letters, digits, `-` and `_` kept; spaces become
/// `-`; everything else (punctuation, backticks, symbols) dropped.
fn slug(heading: &str) -> String {
    heading
        .chars()
        .filter_map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                Some(c.to_lowercase().collect::<String>())
            } else if c == ' ' {
                Some("-".to_string())
            } else {
                None
            }
        })
        .collect()
}

/// A fence opener or closer: three or more backticks or tildes, after up to any
/// indentation (fences inside list items are indented).
fn fence(line: &str) -> Option<(char, usize)> {
    let trimmed = line.trim_start();
    let c = trimmed.chars().next()?;
    if c != '`' && c != '~' {
        return None;
    }
    let n = trimmed.chars().take_while(|&x| x == c).count();
    (n >= 3).then_some((c, n))
}

/// The Markdown outside fenced code blocks, as paragraphs (runs of non-blank lines), with
/// the line number each starts at.
fn paragraphs(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    let mut open: Option<(char, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some((c, n)) = open {
            if fence(line).is_some_and(|(c2, n2)| c2 == c && n2 >= n)
                && line.trim().chars().all(|x| x == c)
            {
                open = None;
            }
            continue;
        }
        if let Some(f) = fence(line) {
            open = Some(f);
            out.extend(current.take());
            continue;
        }
        if line.trim().is_empty() {
            out.extend(current.take());
            continue;
        }
        match &mut current {
            Some((_, p)) => {
                p.push('\n');
                p.push_str(line);
            }
            None => current = Some((i + 1, line.to_string())),
        }
    }
    out.extend(current);
    out
}

/// The anchors of a page's headings, with GitHub's `-1`, `-2` suffixes for repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, paragraph) in paragraphs(text) {
        for line in paragraph.lines() {
            let hashes = line.chars().take_while(|&c| c == '#').count();
            if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
                continue;
            }
            let heading = line[hashes..].trim().trim_end_matches('#').trim();
            let base = slug(heading);
            let n = seen.entry(base.clone()).or_insert(0);
            out.insert(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
    }
    out
}

/// A paragraph with its inline code spans removed (a span is a run of backticks up to the
/// next run of the same length; an unmatched run is literal text).
fn without_code_spans(paragraph: &str) -> String {
    let chars: Vec<char> = paragraph.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let n = chars[i..].iter().take_while(|&&c| c == '`').count();
        let mut j = i + n;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let m = chars[j..].iter().take_while(|&&c| c == '`').count();
                if m == n {
                    close = Some(j + m);
                    break;
                }
                j += m;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                out.push(' ');
                i = end;
            }
            None => {
                out.extend(&chars[i..i + n]);
                i += n;
            }
        }
    }
    out
}

/// The link targets of a page with their line numbers: inline links and images
/// `[text](target "title")` and reference definitions `[label]: target`.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (start, paragraph) in paragraphs(text) {
        let prose = without_code_spans(&paragraph);
        for (offset, line) in prose.lines().enumerate() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('[')
                && let Some((label, rest)) = trimmed.split_once("]:")
                && !label.contains(']')
                && let Some(target) = rest.split_whitespace().next()
            {
                out.push((start + offset, target.to_string()));
            }
            let mut rest = line;
            while let Some(at) = rest.find("](") {
                let after = &rest[at + 2..];
                let end = after.find(')').unwrap_or(after.len());
                let inside = after[..end].trim();
                let target = inside
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches('<')
                    .trim_end_matches('>');
                out.push((start + offset, target.to_string()));
                rest = &after[end..];
            }
        }
    }
    out
}

/// `a/b/../c` → `a/c`; `None` when the path leaves the repository.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Problems with the links of `pages` (path relative to the repository → contents).
/// `exists` says whether a repository path (file or folder) exists; Markdown targets are
/// looked up in `pages` for their anchors.
fn check_links(pages: &BTreeMap<PathBuf, String>, exists: &dyn Fn(&Path) -> bool) -> Vec<String> {
    let mut problems = Vec::new();
    let anchor_sets: BTreeMap<&PathBuf, BTreeSet<String>> =
        pages.iter().map(|(p, t)| (p, anchors(t))).collect();
    for (page, text) in pages {
        for (line, target) in links(text) {
            let at = format!("{}:{line}: `{target}`", page.display());
            if target.is_empty() {
                problems.push(format!("{at}: empty link"));
                continue;
            }
            let scheme = target
                .split_once(':')
                .is_some_and(|(s, _)| !s.is_empty() && !s.contains('/') && !s.contains('#'));
            if scheme {
                continue;
            }
            let (path_part, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if path_part.is_empty() {
                Some(page.clone())
            } else if let Some(absolute) = path_part.strip_prefix('/') {
                normalize(Path::new(absolute))
            } else {
                normalize(&page.parent().unwrap_or(Path::new("")).join(path_part))
            };
            let Some(resolved) = resolved else {
                problems.push(format!("{at}: leaves the repository"));
                continue;
            };
            if !path_part.is_empty() && !exists(&resolved) {
                problems.push(format!("{at}: {} does not exist", resolved.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if !resolved.to_string_lossy().ends_with(".md") {
                continue; // a line anchor into source code, say; GitHub resolves those
            }
            match anchor_sets.get(&resolved) {
                Some(set) if set.contains(anchor) => {}
                Some(set) => problems.push(format!(
                    "{at}: no heading #{anchor} in {} (it has: {})",
                    resolved.display(),
                    set.iter().cloned().collect::<Vec<_>>().join(", ")
                )),
                None => problems.push(format!(
                    "{at}: {} is not a checked Markdown page",
                    resolved.display()
                )),
            }
        }
    }
    problems
}

fn repository_pages() -> BTreeMap<PathBuf, String> {
    markdown_files()
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(root().join(&p))
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let pages = repository_pages();
    for expected in [
        "README.md",
        "charts/audience-token-operator/README.md",
        "docs/concepts.md",
    ] {
        assert!(
            pages.contains_key(Path::new(expected)),
            "{expected} was not found, so the walk is wrong"
        );
    }
    let problems = check_links(&pages, &|p: &Path| root().join(p).exists());
    assert!(
        problems.is_empty(),
        "broken links in the documentation:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_docs_page_is_in_the_readme_map_and_says_what_it_answers() {
    let pages = repository_pages();
    let readme_targets: BTreeSet<String> = links(&pages[Path::new("README.md")])
        .into_iter()
        .map(|(_, t)| t.split('#').next().unwrap_or_default().to_string())
        .collect();
    let docs: Vec<&PathBuf> = pages.keys().filter(|p| p.starts_with("docs")).collect();
    assert!(docs.len() >= 9, "docs/ has only {} pages", docs.len());
    for page in docs {
        let name = page.to_string_lossy().replace('\\', "/");
        assert!(
            readme_targets.contains(&name),
            "{name} is not linked from README.md's map"
        );
        let text = &pages[page];
        let paras = paragraphs(text);
        assert!(
            paras.first().is_some_and(|(_, p)| p.starts_with("# ")),
            "{name} does not start with a title"
        );
        let intro = paras
            .iter()
            .skip(1)
            .find(|(_, p)| !p.starts_with("<!--"))
            .map(|(_, p)| p.as_str())
            .unwrap_or_default();
        assert!(
            intro.starts_with("This page answers"),
            "{name}: the paragraph after the title should say what the page answers; it is:\n{intro}"
        );
    }
}

#[test]
fn slugs_follow_github() {
    for (heading, anchor) in [
        (
            "Authorization details (RFC 9396)",
            "authorization-details-rfc-9396",
        ),
        (
            "Secretless issuers: ServiceAccount tokens",
            "secretless-issuers-serviceaccount-tokens",
        ),
        ("Status / roadmap", "status--roadmap"),
        (
            "Refresh-token chains and `login`",
            "refresh-token-chains-and-login",
        ),
        (
            "By hand (kind or k3d, operator run locally)",
            "by-hand-kind-or-k3d-operator-run-locally",
        ),
        (
            "Where DESIGN.md was silent or changed",
            "where-designmd-was-silent-or-changed",
        ),
        ("snake_case stays", "snake_case-stays"),
    ] {
        assert_eq!(slug(heading), anchor, "{heading}");
    }
}

/// The checker is only worth something if it fails on broken links: a page set with one
/// good link of each kind and one broken link of each kind.
#[test]
fn the_link_checker_catches_what_it_should() {
    let page = |s: &str| s.to_string();
    let pages: BTreeMap<PathBuf, String> = [
        (
            PathBuf::from("README.md"),
            page(
                "# Title\n\n## Quick start\n\nSee [a](docs/a.md), [b](docs/a.md#part-one), \
                 [here](#quick-start), [ex](examples/), [web](https://example.com/x#y).\n\
                 Broken: [c](docs/missing.md), [d](docs/a.md#no-such-part), [e](#nowhere),\n\
                 [f](../outside.md), ![img](img/missing.png).\n\n\
                 `[not a link](nowhere.md)` and\n\n```md\n[also not](nowhere.md)\n```\n\n\
                 [ref]: docs/gone.md\n",
            ),
        ),
        (
            PathBuf::from("docs/a.md"),
            page("# A\n\n## Part one\n\n## Part one\n\nBack to [the top](../README.md#title), [twice](#part-one-1).\n"),
        ),
    ]
    .into_iter()
    .collect();
    let existing: BTreeSet<PathBuf> = ["README.md", "docs/a.md", "examples"]
        .iter()
        .map(PathBuf::from)
        .collect();
    let problems = check_links(&pages, &|p: &Path| existing.contains(p));
    let text = problems.join("\n");
    for expected in [
        "README.md:6: `docs/missing.md`: docs/missing.md does not exist",
        "README.md:6: `docs/a.md#no-such-part`: no heading #no-such-part",
        "README.md:6: `#nowhere`: no heading #nowhere in README.md",
        "README.md:7: `../outside.md`: leaves the repository",
        "README.md:7: `img/missing.png`: img/missing.png does not exist",
        "README.md:15: `docs/gone.md`: docs/gone.md does not exist",
    ] {
        assert!(text.contains(expected), "missed {expected:?}; got:\n{text}");
    }
    assert_eq!(
        problems.len(),
        6,
        "only the broken links are reported:\n{text}"
    );
}
