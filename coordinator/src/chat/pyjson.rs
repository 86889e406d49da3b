//! JSON as Python's `json.dumps` writes it, which chat templates print through `tojson`: items
//! separated by `", "` and keys by `": "` (or, with `indent`, one item per line), non-ASCII kept
//! unless `ensure_ascii`. A tool schema then renders into the prompt byte for byte as the
//! reference renders it.

use std::io;

use serde::Serialize;
use serde_json::Value;
use serde_json::ser::{CompactFormatter, Formatter, PrettyFormatter, Serializer};

/// `json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)`.
pub fn dumps(value: &Value, indent: Option<usize>, ensure_ascii: bool) -> String {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail, and a `Value` always serializes.
    let _ = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            value.serialize(&mut Serializer::with_formatter(
                &mut out,
                PrettyFormatter::with_indent(&spaces),
            ))
        }
        None => value.serialize(&mut Serializer::with_formatter(&mut out, PythonSeparators)),
    };
    let text = String::from_utf8(out).unwrap_or_default();
    if ensure_ascii {
        escape_non_ascii(&text)
    } else {
        text
    }
}

/// Compact JSON with Python's default separators.
struct PythonSeparators;

impl Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        CompactFormatter.begin_object_value(w)?;
        w.write_all(b" ")
    }
}

/// Non-ASCII characters (which occur only inside strings) as `\uXXXX`, astral ones as surrogate
/// pairs, as Python's `ensure_ascii` writes them.
fn escape_non_ascii(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_layouts() {
        let v = json!({"a": [1, 2.5, "x"], "b": {}, "c": [], "d": "é😀\n"});
        assert_eq!(
            dumps(&v, None, false),
            "{\"a\": [1, 2.5, \"x\"], \"b\": {}, \"c\": [], \"d\": \"é😀\\n\"}"
        );
        assert_eq!(
            dumps(&v, None, true),
            "{\"a\": [1, 2.5, \"x\"], \"b\": {}, \"c\": [], \"d\": \"\\u00e9\\ud83d\\ude00\\n\"}"
        );
        assert_eq!(
            dumps(&json!({"a": [1]}), Some(1), false),
            "{\n \"a\": [\n  1\n ]\n}"
        );
    }
}
