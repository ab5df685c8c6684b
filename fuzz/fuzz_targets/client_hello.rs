//! The ClientHello sniffer (SNI, ALPN) over arbitrary client bytes, fed in
//! the chunk sizes the first byte picks: never panics, and once it has
//! decided, more bytes do not change its mind.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_agent::proxy::client_hello::{Hello, HelloSniffer};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split % 64) + 1;
    let mut s = HelloSniffer::default();
    let mut decided: Option<Hello> = None;
    for part in rest.chunks(chunk) {
        let state = s.feed(part).clone();
        if let Some(d) = &decided {
            assert_eq!(&state, d, "a decided sniffer changed its mind");
        } else if state != Hello::Pending {
            decided = Some(state);
        }
    }
});
