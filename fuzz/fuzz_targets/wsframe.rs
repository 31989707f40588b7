//! The WebSocket frame watcher over arbitrary bytes, fed in arbitrary pieces: no panic, and the
//! count does not depend on how the bytes were split.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pbx_remote::agent::wsframe::FrameWatch;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut whole = FrameWatch::default();
    let a = whole.feed(rest);
    let mut pieces = FrameWatch::default();
    let step = usize::from(split).max(1);
    let b: usize = rest.chunks(step).map(|c| pieces.feed(c)).sum();
    assert_eq!(a, b);
});
