//! A linear pre-scan that bounds how deeply pipeline YAML nests, run before serde_yaml_ng sees it.
//!
//! libyaml (under serde_yaml_ng) looks at every open flow collection (`[`, `{`) for a stale simple
//! key on each token it reads, so its time grows with the square of the flow depth: 64 KiB of `[`
//! took 4 s, and the 1 MiB a request may carry would take minutes. This scan follows libyaml's
//! scanner (`unsafe-libyaml`'s `scanner.rs`) closely enough to know where a flow collection or a
//! block level opens: it skips comments and quoted, plain and block scalars exactly where libyaml
//! does and keeps the same block indentation stack, so that no bracket inside a string is counted
//! and none outside one is missed. Where libyaml would stop with a syntax error the scan stops
//! too and leaves the message to serde_yaml_ng; libyaml reads nothing past that point either.
//!
//! It never allocates in proportion to the input: the indentation stack is cut off at the limit.

/// Where the scan found the text nesting too deeply: 1-based line and column (in characters) of
/// the bracket, brace or indented entry that opened one level too many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooDeep {
    pub line: usize,
    pub column: usize,
}

/// What a scan saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Depths {
    /// Deepest flow nesting (`[` and `{` open at once).
    pub flow: usize,
    /// Deepest nesting of flow and block levels together.
    pub total: usize,
}

/// Scan `yaml` and refuse it at the first place where flow and block levels together exceed
/// `limit`; otherwise say how deep it went (up to where libyaml would stop with an error).
pub(crate) fn scan(yaml: &str, limit: usize) -> Result<Depths, TooDeep> {
    let mut s = Scanner {
        s: yaml.as_bytes(),
        // libyaml's reader drops a leading byte order mark before it counts columns.
        i: if yaml.starts_with('\u{feff}') { 3 } else { 0 },
        line: 0,
        col: 0,
        index: 0,
        flow: 0,
        indent: -1,
        indents: Vec::new(),
        allowed: true,
        key: None,
        limit,
        depths: Depths { flow: 0, total: 0 },
    };
    s.run()?;
    Ok(s.depths)
}

/// A position as libyaml counts it: 0-based line, column and index, in characters.
#[derive(Debug, Clone, Copy)]
struct Mark {
    line: usize,
    col: usize,
    index: usize,
}

/// Where a block mapping's key may start, and the deepest flow nesting since: a key can be a flow
/// collection (`[a, b]: c`), which then sits one level inside the mapping it opens.
#[derive(Debug, Clone, Copy)]
struct Key {
    at: Mark,
    flow: usize,
}

/// libyaml drops a simple key once it is this many characters behind (`scanner.rs`).
const SIMPLE_KEY_REACH: usize = 1024;

/// Why a scan stopped early.
enum Stop {
    /// libyaml would report a syntax error here: nothing after it is read.
    Syntax,
    /// Too deep.
    Deep(TooDeep),
}

type Step = Result<(), Stop>;

struct Scanner<'a> {
    s: &'a [u8],
    /// Byte offset.
    i: usize,
    line: usize,
    col: usize,
    /// Characters read so far (libyaml's `mark.index`).
    index: usize,
    /// Open flow collections.
    flow: usize,
    /// Current block indentation column (-1 outside any block collection).
    indent: isize,
    /// Enclosing block indentation columns.
    indents: Vec<isize>,
    /// libyaml's `simple_key_allowed`.
    allowed: bool,
    /// The simple key candidate outside flow collections: where a block mapping's key would start.
    /// Keys inside flow collections never move the block indentation, so they are not kept.
    key: Option<Key>,
    limit: usize,
    depths: Depths,
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// libyaml's `IS_ALPHA`: the characters of anchor names and tag handles.
fn is_alpha(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// A character of a tag (libyaml's URI characters; `,`, `[` and `]` only inside `!<...>`).
fn is_uri(b: u8, verbatim: bool) -> bool {
    is_alpha(b) || b";/?:@&=+$.%!~*'()".contains(&b) || (verbatim && b",[]".contains(&b))
}

impl Scanner<'_> {
    fn peek(&self, k: usize) -> u8 {
        self.s.get(self.i + k).copied().unwrap_or(0)
    }

    /// Bytes of the line break at byte offset `at`, or 0: CR, LF, CRLF, NEL, LS and PS, as libyaml
    /// counts them.
    fn break_len(&self, at: usize) -> usize {
        match self.s.get(at..).unwrap_or_default() {
            [b'\r', b'\n', ..] => 2,
            [b'\r' | b'\n', ..] => 1,
            [0xC2, 0x85, ..] => 2,
            [0xE2, 0x80, 0xA8 | 0xA9, ..] => 3,
            _ => 0,
        }
    }

    fn is_break(&self, k: usize) -> bool {
        self.break_len(self.i + k) > 0
    }

    /// End of input or a NUL (which libyaml's reader refuses).
    fn is_z(&self, k: usize) -> bool {
        self.peek(k) == 0
    }

    fn is_breakz(&self, k: usize) -> bool {
        self.is_break(k) || self.is_z(k)
    }

    fn is_blankz(&self, k: usize) -> bool {
        is_blank(self.peek(k)) || self.is_breakz(k)
    }

    fn mark(&self) -> Mark {
        Mark { line: self.line, col: self.col, index: self.index }
    }

    /// Move past one character, or one line break (CRLF counts once, as two in the index).
    fn advance(&mut self) {
        match self.break_len(self.i) {
            0 => {
                let Some(&b) = self.s.get(self.i) else { return };
                self.i += match b {
                    0x00..=0x7F => 1,
                    0xC0..=0xDF => 2,
                    0xE0..=0xEF => 3,
                    _ => 4,
                };
                self.col += 1;
                self.index += 1;
            }
            n => {
                self.index += if n == 2 && self.peek(0) == b'\r' { 2 } else { 1 };
                self.i += n;
                self.line += 1;
                self.col = 0;
            }
        }
    }

    fn starts_document_marker(&self) -> bool {
        self.col == 0
            && (self.s[self.i..].starts_with(b"---") || self.s[self.i..].starts_with(b"..."))
            && self.is_blankz(3)
    }

    fn deep(&self, at: Mark) -> Stop {
        Stop::Deep(TooDeep { line: at.line + 1, column: at.col + 1 })
    }

    /// Count the levels open now, `inner` more flow levels inside the newest, reached at `at`.
    fn opened(&mut self, at: Mark, inner: usize) -> Step {
        let total = self.flow + self.indents.len() + inner;
        self.depths.flow = self.depths.flow.max(self.flow);
        self.depths.total = self.depths.total.max(total);
        if total > self.limit {
            return Err(self.deep(at));
        }
        Ok(())
    }

    /// A block collection starting at column `col` (libyaml's `roll_indent`), holding `inner`
    /// flow levels already read (its key's).
    fn roll(&mut self, col: usize, at: Mark, inner: usize) -> Step {
        if self.flow == 0 && self.indent < col as isize {
            self.indents.push(self.indent);
            self.indent = col as isize;
            self.opened(at, inner)?;
        }
        Ok(())
    }

    /// Close the block collections indented deeper than `col` (libyaml's `unroll_indent`).
    fn unroll(&mut self, col: isize) {
        if self.flow == 0 {
            while self.indent > col {
                self.indent = self.indents.pop().unwrap_or(-1);
            }
        }
    }

    fn save_key(&mut self) {
        if self.flow == 0 && self.allowed {
            self.key = Some(Key { at: self.mark(), flow: 0 });
        }
    }

    fn remove_key(&mut self) {
        if self.flow == 0 {
            self.key = None;
        }
    }

    fn run(&mut self) -> Result<(), TooDeep> {
        match self.tokens() {
            Ok(()) | Err(Stop::Syntax) => Ok(()),
            Err(Stop::Deep(d)) => Err(d),
        }
    }

    /// libyaml's `fetch_next_token`, over the whole input.
    fn tokens(&mut self) -> Step {
        loop {
            self.skip_to_token();
            self.unroll(self.col as isize);
            let at = self.mark();
            let c = self.peek(0);
            if self.is_z(0) {
                return Ok(());
            }
            if self.col == 0 && c == b'%' {
                // A directive fills its line.
                self.unroll(-1);
                self.remove_key();
                self.allowed = false;
                while !self.is_breakz(0) {
                    self.advance();
                }
                self.advance();
                continue;
            }
            if self.starts_document_marker() {
                self.unroll(-1);
                self.remove_key();
                self.allowed = false;
                (0..3).for_each(|_| self.advance());
                continue;
            }
            match c {
                b'[' | b'{' => {
                    self.save_key();
                    self.flow += 1;
                    if let Some(k) = self.key.as_mut() {
                        k.flow = k.flow.max(self.flow);
                    }
                    self.opened(at, 0)?;
                    self.allowed = true;
                    self.advance();
                }
                b']' | b'}' => {
                    self.remove_key();
                    self.flow = self.flow.saturating_sub(1);
                    self.allowed = false;
                    self.advance();
                }
                b',' => {
                    self.remove_key();
                    self.allowed = true;
                    self.advance();
                }
                b'-' if self.is_blankz(1) => {
                    self.roll(at.col, at, 0)?;
                    self.remove_key();
                    self.allowed = true;
                    self.advance();
                }
                b'?' if self.flow > 0 || self.is_blankz(1) => {
                    self.roll(at.col, at, 0)?;
                    self.remove_key();
                    self.allowed = self.flow == 0;
                    self.advance();
                }
                b':' if self.flow > 0 || self.is_blankz(1) => {
                    if self.flow == 0 {
                        // A key on this line and within reach opens the mapping where it starts.
                        let key = self.key.take().filter(|k| {
                            k.at.line == self.line && k.at.index + SIMPLE_KEY_REACH >= self.index
                        });
                        match key {
                            Some(k) => {
                                self.roll(k.at.col, k.at, k.flow)?;
                                self.allowed = false;
                            }
                            None => {
                                self.roll(at.col, at, 0)?;
                                self.allowed = true;
                            }
                        }
                    } else {
                        self.allowed = false;
                    }
                    self.advance();
                }
                b'*' | b'&' => {
                    self.save_key();
                    self.allowed = false;
                    self.advance();
                    while is_alpha(self.peek(0)) {
                        self.advance();
                    }
                }
                b'!' => {
                    self.save_key();
                    self.allowed = false;
                    self.advance();
                    let verbatim = self.peek(0) == b'<';
                    if verbatim {
                        self.advance();
                    }
                    while is_uri(self.peek(0), verbatim) {
                        self.advance();
                    }
                    if verbatim {
                        if self.peek(0) != b'>' {
                            return Err(Stop::Syntax);
                        }
                        self.advance();
                    }
                }
                b'|' | b'>' if self.flow == 0 => {
                    self.remove_key();
                    self.allowed = true;
                    self.block_scalar()?;
                }
                b'\'' | b'"' => {
                    self.save_key();
                    self.allowed = false;
                    self.quoted(c)?;
                }
                _ if self.plain_starts(c) => {
                    self.save_key();
                    self.allowed = false;
                    self.plain()?;
                }
                _ => return Err(Stop::Syntax),
            }
        }
    }

    /// libyaml's `scan_to_next_token`: blanks, comments and line breaks.
    fn skip_to_token(&mut self) {
        loop {
            if self.col == 0 && self.s[self.i..].starts_with("\u{feff}".as_bytes()) {
                self.advance();
            }
            while self.peek(0) == b' ' || ((self.flow > 0 || !self.allowed) && self.peek(0) == b'\t') {
                self.advance();
            }
            if self.peek(0) == b'#' {
                while !self.is_breakz(0) {
                    self.advance();
                }
            }
            if !self.is_break(0) {
                return;
            }
            self.advance();
            if self.flow == 0 {
                self.allowed = true;
            }
        }
    }

    /// Whether `c` (not an indicator handled before) starts a plain scalar.
    fn plain_starts(&self, c: u8) -> bool {
        let indicator = self.is_blankz(0) || b"-?:,[]{}#&*!|>'\"%@`".contains(&c);
        !indicator
            || (c == b'-' && !is_blank(self.peek(1)))
            || (self.flow == 0 && (c == b'?' || c == b':') && !self.is_blankz(1))
    }

    /// libyaml's `scan_plain_scalar`: a plain scalar may go on over lines indented past the
    /// current block; in flow collections it ends at `,`, `[`, `]`, `{` and `}`.
    fn plain(&mut self) -> Step {
        let indent = self.indent + 1;
        let mut leading_blanks = false;
        loop {
            if self.starts_document_marker() || self.peek(0) == b'#' {
                break;
            }
            while !self.is_blankz(0) {
                let (c, next) = (self.peek(0), self.peek(1));
                if self.flow > 0 && c == b':' && b",?[]{}".contains(&next) && next != 0 {
                    return Err(Stop::Syntax);
                }
                if (c == b':' && self.is_blankz(1)) || (self.flow > 0 && b",[]{}".contains(&c)) {
                    break;
                }
                leading_blanks = false;
                self.advance();
            }
            if !(is_blank(self.peek(0)) || self.is_break(0)) {
                break;
            }
            while is_blank(self.peek(0)) || self.is_break(0) {
                if is_blank(self.peek(0)) {
                    if leading_blanks && (self.col as isize) < indent && self.peek(0) == b'\t' {
                        return Err(Stop::Syntax);
                    }
                } else {
                    leading_blanks = true;
                }
                self.advance();
            }
            if self.flow == 0 && (self.col as isize) < indent {
                break;
            }
        }
        if leading_blanks {
            self.allowed = true;
        }
        Ok(())
    }

    /// libyaml's `scan_flow_scalar`: `'...'` (with `''` inside) or `"..."` (with `\` escapes).
    fn quoted(&mut self, quote: u8) -> Step {
        self.advance();
        loop {
            if self.starts_document_marker() || self.is_z(0) {
                return Err(Stop::Syntax);
            }
            let c = self.peek(0);
            if quote == b'\'' && c == b'\'' {
                self.advance();
                if self.peek(0) != b'\'' {
                    return Ok(());
                }
            } else if quote == b'"' && c == b'\\' {
                self.advance();
                if self.is_z(0) {
                    return Err(Stop::Syntax);
                }
            } else if quote == b'"' && c == b'"' {
                self.advance();
                return Ok(());
            }
            self.advance();
        }
    }

    /// libyaml's `scan_block_scalar`: `|` or `>`, a header, then every line indented at least as
    /// far as the first (or as the header says), and blank lines among them.
    fn block_scalar(&mut self) -> Step {
        self.advance();
        let mut increment = 0isize;
        let mut digit = |s: &mut Self| -> Step {
            if s.peek(0).is_ascii_digit() {
                if s.peek(0) == b'0' {
                    return Err(Stop::Syntax);
                }
                increment = (s.peek(0) - b'0') as isize;
                s.advance();
            }
            Ok(())
        };
        if matches!(self.peek(0), b'+' | b'-') {
            self.advance();
            digit(self)?;
        } else if self.peek(0).is_ascii_digit() {
            digit(self)?;
            if matches!(self.peek(0), b'+' | b'-') {
                self.advance();
            }
        }
        while is_blank(self.peek(0)) {
            self.advance();
        }
        if self.peek(0) == b'#' {
            while !self.is_breakz(0) {
                self.advance();
            }
        }
        if !self.is_breakz(0) {
            return Err(Stop::Syntax);
        }
        self.advance();
        let mut indent = match increment {
            0 => 0,
            n if self.indent >= 0 => self.indent + n,
            n => n,
        };
        self.block_breaks(&mut indent)?;
        while self.col as isize == indent && !self.is_z(0) {
            while !self.is_breakz(0) {
                self.advance();
            }
            if self.is_z(0) {
                break;
            }
            self.advance();
            self.block_breaks(&mut indent)?;
        }
        Ok(())
    }

    /// libyaml's `scan_block_scalar_breaks`: the indentation and blank lines before a line of
    /// content, fixing the indentation from the first such line when the header left it open.
    fn block_breaks(&mut self, indent: &mut isize) -> Step {
        let mut max_indent = 0isize;
        loop {
            while (*indent == 0 || (self.col as isize) < *indent) && self.peek(0) == b' ' {
                self.advance();
            }
            max_indent = max_indent.max(self.col as isize);
            if (*indent == 0 || (self.col as isize) < *indent) && self.peek(0) == b'\t' {
                return Err(Stop::Syntax);
            }
            if !self.is_break(0) {
                break;
            }
            self.advance();
        }
        if *indent == 0 {
            *indent = max_indent.max(self.indent + 1).max(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn depths(yaml: &str) -> Depths {
        scan(yaml, usize::MAX).unwrap()
    }

    #[test]
    fn brackets_in_strings_comments_and_scripts_do_not_count() {
        let yaml =
            "name: a # [[[[\nenv: {A: '[[[', B: \"{{\\\"[\"}\nnote: x[[[ {{ ]]\nsteps:\n  - sh: |\n      \
                    echo [[[[ don't\n      echo {{{{\n    name: \"[\"\n  - sh: echo [[[ ]]] '[[\n";
        assert_eq!(depths(yaml), Depths { flow: 1, total: 3 });
    }

    #[test]
    fn block_levels_count_by_indentation() {
        assert_eq!(depths("a:\n  b:\n    c: [x]\n").total, 4);
        assert_eq!(depths("- - - x\n").total, 3);
        // A sequence at its key's own column opens no level of its own in libyaml's scanner.
        assert_eq!(depths("steps:\n- sh: x\n").total, 2);
    }

    #[test]
    fn the_first_level_past_the_limit_is_reported_where_it_opens() {
        assert_eq!(scan("a: [[[x]]]", 4), Ok(Depths { flow: 3, total: 4 }));
        assert_eq!(scan("a: [[[x]]]", 3), Err(TooDeep { line: 1, column: 6 }));
        assert_eq!(scan("x:\n  - - - y\n", 3), Err(TooDeep { line: 2, column: 7 }));
    }

    #[test]
    fn a_quote_inside_a_plain_scalar_or_a_block_scalar_hides_nothing() {
        // An apostrophe in a block scalar or mid-scalar does not start a string that could hide
        // the brackets after it.
        for yaml in [
            "x: |\n  don't\ny: [[[[[[[[[[",
            "x: don't\ny: [[[[[[[[[[",
            "x: [a 'b, [[[[[[[[[[",
            "x: >-\n   a \"\n  \ny: [[[[[[[[[[",
            "- x: |\n  y: [[[[[[[[[[",
        ] {
            assert!(depths(yaml).flow >= 10, "{yaml:?}: {:?}", depths(yaml));
        }
    }

    /// The depths libyaml's own scanner reaches on `yaml`, and the byte offset of its first error.
    fn libyaml_depths(yaml: &str) -> (Depths, Option<usize>) {
        use std::mem::MaybeUninit;
        use unsafe_libyaml as unsafe_y;
        let mut d = Depths { flow: 0, total: 0 };
        let (mut flow, mut block) = (0usize, 0usize);
        let mut error = None;
        // SAFETY: the parser is initialised before use, reads only `yaml` (alive throughout), and
        // each token and the parser are freed exactly once.
        unsafe {
            let mut parser = MaybeUninit::<unsafe_y::yaml_parser_t>::uninit();
            assert!(unsafe_y::yaml_parser_initialize(parser.as_mut_ptr()).ok);
            let parser = parser.as_mut_ptr();
            unsafe_y::yaml_parser_set_input_string(parser, yaml.as_ptr(), yaml.len() as u64);
            loop {
                let mut token = MaybeUninit::<unsafe_y::yaml_token_t>::uninit();
                if unsafe_y::yaml_parser_scan(parser, token.as_mut_ptr()).fail {
                    // libyaml's reader drops a leading byte order mark before counting.
                    let bom = usize::from(yaml.starts_with('\u{feff}'));
                    let chars = (&*parser).problem_mark.index as usize + bom;
                    error = Some(yaml.char_indices().nth(chars).map_or(yaml.len(), |(b, _)| b));
                    break;
                }
                let token = token.as_mut_ptr();
                let t = (*token).type_;
                unsafe_y::yaml_token_delete(token);
                match t {
                    unsafe_y::YAML_FLOW_SEQUENCE_START_TOKEN | unsafe_y::YAML_FLOW_MAPPING_START_TOKEN => {
                        flow += 1
                    }
                    unsafe_y::YAML_FLOW_SEQUENCE_END_TOKEN | unsafe_y::YAML_FLOW_MAPPING_END_TOKEN => {
                        flow = flow.saturating_sub(1)
                    }
                    unsafe_y::YAML_BLOCK_SEQUENCE_START_TOKEN | unsafe_y::YAML_BLOCK_MAPPING_START_TOKEN => {
                        block += 1
                    }
                    unsafe_y::YAML_BLOCK_END_TOKEN => block = block.saturating_sub(1),
                    unsafe_y::YAML_STREAM_END_TOKEN => break,
                    _ => {}
                }
                d.flow = d.flow.max(flow);
                d.total = d.total.max(flow + block);
            }
            unsafe_y::yaml_parser_delete(parser);
        }
        (d, error)
    }

    /// Fragments that matter to YAML's scanner, to build inputs from.
    const PIECES: &[&str] = &[
        "[",
        "]",
        "{",
        "}",
        ",",
        ": ",
        ":",
        "- ",
        "-",
        "? ",
        "?",
        "a",
        "b c",
        "'",
        "''",
        "\"",
        "\\\"",
        "\\",
        "#",
        " #",
        "|",
        ">",
        "|-",
        ">2",
        "|+1",
        "\n",
        "\n  ",
        "\n    ",
        "\n ",
        " ",
        "  ",
        "\t",
        "&x ",
        "*x",
        "!t ",
        "!<a,[b]> ",
        "!!str ",
        "---",
        "...",
        "\n---\n",
        "%YAML 1.1\n",
        "\r\n",
        "\r",
        "\u{85}",
        "\u{2028}",
        "é",
        "k: ",
        "\n- ",
        "\n  - ",
        "x:\n",
        "\u{feff}",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 50_000, ..ProptestConfig::default() })]

        /// Exactly libyaml's depths when libyaml scans the text to its end; never below them up
        /// to where libyaml stops with an error (so a bracket libyaml opens is never missed).
        #[test]
        fn the_scan_agrees_with_libyamls_scanner(parts in prop::collection::vec(0..PIECES.len(), 0..60)) {
            let yaml: String = parts.iter().map(|&i| PIECES[i]).collect();
            match libyaml_depths(&yaml) {
                (want, None) => prop_assert_eq!(depths(&yaml), want, "{:?}", yaml),
                (want, Some(at)) => {
                    let got = depths(&yaml[..at]);
                    prop_assert!(
                        got.flow >= want.flow && got.total >= want.total,
                        "{:?} (error at byte {}): {:?} < {:?}", yaml, at, got, want
                    );
                }
            }
        }
    }
}
