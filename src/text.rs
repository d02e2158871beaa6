//! Text cut to a byte limit without splitting a character: every message that crosses a limit
//! (a rejection, an exit message, a log line quoting peer input) goes through here, because
//! slicing a `str` inside a UTF-8 character panics. Also [`Tenths`], a duration in seconds
//! without the float formatting code (tens of KB the static agent does not carry).

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

/// A duration as seconds with one decimal, rounded to the nearest tenth: `1.5`, `0.3`, `10.0`
/// (what `{:.1}` of the seconds as `f64` prints, in integer arithmetic).
pub struct Tenths(pub std::time::Duration);

impl std::fmt::Display for Tenths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tenths = (self.0.as_millis() + 50) / 100;
        write!(f, "{}.{}", tenths / 10, tenths % 10)
    }
}

#[cfg(test)]
mod tests {
    use super::{truncate, Tenths};
    use std::time::Duration;

    #[test]
    fn tenths_of_a_second() {
        let show = |ms| Tenths(Duration::from_millis(ms)).to_string();
        assert_eq!(show(0), "0.0");
        assert_eq!(show(500), "0.5");
        assert_eq!(show(1049), "1.0");
        assert_eq!(show(1050), "1.1");
        assert_eq!(show(9_960), "10.0");
        assert_eq!(show(61_234), "61.2");
    }

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
