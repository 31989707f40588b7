//! WebSocket frame boundaries, however the bytes are split.
//! The body is `pbx_remote::fuzzing::wsframe`, which `cargo test` also replays over
//! `fuzz/corpus/wsframe/` and `fuzz/artifacts/wsframe/`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pbx_remote::fuzzing::wsframe(data));
