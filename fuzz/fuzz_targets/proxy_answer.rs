//! An HTTP CONNECT proxy's answer from a hostile or broken proxy.
//! The body is `pbx_remote::fuzzing::proxy_answer`, which `cargo test` also replays over
//! `fuzz/corpus/proxy_answer/` and `fuzz/artifacts/proxy_answer/`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pbx_remote::fuzzing::proxy_answer(data));
