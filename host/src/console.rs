//! The CLI's standard output: the one place the binary prints for people and scripts to read
//! (logs go to stderr through `tracing`).

use std::io::Write;

/// Prints one line to stdout and flushes it, so a supervising process sees it at once.
#[expect(clippy::print_stdout, reason = "this module is the CLI's stdout")]
pub fn line(text: &str) {
    println!("{text}");
    let _ = std::io::stdout().flush();
}

/// Writes bytes to stdout as they are (a streamed export).
pub fn raw(bytes: &[u8]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()
}
