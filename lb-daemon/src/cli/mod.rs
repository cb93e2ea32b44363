//! The command lines of the three binaries, in one place so that their man pages and shell
//! completions (`cargo xtask dist`) come from the same definitions the binaries parse.
//! `lb-daemon`'s flags are [`crate::config::Args`].
pub mod audit;
pub mod lbctl;

use clap::CommandFactory as _;

/// Every binary's command definition: `lb-daemon`, `lbctl`, `lb-audit`.
pub fn commands() -> Vec<clap::Command> {
    vec![
        crate::config::Args::command(),
        lbctl::Cli::command(),
        audit::Cli::command(),
    ]
}
