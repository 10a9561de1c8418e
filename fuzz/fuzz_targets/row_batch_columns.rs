//! A row batch's payload read column by column: checked, then every row read out, with any
//! bytes a sender may send.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = dbsync_protocol::columns::decode_batch(data.to_vec(), 32) {
        let _ = batch.rows.to_rows();
        let _ = batch.into_row_batch();
    }
});
