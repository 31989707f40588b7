//! A portal page read for its login form (the portal login broker).
//! The body is `pbx_remote::fuzzing::login_form`, which `cargo test` also replays over
//! `fuzz/corpus/login_form/` and `fuzz/artifacts/login_form/`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pbx_remote::fuzzing::login_form(data));
