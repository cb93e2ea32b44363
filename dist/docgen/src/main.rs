//! `lb-docgen OUT_DIR`: writes the man pages and shell completions of lb's binaries under
//! OUT_DIR (see the library's documentation); used by `cargo xtask dist`.
use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: lb-docgen OUT_DIR");
        return ExitCode::from(2);
    };
    match lb_docgen::generate(&PathBuf::from(out)) {
        Ok(g) => {
            println!(
                "lb-docgen: {} man pages, {} completion scripts",
                g.man_pages.len(),
                g.completions.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lb-docgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
