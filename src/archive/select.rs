//! Which entries of a tree an archive takes: include and exclude globs over `/`-separated paths
//! relative to the root, matched with `fast-glob`.

use super::{ArchiveError, MAX_PATH};

/// Include and exclude globs, checked by [`Selection::new`].
///
/// Patterns are matched against an entry's path relative to the root, `/`-separated, without a
/// leading `./` (`dist/app.js`, `target/release/wisp`). The syntax:
///
/// - `*` matches any run of characters within one path component (never `/`); `?` one character
///   (not `/`);
/// - `**` as a whole component matches any number of components, none included: `dist/**` is
///   everything under `dist`, `**/*.log` every `.log` file at any depth (the root's too);
/// - `[abc]`, `[a-z]`, `[!a]` (or `[^a]`) match one character of (or not of) a set;
/// - `{a,b}` matches either alternative (which may hold the other wildcards);
/// - `\` makes the next character literal.
///
/// An entry is taken when its own path matches an include pattern and neither it nor any
/// directory above it matches an exclude pattern: an excluded directory is not entered at all
/// (`exclude: ["**/node_modules"]`), and excludes win over includes. A directory that matches an
/// include is taken as a directory (empty, unless entries under it match too: write `dist/**` for
/// its content); the directories above a taken entry are always taken, so their modes and mtimes
/// travel too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    include: Vec<String>,
    exclude: Vec<String>,
}

impl Selection {
    /// Check the patterns: a clear error for an empty or malformed glob (an unclosed `[` or `{`, a
    /// trailing `\`), an absolute one, one with a `..` or `.` component (a leading `./` is
    /// dropped), a trailing `/`, or a leading `!` (negation: put the pattern in `exclude`). At
    /// least one include pattern is needed.
    pub fn new(include: Vec<String>, exclude: Vec<String>) -> Result<Selection, ArchiveError> {
        if include.is_empty() {
            return Err(ArchiveError::Pattern {
                pattern: String::new(),
                reason: "no include pattern: nothing would be selected".into(),
            });
        }
        let check_all =
            |list: Vec<String>| list.into_iter().map(check_pattern).collect::<Result<Vec<_>, _>>();
        Ok(Selection { include: check_all(include)?, exclude: check_all(exclude)? })
    }

    /// The include patterns (as checked: without a leading `./`).
    pub fn include(&self) -> &[String] {
        &self.include
    }

    /// The exclude patterns (as checked: without a leading `./`).
    pub fn exclude(&self) -> &[String] {
        &self.exclude
    }

    /// Whether `path` matches an include pattern.
    pub fn is_included(&self, path: &str) -> bool {
        self.include.iter().any(|g| fast_glob::glob_match(g, path))
    }

    /// Whether `path` matches an exclude pattern.
    pub fn is_excluded(&self, path: &str) -> bool {
        self.exclude.iter().any(|g| fast_glob::glob_match(g, path))
    }
}

fn check_pattern(pattern: String) -> Result<String, ArchiveError> {
    let bad = |reason: &str| ArchiveError::Pattern { pattern: pattern.clone(), reason: reason.into() };
    if pattern.trim().is_empty() {
        return Err(bad("empty pattern"));
    }
    if pattern.len() > MAX_PATH {
        return Err(bad("longer than 4096 bytes"));
    }
    if pattern.contains('\0') {
        return Err(bad("contains a NUL character"));
    }
    if pattern.starts_with('/') {
        return Err(bad("absolute: patterns are relative to the workspace (drop the leading /)"));
    }
    let mut p = pattern.as_str();
    while let Some(rest) = p.strip_prefix("./") {
        p = rest.trim_start_matches('/');
    }
    if p.is_empty() || p == "." {
        return Err(bad("matches only the workspace itself: write ** for everything in it"));
    }
    if p.starts_with('!') {
        return Err(bad("a leading ! (negation) is not supported: put the pattern in exclude"));
    }
    if p.ends_with('/') {
        return Err(bad("a trailing / matches nothing: write dir/** for a directory's content"));
    }
    for comp in p.split('/') {
        match comp {
            "" => return Err(bad("an empty path component (//)")),
            ".." => return Err(bad("a .. component: patterns cannot leave the workspace")),
            "." => return Err(bad("a . component in the middle never matches")),
            _ => {}
        }
    }
    fast_glob::validate(p).map_err(|e| bad(&e.to_string()))?;
    Ok(p.to_string())
}
