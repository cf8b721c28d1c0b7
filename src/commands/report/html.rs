//! HTML pieces of the report: text escaping, tables from [`Grid`]s, the page frame and its
//! inline style sheet. Everything written here is well-formed XML as well as HTML (void
//! elements self-closed, only the five XML entities), so a strict XML parser can check a report.

use super::table::Grid;

/// `text` safe inside an element or a quoted attribute: `& < > " '` become entities, and
/// characters XML 1.0 forbids (C0 controls other than tab, newline and carriage return) become
/// U+FFFD, so a model's stray control byte cannot break the document.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// `grid` as `<table id=...>` with a header row; every cell escaped. `first_col_header`: the
/// first cell of each row is a row header (`<th scope="row">`).
pub fn table(grid: &Grid, id: &str, class: &str, first_col_header: bool) -> String {
    let mut s = format!(
        "<table id=\"{}\" class=\"{}\">\n<thead><tr>",
        escape(id),
        escape(class)
    );
    for h in &grid.header {
        s.push_str(&format!("<th scope=\"col\">{}</th>", escape(h)));
    }
    s.push_str("</tr></thead>\n<tbody>\n");
    for row in &grid.rows {
        s.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            if i == 0 && first_col_header {
                s.push_str(&format!("<th scope=\"row\">{}</th>", escape(cell)));
            } else {
                s.push_str(&format!("<td>{}</td>", escape(cell)));
            }
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody>\n</table>\n");
    s
}

/// The inline style sheet (no `<` or `&`, so it needs no CDATA section).
const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0.2em; }
p.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
thead th { background: #f0f0f0; }
table.samples td { white-space: pre-wrap; max-width: 24em; }
div.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; border: 1px solid #ddd; padding: 0.5em; }
figcaption { font-size: 0.85em; color: #444; max-width: 520px; }
p.note { color: #a33; font-style: italic; }
svg.plot text { font-family: system-ui, sans-serif; fill: #222; }
";

/// The whole document around `body` (already escaped HTML).
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n\
         <meta charset=\"utf-8\"/>\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        escape(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_quotes_and_control_characters() {
        assert_eq!(
            escape("a<b & \"c\" 'd'>\u{1}\n"),
            "a&lt;b &amp; &quot;c&quot; &#39;d&#39;&gt;\u{FFFD}\n"
        );
    }
}
