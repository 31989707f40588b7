//! Activation request and response JSON: whatever decodes re-encodes and decodes again.
//! The body is `pbx_remote::fuzzing::activation`, which `cargo test` also replays over
//! `fuzz/corpus/activation/` and `fuzz/artifacts/activation/`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pbx_remote::fuzzing::activation(data));
