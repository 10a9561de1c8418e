//! The MessagePack pre-scan on any bytes: it never panics and never reads past its input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for depth in [1, 8, 32] {
        let _ = dbsync_protocol::msgpack::check(data, depth);
    }
});
