//! Passwordless tokens: nothing verifies under a key no input can have signed for.
//! The body is `pbx_remote::fuzzing::passwordless_token`, which `cargo test` also replays over
//! `fuzz/corpus/passwordless_token/` and `fuzz/artifacts/passwordless_token/`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pbx_remote::fuzzing::passwordless_token(data));
