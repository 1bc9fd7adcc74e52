//! The agent's log: levelled lines on stderr, as text for people or JSON for log pipelines.
//!
//! Events that carry numbers (latencies, counts, generations) pass them as key-values
//! (`log::info!(generation = 3, writes = 12; "config applied")`), so a pipeline reads them as
//! fields instead of parsing the message. The level comes from `RUST_LOG` (default `info`).

use std::{fmt::Write as _, io::Write as _};

use log::kv::{self, VisitSource};

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-11-22T10:00:00.000Z INFO  config applied generation=3`
    #[default]
    Text,
    /// One JSON object per line: `time`, `level`, `msg` and the event's fields.
    Json,
}

/// Installs the logger; call once, before anything logs.
pub fn init(format: LogFormat) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    match format {
        LogFormat::Text => builder.format(|buf, record| {
            let mut fields = String::new();
            let _ = record.key_values().visit(&mut TextFields(&mut fields));
            writeln!(
                buf,
                "{} {:<5} {}{fields}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        }),
        LogFormat::Json => builder.format(|buf, record| {
            let mut line = serde_json::Map::new();
            line.insert("time".into(), buf.timestamp_millis().to_string().into());
            line.insert(
                "level".into(),
                record.level().as_str().to_ascii_lowercase().into(),
            );
            line.insert("msg".into(), record.args().to_string().into());
            let _ = record.key_values().visit(&mut JsonFields(&mut line));
            writeln!(buf, "{}", serde_json::Value::Object(line))
        }),
    };
    builder.init();
}

/// Appends ` key=value` per field; values with spaces are quoted.
struct TextFields<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for TextFields<'_> {
    fn visit_pair(&mut self, key: kv::Key<'kvs>, value: kv::Value<'kvs>) -> Result<(), kv::Error> {
        let value = value.to_string();
        if value.contains(char::is_whitespace) || value.is_empty() {
            let _ = write!(self.0, " {key}={value:?}");
        } else {
            let _ = write!(self.0, " {key}={value}");
        }
        Ok(())
    }
}

/// Adds each field to the JSON object, numbers and booleans as such.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl<'kvs> VisitSource<'kvs> for JsonFields<'_> {
    fn visit_pair(&mut self, key: kv::Key<'kvs>, value: kv::Value<'kvs>) -> Result<(), kv::Error> {
        let json = if let Some(n) = value.to_u64() {
            n.into()
        } else if let Some(n) = value.to_i64() {
            n.into()
        } else if let Some(b) = value.to_bool() {
            b.into()
        } else if let Some(x) = value.to_f64().and_then(serde_json::Number::from_f64) {
            serde_json::Value::Number(x)
        } else {
            value.to_string().into()
        };
        self.0.insert(key.to_string(), json);
        Ok(())
    }
}
