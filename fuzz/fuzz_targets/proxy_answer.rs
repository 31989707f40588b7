//! An HTTP CONNECT proxy's answer from a hostile or broken proxy: reading it never panics,
//! never takes more than 8 KiB, and stops right after the first blank line, leaving the
//! tunnel's bytes in the stream.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pbx_remote::agent::read_proxy_answer;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut input = data;
        if let Ok(line) = read_proxy_answer(&mut input).await {
            let taken = data.len() - input.len();
            assert!(taken <= 8 * 1024);
            assert!(data[..taken].ends_with(b"\r\n\r\n"));
            let first = data.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            assert_eq!(first + 4, taken);
            assert!(line.chars().count() <= 200);
        }
    });
});
