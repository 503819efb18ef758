//! Text from files, made safe to print on a terminal.
//!
//! Class names come from `.irisemb` files and `dataset.json`: a name with a
//! newline or an escape sequence would otherwise break the tables or drive
//! the user's terminal.

use std::borrow::Cow;

/// `text` as it can be shown on a terminal: control characters (newlines,
/// escape sequences), bidirectional overrides and backslashes are written
/// as in a Rust string literal (`\n`, `\u{1b}`, `\\`); everything else,
/// letters of any script included, is kept.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn controls_are_escaped_and_letters_kept() {
        assert_eq!(printable("left kidney"), "left kidney");
        assert_eq!(printable("Leber ä 肝臓"), "Leber ä 肝臓");
        assert_eq!(
            printable("a\u{1b}[2Jb\nc\td\\e\u{202e}f"),
            "a\\u{1b}[2Jb\\nc\\td\\\\e\\u{202e}f"
        );
        assert!(!printable("\u{7}\r\u{0}").chars().any(char::is_control));
    }
}
