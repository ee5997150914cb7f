//! Python's notion of whitespace, which sacrebleu's `str.split()` and `str.rstrip()` use.
//!
//! It is Rust's (`char::is_whitespace`, the Unicode `White_Space` property) plus the four
//! ASCII information separators U+001C–U+001F, which Python counts as whitespace (bidirectional
//! class B/S) and Unicode does not. Checked against CPython 3.11's `str.isspace` over every code
//! point.

/// `c.isspace()` in Python 3.
pub fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `text.split()` in Python: the non-empty runs between whitespace.
pub fn python_split_whitespace(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_python_whitespace).filter(|s| !s.is_empty())
}

/// `text.rstrip()` in Python.
pub fn python_trim_end(text: &str) -> &str {
    text.trim_end_matches(is_python_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_cpython_isspace() {
        // The full list from CPython 3.11: [c for c in range(0x110000) if chr(c).isspace()].
        let python: Vec<u32> = [0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680]
            .into_iter()
            .chain(0x2000..=0x200a)
            .chain([0x2028, 0x2029, 0x202f, 0x205f, 0x3000])
            .collect();
        let ours: Vec<u32> =
            (0..=0x10FFFF).filter_map(char::from_u32).filter(|&c| is_python_whitespace(c)).map(u32::from).collect();
        assert_eq!(ours, python);
        assert_eq!(python_split_whitespace("\u{1c}a\u{a0} b\u{200b}c ").collect::<Vec<_>>(), ["a", "b\u{200b}c"]);
        assert_eq!(python_trim_end("a \u{3000}\u{1f}"), "a");
    }
}
