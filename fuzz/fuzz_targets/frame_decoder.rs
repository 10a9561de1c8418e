//! Any bytes as a frame, under a receiver's limits and a sender's: decoding never panics,
//! and whatever decodes encodes again.
#![no_main]

use dbsync_protocol::codec::{self, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits keep each run fast; the bounds are the code under test, not their values.
    let receiver = Limits {
        max_frame_bytes: 1 << 20,
        max_decompressed_bytes: 4 << 20,
        ..Limits::default()
    };
    for limits in [receiver, Limits::requests()] {
        if let Ok(message) = codec::decode_exact(data, &limits) {
            let _ = codec::encode(&message, 1);
        }
        let _ = codec::decode(data, &limits);
        let _ = codec::decode_batch_exact(data, &limits);
    }
});
