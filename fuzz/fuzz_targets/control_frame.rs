//! Control-stream frames (and the TCP transport's goodbye) from a hostile peer: decoding never
//! panics, and whatever decodes re-encodes and decodes again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pbx_remote::protocol::{read_frame, write_frame, Control, Goodbye};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut input = data;
        while let Ok(Some(frame)) = read_frame::<_, Control>(&mut input).await {
            let mut buf = Vec::new();
            write_frame(&mut buf, &frame).await.unwrap();
            let again: Control = read_frame(&mut &buf[..]).await.unwrap().unwrap();
            assert_eq!(format!("{frame:?}"), format!("{again:?}"));
        }
        let mut input = data;
        while let Ok(Some(goodbye)) = read_frame::<_, Goodbye>(&mut input).await {
            let mut buf = Vec::new();
            write_frame(&mut buf, &goodbye).await.unwrap();
            let again: Goodbye = read_frame(&mut &buf[..]).await.unwrap().unwrap();
            assert_eq!(format!("{goodbye:?}"), format!("{again:?}"));
        }
    });
});
