//! Text cut to a byte limit without splitting a character: every message that crosses a limit
//! (a rejection, an exit message, a log line quoting peer input) goes through here, because
//! slicing a `str` inside a UTF-8 character panics.

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn cuts_before_a_character_that_crosses_the_limit() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abc", 2), "ab");
        // "é" is two bytes: a limit between them keeps neither.
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("€€", 4), "€");
        assert_eq!(truncate("€", 0), "");
        for max in 0..12 {
            let t = truncate("añ€😀b", max);
            assert!(t.len() <= max && "añ€😀b".starts_with(t));
        }
    }
}
