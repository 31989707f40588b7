//! Request and response header sanitising: nothing forged, hop-by-hop or reserved survives.
//! The body is `pbx_remote::fuzzing::sanitize`, which `cargo test` also replays over
//! `fuzz/corpus/sanitize/` and `fuzz/artifacts/sanitize/`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pbx_remote::fuzzing::sanitize(data));
