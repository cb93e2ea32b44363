//! The kernel programs live in the `lb-xdp` binary target (`src/main.rs`), built for
//! `bpfel-unknown-none` by lb-daemon's build script. This library target exists so that
//! lb-daemon can name the crate as a build dependency and be rebuilt when it changes.
#![no_std]
