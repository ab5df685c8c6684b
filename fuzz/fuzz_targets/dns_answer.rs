//! The DNS answer parser the kernel program runs (shared code), over
//! arbitrary packets: never panics, never reads past the packet, reports at
//! most MAX_ANSWERS addresses, and the name key is well formed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_common::dns::{DnsName, MAX_ANSWERS, answers, question};

fuzz_target!(|data: &[u8]| {
    let mut name = DnsName::default();
    let Some((at, count)) = question(data, 0, &mut name) else {
        return;
    };
    let mut n = 0;
    answers(data, at, count, |_| n += 1);
    assert!(n <= MAX_ANSWERS);
    // The key is the wire name (labels may hold any octet, zero included),
    // zero-padded after its final empty label.
    let mut at = 0;
    while name.wire[at] != 0 {
        at += 1 + name.wire[at] as usize;
    }
    assert!(name.wire[at..].iter().all(|b| *b == 0));
});
