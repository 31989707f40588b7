//! The header the front writes at the start of every request stream.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pbx_remote::protocol::{read_frame, StreamHeader};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut input = data;
        let _ = read_frame::<_, StreamHeader>(&mut input).await;
    });
});
