//! The command line: `serve` boots the gateway; the other subcommands administer its data
//! directory, or a running gateway through its admin API.

mod admin_client;
mod args;
mod data_dir;
mod plugin;
mod serve;

pub(crate) use args::Cli;
use args::Command;

/// The exit status of a failed command (documented in docs/operating.md; clap exits 2 for a
/// command line it cannot read).
pub(crate) fn exit_code(error: &anyhow::Error) -> u8 {
    if error.is::<admin_client::AdminRefusal>() {
        3
    } else if error.is::<admin_client::Unreachable>() {
        4
    } else {
        1
    }
}

/// Runs one subcommand.
pub(crate) fn run(cli: Cli) -> anyhow::Result<()> {
    // `serve` sets up tracing once its configuration (which may name an OTLP endpoint) is read.
    if !matches!(cli.command, Command::Serve { .. }) {
        serve::init_tracing(None)?;
    }
    match cli.command {
        Command::Init { config } => data_dir::init(&config),
        Command::Serve { config, listen } => serve::run(config.as_deref(), listen),
        Command::Tenant { action } => data_dir::tenant(action),
        Command::Key { action } => data_dir::key(action),
        Command::Balance { action } => admin_client::balance(action),
        Command::Channel { action } => admin_client::channel(action),
        Command::Usage { action } => admin_client::usage(action),
        Command::Plugin { action } => plugin::command(action),
    }
}
