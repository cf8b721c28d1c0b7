//! GPT-2 style pre-tokenization without a regex engine: splits text into the pieces that BPE
//! merges never cross.
//!
//! Mirrors GPT-2's pattern
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`:
//! an English contraction suffix; a run of letters, of digits, or of other symbols, each with at
//! most one leading space; and whitespace, where a run followed by a non-space keeps its last
//! character for the next piece. Letters are `char::is_alphabetic`, digits `char::is_numeric`.
//! Checked against the regex on 2 MB of English docs: identical pieces; the one known departure is
//! that Unicode's Alphabetic property also holds some combining marks (e.g. Hebrew points) that
//! `\p{L}` leaves out, so such a mark stays with its letter here.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Number
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];

/// Iterator over the pre-tokens of a text; the pieces concatenate back to the text.
pub struct PreTokens<'a> {
    text: &'a str,
    pos: usize,
}

/// Splits `text` into GPT-2 style pre-tokens.
pub fn pretokenize(text: &str) -> PreTokens<'_> {
    PreTokens { text, pos: 0 }
}

impl<'a> PreTokens<'a> {
    /// End of the run of `cls` characters starting at byte `from`.
    fn run_end(&self, from: usize, cls: Class) -> usize {
        let rest = &self.text[from..];
        rest.char_indices()
            .find(|&(_, c)| class(c) != cls)
            .map_or(self.text.len(), |(i, _)| from + i)
    }
}

impl<'a> Iterator for PreTokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let text = self.text;
        let start = self.pos;
        let rest = &text[start..];
        let mut chars = rest.chars();
        let c0 = chars.next()?;
        let end = 'end: {
            if c0 == '\'' {
                for c in CONTRACTIONS {
                    if rest.starts_with(c) {
                        break 'end start + c.len();
                    }
                }
            }
            let k0 = class(c0);
            if k0 != Class::Space {
                break 'end self.run_end(start, k0);
            }
            // c0 is whitespace.
            if c0 == ' ' {
                if let Some(c1) = chars.next() {
                    let k1 = class(c1);
                    if k1 != Class::Space {
                        break 'end self.run_end(start + 1, k1);
                    }
                }
            }
            let ws_end = self.run_end(start, Class::Space);
            if ws_end == text.len() {
                break 'end ws_end;
            }
            // Followed by a non-space: leave the last whitespace char to the next piece, unless
            // the run is a single char.
            let last = text[..ws_end].chars().next_back().unwrap();
            let trimmed = ws_end - last.len_utf8();
            if trimmed > start {
                trimmed
            } else {
                ws_end
            }
        };
        self.pos = end;
        Some(&text[start..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        pretokenize(s).collect()
    }

    #[test]
    fn matches_gpt2_pattern_on_examples() {
        assert_eq!(split("Hello world"), vec!["Hello", " world"]);
        assert_eq!(
            split("I'm here, don't"),
            vec!["I", "'m", " here", ",", " don", "'t"]
        );
        assert_eq!(split("a  b"), vec!["a", " ", " b"]);
        assert_eq!(split("x\n\ny"), vec!["x", "\n", "\n", "y"]);
        assert_eq!(split("ab 123 !!? "), vec!["ab", " 123", " !!?", " "]);
        assert_eq!(split("héllo wörld 日本"), vec!["héllo", " wörld", " 日本"]);
        assert_eq!(split(""), Vec::<&str>::new());
    }

    #[test]
    fn pieces_concatenate_back() {
        let s = "  Tabs\tand\r\n  spaces '' 's 3.14 €uro  \n";
        assert_eq!(split(s).concat(), s);
    }
}
