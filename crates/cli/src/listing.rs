//! What `kiln ps` and `kiln images` print: docker's `--format` subset (`{{.Field}}`
//! templates, `table ...`, `json`), columns aligned to their widest cell, docker's human
//! sizes and relative times, and `--filter KEY=VALUE`.

use std::collections::BTreeMap;
use std::io::Write;

/// The output flags `ps` and `images` share.
#[derive(Debug, clap::Args)]
pub struct ListingArgs {
    /// Print with a template of fields, as '{{.ID}} {{.Status}}' ("table ..." adds a
    /// header; an unknown field's error lists them all), or json (an object per line).
    #[arg(long, value_name = "TEMPLATE")]
    pub format: Option<String>,

    /// Do not shorten ids, references or commands.
    #[arg(long)]
    pub no_trunc: bool,
}

/// A listing's columns: the field's name in templates and its table header.
pub type Columns = &'static [(&'static str, &'static str)];

/// One row: a value per column, in the order of the listing's [`Columns`].
pub type Row = Vec<String>;

/// How rows are printed.
#[derive(Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns under a header line.
    Table(Vec<Part>),
    /// One rendered template per row, no header.
    Lines(Vec<Part>),
    /// One JSON object per row, keyed by field name.
    Json,
}

/// A piece of a template: literal text or a column's value.
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Field(usize),
}

/// A `--format` that is not docker's subset as kiln reads it.
#[derive(Debug, thiserror::Error)]
#[error("--format {format:?}: {reason}; accepted: {accepted}")]
pub struct FormatError {
    format: String,
    reason: String,
    accepted: String,
}

/// Parses `--format` against `columns`; `None` is the table of `default`.
pub fn parse_format(
    format: Option<&str>,
    columns: Columns,
    default: &str,
) -> Result<Format, FormatError> {
    let text = format.unwrap_or(default);
    if text == "json" {
        return Ok(Format::Json);
    }
    if text == "table" {
        return parse_format(None, columns, default);
    }
    let error = |reason: String| FormatError {
        format: text.to_owned(),
        reason,
        accepted: format!(
            "table, json, or a template of {} (with `table ` in front for a header)",
            columns
                .iter()
                .map(|(name, _)| format!("{{{{.{name}}}}}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    };
    // Escapes as docker reads them: a shell passes `\t` through as two characters.
    let (table, body) = match text.strip_prefix("table") {
        Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => {
            (true, rest.trim_start())
        }
        _ => (false, text),
    };
    let body = body.replace("\\t", "\t").replace("\\n", "\n");
    let mut parts = Vec::new();
    let mut rest = body.as_str();
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| error("a {{ without its }}".into()))?;
        let action = after[..end].trim();
        let name = action.strip_prefix('.').ok_or_else(|| {
            error(format!(
                "{{{{{action}}}}} is not a field (fields start with .)"
            ))
        })?;
        let index = columns
            .iter()
            .position(|(field, _)| *field == name)
            .ok_or_else(|| error(format!("unknown field .{name}")))?;
        parts.push(Part::Field(index));
        rest = &after[end + 2..];
    }
    if rest.contains("}}") {
        return Err(error("a }} without its {{".into()));
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(if table {
        Format::Table(parts)
    } else {
        Format::Lines(parts)
    })
}

/// `template` with each `{{.a.b}}` replaced by that field of `value` (strings as they
/// are, anything else as JSON; `{{json .a}}` always as JSON), for `inspect --format`.
pub fn render_json(template: &str, value: &serde_json::Value) -> Result<String, FormatError> {
    let error = |reason: String| FormatError {
        format: template.to_owned(),
        reason,
        accepted: match value {
            serde_json::Value::Object(map) => format!(
                "a template of {} (nested fields as {{{{.a.b}}}}, JSON as {{{{json .a}}}})",
                map.keys()
                    .map(|k| format!("{{{{.{k}}}}}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            _ => "a template of the JSON's fields".to_owned(),
        },
    };
    let mut out = String::new();
    let mut rest = template.replace("\\t", "\t").replace("\\n", "\n");
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| error("a {{ without its }}".into()))?;
        let action = after[..end].trim();
        let (as_json, path) = match action.strip_prefix("json ") {
            Some(path) => (true, path.trim()),
            None => (false, action),
        };
        let path = path.strip_prefix('.').ok_or_else(|| {
            error(format!(
                "{{{{{action}}}}} is not a field (fields start with .)"
            ))
        })?;
        let mut field = value;
        for key in path.split('.').filter(|k| !k.is_empty()) {
            field = field
                .get(key)
                .ok_or_else(|| error(format!("unknown field .{path}")))?;
        }
        match field {
            serde_json::Value::String(text) if !as_json => out.push_str(text),
            other => out.push_str(&other.to_string()),
        }
        rest = after[end + 2..].to_owned();
    }
    out.push_str(&rest);
    Ok(out)
}

fn render(parts: &[Part], row: &[String]) -> String {
    parts
        .iter()
        .map(|part| match part {
            Part::Text(text) => text.as_str(),
            Part::Field(index) => row[*index].as_str(),
        })
        .collect()
}

/// Prints `rows` as `format` says.
pub fn print(
    out: &mut dyn Write,
    format: &Format,
    columns: Columns,
    rows: &[Row],
) -> std::io::Result<()> {
    match format {
        Format::Json => {
            for row in rows {
                let object: serde_json::Map<String, serde_json::Value> = columns
                    .iter()
                    .zip(row)
                    .map(|((name, _), value)| ((*name).to_owned(), value.clone().into()))
                    .collect();
                writeln!(out, "{}", serde_json::Value::Object(object))?;
            }
        }
        Format::Lines(parts) => {
            for row in rows {
                writeln!(out, "{}", render(parts, row))?;
            }
        }
        Format::Table(parts) => {
            let header: Row = columns.iter().map(|(_, h)| (*h).to_owned()).collect();
            let lines: Vec<String> = std::iter::once(&header)
                .chain(rows)
                .map(|row| render(parts, row))
                .collect();
            write_aligned(out, &lines)?;
        }
    }
    Ok(())
}

/// Tab-separated cells padded to their column's widest cell plus three spaces (as
/// docker's tabwriter); the last cell of a line is not padded.
fn write_aligned(out: &mut dyn Write, lines: &[String]) -> std::io::Result<()> {
    let cells: Vec<Vec<&str>> = lines.iter().map(|l| l.split('\t').collect()).collect();
    let mut widths: Vec<usize> = Vec::new();
    for line in &cells {
        for (i, cell) in line.iter().enumerate().take(line.len().saturating_sub(1)) {
            let width = cell.chars().count();
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(width),
                None => widths.push(width),
            }
        }
    }
    for line in &cells {
        let mut text = String::new();
        for (i, cell) in line.iter().enumerate() {
            text.push_str(cell);
            if i + 1 < line.len() {
                let pad = widths[i] - cell.chars().count() + 3;
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        writeln!(out, "{}", text.trim_end())?;
    }
    Ok(())
}

/// `text` cut to `max` characters, ending in `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let kept: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{kept}…")
}

/// A size as docker prints it: decimal units (B, kB, MB, GB, TB), four significant
/// digits, trailing zeros dropped: `7.8MB`, `123.5kB`, `999B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    let integer_digits = (value.max(1.0).log10().floor() as usize) + 1;
    let decimals = 4usize.saturating_sub(integer_digits);
    let mut text = format!("{value:.decimals$}");
    if text.contains('.') {
        text = text.trim_end_matches('0').trim_end_matches('.').to_owned();
    }
    format!("{text}{}", UNITS[unit])
}

/// A duration as docker's `HumanDuration` words it: `Less than a second`, `5 seconds`,
/// `About a minute`, `3 hours`, `2 weeks`.
pub fn human_duration(seconds: u64) -> String {
    let minutes = seconds / 60;
    // Docker rounds hours to the nearest one.
    let hours = (seconds + 1800) / 3600;
    match seconds {
        0 => "Less than a second".to_owned(),
        1 => "1 second".to_owned(),
        2..60 => format!("{seconds} seconds"),
        _ if minutes == 1 => "About a minute".to_owned(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".to_owned(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", seconds / 3600 / 24 / 365),
    }
}

/// `then` (seconds since the epoch) relative to `now`: `5 minutes ago`.
pub fn ago(then: u64, now: u64) -> String {
    format!("{} ago", human_duration(now.saturating_sub(then)))
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A local time as docker's `CreatedAt` prints it.
pub fn timestamp(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .map_or_else(
            || unix.to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%S +0000 UTC").to_string(),
        )
}

/// `--filter KEY=VALUE` flags: values of the same key are alternatives, different keys
/// must all match (docker's rule).
#[derive(Debug, Default)]
pub struct Filters {
    by_key: BTreeMap<String, Vec<String>>,
}

/// A `--filter` that is not `KEY=VALUE` with a key the command knows.
#[derive(Debug, thiserror::Error)]
#[error("--filter {value:?}: {reason}; accepted: {accepted}")]
pub struct FilterError {
    value: String,
    reason: &'static str,
    accepted: String,
}

impl Filters {
    pub fn parse(flags: &[String], keys: &[&str]) -> Result<Filters, FilterError> {
        let mut filters = Filters::default();
        for flag in flags {
            let error = |reason| FilterError {
                value: flag.clone(),
                reason,
                accepted: keys
                    .iter()
                    .map(|k| format!("{k}=VALUE"))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let (key, value) = flag.split_once('=').ok_or_else(|| error("not KEY=VALUE"))?;
            if !keys.contains(&key) {
                return Err(error("unknown filter"));
            }
            filters
                .by_key
                .entry(key.to_owned())
                .or_default()
                .push(value.to_owned());
        }
        Ok(filters)
    }

    /// The values given for `key`, if any were.
    pub fn values(&self, key: &str) -> Option<&[String]> {
        self.by_key.get(key).map(Vec::as_slice)
    }

    /// Whether `key` was not given, or one of its values satisfies `test`.
    pub fn allows(&self, key: &str, test: impl Fn(&str) -> bool) -> bool {
        self.values(key)
            .is_none_or(|values| values.iter().any(|v| test(v)))
    }

    /// `label=KEY` or `label=KEY=VALUE` against `labels`.
    pub fn allows_labels<'a>(&self, labels: impl Fn(&str) -> Option<&'a str>) -> bool {
        // Every label filter must hold, as docker's.
        self.values("label").is_none_or(|values| {
            values.iter().all(|want| match want.split_once('=') {
                Some((key, value)) => labels(key) == Some(value),
                None => labels(want).is_some(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLUMNS: Columns = &[("ID", "ID"), ("Names", "NAMES"), ("Status", "STATUS")];

    fn printed(format: &Format, rows: &[Row]) -> String {
        let mut out = Vec::new();
        print(&mut out, format, COLUMNS, rows).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn rows() -> Vec<Row> {
        vec![
            vec!["abc".into(), "a-long-name".into(), "Up 5 seconds".into()],
            vec!["def".into(), "b".into(), "Created".into()],
        ]
    }

    #[test]
    fn templates_render_fields_and_text() {
        let format = parse_format(Some("{{.ID}}: {{ .Names }}"), COLUMNS, "").unwrap();
        assert_eq!(printed(&format, &rows()), "abc: a-long-name\ndef: b\n");
    }

    #[test]
    fn tables_align_columns_under_a_header() {
        let format =
            parse_format(None, COLUMNS, "table {{.ID}}\\t{{.Names}}\\t{{.Status}}").unwrap();
        assert_eq!(
            printed(&format, &rows()),
            "ID    NAMES         STATUS\n\
             abc   a-long-name   Up 5 seconds\n\
             def   b             Created\n"
        );
    }

    #[test]
    fn json_prints_an_object_per_row() {
        let format = parse_format(Some("json"), COLUMNS, "").unwrap();
        assert_eq!(
            printed(&format, &rows()[..1]),
            "{\"ID\":\"abc\",\"Names\":\"a-long-name\",\"Status\":\"Up 5 seconds\"}\n"
        );
    }

    #[test]
    fn unknown_fields_and_broken_templates_are_refused_naming_what_is_accepted() {
        let err = parse_format(Some("{{.Nope}}"), COLUMNS, "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--format \"{{.Nope}}\": unknown field .Nope; accepted: table, json, or a \
             template of {{.ID}} {{.Names}} {{.Status}} (with `table ` in front for a header)"
        );
        for bad in ["{{.ID", "{{ID}}", "x}}"] {
            assert!(parse_format(Some(bad), COLUMNS, "").is_err(), "{bad}");
        }
    }

    #[test]
    fn json_templates_reach_nested_fields() {
        let value = serde_json::json!({"status": "running", "run": {"argv": ["sh", "-c"]}});
        assert_eq!(
            render_json("{{.status}} {{.run.argv}} {{json .status}}", &value).unwrap(),
            "running [\"sh\",\"-c\"] \"running\""
        );
        let err = render_json("{{.nope}}", &value).unwrap_err().to_string();
        assert!(
            err.contains("unknown field .nope") && err.contains("{{.run}}"),
            "{err}"
        );
    }

    #[test]
    fn sizes_are_dockers() {
        for (bytes, text) in [
            (0, "0B"),
            (999, "999B"),
            (1234, "1.234kB"),
            (123_456, "123.5kB"),
            (7_800_000, "7.8MB"),
            (1_000_000_000, "1GB"),
        ] {
            assert_eq!(human_size(bytes), text, "{bytes}");
        }
    }

    #[test]
    fn durations_are_dockers() {
        for (seconds, text) in [
            (0, "Less than a second"),
            (1, "1 second"),
            (5, "5 seconds"),
            (60, "About a minute"),
            (300, "5 minutes"),
            (3600, "About an hour"),
            (7200, "2 hours"),
            (3 * 86400, "3 days"),
            (21 * 86400, "3 weeks"),
            (90 * 86400, "3 months"),
            (1000 * 86400, "2 years"),
        ] {
            assert_eq!(human_duration(seconds), text, "{seconds}");
        }
        assert_eq!(ago(100, 400), "5 minutes ago");
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }

    #[test]
    fn filters_or_within_a_key_and_and_across_keys() {
        let flags = ["status=running", "status=exited", "label=a=1"].map(String::from);
        let filters = Filters::parse(&flags, &["status", "label"]).unwrap();
        assert!(filters.allows("status", |s| s == "exited"));
        assert!(!filters.allows("status", |s| s == "created"));
        assert!(
            filters.allows("name", |_| false),
            "an absent key allows all"
        );
        assert!(filters.allows_labels(|k| (k == "a").then_some("1")));
        assert!(!filters.allows_labels(|k| (k == "a").then_some("2")));
        let err = Filters::parse(&["size=1".into()], &["status"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--filter \"size=1\": unknown filter; accepted: status=VALUE"
        );
    }
}
