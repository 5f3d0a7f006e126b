//! Options every kiln command honours.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Directory for the content store and sandbox state; kiln refuses one that another
    /// user owns or can write [default: $XDG_CACHE_HOME/kiln or ~/.cache/kiln]
    #[arg(long, global = true, env = "KILN_ROOT", value_name = "DIR")]
    root: Option<PathBuf>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// Print nothing but errors and requested output (`ps` and `images`: ids only).
    #[arg(short, long, global = true)]
    quiet: bool,

    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides. Given before
    /// the command: after `run` or `create`, -v shares a volume, as in docker.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Disk space the built root images under DIR/rootfs may take (as 20g, 512m); past it,
    /// building or running an image removes the least recently used ones no sandbox is
    /// pinned to [default: 20g]
    #[arg(
        long,
        global = true,
        env = "KILN_ROOTFS_CACHE_MAX",
        value_name = "SIZE"
    )]
    rootfs_cache_max: Option<String>,
}

/// Resolved global options, passed to every command.
#[derive(Debug, Clone)]
pub struct Globals {
    pub root: PathBuf,
    pub json: bool,
    pub quiet: bool,
    pub verbose: u8,
    /// `None`: kiln-sandbox's default.
    pub rootfs_cache_max: Option<u64>,
}

impl Globals {
    pub fn from_args(args: GlobalArgs) -> anyhow::Result<Self> {
        let root = match args.root {
            Some(root) if root.as_os_str().is_empty() => {
                bail!("--root (or KILN_ROOT) is empty; give a directory path")
            }
            Some(root) => root,
            None => kiln_hostfs::default_root().context(
                "cannot find a default --root: neither XDG_CACHE_HOME nor HOME is set; pass --root DIR",
            )?,
        };
        // Not a clap conflict: -v is not global (it is a volume after run/create).
        if args.quiet && args.verbose > 0 {
            bail!("-q and -v contradict each other; give one of them");
        }
        let rootfs_cache_max = args
            .rootfs_cache_max
            .as_deref()
            .map(kiln_sandbox::parse_size)
            .transpose()
            .context("--rootfs-cache-max (or KILN_ROOTFS_CACHE_MAX)")?;
        Ok(Self {
            root,
            json: args.json,
            quiet: args.quiet,
            verbose: args.verbose,
            rootfs_cache_max,
        })
    }

    /// Whether progress and notes go to stderr: on a terminal, or with -v; never with
    /// -q or --json. Scripts that read stderr see only errors and warnings.
    pub fn show_progress(&self) -> bool {
        !self.quiet && !self.json && (self.verbose > 0 || std::io::stderr().is_terminal())
    }

    /// Logs go to stderr; RUST_LOG wins over -v/-q.
    pub fn init_logging(&self) {
        let default = match (self.quiet, self.verbose) {
            (true, _) => "error",
            (false, 0) => "warn",
            (false, 1) => "info",
            (false, 2) => "debug",
            (false, _) => "trace",
        };
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .try_init();
    }
}
