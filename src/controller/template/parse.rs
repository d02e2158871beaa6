//! The cloud file's parser: serde structs that check every field as serde_yaml_ng reads it, so an
//! error carries the field's path and position; the one-key mappings (`- podman: {...}`,
//! `- emptyDirVolume: {...}`) and the plugin's alternative forms (a map or a `[{key, value}]`
//! list, a `k=v,k=v` node selector) by hand. A template's Pod YAML is parsed strictly into
//! k8s-openapi's `Pod`: a field it does not know is an error naming its path.

use super::{
    CloudKind, CloudSpec, ConfigError, ContainerTemplate, MergeStrategy, PodTemplate, Retention,
    TemplateVolume, MAX_FILE, MAX_NESTING, MAX_TEMPLATE_NAME,
};
use crate::controller::labels;
use crate::controller::pipeline::depth;
use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

/// Most clouds in one file, templates in one cloud, containers or volumes in one template, and
/// entries in one map (labels, env): far above any real use, small enough that aliases cannot
/// make a 1 MiB file build a large model.
const MAX_ITEMS: usize = 256;
/// Longest string kept from a scalar (an image, a path, a label value), in bytes; the Pod YAML
/// and a server certificate may be longer (up to the file's size).
const MAX_SCALAR: usize = 4096;
/// Pod labels every pod gets when a cloud names none (the plugin's default).
const DEFAULT_POD_LABELS: [(&str, &str); 1] = [("jenkins", "slave")];

pub(super) fn parse_clouds(text: &str) -> Result<Vec<CloudSpec>, ConfigError> {
    check_size_and_depth(text, "the file")?;
    let file: Option<File> =
        serde_yaml_ng::from_str(text).map_err(|e| locate_in_block(text, from_yaml(&e)))?;
    let Some(file) = file else {
        return Err(ConfigError {
            line: None,
            column: None,
            message: "the file is empty; expected \"clouds:\" with a list of clouds such as \
                      \"- podman: {name: local, templates: [...]}\""
                .into(),
        });
    };
    Ok(file.clouds.0)
}

/// Refuse text over [`MAX_FILE`] bytes or nested deeper than [`MAX_NESTING`], before parsing it.
fn check_size_and_depth(text: &str, what: &str) -> Result<(), ConfigError> {
    if text.len() > MAX_FILE {
        return Err(ConfigError {
            line: None,
            column: None,
            message: format!("{what} is {} bytes; the limit is {MAX_FILE} (1 MiB)", text.len()),
        });
    }
    depth::scan(text, MAX_NESTING).map_err(|d| ConfigError {
        line: Some(d.line),
        column: Some(d.column),
        message: format!(
            "{what} nests deeper than {MAX_NESTING} levels here (counting [ ], {{ }} and indented blocks)"
        ),
    })?;
    Ok(())
}

/// serde_yaml_ng's error as a [`ConfigError`]: its position taken out of the text, and serde's
/// "unknown field" and "unknown variant" messages given a suggestion.
pub(crate) fn from_yaml(e: &serde_yaml_ng::Error) -> ConfigError {
    let mut text = e.to_string();
    if text.starts_with("deserializing from YAML containing more than one document") {
        text = "the YAML holds more than one document (\"---\"); put everything in one".into();
    }
    let (mut line, mut column) = (None, None);
    if let Some(loc) = e.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(i) = text.find(&suffix) {
            text = format!("{}{}", &text[..i], &text[i + suffix.len()..]);
            (line, column) = (Some(loc.line()), Some(loc.column()));
        }
    }
    ConfigError { line, column, message: suggest(&join_index(&text)) }
}

/// `clouds: [1]: ...` (a list's own error naming an element) as `clouds[1]: ...`.
fn join_index(text: &str) -> String {
    if let Some(i) = text.find(": [") {
        let rest = &text[i + 2..];
        if let Some(end) = rest.find("]: ") {
            if end > 1 && rest[1..end].bytes().all(|b| b.is_ascii_digit()) && !text[..i].contains(' ') {
                return format!("{}{rest}", &text[..i]);
            }
        }
    }
    text.to_string()
}

/// Where an error inside a template's Pod YAML is in the file: when the YAML is a block scalar
/// (`yaml: |`) at `(line, column)`, its line L, column C is the file's line `line + L`, column
/// `indent + C`. Other forms of string keep the YAML's own position in the message.
fn locate_in_block(text: &str, mut e: ConfigError) -> ConfigError {
    const MARK: &str = " (at its line ";
    let (Some(line), Some(column)) = (e.line, e.column) else { return e };
    let Some(at) = e.message.rfind(MARK) else { return e };
    let inner = e.message[at + MARK.len()..].trim_end_matches(')');
    let Some((l, c)) = inner.split_once(", column ") else { return e };
    let (Ok(l), Ok(c)) = (l.parse::<usize>(), c.parse::<usize>()) else { return e };
    let mut lines = text.lines().skip(line - 1);
    let Some(head) = lines.next() else { return e };
    if !matches!(head.chars().nth(column - 1), Some('|' | '>')) {
        return e;
    }
    let Some(indent) = lines.find(|s| !s.trim().is_empty()).map(|s| s.len() - s.trim_start().len()) else {
        return e;
    };
    e.message.truncate(at);
    e.line = Some(line + l);
    e.column = Some(indent + c);
    e
}

/// Add "did you mean" to serde's `unknown field `x`, expected one of `a`, `b`` (and the same for
/// variants), and quote names the way the rest of wisp's messages do.
fn suggest(message: &str) -> String {
    for what in ["unknown field `", "unknown variant `"] {
        let Some(start) = message.find(what) else { continue };
        let rest = &message[start + what.len()..];
        let Some(end) = rest.find('`') else { continue };
        let given = &rest[..end];
        let tail = &rest[end + 1..];
        let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let hint = expected
            .iter()
            .filter(|f| close(f, given))
            .min_by_key(|f| distance(f, given))
            .map(|f| format!(" (did you mean \"{f}\"?)"))
            .unwrap_or_default();
        let list = expected.iter().map(|f| format!("\"{f}\"")).collect::<Vec<_>>().join(", ");
        let kind = if what.contains("field") { "field" } else { "value" };
        let list = if expected.is_empty() { String::new() } else { format!("; expected one of {list}") };
        return format!("{}unknown {kind} \"{given}\"{hint}{list}", &message[..start]);
    }
    match message.find("missing field `") {
        Some(i) => format!("{}missing field \"{}", &message[..i], message[i + 15..].replacen('`', "\"", 1)),
        None => message.to_string(),
    }
}

/// Whether `b` is close enough to `a` to suggest `a`: within one edit for short names, two for
/// longer ones, ignoring case.
fn close(a: &str, b: &str) -> bool {
    let d = distance(a, b);
    d <= if a.len() > 6 { 2 } else { 1 }
}

/// Edit distance (insertions, deletions, substitutions, swaps of neighbours), ignoring case.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    if a.len().abs_diff(b.len()) > 2 || b.len() > 64 {
        return usize::MAX;
    }
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

// ---------------------------------------------------------------------------------------------
// Checks on one scalar, each returning the message serde_yaml_ng positions at the value.

fn check_len(s: &str, limit: usize) -> Result<(), String> {
    if s.len() > limit {
        return Err(format!("is {} bytes long; the limit is {limit}", s.len()));
    }
    if s.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    Ok(())
}

/// A DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`) of at most `limit` characters.
fn check_dns_label(s: &str, what: &str, limit: usize) -> Result<(), String> {
    const RULE: &str = "use lower-case letters, digits and '-', starting and ending with a letter or digit";
    if s.is_empty() {
        return Err(format!("{what} is empty; {RULE}"));
    }
    if let Some((i, c)) =
        s.char_indices().find(|&(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
    {
        return Err(format!("{what} {s:?} has {c:?} at column {}; {RULE}", s[..i].chars().count() + 1));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!("{what} {s:?} starts or ends with '-'; {RULE}"));
    }
    if s.len() > limit {
        return Err(format!("{what} {s:?} is {} characters long; the limit is {limit}", s.len()));
    }
    Ok(())
}

fn check_template_name(s: &str) -> Result<String, String> {
    check_dns_label(s, "template name", MAX_TEMPLATE_NAME)
        .map_err(|e| format!("{e} (pods are named NAME-xxxxx, at most 63 characters)"))?;
    Ok(s.to_string())
}

fn check_container_name(s: &str) -> Result<String, String> {
    check_dns_label(s, "container name", 63)?;
    Ok(s.to_string())
}

fn check_cloud_name(s: &str) -> Result<String, String> {
    // A cloud's name is a node's origin and appears in labels and URLs: the node label rules.
    labels::validate_label(s).map_err(|e| format!("cloud name: {e}"))?;
    Ok(s.to_string())
}

/// The labels a template serves: whitespace-separated node labels.
fn check_template_label(s: &str) -> Result<Option<String>, String> {
    check_len(s, labels::MAX_EXPR_LEN)?;
    for l in s.split_whitespace() {
        labels::validate_label(l)
            .map_err(|e| format!("{e} (label is a space-separated list of labels, not an expression)"))?;
    }
    let t = s.split_whitespace().collect::<Vec<_>>().join(" ");
    Ok(if t.is_empty() { None } else { Some(t) })
}

fn check_inherit_from(s: &str) -> Result<String, String> {
    check_len(s, labels::MAX_EXPR_LEN)?;
    for n in s.split_whitespace() {
        check_template_name(n).map_err(|e| format!("inheritFrom names templates: {e}"))?;
    }
    Ok(s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn check_text(s: &str) -> Result<String, String> {
    check_len(s, MAX_SCALAR)?;
    Ok(s.to_string())
}

fn check_nonempty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("is empty; give a value or leave the field out".into());
    }
    check_text(s)
}

fn check_image(s: &str) -> Result<String, String> {
    check_len(s, MAX_SCALAR)?;
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{s:?} is not an image reference (e.g. \"localhost/busybox:wisp\")"));
    }
    Ok(s.to_string())
}

fn check_abs_path(s: &str) -> Result<String, String> {
    check_len(s, MAX_SCALAR)?;
    if !s.starts_with('/') {
        return Err(format!("{s:?} is not an absolute path"));
    }
    Ok(s.to_string())
}

fn check_url(s: &str) -> Result<String, String> {
    check_len(s, MAX_SCALAR)?;
    if !(s.starts_with("http://") || s.starts_with("https://")) || s.chars().any(char::is_whitespace) {
        return Err(format!("{s:?} is not an http:// or https:// URL"));
    }
    Ok(s.to_string())
}

fn check_host_port(s: &str) -> Result<String, String> {
    check_len(s, MAX_SCALAR)?;
    let port = s.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
    match port {
        Some((h, Ok(p))) if !h.is_empty() && p > 0 && !h.contains(char::is_whitespace) => Ok(s.to_string()),
        _ => Err(format!("{s:?} is not host:port (e.g. \"controller:50000\")")),
    }
}

fn check_env_name(s: &str) -> Result<String, String> {
    let mut b = s.bytes();
    let ok = matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_');
    if !ok || s.len() > MAX_SCALAR {
        return Err(format!(
            "{s:?} is not a valid variable name (use letters, digits and \"_\", not starting with a digit)"
        ));
    }
    Ok(s.to_string())
}

/// A Kubernetes label or annotation key: `[prefix/]name`, the name at most 63 characters of
/// `[A-Za-z0-9._-]` starting and ending with a letter or digit, the prefix a DNS subdomain.
pub(super) fn check_label_key(s: &str) -> Result<String, String> {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| check_dns_label(part, "prefix", 63).is_ok());
        if !ok {
            return Err(format!("key {s:?} has a bad prefix {p:?}; use a DNS name such as \"example.com/\""));
        }
    }
    if name.is_empty() || !valid_label_value(name) {
        return Err(format!(
            "key {s:?}: the name part must be 1 to 63 letters, digits, '-', '_' or '.', starting and ending \
             with a letter or digit"
        ));
    }
    Ok(s.to_string())
}

/// Whether `s` is a valid Kubernetes label value: at most 63 characters of `[A-Za-z0-9._-]`,
/// starting and ending with a letter or digit (or empty).
pub(super) fn valid_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_none_or(u8::is_ascii_alphanumeric)
        && b.last().is_none_or(u8::is_ascii_alphanumeric)
}

fn check_label_value(s: &str) -> Result<String, String> {
    if !valid_label_value(s) {
        return Err(format!(
            "label value {s:?} must be at most 63 letters, digits, '-', '_' or '.', starting and ending with a \
             letter or digit"
        ));
    }
    Ok(s.to_string())
}

/// A template's Pod YAML: bounded, then parsed strictly into k8s-openapi's `Pod`.
pub(super) fn check_pod_yaml(s: &str) -> Result<Option<String>, String> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    let at = |e: &ConfigError| match (e.line, e.column) {
        (Some(l), Some(c)) => format!(" (at its line {l}, column {c})"),
        _ => String::new(),
    };
    check_size_and_depth(s, "the Pod YAML").map_err(|e| format!("{}{}", e.message, at(&e)))?;
    let mut unknown = Vec::new();
    let de = serde_yaml_ng::Deserializer::from_str(s);
    let pod: Option<Pod> =
        serde_ignored::deserialize(de, |path| unknown.push(show_path(&path))).map_err(|e| {
            let e = from_yaml(&e);
            format!("the Pod YAML is not a Pod: {}{}", e.message, at(&e))
        })?;
    if let Some(path) = unknown.first() {
        return Err(format!(
            "the Pod YAML has a field Kubernetes' Pod does not have: {path} (check its spelling and indentation)"
        ));
    }
    if pod.as_ref().is_some_and(|p| p.status.is_some()) {
        return Err("the Pod YAML sets \"status\"; a template describes only metadata and spec".into());
    }
    Ok(Some(s.to_string()))
}

/// A path serde_ignored reports, written as wisp writes paths: `spec.containers[0].imagee`.
fn show_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match p {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", show_path(parent)),
        Path::Map { parent, key } => match show_path(parent) {
            s if s.is_empty() => key.clone(),
            s => format!("{s}.{key}"),
        },
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            show_path(parent)
        }
    }
}

/// A list of strings, or one string split on whitespace (the plugin's `command: 'cat'`).
fn check_words(s: &str) -> Result<Vec<String>, String> {
    check_len(s, MAX_SCALAR)?;
    if s.contains(['"', '\'', '\\']) {
        return Err(format!(
            "{s:?} has quotes or backslashes; give the words as a list instead, such as [sh, -c, \"...\"]"
        ));
    }
    Ok(s.split_whitespace().map(str::to_string).collect())
}

// ---------------------------------------------------------------------------------------------
// Deserialisation helpers. A function named `de_*` is a `deserialize_with` for one field.

/// A scalar read as its text and checked.
struct Checked<T>(fn(&str) -> Result<T, String>, &'static str);

impl<'de, T> Visitor<'de> for Checked<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
}

fn text<'de, D: Deserializer<'de>, T>(
    d: D,
    check: fn(&str) -> Result<T, String>,
    what: &'static str,
) -> Result<T, D::Error> {
    d.deserialize_str(Checked(check, what))
}

/// An optional scalar: null is `None`.
fn opt_text<'de, D: Deserializer<'de>, T>(
    d: D,
    check: fn(&str) -> Result<T, String>,
    what: &'static str,
) -> Result<Option<T>, D::Error> {
    struct Opt<T>(Checked<T>);
    impl<'de, T> Visitor<'de> for Opt<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0 .1)
        }
        fn visit_none<E: de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
            d.deserialize_str(self.0).map(Some)
        }
    }
    d.deserialize_option(Opt(Checked(check, what)))
}

macro_rules! de_text {
    ($name:ident, $opt:ident, $check:ident, $t:ty, $what:expr) => {
        #[allow(dead_code)]
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
            text(d, $check, $what)
        }
        #[allow(dead_code)]
        fn $opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$t>, D::Error> {
            opt_text(d, $check, $what)
        }
    };
}

de_text!(de_template_name, de_opt_template_name, check_template_name, String, "a template name");
de_text!(de_container_name, de_opt_container_name, check_container_name, String, "a container name");
de_text!(de_cloud_name, de_opt_cloud_name, check_cloud_name, String, "a cloud name");
de_text!(de_text_, de_opt_text, check_text, String, "a string");
de_text!(de_nonempty, de_opt_nonempty, check_nonempty, String, "a string");
de_text!(de_image, de_opt_image, check_image, String, "an image reference");
de_text!(de_abs_path, de_opt_abs_path, check_abs_path, String, "an absolute path");
de_text!(de_url, de_opt_url, check_url, String, "a URL");
de_text!(de_host_port, de_opt_host_port, check_host_port, String, "host:port");
de_text!(de_inherit_from, de_opt_inherit_from, check_inherit_from, String, "template names, space separated");

/// A long text such as a PEM certificate: bounded by the file's size only.
fn de_opt_long_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    opt_text(d, |s| check_len(s, MAX_FILE).map(|()| s.to_string()), "a string")
}

fn de_template_label<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(opt_text(d, check_template_label, "labels, space separated")?.flatten())
}

fn de_pod_yaml<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(opt_text(d, check_pod_yaml, "the YAML of a Pod, as a string (yaml: |)")?.flatten())
}

/// A count that must not be negative, up to its field's limit; checked in the visitor so that
/// the error is positioned at the number.
struct Count(u64);

impl<'de> Visitor<'de> for Count {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a whole number from 0 to {}", self.0)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
        if n < 0 {
            return Err(E::custom(format!("is {n}; it must be 0 or more")));
        }
        self.visit_u64(n as u64)
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
        if n > self.0 {
            return Err(E::custom(format!("is {n}; the limit is {}", self.0)));
        }
        Ok(n)
    }
}

/// [`Count`], or `None` for null.
struct OptCount(u64);

impl<'de> Visitor<'de> for OptCount {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Count(self.0).expecting(f)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(Count(self.0)).map(Some)
    }
}

fn de_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(d.deserialize_any(Count(u32::MAX.into()))? as u32)
}

fn de_opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Ok(d.deserialize_option(OptCount(u32::MAX.into()))?.map(|n| n as u32))
}

fn de_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(Count(i64::MAX as u64))
}

fn de_opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_option(OptCount(i64::MAX as u64))
}

/// A `{key: value}` map or the JCasC list form `[{key: k, value: v}]`, keys and values checked,
/// keys unique, at most [`MAX_ITEMS`].
struct KeyValues {
    key: fn(&str) -> Result<String, String>,
    value: fn(&str) -> Result<String, String>,
    expecting: &'static str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Kv {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

impl KeyValues {
    fn insert<E: de::Error>(&self, out: &mut Vec<(String, String)>, k: &str, v: &str) -> Result<(), E> {
        let k = (self.key)(k).map_err(E::custom)?;
        let v = (self.value)(v).map_err(|e| E::custom(format!("{k}: {e}")))?;
        if out.iter().any(|(o, _)| *o == k) {
            return Err(E::custom(format!("{k:?} is given twice")));
        }
        if out.len() == MAX_ITEMS {
            return Err(E::custom(format!("more than {MAX_ITEMS} entries")));
        }
        out.push((k, v));
        Ok(())
    }
}

impl<'de> Visitor<'de> for KeyValues {
    type Value = Vec<(String, String)>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(k) = map.next_key::<Scalar>()? {
            let v = map.next_value::<Option<Scalar>>()?.map(|s| s.0).unwrap_or_default();
            self.insert(&mut out, &k.0, &v)?;
        }
        Ok(out)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(kv) = seq.next_element::<Kv>()? {
            self.insert(&mut out, &kv.key, kv.value.as_deref().unwrap_or(""))?;
        }
        Ok(out)
    }
}

/// Any scalar, as the text it was written as (`1.10` stays "1.10").
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text(d, |s| check_len(s, MAX_SCALAR).map(|()| Scalar(s.to_string())), "a string, number or boolean")
    }
}

fn de_env<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    d.deserialize_any(KeyValues {
        key: check_env_name,
        value: check_text,
        expecting: "variables as {NAME: value} or [{key: NAME, value: value}]",
    })
}

fn de_labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let kv = d.deserialize_any(KeyValues {
        key: check_label_key,
        value: check_label_value,
        expecting: "labels as {key: value} or [{key: k, value: v}]",
    })?;
    Ok(kv.into_iter().collect())
}

fn de_opt_labels<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    de_labels(d).map(Some)
}

fn de_annotations<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let kv = d.deserialize_any(KeyValues {
        key: check_label_key,
        value: check_text,
        expecting: "annotations as {key: value} or [{key: k, value: v}]",
    })?;
    Ok(kv.into_iter().collect())
}

/// `nodeSelector`: the plugin's `key=value,key=value` string, or a map.
fn de_node_selector<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct NodeSelector;
    impl<'de> Visitor<'de> for NodeSelector {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("\"key=value,key=value\" or {key: value}")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            check_len(v, MAX_SCALAR).map_err(E::custom)?;
            let mut out = BTreeMap::new();
            for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let Some((k, val)) = pair.split_once('=') else {
                    return Err(E::custom(format!("{pair:?} is not key=value (write \"disk=ssd,zone=a\")")));
                };
                let k = check_label_key(k.trim()).map_err(E::custom)?;
                let val = check_label_value(val.trim()).map_err(E::custom)?;
                if out.insert(k.clone(), val).is_some() {
                    return Err(E::custom(format!("{k:?} is given twice")));
                }
            }
            Ok(out)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            let kv =
                KeyValues { key: check_label_key, value: check_label_value, expecting: "" }.visit_map(map)?;
            Ok(kv.into_iter().collect())
        }
    }
    d.deserialize_any(NodeSelector)
}

/// `imagePullSecrets`: `[name]` or `[{name: name}]`.
fn de_pull_secrets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Secret(String);
    impl<'de> Deserialize<'de> for Secret {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Secret;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a secret's name, or {name: NAME}")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                    check_dns_subdomain(v).map(Secret).map_err(E::custom)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Secret, A::Error> {
                    let mut name = None;
                    while let Some(k) = map.next_key::<String>()? {
                        if k != "name" || name.is_some() {
                            return Err(de::Error::custom(format!(
                                "unknown or repeated field {k:?}; expected only \"name\""
                            )));
                        }
                        name = Some(map.next_value::<Scalar>()?.0);
                    }
                    let name = name.ok_or_else(|| de::Error::custom("missing field \"name\""))?;
                    check_dns_subdomain(&name).map(Secret).map_err(de::Error::custom)
                }
            }
            d.deserialize_any(V)
        }
    }
    let list: Option<Vec<Secret>> = Option::deserialize(d)?;
    let mut out: Vec<String> = Vec::new();
    for Secret(s) in list.unwrap_or_default() {
        if out.len() == MAX_ITEMS {
            return Err(de::Error::custom(format!("more than {MAX_ITEMS} entries")));
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// An object name: a DNS subdomain (dot-separated DNS labels, at most 253 characters).
fn check_dns_subdomain(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 253 || !s.split('.').all(|p| check_dns_label(p, "name", 63).is_ok()) {
        return Err(format!(
            "{s:?} is not a Kubernetes object name (lower-case letters, digits, '-' and '.', at most 253)"
        ));
    }
    Ok(s.to_string())
}

/// `command`/`args`: a list of strings, or one string split on whitespace.
fn de_words<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct Words;
    impl<'de> Visitor<'de> for Words {
        type Value = Option<Vec<String>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of strings, such as [sleep, \"9999\"]")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            check_words(v).map(Some).map_err(E::custom)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(w) = seq.next_element::<Scalar>()? {
                if out.len() == MAX_ITEMS {
                    return Err(de::Error::custom(format!("more than {MAX_ITEMS} words")));
                }
                out.push(w.0);
            }
            Ok(Some(out))
        }
    }
    d.deserialize_any(Words)
}

/// `resources`: checked strictly against k8s-openapi's `ResourceRequirements`, kept as JSON.
fn de_resources<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    let mut unknown = Vec::new();
    let r: Option<ResourceRequirements> = serde_ignored::deserialize(d, |p| unknown.push(show_path(&p)))?;
    if let Some(p) = unknown.first() {
        return Err(de::Error::custom(format!(
            "unknown field {p:?}; resources has \"limits\", \"requests\" and \"claims\""
        )));
    }
    r.map(|r| serde_json::to_value(r).map_err(de::Error::custom)).transpose()
}

/// A list of at most [`MAX_ITEMS`] elements whose `name` must be unique.
struct Unique<T>(Vec<T>);

/// What [`Unique`] needs of an element.
trait Named {
    const WHAT: &'static str;
    fn name(&self) -> &str;
}

impl<'de, T: DeserializeOwned + Named> Deserialize<'de> for Unique<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: DeserializeOwned + Named> Visitor<'de> for V<T> {
            type Value = Unique<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of {}s", T::WHAT)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Unique(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<T> = Vec::new();
                while let Some(item) = seq.next_element::<T>()? {
                    let i = out.len();
                    if i == MAX_ITEMS {
                        return Err(de::Error::custom(format!("more than {MAX_ITEMS} {}s", T::WHAT)));
                    }
                    if !item.name().is_empty() {
                        if let Some(first) = out.iter().position(|o| o.name() == item.name()) {
                            return Err(de::Error::custom(format!(
                                "[{i}]: {} name {:?} is used twice (also at [{first}]); names must be unique",
                                T::WHAT,
                                item.name()
                            )));
                        }
                    }
                    out.push(item);
                }
                Ok(Unique(out))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<T> Default for Unique<T> {
    fn default() -> Self {
        Unique(Vec::new())
    }
}

/// A value written as a mapping with one key naming its kind (`- podman: {...}`).
trait OneKey: Sized {
    const KEYS: &'static [&'static str];
    fn value<'de, A: MapAccess<'de>>(key: &str, map: &mut A) -> Result<Self, A::Error>;
}

struct OneKeyVisitor<T>(PhantomData<T>);

impl<'de, T: OneKey> Visitor<'de> for OneKeyVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = T::KEYS.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(" or ");
        write!(f, "a mapping with one key, {keys}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let Some(key) = map.next_key::<String>()? else {
            let keys = T::KEYS.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(" or ");
            return Err(de::Error::custom(format!("is empty; expected one key, {keys}")));
        };
        if !T::KEYS.contains(&key.as_str()) {
            let list = T::KEYS.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            return Err(de::Error::custom(format!("unknown variant `{key}`, expected one of {list}")));
        }
        let v = T::value(&key, &mut map)?;
        if let Some(other) = map.next_key::<String>()? {
            return Err(de::Error::custom(format!(
                "has a second key {other:?} beside {key:?}; put it inside {key:?} (each list entry is one {key})"
            )));
        }
        Ok(v)
    }
}

// ---------------------------------------------------------------------------------------------
// The file.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    clouds: Unique<CloudSpec>,
}

impl Named for CloudSpec {
    const WHAT: &'static str = "cloud";
    fn name(&self) -> &str {
        &self.name
    }
}

impl<'de> Deserialize<'de> for CloudSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(OneKeyVisitor(PhantomData))
    }
}

impl OneKey for CloudSpec {
    const KEYS: &'static [&'static str] = &["podman", "kubernetes"];
    fn value<'de, A: MapAccess<'de>>(key: &str, map: &mut A) -> Result<Self, A::Error> {
        if key == "podman" {
            map.next_value::<podman::Cloud>().map(|c| c.0)
        } else {
            map.next_value::<kubernetes::Cloud>().map(|c| c.0)
        }
    }
}

/// The raw mapping of one kind of cloud: the fields every cloud has, then `$extra`. Each kind
/// has its own struct so that an unknown field is refused with the fields that kind has.
macro_rules! raw_cloud {
    ($($extra:tt)*) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "camelCase")]
        struct Raw {
            #[serde(default, deserialize_with = "de_opt_cloud_name")]
            name: Option<String>,
            #[serde(default, deserialize_with = "de_u32")]
            container_cap: u32,
            #[serde(default, deserialize_with = "de_opt_labels")]
            pod_labels: Option<BTreeMap<String, String>>,
            #[serde(default)]
            pod_retention: Retention,
            #[serde(default)]
            web_socket: bool,
            #[serde(default)]
            direct_connection: bool,
            #[serde(default, deserialize_with = "de_opt_url")]
            jenkins_url: Option<String>,
            #[serde(default, deserialize_with = "de_opt_host_port")]
            jenkins_tunnel: Option<String>,
            #[serde(default, deserialize_with = "de_opt_image")]
            agent_image: Option<String>,
            #[serde(default)]
            templates: Unique<PodTemplate>,
            $($extra)*
        }

        impl Raw {
            /// The fields every cloud has, checked together.
            fn common(&mut self, kind: CloudKind) -> Result<CloudSpec, String> {
                let name = self
                    .name
                    .take()
                    .ok_or("missing field \"name\"; give the cloud a name such as \"name: local\"")?;
                if self.web_socket && self.direct_connection {
                    return Err("webSocket and directConnection are both true; agents use one of them".into());
                }
                if self.jenkins_tunnel.is_some() && !self.direct_connection {
                    return Err("jenkinsTunnel is used only with directConnection: true".into());
                }
                let templates = std::mem::take(&mut self.templates.0);
                if let Some(i) = templates.iter().position(|t| t.name.is_empty()) {
                    return Err(format!(
                        "templates[{i}]: missing field \"name\"; every template of a cloud needs one"
                    ));
                }
                let pod_labels = self.pod_labels.take().unwrap_or_else(|| {
                    DEFAULT_POD_LABELS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
                });
                Ok(CloudSpec {
                    name,
                    kind: Some(kind),
                    container_cap: self.container_cap,
                    pod_labels,
                    pod_retention: self.pod_retention,
                    web_socket: self.web_socket,
                    direct_connection: self.direct_connection,
                    jenkins_url: self.jenkins_url.take(),
                    jenkins_tunnel: self.jenkins_tunnel.take(),
                    agent_image: self.agent_image.take(),
                    templates,
                    ..CloudSpec::default()
                })
            }
        }

        /// A checked cloud of this kind.
        pub(super) struct Cloud(pub(super) CloudSpec);

        impl<'de> Deserialize<'de> for Cloud {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Raw::deserialize(d).and_then(|r| r.into_spec().map(Cloud).map_err(de::Error::custom))
            }
        }
    };
}

mod podman {
    use super::*;
    raw_cloud! {
        #[serde(default, deserialize_with = "de_opt_nonempty")]
        podman: Option<String>,
        #[serde(default, deserialize_with = "de_opt_nonempty")]
        network: Option<String>,
        #[serde(default, deserialize_with = "de_opt_nonempty")]
        socket: Option<String>,
    }
    impl Raw {
        fn into_spec(mut self) -> Result<CloudSpec, String> {
            let mut spec = self.common(CloudKind::Podman)?;
            spec.podman = self.podman;
            spec.network = self.network;
            spec.socket = self.socket;
            Ok(spec)
        }
    }
}

mod kubernetes {
    use super::*;
    raw_cloud! {
        #[serde(default, deserialize_with = "de_opt_namespace")]
        namespace: Option<String>,
        #[serde(default, deserialize_with = "de_opt_url")]
        server_url: Option<String>,
        #[serde(default, deserialize_with = "de_opt_long_text")]
        server_certificate: Option<String>,
        #[serde(default, deserialize_with = "de_opt_nonempty")]
        credentials_token: Option<String>,
        #[serde(default, deserialize_with = "de_opt_nonempty")]
        kubeconfig: Option<String>,
        #[serde(default, deserialize_with = "de_opt_nonempty")]
        context: Option<String>,
        #[serde(default)]
        skip_tls_verify: bool,
    }
    impl Raw {
        fn into_spec(mut self) -> Result<CloudSpec, String> {
            let mut spec = self.common(CloudKind::Kubernetes)?;
            spec.namespace = self.namespace;
            spec.server_url = self.server_url;
            spec.server_certificate = self.server_certificate;
            spec.credentials_token = self.credentials_token;
            spec.kubeconfig = self.kubeconfig;
            spec.context = self.context;
            spec.skip_tls_verify = self.skip_tls_verify;
            Ok(spec)
        }
    }
}

fn check_namespace(s: &str) -> Result<String, String> {
    check_dns_label(s, "namespace", 63)?;
    Ok(s.to_string())
}
de_text!(de_namespace, de_opt_namespace, check_namespace, String, "a namespace");

// ---------------------------------------------------------------------------------------------
// Templates.

impl Named for PodTemplate {
    const WHAT: &'static str = "template";
    fn name(&self) -> &str {
        &self.name
    }
}

impl<'de> Deserialize<'de> for PodTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawTemplate::deserialize(d).and_then(|r| PodTemplate::try_from(r).map_err(de::Error::custom))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTemplate {
    #[serde(default, deserialize_with = "de_opt_template_name")]
    name: Option<String>,
    #[serde(default, deserialize_with = "de_template_label")]
    label: Option<String>,
    #[serde(default, deserialize_with = "de_opt_inherit_from")]
    inherit_from: Option<String>,
    #[serde(default, deserialize_with = "de_pod_yaml")]
    yaml: Option<String>,
    #[serde(default)]
    yaml_merge_strategy: Option<MergeStrategy>,
    #[serde(default)]
    containers: Unique<ContainerTemplate>,
    #[serde(default, deserialize_with = "de_env")]
    env_vars: Vec<(String, String)>,
    #[serde(default)]
    volumes: Option<Vec<TemplateVolume>>,
    #[serde(default, deserialize_with = "de_node_selector")]
    node_selector: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "de_opt_service_account")]
    service_account: Option<String>,
    #[serde(default, deserialize_with = "de_pull_secrets")]
    image_pull_secrets: Vec<String>,
    #[serde(default, deserialize_with = "de_annotations")]
    annotations: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "de_labels")]
    labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "de_opt_u32")]
    instance_cap: Option<u32>,
    #[serde(default, deserialize_with = "de_u32")]
    idle_minutes: u32,
    #[serde(default)]
    pod_retention: Retention,
    #[serde(default, deserialize_with = "de_u64")]
    active_deadline_seconds: u64,
    #[serde(default, alias = "slaveConnectTimeout", deserialize_with = "de_opt_u64")]
    connect_timeout: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_container_name")]
    default_container: Option<String>,
}

fn check_service_account(s: &str) -> Result<String, String> {
    check_dns_subdomain(s)
}
de_text!(de_service_account, de_opt_service_account, check_service_account, String, "a service account name");

impl TryFrom<RawTemplate> for PodTemplate {
    type Error = String;
    fn try_from(r: RawTemplate) -> Result<Self, String> {
        let volumes = r.volumes.unwrap_or_default();
        if volumes.len() > MAX_ITEMS {
            return Err(format!("volumes: more than {MAX_ITEMS} volumes"));
        }
        for (i, v) in volumes.iter().enumerate() {
            if let Some(first) = volumes[..i].iter().position(|o| o.mount_path() == v.mount_path()) {
                return Err(format!(
                    "volumes[{i}]: mount path {:?} is used twice (also at volumes[{first}])",
                    v.mount_path()
                ));
            }
        }
        Ok(PodTemplate {
            name: r.name.unwrap_or_default(),
            label: r.label,
            inherit_from: r.inherit_from,
            yaml: r.yaml.into_iter().collect(),
            yaml_merge_strategy: r.yaml_merge_strategy,
            containers: r.containers.0,
            env_vars: r.env_vars,
            volumes,
            node_selector: r.node_selector,
            service_account: r.service_account,
            image_pull_secrets: r.image_pull_secrets,
            annotations: r.annotations,
            labels: r.labels,
            instance_cap: r.instance_cap,
            idle_minutes: r.idle_minutes,
            pod_retention: r.pod_retention,
            active_deadline_seconds: r.active_deadline_seconds,
            connect_timeout: r.connect_timeout,
            default_container: r.default_container,
        })
    }
}

impl Named for ContainerTemplate {
    const WHAT: &'static str = "container";
    fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawContainer {
    #[serde(deserialize_with = "de_container_name")]
    name: String,
    #[serde(default, deserialize_with = "de_opt_image")]
    image: Option<String>,
    #[serde(default, deserialize_with = "de_words")]
    command: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_words")]
    args: Option<Vec<String>>,
    #[serde(default, alias = "envVars", deserialize_with = "de_env")]
    env: Vec<(String, String)>,
    #[serde(default, deserialize_with = "de_opt_abs_path")]
    working_dir: Option<String>,
    #[serde(default, deserialize_with = "de_resources")]
    resources: Option<serde_json::Value>,
}

impl<'de> Deserialize<'de> for ContainerTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = RawContainer::deserialize(d)?;
        Ok(ContainerTemplate {
            name: r.name,
            image: r.image,
            command: r.command,
            args: r.args,
            env: r.env,
            working_dir: r.working_dir,
            resources: r.resources,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Volumes.

impl<'de> Deserialize<'de> for TemplateVolume {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(OneKeyVisitor(PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EmptyDir {
    #[serde(deserialize_with = "de_abs_path")]
    mount_path: String,
    #[serde(default)]
    memory: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HostPath {
    #[serde(deserialize_with = "de_abs_path")]
    host_path: String,
    #[serde(deserialize_with = "de_abs_path")]
    mount_path: String,
    #[serde(default)]
    read_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Claim {
    #[serde(deserialize_with = "de_dns_subdomain")]
    claim_name: String,
    #[serde(deserialize_with = "de_abs_path")]
    mount_path: String,
    #[serde(default)]
    read_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigMap {
    #[serde(deserialize_with = "de_dns_subdomain")]
    config_map_name: String,
    #[serde(deserialize_with = "de_abs_path")]
    mount_path: String,
    #[serde(default, deserialize_with = "de_opt_nonempty")]
    sub_path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Secret {
    #[serde(deserialize_with = "de_dns_subdomain")]
    secret_name: String,
    #[serde(deserialize_with = "de_abs_path")]
    mount_path: String,
}

de_text!(de_dns_subdomain, de_opt_dns_subdomain, check_dns_subdomain, String, "a Kubernetes object name");

impl OneKey for TemplateVolume {
    const KEYS: &'static [&'static str] =
        &["emptyDirVolume", "hostPathVolume", "persistentVolumeClaim", "configMapVolume", "secretVolume"];
    fn value<'de, A: MapAccess<'de>>(key: &str, map: &mut A) -> Result<Self, A::Error> {
        Ok(match key {
            "emptyDirVolume" => {
                let v: EmptyDir = map.next_value()?;
                TemplateVolume::EmptyDirVolume { mount_path: v.mount_path, memory: v.memory }
            }
            "hostPathVolume" => {
                let v: HostPath = map.next_value()?;
                TemplateVolume::HostPathVolume {
                    host_path: v.host_path,
                    mount_path: v.mount_path,
                    read_only: v.read_only,
                }
            }
            "persistentVolumeClaim" => {
                let v: Claim = map.next_value()?;
                TemplateVolume::PersistentVolumeClaim {
                    claim_name: v.claim_name,
                    mount_path: v.mount_path,
                    read_only: v.read_only,
                }
            }
            "configMapVolume" => {
                let v: ConfigMap = map.next_value()?;
                TemplateVolume::ConfigMapVolume {
                    config_map_name: v.config_map_name,
                    mount_path: v.mount_path,
                    sub_path: v.sub_path,
                }
            }
            _ => {
                let v: Secret = map.next_value()?;
                TemplateVolume::SecretVolume { secret_name: v.secret_name, mount_path: v.mount_path }
            }
        })
    }
}
