//! A WASI command, not a plugin: a component of the wrong world for the upload tests.

fn main() {
    std::process::exit(i32::from(std::env::args().count() > 1));
}
