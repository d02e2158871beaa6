//! Parse arbitrary text as a `jenkins-agent.jnlp` descriptor (what `--jnlp-url` reads once it has
//! opened the sealed answer), and split arbitrary `--jnlp-url` values.
//!
//! Properties: neither function panics; a parsed descriptor has a secret and a name that do not
//! start with '-'; a split URL gives a base ending in '/' and a non-empty name without '/'.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wisp::agent::jnlp::{parse, split_url};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(d) = parse(text) {
        assert!(!d.secret.starts_with('-') && !d.name.starts_with('-'));
    }
    if let Ok((base, name)) = split_url(text) {
        assert!(base.ends_with('/'));
        assert!(!name.is_empty());
    }
});
