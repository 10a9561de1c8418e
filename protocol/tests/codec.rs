//! Frame round-trips (property tests) and one test per kind of malformed input.

use dbsync_protocol::codec::{self, FLAG_ZSTD, HEADER_LEN, Limits, MAGIC};
use dbsync_protocol::columns::Scalar;
use dbsync_protocol::message::columnar::{
    Column, ColumnsWriter, DELTAS, Kind as ColumnKind, PACKED,
};
use dbsync_protocol::message::{
    Credit, ErrorMessage, Hello, KeyFilter, Kind, Ping, Pull, PullDone, RowBatch, TableInfo,
};
use dbsync_protocol::{Message, ProtocolError, Value};
use proptest::prelude::*;

fn limits() -> Limits {
    Limits::default()
}

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![MAGIC, kind, flags, 0];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_map(Value::Float),
        Just(Value::Float(f64::INFINITY)),
        Just(Value::Float(f64::NEG_INFINITY)),
        "-?[0-9]{1,60}(\\.[0-9]{1,30})?".prop_map(Value::Numeric),
        ".{0,40}".prop_map(Value::Text),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Value::Bytes),
        any::<[u8; 16]>().prop_map(Value::Uuid),
        any::<i32>().prop_map(Value::Date),
        any::<i64>().prop_map(Value::TimestampTz),
        (any::<i32>(), any::<i32>(), any::<i64>()).prop_map(|(months, days, micros)| {
            Value::Interval {
                months,
                days,
                micros,
            }
        }),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 32, 6, |inner| {
        proptest::collection::vec(inner, 0..6).prop_map(Value::Array)
    })
}

/// Equality that treats NaN as equal to NaN (the wire must carry NaN through).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

proptest! {
    #[test]
    fn row_batches_round_trip(rows in (1usize..6).prop_flat_map(|width| proptest::collection::vec(proptest::collection::vec(value(), width), 0..20)), seq in any::<u64>()) {
        let batch = RowBatch {
            request_id: 7,
            seq,
            columns: (0..rows.first().map_or(1, Vec::len)).map(|i| format!("c{i}")).collect(),
            last_key: rows.last().map(|r| vec![r[0].clone()]).unwrap_or_default(),
            rows,
            transfer_id: "t".into(),
        };
        let encoded = codec::encode(&Message::RowBatch(batch.clone()), 3).unwrap();
        prop_assert_eq!(encoded[2], FLAG_ZSTD);
        let (decoded, used) = codec::decode(&encoded, &limits()).unwrap().unwrap();
        prop_assert_eq!(used, encoded.len());
        let Message::RowBatch(decoded) = decoded else { panic!("wrong kind") };
        prop_assert_eq!(decoded.seq, batch.seq);
        prop_assert_eq!(decoded.rows.len(), batch.rows.len());
        for (a, b) in decoded.rows.iter().flatten().zip(batch.rows.iter().flatten()) {
            prop_assert!(same(a, b), "{:?} != {:?}", a, b);
        }
    }

    #[test]
    fn columns_written_directly_make_the_same_frame(rows in (1usize..6).prop_flat_map(|width| proptest::collection::vec(proptest::collection::vec(value(), width), 1..20))) {
        let batch = RowBatch {
            request_id: 300,
            seq: 70_000,
            columns: (0..rows[0].len()).map(|i| format!("c{i}")).collect(),
            last_key: vec![rows[rows.len() - 1][0].clone()],
            rows,
            transfer_id: "0190-transfer".into(),
        };
        let (frame, raw) = codec::encode_sized(&Message::RowBatch(batch.clone()), 1).unwrap();
        let write = |column: &mut Column, value: &Value, kind: Option<ColumnKind>| match (value, kind) {
            (Value::Null, _) => column.null(),
            (_, None) => column.value(value).unwrap(),
            (Value::Bool(b), _) => column.bool(*b),
            (Value::Int(i) | Value::Time(i) | Value::Timestamp(i) | Value::TimestampTz(i), _) => column.int(*i),
            (Value::Date(d), _) => column.int(i64::from(*d)),
            (Value::Float(f), _) => column.float(*f),
            (Value::Numeric(t) | Value::Text(t) | Value::Json(t), _) => column.str(t),
            (Value::Bytes(b), _) => column.bin(b),
            (Value::Uuid(u), _) => column.bin(u),
            (other, Some(_)) => panic!("{other:?} has no bare form"),
        };
        // Each column written in place, and each written apart and added whole.
        let mut writer = ColumnsWriter::new(batch.columns.len(), batch.rows.len(), Vec::new());
        let mut apart = ColumnsWriter::new(batch.columns.len(), batch.rows.len(), Vec::new());
        for index in 0..batch.columns.len() {
            // The kind the serializer chooses: the one kind of the non-null values, Int when all
            // are NULL, none (whole values) when they differ.
            let mut kinds = batch.rows.iter().map(|r| &r[index]).filter(|v| **v != Value::Null).map(ColumnKind::of);
            let kind = match kinds.next() {
                None => Some(ColumnKind::Int),
                Some(first) => first.filter(|k| kinds.all(|other| other == Some(*k))),
            };
            let column = writer.column(kind).unwrap();
            let mut alone = Column::new(kind);
            for row in &batch.rows {
                write(column, &row[index], kind);
                write(&mut alone, &row[index], kind);
            }
            apart.push(&alone).unwrap();
        }
        let columns = writer.finish().unwrap();
        prop_assert_eq!(&apart.finish().unwrap(), &columns);
        let (direct, direct_raw) = codec::encode_row_batch_columns(&batch, &columns, 1).unwrap();
        prop_assert_eq!(raw, direct_raw);
        prop_assert!(frame == direct, "the frames differ");
        // Sent from where the rows lie, behind the room a sender leaves, more room, or too
        // little (then copied): the same frame.
        let room = codec::row_batch_room(&batch.columns);
        for room in [room, room + 7, 0, 1] {
            let mut page = vec![0xAB; room];
            page.extend_from_slice(&columns);
            let (in_place, in_place_raw) = codec::encode_row_batch_in_place(&batch, &mut page, room, 1).unwrap();
            prop_assert_eq!(raw, in_place_raw);
            prop_assert!(frame == in_place, "the frame sent in place differs (room {})", room);
        }
    }

    #[test]
    fn columns_of_differences_read_back_as_their_values(
        ints in proptest::collection::vec(proptest::option::of(any::<i64>()), 1..40),
        start in any::<i64>(),
        step in any::<i64>(),
    ) {
        // Any integers (differences that wrap past either end) and a sequence of any step.
        let sequence: Vec<Option<i64>> = (0..ints.len() as i64)
            .map(|i| Some(start.wrapping_add(i.wrapping_mul(step))))
            .collect();
        for values in [ints, sequence] {
            let frame = one_int_column(&values, Column::compact(Some(ColumnKind::Int)));
            let arrived = codec::decode_batch_exact(&frame, &limits()).unwrap();
            let expected: Vec<Vec<Value>> =
                values.iter().map(|v| vec![v.map_or(Value::Null, Value::Int), Value::Text(String::new())]).collect();
            prop_assert_eq!(arrived.rows.to_rows().unwrap(), expected);
            let mut cursors = arrived.rows.cursors().unwrap();
            for value in &values {
                prop_assert_eq!(
                    cursors[0].next_scalar().unwrap(),
                    value.map_or(Scalar::Null, Scalar::Int)
                );
            }
        }
    }

    #[test]
    fn uuids_packed_or_not_read_back_as_themselves(
        uuids in proptest::collection::vec(proptest::option::of(any::<[u8; 16]>()), 0..40),
    ) {
        // Packed when none is NULL (and there is one at least), as binaries otherwise.
        let mut column = Column::compact(Some(ColumnKind::Uuid));
        for uuid in &uuids {
            match uuid {
                Some(u) => column.bin(u),
                None => column.null(),
            }
        }
        let frame = one_column(uuids.len(), &column);
        let arrived = codec::decode_batch_exact(&frame, &limits()).unwrap();
        let packed = !uuids.is_empty() && uuids.iter().all(Option::is_some);
        prop_assert_eq!(arrived.rows.as_bytes()[2], ColumnKind::Uuid as u8 | if packed { PACKED } else { 0 });
        let expected: Vec<Vec<Value>> =
            uuids.iter().map(|u| vec![u.map_or(Value::Null, Value::Uuid), Value::Text(String::new())]).collect();
        prop_assert_eq!(arrived.rows.to_rows().unwrap(), expected);
        let mut cursors = arrived.rows.cursors().unwrap();
        for uuid in &uuids {
            prop_assert_eq!(
                cursors[0].next_scalar().unwrap(),
                uuid.as_ref().map_or(Scalar::Null, |u| Scalar::Bin(u))
            );
        }
        // Past the column's last value: an error, not the next column's bytes.
        prop_assert!(cursors[0].next_scalar().is_err());
    }

    #[test]
    fn any_prefix_is_incomplete_not_an_error(cut in 0usize..200) {
        let encoded = codec::encode(&Message::Pull(Pull {
            request_id: 1, table: "users".into(), after_key: Some(vec![Value::Int(42)]), limit: 10_000,
            exclude_columns: vec![], credits: 4, transfer_id: None,
            key_filter: Some(KeyFilter::Range { from: Some(vec![Value::Int(1)]), to: None }),
            cursor_column: Some("updated_at".into()), keys_only: false, split: None,
        }), 3).unwrap();
        let cut = cut.min(encoded.len() - 1);
        prop_assert!(codec::decode(&encoded[..cut], &limits()).unwrap().is_none());
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = codec::decode(&bytes, &limits());
        let mut framed = vec![MAGIC, Kind::RowBatch as u8, 0, 0];
        framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        framed.extend_from_slice(&bytes);
        let _ = codec::decode(&framed, &limits());
    }
}

#[test]
fn every_message_kind_round_trips() {
    let messages = vec![
        Message::Hello(Hello {
            versions: vec![2],
            token: "dbs_x".into(),
            password: None,
            client_name: "dbsync/0.1".into(),
        }),
        Message::Error(ErrorMessage {
            code: "rate_limited".into(),
            message: "slow down".into(),
            retry_after_ms: Some(1500),
            transfer_id: None,
        }),
        Message::ListTables,
        Message::TableList(vec![TableInfo {
            name: "users".into(),
            estimated_rows: 10,
            bytes: 8192,
            primary_key: vec!["id".into()],
            depends_on: vec![],
        }]),
        Message::DescribeTable("users".into()),
        Message::Credit(Credit {
            request_id: 1,
            batches: 8,
        }),
        Message::PullDone(PullDone {
            request_id: 1,
            rows: 3,
            more: false,
            truncated: true,
            last_key: Some(vec![Value::Int(3)]),
            transfer_id: "t".into(),
        }),
        Message::Ping(Ping { nonce: 9 }),
        Message::Pong(Ping { nonce: 9 }),
    ];
    for message in messages {
        let encoded = codec::encode(&message, 3).unwrap();
        assert_eq!(codec::decode_exact(&encoded, &limits()).unwrap(), message);
    }
}

#[test]
fn truncated_frames_are_incomplete_and_exact_decoding_refuses_them() {
    let encoded = codec::encode(&Message::Ping(Ping { nonce: 1 }), 3).unwrap();
    for cut in 0..encoded.len() {
        assert!(codec::decode(&encoded[..cut], &limits()).unwrap().is_none());
        assert!(matches!(
            codec::decode_exact(&encoded[..cut], &limits()),
            Err(ProtocolError::Truncated)
        ));
    }
}

#[test]
fn bad_headers_are_refused() {
    let good = codec::encode(&Message::Ping(Ping { nonce: 1 }), 3).unwrap();
    let mut bad_magic = good.clone();
    bad_magic[0] = 0x00;
    assert!(matches!(
        codec::decode(&bad_magic, &limits()),
        Err(ProtocolError::BadHeader(_))
    ));
    let mut bad_flags = good.clone();
    bad_flags[2] = 0x80;
    assert!(matches!(
        codec::decode(&bad_flags, &limits()),
        Err(ProtocolError::BadHeader(_))
    ));
    let mut bad_reserved = good;
    bad_reserved[3] = 1;
    assert!(matches!(
        codec::decode(&bad_reserved, &limits()),
        Err(ProtocolError::BadHeader(_))
    ));
}

#[test]
fn unknown_message_kinds_are_refused() {
    let frame = frame(0xEE, 0, &[0xc0]);
    assert_eq!(
        codec::decode(&frame, &limits()),
        Err(ProtocolError::UnknownKind(0xEE))
    );
}

#[test]
fn oversized_frames_are_refused_from_the_header() {
    // Only the header is present: the declared size alone is enough to refuse.
    let header = [
        MAGIC,
        Kind::RowBatch as u8,
        FLAG_ZSTD,
        0,
        0xff,
        0xff,
        0xff,
        0xff,
    ];
    assert!(matches!(
        codec::decode(&header, &limits()),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
    let small = Limits {
        max_frame_bytes: 16,
        ..Limits::default()
    };
    let payload = frame(
        Kind::DescribeTable as u8,
        0,
        &rmp_serde::to_vec(&"x".repeat(40)).unwrap(),
    );
    assert!(matches!(
        codec::decode(&payload, &small),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
}

#[test]
fn a_zstd_bomb_is_refused() {
    // 256 MiB of zeros compress to a few kilobytes.
    let zeros = vec![0u8; 256 * 1024 * 1024];
    let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
    drop(zeros);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let framed = frame(Kind::RowBatch as u8, FLAG_ZSTD, &bomb);
    assert!(matches!(
        codec::decode(&framed, &limits()),
        Err(ProtocolError::DecompressedTooLarge { .. })
    ));

    // A frame that does not declare its size is cut off at the limit while streaming.
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    encoder.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut encoder, &vec![0u8; 8 * 1024 * 1024]).unwrap();
    let undeclared = encoder.finish().unwrap();
    let tight = Limits {
        max_decompressed_bytes: 1024 * 1024,
        ..Limits::default()
    };
    let framed = frame(Kind::RowBatch as u8, FLAG_ZSTD, &undeclared);
    assert!(matches!(
        codec::decode(&framed, &tight),
        Err(ProtocolError::DecompressedTooLarge { .. })
    ));

    // A payload that holds more than its first frame declares (a second frame after it) does
    // not fit the buffer sized from the declaration.
    let mut stacked = zstd::bulk::compress(&[1u8; 100], 3).unwrap();
    stacked.extend(zstd::bulk::compress(&vec![2u8; 1024 * 1024], 3).unwrap());
    let framed = frame(Kind::RowBatch as u8, FLAG_ZSTD, &stacked);
    assert!(matches!(
        codec::decode(&framed, &limits()),
        Err(ProtocolError::Decompress(_))
    ));

    // Garbage flagged as zstd.
    let framed = frame(Kind::RowBatch as u8, FLAG_ZSTD, b"not zstd at all");
    assert!(matches!(
        codec::decode(&framed, &limits()),
        Err(ProtocolError::Decompress(_))
    ));
}

#[test]
fn ten_thousand_levels_of_nesting_are_refused() {
    let mut payload = vec![0x91u8; 10_000];
    payload.push(0xc0);
    let framed = frame(Kind::RowBatch as u8, 0, &payload);
    assert!(matches!(
        codec::decode(&framed, &limits()),
        Err(ProtocolError::TooDeep { .. })
    ));
}

#[test]
fn a_declared_length_of_four_billion_in_a_ten_byte_frame_is_refused() {
    let payload = [0xdd, 0xee, 0x6b, 0x28, 0x00, 0x90, 0x90, 0x90, 0x90, 0x90];
    let framed = frame(Kind::RowBatch as u8, 0, &payload);
    assert_eq!(framed.len(), HEADER_LEN + 10);
    assert!(matches!(
        codec::decode(&framed, &limits()),
        Err(ProtocolError::LengthOutOfBounds {
            declared: 4_000_000_000,
            ..
        })
    ));
}

#[test]
fn a_payload_of_the_wrong_shape_is_malformed() {
    // A valid MessagePack string where a Pull struct belongs.
    let framed = frame(Kind::Pull as u8, 0, &rmp_serde::to_vec(&"hello").unwrap());
    assert!(matches!(
        codec::decode(&framed, &limits()),
        Err(ProtocolError::Malformed(_))
    ));
    // Trailing bytes after a frame given as a whole message.
    let mut encoded = codec::encode(&Message::Ping(Ping { nonce: 1 }), 3).unwrap();
    encoded.push(0);
    assert!(matches!(
        codec::decode_exact(&encoded, &limits()),
        Err(ProtocolError::Malformed(_))
    ));
}

#[test]
fn an_unsupported_version_has_no_negotiated_version() {
    assert_eq!(dbsync_protocol::negotiate(&[1, 10]), None);
    assert_eq!(dbsync_protocol::negotiate(&[1, 2]), Some(2));
}

#[test]
fn hello_debug_hides_token_and_password() {
    let hello = Hello {
        versions: vec![2],
        token: "dbs_secret_token".into(),
        password: Some("pw_secret".into()),
        client_name: "x".into(),
    };
    let shown = format!("{hello:?}");
    assert!(!shown.contains("secret"), "{shown}");
}

#[test]
fn columns_of_the_wrong_length_and_pages_without_their_room_are_refused() {
    let mut writer = ColumnsWriter::new(2, 2, Vec::new());
    let mut short = Column::new(Some(ColumnKind::Int));
    short.int(1);
    assert!(
        writer
            .push(&short)
            .unwrap_err()
            .contains("1 values in a batch of 2 rows")
    );
    short.null();
    writer.push(&short).unwrap();
    assert!(writer.finish().unwrap_err().contains("1 of 2 columns"));
    let batch = RowBatch {
        request_id: 1,
        seq: 0,
        columns: vec!["id".into()],
        rows: Vec::new(),
        last_key: Vec::new(),
        transfer_id: String::new(),
    };
    let room = codec::row_batch_room(&batch.columns);
    let mut page = vec![0; room - 1];
    assert!(codec::encode_row_batch_in_place(&batch, &mut page, room, 1).is_err());
}

/// A row batch frame of one column `c` of `values`, written into `column`.
fn one_int_column(values: &[Option<i64>], mut column: Column) -> Vec<u8> {
    for value in values {
        match value {
            Some(i) => column.int(*i),
            None => column.null(),
        }
    }
    one_column(values.len(), &column)
}

/// A row batch frame of one column `c` of `rows` values, `column`, then an empty text column.
fn one_column(rows: usize, column: &Column) -> Vec<u8> {
    let mut writer = ColumnsWriter::new(2, rows, Vec::new());
    writer.push(column).unwrap();
    let text = writer.column(Some(ColumnKind::Text)).unwrap();
    for _ in 0..rows {
        text.str("");
    }
    let batch = RowBatch {
        request_id: 1,
        seq: 0,
        columns: vec!["c".into(), "d".into()],
        rows: Vec::new(),
        last_key: Vec::new(),
        transfer_id: "t".into(),
    };
    codec::encode_row_batch_columns(&batch, &writer.finish().unwrap(), 1)
        .unwrap()
        .0
}

#[test]
fn integers_go_as_differences_only_where_that_is_smaller() {
    let tag = |frame: &[u8]| {
        let batch = codec::decode_batch_exact(frame, &limits()).unwrap();
        let columns = batch.rows.as_bytes().to_vec();
        // [ [tag, [values...]] ]: the tag is the third byte (a positive fixint).
        columns[2]
    };
    // Time stamps a second apart, with a NULL among them: differences, and far smaller.
    let stamps: Vec<Option<i64>> = (0..1000)
        .map(|i| (i != 500).then_some(757_382_400_000_000 + i * 1_000_000))
        .collect();
    let as_differences = one_int_column(&stamps, Column::compact(Some(ColumnKind::Int)));
    let as_values = one_int_column(&stamps, Column::new(Some(ColumnKind::Int)));
    assert_eq!(tag(&as_differences), ColumnKind::Int as u8 | DELTAS);
    assert_eq!(tag(&as_values), ColumnKind::Int as u8);
    assert!(as_differences.len() * 10 < as_values.len());
    // Values that swing back and forth take more bytes as differences: sent as values.
    let swings: Vec<Option<i64>> = (0..100)
        .map(|i| Some(if i % 2 == 0 { 0 } else { 4_000_000_000 }))
        .collect();
    let frame = one_int_column(&swings, Column::compact(Some(ColumnKind::Int)));
    assert_eq!(tag(&frame), ColumnKind::Int as u8);
    assert_eq!(
        frame,
        one_int_column(&swings, Column::new(Some(ColumnKind::Int)))
    );
    // A column of another kind is written as by `Column::new`.
    let mut text = Column::compact(Some(ColumnKind::Text));
    text.str("a");
    let mut writer = ColumnsWriter::new(1, 1, Vec::new());
    writer.push(&text).unwrap();
    assert_eq!(writer.finish().unwrap()[2], ColumnKind::Text as u8);
}

#[test]
fn row_batches_travel_column_major_and_ragged_ones_are_refused() {
    let batch = RowBatch {
        request_id: 1,
        seq: 0,
        columns: vec!["id".into(), "name".into()],
        rows: vec![
            vec![Value::Int(1), Value::Text("a".into())],
            vec![Value::Int(2), Value::Text("b".into())],
        ],
        last_key: vec![Value::Int(2)],
        transfer_id: "t".into(),
    };
    // The rows field is [[2, [1, 2]], [5, ["a", "b"]]]: one array per column, each with its kind
    // (2 integers, 5 text) and bare values.
    let payload = rmp_serde::to_vec(&batch).unwrap();
    let columns = rmp_serde::to_vec(&((2u8, [1i64, 2]), (5u8, ["a", "b"]))).unwrap();
    assert!(
        payload
            .windows(columns.len())
            .any(|w| w == columns.as_slice()),
        "column-major rows in the payload"
    );
    // A column of mixed kinds, or with a NULL, still round-trips.
    let mut mixed = batch.clone();
    mixed.rows[0][1] = Value::Int(5);
    mixed.rows[1][0] = Value::Null;
    let encoded = codec::encode(&Message::RowBatch(mixed.clone()), 3).unwrap();
    let (decoded, _) = codec::decode(&encoded, &limits()).unwrap().unwrap();
    assert_eq!(decoded, Message::RowBatch(mixed));
    // Rows of different lengths cannot be sent.
    let mut ragged = batch.clone();
    ragged.rows[1].pop();
    assert!(codec::encode(&Message::RowBatch(ragged), 3).is_err());
    // From a peer: columns of different lengths, unknown kinds, and values that do not match
    // their column's kind are refused, not padded, truncated or guessed.
    #[derive(serde::Serialize)]
    struct Raw<C>(u64, u64, Vec<String>, C, Vec<Value>, String);
    fn framed<C: serde::Serialize>(columns: C) -> Vec<u8> {
        let payload =
            rmp_serde::to_vec(&Raw(1, 0, vec!["id".into()], columns, vec![], "t".into())).unwrap();
        let compressed = zstd::bulk::compress(&payload, 3).unwrap();
        let mut frame = vec![MAGIC, Kind::RowBatch as u8, FLAG_ZSTD, 0];
        frame.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
        frame.extend_from_slice(&compressed);
        frame
    }
    let err = codec::decode(&framed(((2u8, [1i64, 2]), (5u8, ["a"]))), &limits()).unwrap_err();
    assert!(err.to_string().contains("differ in length"), "{err}");
    let err = codec::decode(&framed(((2u8, [1i64]), (5u8, ["a", "b"]))), &limits()).unwrap_err();
    assert!(err.to_string().contains("differ in length"), "{err}");
    for frame in [
        framed(((99u8, [1i64]),)),
        framed(((2u8, ["x"]),)),
        framed(((7u8, [serde_bytes::Bytes::new(&[1, 2, 3])]),)),
        framed(((2u8, [1i64], 3u8),)),
    ] {
        assert!(matches!(
            codec::decode(&frame, &limits()),
            Err(ProtocolError::Malformed(_))
        ));
    }
}

#[test]
fn buckets_round_trip_and_are_checked() {
    use dbsync_protocol::message::{
        BucketHashes, Buckets, RangeHash, Verify, VerifyPage, VerifyRange,
    };
    let ask = Message::Verify(Verify {
        request_id: 3,
        table: "t".into(),
        after: Some(vec![Value::Int(9)]),
        limit: 10,
        detail: true,
        range: Some(VerifyRange {
            upto: None,
            hash: RangeHash::PgRecord,
            buckets: Some(Buckets {
                count: 16,
                only: vec![0b1000_0001, 0],
            }),
            keys_only: false,
            since: None,
            keys: None,
        }),
    });
    let answer = Message::VerifyPage(VerifyPage {
        request_id: 3,
        rows: 3,
        hash: vec![0; 8],
        last_key: None,
        more: false,
        keys: vec![],
        hashes: vec![],
        buckets: Some(BucketHashes {
            ids: vec![0, 7],
            rows: vec![1, 2],
            hashes: vec![5; 16],
        }),
        mark: None,
    });
    for message in [ask, answer] {
        let encoded = codec::encode(&message, 3).unwrap();
        assert_eq!(codec::decode_exact(&encoded, &limits()).unwrap(), message);
    }
    // Well formed: a power of two within the most, a bitmap of as many bits with a page only.
    let buckets = |count, only: Vec<u8>| Buckets { count, only };
    assert!(buckets(16, vec![0, 0]).is_well_formed(true));
    assert!(buckets(1, vec![]).is_well_formed(false));
    assert!(!buckets(16, vec![0]).is_well_formed(true));
    assert!(!buckets(16, vec![0, 0]).is_well_formed(false));
    assert!(!buckets(12, vec![]).is_well_formed(false));
    assert!(!buckets(1 << 17, vec![]).is_well_formed(false));
    // Numbers in order and in range, no empty bucket, counts that make the rows.
    let hashes = |ids: Vec<u32>, rows: Vec<u64>| BucketHashes {
        hashes: vec![0; 8 * ids.len()],
        ids,
        rows,
    };
    assert!(hashes(vec![0, 7], vec![1, 2]).is_well_formed(8, 3));
    assert!(hashes(vec![], vec![]).is_well_formed(8, 0));
    assert!(!hashes(vec![7, 0], vec![1, 2]).is_well_formed(8, 3));
    assert!(!hashes(vec![0, 8], vec![1, 2]).is_well_formed(8, 3));
    assert!(!hashes(vec![0, 7], vec![1, 2]).is_well_formed(8, 4));
    assert!(!hashes(vec![0, 7], vec![0, 3]).is_well_formed(8, 3));
    assert!(!hashes(vec![0, 7], vec![u64::MAX, 4]).is_well_formed(8, 3));
}

/// Protocol 9's fields keep their places after empty ones, and a message without them is what
/// an older peer reads: no field it does not know.
#[test]
fn marks_and_listed_keys_keep_their_places() {
    use dbsync_protocol::message::{
        Buckets, Mark, RangeHash, Since, Verify, VerifyPage, VerifyRange,
    };
    let range = |keys_only, since, keys| VerifyRange {
        upto: None,
        hash: RangeHash::PgRecord,
        buckets: None,
        keys_only,
        since,
        keys,
    };
    let ask = |range| {
        Message::Verify(Verify {
            request_id: 4,
            table: "t".into(),
            after: None,
            limit: 10,
            detail: true,
            range: Some(range),
        })
    };
    let page = |mark| {
        Message::VerifyPage(VerifyPage {
            request_id: 4,
            rows: 0,
            hash: vec![0; 8],
            last_key: None,
            more: false,
            keys: vec![],
            hashes: vec![],
            buckets: None,
            mark,
        })
    };
    let since = Some(Since {
        xid: 1 << 40,
        written: false,
    });
    for message in [
        ask(range(true, None, None)),
        ask(range(false, since, None)),
        ask(range(false, since, Some(vec![vec![Value::Int(1)]]))),
        page(Some(Mark {
            xid: 77,
            table: "1/2/3/4".into(),
        })),
        page(None),
    ] {
        let encoded = codec::encode(&message, 3).unwrap();
        assert_eq!(codec::decode_exact(&encoded, &limits()).unwrap(), message);
    }
    // What a protocol 8 peer knows of a range: without the new fields it reads the message
    // whole (MessagePack arrays, a field by its place; a longer array would be refused).
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct EightRange {
        upto: Option<Vec<Value>>,
        hash: RangeHash,
        #[serde(default)]
        buckets: Option<Buckets>,
    }
    let plain = rmp_serde::to_vec(&range(false, None, None)).unwrap();
    assert!(rmp_serde::from_slice::<EightRange>(&plain).is_ok());
    assert_eq!(plain[0], 0x92, "two fields, as protocol 5 wrote them");
    let with_buckets = VerifyRange {
        buckets: Some(Buckets {
            count: 2,
            only: vec![],
        }),
        ..range(false, None, None)
    };
    assert_eq!(rmp_serde::to_vec(&with_buckets).unwrap()[0], 0x93);
}
