//! A model's own chat template (the Jinja `chat_template` of a Hugging Face
//! `tokenizer_config.json`), rendered with minijinja as transformers' `apply_chat_template`
//! renders it with Jinja2: `trim_blocks` and `lstrip_blocks` on, a trailing newline of the
//! template dropped, Python's string and dict methods (`.strip()`, `.startswith()`, `.items()`,
//! through minijinja-contrib's pycompat), loop controls, and the globals transformers adds:
//! `raise_exception(msg)` (an error naming the template), `strftime_now(fmt)` (UTC) and a
//! `tojson` filter that writes what Python's `json.dumps(x, ensure_ascii=False)` writes.
//! The variables: `messages` (a list of `{"role", "content"}`), `add_generation_prompt`,
//! `bos_token` / `eos_token` where the tokenizer has them, `tools` and `documents` (none).
//! transformers' `{% generation %}` marker blocks are accepted and render their body.
//!
//! The loss mask that goes with a rendered conversation is chat.rs's.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use super::chat::Message;
use super::error::{DataError, Result};

const NAME: &str = "chat_template";

/// A compiled chat template, and where it came from (for errors).
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("len", &self.source.len())
            .finish()
    }
}

/// The special-token strings a template may print.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it was read (a file, or a file and key) and
    /// leads every error message of this template.
    pub fn new(source: &str, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, without_generation_tags(source))
            .map_err(|e| template_error(&origin, "does not compile", &e))?;
        Ok(Self {
            env,
            source: source.to_string(),
            origin,
        })
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template was read.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends with what opens the
    /// assistant's next turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
    ) -> Result<String> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_iter([
                    ("role", Value::from(m.role.name())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut vars: Vec<(&str, Value)> = vec![
            ("messages", Value::from(msgs)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        for (name, v) in [
            ("bos_token", &tokens.bos_token),
            ("eos_token", &tokens.eos_token),
        ] {
            if let Some(s) = v {
                vars.push((name, Value::from(s.as_str())));
            }
        }
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error(&self.origin, "does not compile", &e))?;
        tmpl.render(Value::from_iter(vars))
            .map_err(|e| template_error(&self.origin, "failed to render", &e))
    }

    /// An error about this template.
    pub(crate) fn error(&self, msg: String) -> DataError {
        DataError::ChatTemplate {
            origin: self.origin.clone(),
            msg,
        }
    }
}

fn template_error(origin: &str, what: &str, e: &Error) -> DataError {
    let mut msg = format!("{what}: {}", e.detail().unwrap_or(""));
    if e.detail().is_none() {
        msg.push_str(&e.kind().to_string());
    }
    if let Some(line) = e.line() {
        let _ = write!(msg, " (template line {line})");
    }
    DataError::ChatTemplate {
        origin: origin.to_string(),
        msg,
    }
}

/// transformers' `raise_exception`: the template refuses the conversation.
fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {msg}"),
    ))
}

/// Replaces transformers' `{% generation %}` / `{% endgeneration %}` (which mark assistant
/// text for its own masking) by an `if true` block, keeping their whitespace control.
fn without_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..close];
        let (open_ctl, body) = split_ctl(inner, true);
        let (body, close_ctl) = split_ctl(body, false);
        let replaced = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replaced {
            Some(r) => {
                let _ = write!(out, "{{%{open_ctl} {r} {close_ctl}%}}");
            }
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

/// Splits a leading (or trailing) `-`/`+` whitespace-control mark off a tag's inside.
fn split_ctl(s: &str, leading: bool) -> (&str, &str) {
    let has = |c: char| c == '-' || c == '+';
    if leading {
        match s.chars().next() {
            Some(c) if has(c) => (&s[..1], &s[1..]),
            _ => ("", s),
        }
    } else {
        match s.chars().last() {
            Some(c) if has(c) => (&s[..s.len() - 1], &s[s.len() - 1..]),
            _ => (s, ""),
        }
    }
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=indent,
/// sort_keys=sort_keys)` (separators `", "` and `": "`, or `","` and newlines with an indent).
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let mut out = String::new();
    write_json(value, &mut out, indent, sort_keys.unwrap_or(false), 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    v: &Value,
    out: &mut String,
    indent: Option<usize>,
    sort: bool,
    level: usize,
) -> std::result::Result<(), Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match v.as_i64() {
            Some(i) if v.is_integer() => {
                let _ = write!(out, "{i}");
            }
            _ => out.push_str(&py_float(f64::try_from(v.clone()).unwrap_or(f64::NAN))),
        },
        ValueKind::String => json_string(v.as_str().unwrap_or(""), out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                json_string(&k.to_string(), out);
                out.push_str(": ");
                write_json(&v.get_item(k)?, out, indent, sort, level + 1)?;
            }
            newline(out, level);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_json(item, out, indent, sort, level + 1)?;
            }
            newline(out, level);
            out.push(']');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {} value is not JSON", v.kind()),
            ))
        }
    }
    Ok(())
}

/// Python's `repr` of a float as `json.dumps` writes it.
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{x:?}");
    s.replace("e", "e+").replace("e+-", "e-")
}

/// A JSON string as Python writes it with `ensure_ascii=False`.
fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// transformers' `strftime_now(fmt)`: the current UTC time formatted with the directives
/// templates use (`%d %m %Y %y %b %B %a %A %H %M %S %j %%`); others are kept as written.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&fmt, secs)
}

fn strftime(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(m - 1) as usize];
    let yday = before + d + i64::from(leap && m > 2);
    let wday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('d') => write!(out, "{d:02}"),
            Some('m') => write!(out, "{m:02}"),
            Some('Y') => write!(out, "{y}"),
            Some('y') => write!(out, "{:02}", y.rem_euclid(100)),
            Some('b') => write!(out, "{}", &month[..3]),
            Some('B') => write!(out, "{month}"),
            Some('a') => write!(out, "{}", &DAYS[wday][..3]),
            Some('A') => write!(out, "{}", DAYS[wday]),
            Some('H') => write!(out, "{:02}", sod / 3600),
            Some('M') => write!(out, "{:02}", sod / 60 % 60),
            Some('S') => write!(out, "{:02}", sod % 60),
            Some('j') => write!(out, "{yday:03}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chat::Role;

    #[test]
    fn strftime_matches_known_dates() {
        // 2024-07-26 was a Friday; 2000-02-29 a Tuesday (a leap day); 13:05:09 UTC.
        assert_eq!(
            strftime("%d %b %Y|%A|%j", 1_721_952_000),
            "26 Jul 2024|Friday|208"
        );
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %B %y %%", 951_829_509),
            "2000-02-29 13:05:09 Tue February 00 %"
        );
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ [1, 2.5, none, true, 'é\"\\n'] | tojson }}|{{ {} | tojson }}|{{ {'b': [1], 'a': {}} | tojson(indent=2) }}",
            "test",
        )
        .unwrap();
        let out = t
            .render(
                &[Message::new(Role::User, "hi")],
                false,
                &TemplateTokens::default(),
            )
            .unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"hi\"}|[1, 2.5, null, true, \"é\\\"\\n\"]|{}|{\n  \"b\": [\n    1\n  ],\n  \"a\": {}\n}"
        );
    }

    #[test]
    fn generation_tags_render_their_body_and_keep_whitespace_control() {
        assert_eq!(
            without_generation_tags(
                "a{%- generation %}b{% endgeneration -%}c{% if x %}{% endif %}"
            ),
            "a{%- if true %}b{% endif -%}c{% if x %}{% endif %}"
        );
    }

    #[test]
    fn raise_exception_and_syntax_errors_name_the_template() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "cfg.json").unwrap();
        let e = t
            .render(&[], false, &TemplateTokens::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cfg.json: chat template: failed to render"),
            "{e}"
        );
        assert!(e.contains("no system role"), "{e}");
        let e = ChatTemplate::new("{% for m in messages %}", "x/tokenizer_config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x/tokenizer_config.json: chat template: does not compile"),
            "{e}"
        );
    }

    #[test]
    fn python_string_methods_and_trim_blocks() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {% if m.content.startswith(' ') %}[{{ m.content.strip() }}]{% endif %}\n{% endfor %}\n{{ bos_token }}{{ eos_token }}\n",
            "t",
        )
        .unwrap();
        let tokens = TemplateTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
        };
        let out = t
            .render(&[Message::new(Role::User, " x ")], false, &tokens)
            .unwrap();
        assert_eq!(out, "[x]<s></s>");
    }
}
