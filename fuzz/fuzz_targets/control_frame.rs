//! Control-stream frames (and the TCP transport's goodbye) from a hostile peer.
//! The body is `pbx_remote::fuzzing::control_frame`, which `cargo test` also replays over
//! `fuzz/corpus/control_frame/` and `fuzz/artifacts/control_frame/`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pbx_remote::fuzzing::control_frame(data));
