//! Node labels and Jenkins-style label expressions (`linux && (x86_64 || arm64) && !slow`).

use std::fmt;

/// Longest label expression accepted, in bytes.
pub const MAX_EXPR_LEN: usize = 1024;
/// Deepest nesting of parentheses and `!` in a label expression.
pub const MAX_DEPTH: usize = 32;
/// Longest node label (and node name), in bytes; matches the protocol's limit on names.
pub const MAX_LABEL_LEN: usize = crate::proto::MAX_NAME;

/// Said after a refused character, so every message names the same charset.
const CHARSET: &str = "letters, digits and _ . : / + -";

/// Whether `c` may appear in a label, a node name or an unquoted atom.
fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '+' | '-')
}

/// An error in a label expression or a node label, as a sentence that says where and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelError {
    message: String,
}

impl LabelError {
    fn new(message: String) -> Self {
        Self { message }
    }
}

impl fmt::Display for LabelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LabelError {}

/// A parsed label expression; see [`parse`]. The default expression matches every node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelExpr {
    /// `None` for the empty expression, which matches any node.
    root: Option<Node>,
}

/// One node of the expression tree. `&&` and `||` are n-ary and flattened, so a long chain
/// `a && b && c ...` is one wide node rather than a deep tree, and printing then re-parsing gives
/// back an equal tree.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Atom(String),
    Not(Box<Node>),
    All(Vec<Node>),
    Any(Vec<Node>),
}

impl LabelExpr {
    /// True when the node with these labels matches; pass the node's name among `labels`, since
    /// an atom matches a node when it equals one of the node's labels or the node's name.
    pub fn matches(&self, labels: &[String]) -> bool {
        match &self.root {
            None => true,
            Some(node) => node.matches(labels),
        }
    }

    /// True for the empty expression, which matches every node.
    pub fn is_any(&self) -> bool {
        self.root.is_none()
    }

    /// Labels of which every matching node has at least one, so that only nodes with one of them
    /// need testing; None when there are none such (the empty expression, `!a`, `a || !b`).
    pub fn required_labels(&self) -> Option<Vec<&str>> {
        self.root.as_ref()?.required_labels()
    }
}

impl Node {
    fn required_labels(&self) -> Option<Vec<&str>> {
        match self {
            Node::Atom(a) => Some(vec![a.as_str()]),
            Node::Not(_) => None,
            // A match matches every operand: the operand with the fewest such labels will do.
            Node::All(ns) => ns.iter().filter_map(Node::required_labels).min_by_key(Vec::len),
            // A match matches some operand: it has a label of that one's.
            Node::Any(ns) => {
                let mut all = Vec::new();
                for n in ns {
                    all.extend(n.required_labels()?);
                }
                Some(all)
            }
        }
    }

    fn matches(&self, labels: &[String]) -> bool {
        match self {
            Node::Atom(a) => labels.iter().any(|l| l == a),
            Node::Not(n) => !n.matches(labels),
            Node::All(ns) => ns.iter().all(|n| n.matches(labels)),
            Node::Any(ns) => ns.iter().any(|n| n.matches(labels)),
        }
    }

    /// Binding strength, for deciding where the printed form needs parentheses.
    fn precedence(&self) -> u8 {
        match self {
            Node::Any(_) => 1,
            Node::All(_) => 2,
            Node::Not(_) | Node::Atom(_) => 3,
        }
    }

    /// Print `self` as an operand of an operator of precedence `outer`.
    fn fmt_operand(&self, outer: u8, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.precedence() < outer {
            write!(f, "({self})")
        } else {
            write!(f, "{self}")
        }
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Atom(a) if !a.is_empty() && a.chars().all(is_label_char) => f.write_str(a),
            Node::Atom(a) => {
                f.write_str("\"")?;
                for c in a.chars() {
                    if matches!(c, '"' | '\\') {
                        f.write_str("\\")?;
                    }
                    write!(f, "{c}")?;
                }
                f.write_str("\"")
            }
            Node::Not(n) => {
                f.write_str("!")?;
                n.fmt_operand(3, f)
            }
            Node::All(ns) | Node::Any(ns) => {
                let (op, prec) = if matches!(self, Node::All(_)) { (" && ", 2) } else { (" || ", 1) };
                for (i, n) in ns.iter().enumerate() {
                    if i > 0 {
                        f.write_str(op)?;
                    }
                    n.fmt_operand(prec, f)?;
                }
                Ok(())
            }
        }
    }
}

/// Renders the normalised form: single spaces around `&&` and `||`, parentheses only where
/// precedence needs them, atoms quoted only when they must be; the empty expression prints as "".
impl fmt::Display for LabelExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.root {
            None => Ok(()),
            Some(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Atom(String),
    And,
    Or,
    Not,
    Open,
    Close,
    End,
}

impl Tok {
    /// How the token reads in an error message.
    fn describe(&self) -> String {
        match self {
            Tok::Atom(a) => format!("label {a:?}"),
            Tok::And => "\"&&\"".into(),
            Tok::Or => "\"||\"".into(),
            Tok::Not => "\"!\"".into(),
            Tok::Open => "\"(\"".into(),
            Tok::Close => "\")\"".into(),
            Tok::End => "the end".into(),
        }
    }
}

/// Parse a label expression: labels combined with `!`, `&&` and `||` (binding in that order,
/// tightest first) and parentheses; a label with other characters may be written in double quotes
/// (`\"` and `\\` escape inside them). An empty or all-whitespace expression matches any node.
pub fn parse(s: &str) -> Result<LabelExpr, LabelError> {
    if s.len() > MAX_EXPR_LEN {
        return Err(LabelError::new(format!(
            "label expression is {} bytes long; the limit is {MAX_EXPR_LEN}",
            s.len()
        )));
    }
    let mut p = Parser { src: s, toks: lex(s)?, pos: 0, depth: 0 };
    if p.peek() == &Tok::End {
        return Ok(LabelExpr { root: None });
    }
    let root = p.or(None)?;
    match p.peek() {
        Tok::End => Ok(LabelExpr { root: Some(root) }),
        Tok::Close => Err(p.error_here("unexpected \")\" with no \"(\" to close".into())),
        t => {
            let found = t.describe();
            Err(p.error_here(format!("expected \"&&\" or \"||\" before {found}")))
        }
    }
}

/// 1-based column (in characters) of byte offset `at` in `s`.
fn column(s: &str, at: usize) -> usize {
    s[..at].chars().count() + 1
}

fn expr_error(s: &str, at: usize, what: &str) -> LabelError {
    LabelError::new(format!("label expression {s:?}: {what} at column {}", column(s, at)))
}

/// Split `s` into tokens, each with the byte offset it starts at; always ends with `Tok::End`.
fn lex(s: &str) -> Result<Vec<(Tok, usize)>, LabelError> {
    let mut toks = Vec::new();
    let mut it = s.char_indices().peekable();
    while let Some((at, c)) = it.next() {
        let tok = match c {
            c if c.is_whitespace() => continue,
            '(' => Tok::Open,
            ')' => Tok::Close,
            '!' => Tok::Not,
            '&' | '|' => {
                if it.next_if(|&(_, d)| d == c).is_none() {
                    let what = format!("unexpected \"{c}\" (did you mean \"{c}{c}\"?)");
                    return Err(expr_error(s, at, &what));
                }
                if c == '&' {
                    Tok::And
                } else {
                    Tok::Or
                }
            }
            '"' => {
                let mut atom = String::new();
                loop {
                    match it.next() {
                        None => return Err(expr_error(s, at, "unterminated quoted label starting")),
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match it.next() {
                            Some((_, e)) => atom.push(e),
                            None => return Err(expr_error(s, at, "unterminated quoted label starting")),
                        },
                        Some((_, ch)) => atom.push(ch),
                    }
                }
                if atom.is_empty() {
                    return Err(expr_error(s, at, "empty quoted label"));
                }
                Tok::Atom(atom)
            }
            c if is_label_char(c) => {
                let mut end = at + c.len_utf8();
                while let Some((i, d)) = it.next_if(|&(_, d)| is_label_char(d)) {
                    end = i + d.len_utf8();
                }
                Tok::Atom(s[at..end].to_string())
            }
            c => {
                let what = format!("unexpected character {c:?} (labels may contain {CHARSET}; quote others)");
                return Err(expr_error(s, at, &what));
            }
        };
        toks.push((tok, at));
    }
    toks.push((Tok::End, s.len()));
    Ok(toks)
}

/// Recursive descent over the tokens. Recursion happens only at `(` and `!`, and both count
/// towards `depth`, so hostile input such as 1000 `(` fails cleanly instead of exhausting the stack.
struct Parser<'a> {
    src: &'a str,
    toks: Vec<(Tok, usize)>,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos].0
    }

    fn bump(&mut self) -> Tok {
        let t = self.toks[self.pos].0.clone();
        // `End` is never consumed past, so `peek` stays in bounds.
        if t != Tok::End {
            self.pos += 1;
        }
        t
    }

    fn error_here(&self, what: String) -> LabelError {
        expr_error(self.src, self.toks[self.pos].1, &what)
    }

    /// `or := and ("||" and)*`; `after` is the token just consumed, for error messages.
    fn or(&mut self, after: Option<&Tok>) -> Result<Node, LabelError> {
        let mut items = vec![self.and(after)?];
        while self.peek() == &Tok::Or {
            self.bump();
            items.push(self.and(Some(&Tok::Or))?);
        }
        Ok(flatten(items, false))
    }

    /// `and := unary ("&&" unary)*`.
    fn and(&mut self, after: Option<&Tok>) -> Result<Node, LabelError> {
        let mut items = vec![self.unary(after)?];
        while self.peek() == &Tok::And {
            self.bump();
            items.push(self.unary(Some(&Tok::And))?);
        }
        Ok(flatten(items, true))
    }

    /// `unary := "!" unary | atom | "(" or ")"`.
    fn unary(&mut self, after: Option<&Tok>) -> Result<Node, LabelError> {
        match self.peek().clone() {
            Tok::Atom(a) => {
                self.bump();
                Ok(Node::Atom(a))
            }
            t @ (Tok::Not | Tok::Open) => {
                let open_at = self.toks[self.pos].1;
                self.enter()?;
                self.bump();
                let node = if t == Tok::Not {
                    Node::Not(Box::new(self.unary(Some(&Tok::Not))?))
                } else {
                    let inner = self.or(Some(&Tok::Open))?;
                    match self.peek() {
                        Tok::Close => {
                            self.bump();
                        }
                        Tok::End => return Err(expr_error(self.src, open_at, "unclosed \"(\"")),
                        t => {
                            let found = t.describe();
                            return Err(
                                self.error_here(format!("expected \"&&\", \"||\" or \")\" before {found}"))
                            );
                        }
                    }
                    inner
                };
                self.depth -= 1;
                Ok(node)
            }
            t => {
                let mut what = match after {
                    Some(prev) => format!("expected a label after {}", prev.describe()),
                    None => "expected a label".to_string(),
                };
                if t != Tok::End {
                    what = format!("{what}, found {}", t.describe());
                }
                Err(self.error_here(what))
            }
        }
    }

    fn enter(&mut self) -> Result<(), LabelError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_here(format!("nesting deeper than {MAX_DEPTH} levels of \"(\" and \"!\"")));
        }
        Ok(())
    }
}

/// One operand stays itself; several become an `All` (or `Any`), splicing in operands that are
/// already the same operator so `(a && b) && c` and `a && b && c` parse to the same tree.
fn flatten(mut items: Vec<Node>, all: bool) -> Node {
    if items.len() == 1 {
        return items.pop().expect("one item");
    }
    let mut out = Vec::with_capacity(items.len());
    for n in items {
        match n {
            Node::All(inner) if all => out.extend(inner),
            Node::Any(inner) if !all => out.extend(inner),
            n => out.push(n),
        }
    }
    if all {
        Node::All(out)
    } else {
        Node::Any(out)
    }
}

/// Check one node label (or node name): non-empty, at most 64 bytes, only letters, digits and
/// `_ . : / + -`.
pub fn validate_label(l: &str) -> Result<(), LabelError> {
    if l.is_empty() {
        return Err(LabelError::new("empty label or name".into()));
    }
    if let Some((i, c)) = l.char_indices().find(|&(_, c)| !is_label_char(c)) {
        return Err(LabelError::new(format!(
            "{l:?} has {c:?} at column {}; labels and node names may contain only {CHARSET}",
            column(l, i)
        )));
    }
    if l.len() > MAX_LABEL_LEN {
        return Err(LabelError::new(format!(
            "{l:?} is {} bytes long; labels and node names may be at most {MAX_LABEL_LEN}",
            l.len()
        )));
    }
    Ok(())
}

/// Characters Jenkins refuses in a node name (`Jenkins.checkGoodName`).
const JENKINS_UNSAFE: &str = "?*/\\%!@#$^&|<>[]:;";

/// Check a node name: the rules of Jenkins' `checkGoodName` (not blank, not `.` or `..`, no control
/// characters, none of `?*/\%!@#$^&|<>[]:;`), narrowed so that a name is always one URL path
/// segment and one file name as it stands, one word on the printed agent command line, and one
/// unquoted atom of a label expression: ASCII letters, digits and `_ . + -`, not starting with
/// `-` (it would read as an option), at most 64 bytes (the protocol's limit on names).
pub fn check_node_name(name: &str) -> Result<(), String> {
    const ALLOWED: &str = "use only letters, digits and _ . + -";
    if name.trim().is_empty() {
        return Err("the node name is empty; give one such as \"builder1\"".into());
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} cannot be a node name"));
    }
    if let Some((i, c)) =
        name.char_indices().find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-')))
    {
        let why = if c.is_control() {
            "control characters are not allowed".to_string()
        } else if c.is_whitespace() {
            "spaces are not allowed".to_string()
        } else if JENKINS_UNSAFE.contains(c) {
            format!("{c:?} is not allowed (as in Jenkins, none of {JENKINS_UNSAFE})")
        } else {
            format!("{c:?} is not allowed")
        };
        return Err(format!("node name {name:?} has {c:?} at column {}: {why}; {ALLOWED}", column(name, i)));
    }
    if name.starts_with('-') {
        return Err(format!("node name {name:?} starts with '-', which would read as an option; {ALLOWED}"));
    }
    if name.len() > MAX_LABEL_LEN {
        return Err(format!("node name {name:?} is {} bytes long; the limit is {MAX_LABEL_LEN}", name.len()));
    }
    Ok(())
}

/// Split a node's label list on whitespace and commas, check each label, and drop repeats
/// (keeping the first of each, in order).
pub fn split_labels(s: &str) -> Result<Vec<String>, LabelError> {
    let mut out: Vec<String> = Vec::new();
    for l in s.split(|c: char| c.is_whitespace() || c == ',').filter(|l| !l.is_empty()) {
        validate_label(l).map_err(|e| LabelError::new(format!("bad label: {e}")))?;
        if !out.iter().any(|o| o == l) {
            out.push(l.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: &[&str]) -> Vec<String> {
        labels.iter().map(|s| s.to_string()).collect()
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn empty_or_blank_expression_matches_every_node() {
        for s in ["", "   ", "\t\n"] {
            let e = parse(s).unwrap();
            assert!(e.is_any());
            assert!(e.matches(&[]));
            assert!(e.matches(&node(&["linux"])));
            assert_eq!(e.to_string(), "");
        }
        assert!(LabelExpr::default().matches(&[]));
    }

    #[test]
    fn single_atom_matches_a_label_or_the_node_name() {
        let e = parse("linux").unwrap();
        assert!(e.matches(&node(&["x86_64", "linux"])));
        assert!(!e.matches(&node(&["windows"])));
        assert!(!e.matches(&[]));
        // The caller passes the node's name among its labels, so a name works as a label.
        let by_name = parse("build-01").unwrap();
        assert!(by_name.matches(&node(&["linux", "build-01"])));
        assert!(!by_name.matches(&node(&["linux", "build-02"])));
    }

    #[test]
    fn atoms_are_exact_and_case_sensitive() {
        let e = parse("linux").unwrap();
        assert!(!e.matches(&node(&["Linux"])));
        assert!(!e.matches(&node(&["linux64"])));
    }

    #[test]
    fn not_binds_tighter_than_and_which_binds_tighter_than_or() {
        // a || (b && (!c))
        let e = parse("a || b && !c").unwrap();
        assert_eq!(e, parse("a || (b && (!c))").unwrap());
        assert!(e.matches(&node(&["a"])));
        assert!(e.matches(&node(&["a", "b", "c"])));
        assert!(e.matches(&node(&["b"])));
        assert!(!e.matches(&node(&["b", "c"])));
        assert!(!e.matches(&node(&["c"])));
        assert!(!e.matches(&[]));
        assert_eq!(e.to_string(), "a || b && !c");
    }

    #[test]
    fn parentheses_override_precedence() {
        let e = parse("(a || b) && !c").unwrap();
        assert!(!e.matches(&node(&["a", "c"])));
        assert!(e.matches(&node(&["b"])));
        assert!(!e.matches(&node(&["c"])));
        assert_eq!(e.to_string(), "(a || b) && !c");
        let n = parse("!(a && b)").unwrap();
        assert!(n.matches(&node(&["a"])));
        assert!(!n.matches(&node(&["a", "b"])));
        assert_eq!(n.to_string(), "!(a && b)");
    }

    #[test]
    fn double_negation_cancels() {
        let e = parse("!!a").unwrap();
        assert!(e.matches(&node(&["a"])));
        assert!(!e.matches(&node(&["b"])));
        assert_eq!(e.to_string(), "!!a");
    }

    #[test]
    fn display_normalises_spacing_and_redundant_parentheses() {
        assert_eq!(
            parse("  linux&&(x86_64||arm64)&&!slow ").unwrap().to_string(),
            "linux && (x86_64 || arm64) && !slow"
        );
        assert_eq!(parse("((a))").unwrap().to_string(), "a");
        assert_eq!(parse("(a && b) && c").unwrap().to_string(), "a && b && c");
        assert_eq!(parse("a || (b || c)").unwrap().to_string(), "a || b || c");
        assert_eq!(parse("(a || b) || (c && d)").unwrap().to_string(), "a || b || c && d");
        assert_eq!(parse("!(!a)").unwrap().to_string(), "!!a");
    }

    #[test]
    fn printed_form_parses_back_to_the_same_expression() {
        for s in [
            "a",
            "a || b && !c",
            "!(a || b) && (c || !d) || e:f/g+h-i.j",
            "\"x y\" && \"quote\\\"in\" || \"back\\\\slash\"",
            "((((a || b) && c) || d) && !(e && f))",
        ] {
            let e = parse(s).unwrap();
            let printed = e.to_string();
            assert_eq!(parse(&printed).unwrap(), e, "{s} printed as {printed}");
        }
    }

    #[test]
    fn quoted_atoms_may_hold_any_characters() {
        let e = parse("\"x y\" || \"a\\\"b\"").unwrap();
        assert!(e.matches(&node(&["x y"])));
        assert!(e.matches(&node(&["a\"b"])));
        assert!(!e.matches(&node(&["x"])));
        assert_eq!(e.to_string(), "\"x y\" || \"a\\\"b\"");
        // A quoted atom made of label characters needs no quotes when printed.
        assert_eq!(parse("\"linux\"").unwrap().to_string(), "linux");
    }

    #[test]
    fn atoms_accept_the_full_label_charset() {
        let e = parse("A-z_0.9:/+").unwrap();
        assert!(e.matches(&node(&["A-z_0.9:/+"])));
    }

    #[test]
    fn trailing_operator_names_the_column_and_what_was_expected() {
        assert_eq!(
            err("linux &&"),
            "label expression \"linux &&\": expected a label after \"&&\" at column 9"
        );
        assert_eq!(err("a ||"), "label expression \"a ||\": expected a label after \"||\" at column 5");
        assert_eq!(err("!"), "label expression \"!\": expected a label after \"!\" at column 2");
    }

    #[test]
    fn misplaced_tokens_are_reported_with_what_was_found() {
        assert_eq!(err("&& a"), "label expression \"&& a\": expected a label, found \"&&\" at column 1");
        assert_eq!(
            err("a && || b"),
            "label expression \"a && || b\": expected a label after \"&&\", found \"||\" at column 6"
        );
        assert_eq!(
            err("()"),
            "label expression \"()\": expected a label after \"(\", found \")\" at column 2"
        );
        assert_eq!(
            err("a b"),
            "label expression \"a b\": expected \"&&\" or \"||\" before label \"b\" at column 3"
        );
        assert_eq!(
            err("(a b)"),
            "label expression \"(a b)\": expected \"&&\", \"||\" or \")\" before label \"b\" at column 4"
        );
    }

    #[test]
    fn unbalanced_parentheses_are_reported() {
        assert_eq!(err("(a && b"), "label expression \"(a && b\": unclosed \"(\" at column 1");
        assert_eq!(err("a && ((b) || c"), "label expression \"a && ((b) || c\": unclosed \"(\" at column 6");
        assert_eq!(err("a)"), "label expression \"a)\": unexpected \")\" with no \"(\" to close at column 2");
    }

    #[test]
    fn single_ampersand_or_bar_suggests_the_double_operator() {
        assert_eq!(
            err("a & b"),
            "label expression \"a & b\": unexpected \"&\" (did you mean \"&&\"?) at column 3"
        );
        assert_eq!(
            err("a | b"),
            "label expression \"a | b\": unexpected \"|\" (did you mean \"||\"?) at column 3"
        );
    }

    #[test]
    fn characters_outside_the_charset_are_refused_unless_quoted() {
        let e = err("linux && x86*");
        assert!(e.contains("unexpected character '*'") && e.ends_with("at column 13"), "{e}");
        // Columns count characters, not bytes.
        let e = err("\"é\" && ü");
        assert!(e.ends_with("at column 8"), "{e}");
    }

    #[test]
    fn bad_quoted_atoms_are_reported() {
        assert!(err("a && \"b").contains("unterminated quoted label starting at column 6"));
        assert!(err("\"b\\").contains("unterminated quoted label starting at column 1"));
        assert!(err("a || \"\"").contains("empty quoted label at column 6"));
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        let s = format!("{}a{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(parse(&s).unwrap().matches(&node(&["a"])));
        let s = format!("{}a", "!".repeat(MAX_DEPTH));
        assert!(parse(&s).unwrap().matches(&node(&["a"])));
    }

    #[test]
    fn deep_nesting_fails_cleanly_instead_of_overflowing() {
        let e = err(&"(".repeat(1000));
        assert!(e.contains("nesting deeper than 32 levels") && e.ends_with("at column 33"), "{e}");
        let e = err(&format!("{}a", "!".repeat(MAX_DEPTH + 1)));
        assert!(e.contains("nesting deeper than 32 levels"), "{e}");
        let e = err(&format!("{}a{}", "(!".repeat(20), ")".repeat(20)));
        assert!(e.contains("nesting deeper than 32 levels"), "{e}");
    }

    #[test]
    fn long_flat_chains_are_fine_and_overlong_expressions_are_refused() {
        let chain = vec!["a"; 300].join("&&");
        assert!(chain.len() <= MAX_EXPR_LEN);
        assert!(parse(&chain).unwrap().matches(&node(&["a"])));
        let long = "a".repeat(MAX_EXPR_LEN + 1);
        assert_eq!(err(&long), "label expression is 1025 bytes long; the limit is 1024");
    }

    #[test]
    fn label_error_is_a_std_error() {
        let e: Box<dyn std::error::Error> = Box::new(parse("a &&").unwrap_err());
        assert!(e.to_string().starts_with("label expression"));
    }

    #[test]
    fn validate_label_accepts_the_charset_up_to_64_bytes() {
        assert!(validate_label("linux").is_ok());
        assert!(validate_label("A-z_0.9:/+").is_ok());
        assert!(validate_label(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn validate_label_refuses_empty_long_and_odd_characters() {
        assert_eq!(validate_label("").unwrap_err().to_string(), "empty label or name");
        let e = validate_label(&"x".repeat(65)).unwrap_err().to_string();
        assert!(e.contains("65 bytes long") && e.contains("at most 64"), "{e}");
        let e = validate_label("a b").unwrap_err().to_string();
        assert_eq!(
            e,
            "\"a b\" has ' ' at column 2; labels and node names may contain only letters, digits and \
             _ . : / + -"
        );
        for bad in ["a&&b", "!a", "(a)", "a|b", "é", "a\"b", "a,b"] {
            assert!(validate_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_names_take_letters_digits_and_four_marks() {
        for ok in ["builder1", "a", "A-z_0.9+x", "x86_64.linux", "...", "a..b", &"n".repeat(64)] {
            assert_eq!(check_node_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn node_names_refuse_what_jenkins_refuses() {
        for c in "?*/\\%!@#$^&|<>[]:;".chars() {
            let e = check_node_name(&format!("a{c}b")).unwrap_err();
            assert!(e.contains(&format!("has {c:?} at column 2")) && e.contains("as in Jenkins"), "{e}");
        }
        assert_eq!(check_node_name(""), Err("the node name is empty; give one such as \"builder1\"".into()));
        assert!(check_node_name("   ").unwrap_err().contains("is empty"));
        assert_eq!(check_node_name("."), Err("\".\" cannot be a node name".into()));
        assert_eq!(check_node_name(".."), Err("\"..\" cannot be a node name".into()));
        assert!(check_node_name("a\tb").unwrap_err().contains("control characters are not allowed"));
    }

    #[test]
    fn node_names_refuse_what_would_break_a_url_a_file_name_or_a_command_line() {
        assert_eq!(
            check_node_name("a/b"),
            Err("node name \"a/b\" has '/' at column 2: '/' is not allowed (as in Jenkins, none of \
                 ?*/\\%!@#$^&|<>[]:;); use only letters, digits and _ . + -"
                .into())
        );
        for bad in ["a b", "é", "a'b", "a\"b", "a(b)", "a,b", "a=b", "a~b", "a`b", "a{b}"] {
            assert!(check_node_name(bad).is_err(), "{bad}");
        }
        assert!(check_node_name("-x").unwrap_err().contains("would read as an option"));
        let e = check_node_name(&"n".repeat(65)).unwrap_err();
        assert!(e.ends_with("is 65 bytes long; the limit is 64"), "{e}");
    }

    #[test]
    fn every_node_name_is_a_label_expression_atom() {
        for name in ["builder1", "A-z_0.9+x", "..."] {
            assert!(check_node_name(name).is_ok());
            assert!(parse(name).unwrap().matches(&[name.to_string()]), "{name}");
        }
    }

    #[test]
    fn split_labels_splits_on_whitespace_and_commas_and_drops_repeats() {
        assert_eq!(
            split_labels(" linux, x86_64 docker,,linux\tarm64\n").unwrap(),
            node(&["linux", "x86_64", "docker", "arm64"])
        );
        assert_eq!(split_labels("").unwrap(), Vec::<String>::new());
        assert_eq!(split_labels(" , ").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn split_labels_refuses_a_bad_label() {
        let e = split_labels("linux, a&&b").unwrap_err().to_string();
        assert!(e.starts_with("bad label: \"a&&b\" has '&'"), "{e}");
    }
}
