//! `tollgate`: the gateway binary. `serve` runs it; the other subcommands administer its data
//! directory or a running gateway (see [`cli`]). The only place `anyhow` is used.

mod cli;

use clap::Parser;

/// mimalloc instead of glibc's allocator: a request allocates and frees many small buffers across
/// threads, and glibc's `malloc`/`free` (with its chunk consolidation) took about a seventh of the
/// gateway's CPU under load. `cli::serve` tunes it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A failure is one line on stderr, its causes after colons (never a backtrace: the message is
/// for an operator), and an exit status that says its kind.
fn main() -> std::process::ExitCode {
    match cli::run(cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::from(cli::exit_code(&error))
        }
    }
}
