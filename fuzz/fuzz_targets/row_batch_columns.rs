//! A row batch's payload read column by column: checked, then every row read out, as values
//! and through each column's cursor (one value past the last too), with any bytes a sender may
//! send, compact columns (differences, packed UUIDs) included.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = dbsync_protocol::columns::decode_batch(data.to_vec(), 32) {
        let _ = batch.rows.to_rows();
        if let Some(cursors) = batch.rows.cursors() {
            for mut cursor in cursors {
                for _ in 0..=batch.rows.len() {
                    if let Ok(scalar) = cursor.next_scalar() {
                        let _ = scalar.value(cursor.kind());
                    }
                }
            }
        }
        let _ = batch.into_row_batch();
    }
});
