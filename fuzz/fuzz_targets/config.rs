//! The agent's config file from any bytes: never a panic; a refusal names the file.
//! The body is `pbx_remote::fuzzing::config`, which `cargo test` also replays over
//! `fuzz/corpus/config/` and `fuzz/artifacts/config/`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pbx_remote::fuzzing::config(data));
