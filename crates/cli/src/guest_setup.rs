//! The flags of `kiln run` and `kiln create` for the guest's names and mounts, as docker
//! spells them. `-h` is `--hostname` here, as in `docker run`, so these commands take
//! `--help` only.

use clap::{ArgAction, Args};
use kiln_sandbox::CreateFields;

#[derive(Debug, Args)]
pub struct GuestArgs {
    /// The guest's hostname [default: the sandbox id's first 12 characters].
    #[arg(short = 'h', long, value_name = "NAME")]
    hostname: Option<String>,

    /// Add a line to the guest's /etc/hosts: NAME:IP (repeatable).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    add_hosts: Vec<String>,

    /// A nameserver for the guest's /etc/resolv.conf, instead of the network's (repeatable, up to 3).
    #[arg(long, value_name = "IP")]
    dns: Vec<String>,

    /// Make the root filesystem read-only (volumes, tmpfs mounts, /tmp and /run stay writable).
    #[arg(long)]
    read_only: bool,

    /// Mount a tmpfs: PATH[:size=SIZE,mode=OCTAL] (repeatable; default mode 1777).
    #[arg(long, value_name = "PATH[:OPTIONS]")]
    tmpfs: Vec<String>,

    /// Mount as docker does: type=bind,source=HOSTDIR,target=PATH[,readonly] (a 9p volume,
    /// as -v) or type=tmpfs,target=PATH[,tmpfs-size=SIZE,tmpfs-mode=OCTAL] (repeatable).
    #[arg(long = "mount", value_name = "SPEC")]
    mounts: Vec<String>,

    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

impl GuestArgs {
    /// Fills these flags into `fields`; kiln-sandbox checks them.
    pub fn fill(self, fields: &mut CreateFields) {
        fields.hostname = self.hostname;
        fields.add_hosts = self.add_hosts;
        fields.dns = self.dns;
        fields.read_only = self.read_only;
        fields.tmpfs = self.tmpfs;
        fields.mounts = self.mounts;
    }
}
