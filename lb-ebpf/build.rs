// Fail early, with the fix, when the BPF linker is missing: the error rustc would give
// otherwise ("linker `bpf-linker` not found") does not say how to get it.
fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !found {
        panic!(
            "bpf-linker is not installed: run `cargo xtask setup` (it installs the linker matching the nightly toolchain's LLVM)"
        );
    }
}
