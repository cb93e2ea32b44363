//! `lbctl`: control client for `lb-daemon`. The control socket is not implemented yet, so
//! every command reports that instead of pretending to work.
fn main() -> std::process::ExitCode {
    eprintln!("lbctl: the daemon's control socket is not available in this version; configure lb-daemon with flags");
    std::process::ExitCode::from(3)
}
