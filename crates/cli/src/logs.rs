//! `kiln logs`' selection flags, as docker spells them: `-n/--tail`, `--since`,
//! `-t/--timestamps`.

use clap::Args;
use kiln_sandbox::LogOptions;

#[derive(Debug, Args)]
pub struct LogSelectionArgs {
    /// Only the last N lines of each stream, or "all".
    #[arg(short = 'n', long, value_name = "N|all", default_value = "all")]
    tail: String,

    /// Only lines since a time: RFC 3339 (2026-12-05T04:00:00Z), Unix seconds, or a duration ago (10m, 1h30m).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,

    /// Start each line with the time it arrived (RFC 3339, UTC).
    #[arg(short, long)]
    timestamps: bool,
}

impl LogSelectionArgs {
    pub fn into_options(self, follow: bool) -> anyhow::Result<LogOptions> {
        let tail = match self.tail.as_str() {
            "all" => None,
            text => Some(text.parse::<u64>().map_err(|_| {
                anyhow::anyhow!("--tail {text:?}: expected a number of lines or \"all\"")
            })?),
        };
        Ok(LogOptions {
            follow,
            tail,
            since: self.since,
            timestamps: self.timestamps,
        })
    }
}
