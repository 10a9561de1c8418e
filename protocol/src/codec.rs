//! Frames: an 8-byte header and a MessagePack payload, row batches zstd-compressed.
//!
//! ```text
//! 0      1      2      3      4              8
//! +------+------+------+------+--------------+----------------------+
//! | 0xDB | kind | flags| 0    | length (BE)  | payload (length bytes)|
//! +------+------+------+------+--------------+----------------------+
//! flags bit 0: payload is zstd-compressed
//! ```
//!
//! Decoding checks before it parses: header, frame size limit, declared decompressed size,
//! bounded decompression, a MessagePack pre-scan (depth, declared lengths), then the typed
//! payload. Partial input is reported as incomplete, not as an error.

use std::io::Read;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ProtocolError;
use crate::message::{Kind, Message};

/// First byte of every frame.
pub const MAGIC: u8 = 0xDB;
/// Header length in bytes.
pub const HEADER_LEN: usize = 8;
/// Flag: the payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 0x01;
/// Default largest payload on the wire (16 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;
/// Default largest payload after decompression (64 MiB).
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: u64 = 64 * 1024 * 1024;
/// Default deepest MessagePack nesting (a row batch needs 4 plus array dimensions).
pub const DEFAULT_MAX_DEPTH: usize = 32;
/// Largest request a sender accepts from a receiver (4 MiB): a pull with a key filter of
/// [`crate::message::MAX_FILTER_KEYS`] long text keys fits; nothing a receiver sends is bigger.
pub const MAX_REQUEST_BYTES: u32 = 4 * 1024 * 1024;
/// Default zstd level for row batches. Level 1: on the bench's table (columns already grouped)
/// level 3 made batches only ~2 % smaller for about twice the compression CPU
/// (docs/performance.md).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Every bound the decoder applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload on the wire; a bigger frame is refused from its header.
    pub max_frame_bytes: u32,
    /// Largest payload after decompression; memory per frame is bounded by this.
    pub max_decompressed_bytes: u64,
    /// Deepest MessagePack nesting.
    pub max_depth: usize,
    /// Whether compressed payloads and row batches are accepted at all. A sender reads only
    /// requests from its receivers, which are small and never compressed: it refuses both from
    /// the header, before any decompression work ([`Limits::requests`]).
    pub rows: bool,
}

impl Limits {
    /// The bounds of what a sender reads from a receiver: requests only, at most
    /// [`MAX_REQUEST_BYTES`], never compressed, never a row batch.
    pub fn requests() -> Self {
        Self {
            max_frame_bytes: MAX_REQUEST_BYTES,
            max_decompressed_bytes: 0,
            max_depth: DEFAULT_MAX_DEPTH,
            rows: false,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_decompressed_bytes: DEFAULT_MAX_DECOMPRESSED_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
            rows: true,
        }
    }
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message kind.
    pub kind: Kind,
    /// Flags.
    pub flags: u8,
    /// Payload length.
    pub length: u32,
}

/// Parses and checks a header; `Ok(None)` when fewer than [`HEADER_LEN`] bytes are there.
pub fn check_header(input: &[u8], limits: &Limits) -> Result<Option<Header>, ProtocolError> {
    let Some(bytes) = input.get(..HEADER_LEN) else {
        return Ok(None);
    };
    if bytes[0] != MAGIC {
        return Err(ProtocolError::BadHeader(format!(
            "magic byte {:#04x}",
            bytes[0]
        )));
    }
    let kind = Kind::from_tag(bytes[1]).ok_or(ProtocolError::UnknownKind(bytes[1]))?;
    let flags = bytes[2];
    if flags & !FLAG_ZSTD != 0 || bytes[3] != 0 {
        return Err(ProtocolError::BadHeader(format!(
            "unknown flags {flags:#04x}/{:#04x}",
            bytes[3]
        )));
    }
    if !limits.rows && (flags & FLAG_ZSTD != 0 || kind == Kind::RowBatch) {
        return Err(ProtocolError::BadHeader(format!(
            "{kind:?} frames{} are not accepted from this peer",
            if flags & FLAG_ZSTD != 0 {
                " (compressed)"
            } else {
                ""
            }
        )));
    }
    let length = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if length > limits.max_frame_bytes {
        return Err(ProtocolError::FrameTooLarge {
            size: u64::from(length),
            limit: u64::from(limits.max_frame_bytes),
        });
    }
    Ok(Some(Header {
        kind,
        flags,
        length,
    }))
}

/// Decodes one frame from the front of `input`: `Ok(None)` when the frame is not complete yet,
/// else the message and how many bytes it used.
pub fn decode(input: &[u8], limits: &Limits) -> Result<Option<(Message, usize)>, ProtocolError> {
    let Some(header) = check_header(input, limits)? else {
        return Ok(None);
    };
    let end = HEADER_LEN + header.length as usize;
    let Some(payload) = input.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    let message = decode_payload(header, payload, limits)?;
    Ok(Some((message, end)))
}

/// Decodes a complete frame (a WebSocket binary message, say); trailing bytes are an error.
pub fn decode_exact(input: &[u8], limits: &Limits) -> Result<Message, ProtocolError> {
    let (header, payload) = exact_frame(input, limits)?;
    decode_payload(header, payload, limits)
}

/// Decodes a complete row batch frame, its rows left encoded and checked (see
/// [`crate::columns`]); a frame of another kind is an error. Trailing bytes are an error.
pub fn decode_batch_exact(
    input: &[u8],
    limits: &Limits,
) -> Result<crate::columns::ReceivedBatch, ProtocolError> {
    let (header, payload) = exact_frame(input, limits)?;
    if header.kind != Kind::RowBatch {
        return Err(ProtocolError::Malformed(format!(
            "a row batch expected, got {:?}",
            header.kind
        )));
    }
    let body = checked_body(header, payload, limits)?;
    crate::columns::decode_batch(body.into_owned(), limits.max_depth)
}

/// The header and payload of a complete frame; a short frame or trailing bytes are an error.
fn exact_frame<'a>(input: &'a [u8], limits: &Limits) -> Result<(Header, &'a [u8]), ProtocolError> {
    let header = check_header(input, limits)?.ok_or(ProtocolError::Truncated)?;
    let end = HEADER_LEN + header.length as usize;
    let payload = input.get(HEADER_LEN..end).ok_or(ProtocolError::Truncated)?;
    if input.len() > end {
        return Err(ProtocolError::Malformed(format!(
            "{} bytes after the frame",
            input.len() - end
        )));
    }
    Ok((header, payload))
}

/// A payload decompressed (when its header says so) and through the MessagePack pre-scan.
fn checked_body<'a>(
    header: Header,
    payload: &'a [u8],
    limits: &Limits,
) -> Result<std::borrow::Cow<'a, [u8]>, ProtocolError> {
    let body = if header.flags & FLAG_ZSTD != 0 {
        std::borrow::Cow::Owned(decompress_bounded(payload, limits.max_decompressed_bytes)?)
    } else {
        std::borrow::Cow::Borrowed(payload)
    };
    crate::msgpack::check(&body, limits.max_depth)?;
    Ok(body)
}

fn decode_payload(
    header: Header,
    payload: &[u8],
    limits: &Limits,
) -> Result<Message, ProtocolError> {
    let body = checked_body(header, payload, limits)?;
    let message = match header.kind {
        Kind::Hello => Message::Hello(parse(&body, limits)?),
        Kind::Welcome => Message::Welcome(parse(&body, limits)?),
        Kind::Error => Message::Error(parse(&body, limits)?),
        Kind::ListTables => {
            parse::<()>(&body, limits)?;
            Message::ListTables
        }
        Kind::TableList => Message::TableList(parse(&body, limits)?),
        Kind::DescribeTable => Message::DescribeTable(parse(&body, limits)?),
        Kind::TableSchema => Message::TableSchema(parse(&body, limits)?),
        Kind::Pull => Message::Pull(parse(&body, limits)?),
        Kind::RowBatch => Message::RowBatch(
            crate::columns::decode_batch(body.into_owned(), limits.max_depth)?.into_row_batch()?,
        ),
        Kind::Credit => Message::Credit(parse(&body, limits)?),
        Kind::PullDone => Message::PullDone(parse(&body, limits)?),
        Kind::ApprovalPending => Message::ApprovalPending(parse(&body, limits)?),
        Kind::ApprovalStatus => Message::ApprovalStatus(parse(&body, limits)?),
        Kind::Cancel => Message::Cancel(parse(&body, limits)?),
        Kind::Verify => Message::Verify(parse(&body, limits)?),
        Kind::VerifyPage => Message::VerifyPage(parse(&body, limits)?),
        Kind::Split => Message::Split(parse(&body, limits)?),
        Kind::SplitDone => Message::SplitDone(parse(&body, limits)?),
        Kind::Ping => Message::Ping(parse(&body, limits)?),
        Kind::Pong => Message::Pong(parse(&body, limits)?),
    };
    Ok(message)
}

fn parse<T: DeserializeOwned>(body: &[u8], limits: &Limits) -> Result<T, ProtocolError> {
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(body);
    deserializer.set_max_depth(limits.max_depth);
    T::deserialize(&mut deserializer).map_err(|err| ProtocolError::Malformed(err.to_string()))
}

/// Decompresses at most `limit` bytes; a frame that declares a larger size is refused before
/// any output buffer is allocated, and one that lies about its size is cut off at the limit.
pub fn decompress_bounded(payload: &[u8], limit: u64) -> Result<Vec<u8>, ProtocolError> {
    match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(size)) if size > limit => {
            return Err(ProtocolError::DecompressedTooLarge { limit });
        }
        // The size is declared (as this encoder always does): decompress in one call into a
        // buffer of exactly that size, with this thread's context. A frame holding more than
        // it declared overflows the buffer and is refused.
        Ok(Some(size)) => {
            let mut out = Vec::with_capacity(size as usize);
            return SCRATCH.with_borrow_mut(|scratch| {
                let decompressor = match &mut scratch.decompressor {
                    Some(decompressor) => decompressor,
                    empty => empty.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|err| ProtocolError::Decompress(err.to_string()))?,
                    ),
                };
                decompressor
                    .decompress_to_buffer(payload, &mut out)
                    .map_err(|err| ProtocolError::Decompress(err.to_string()))?;
                Ok(out)
            });
        }
        Ok(None) => {}
        Err(_) => return Err(ProtocolError::Decompress("not a zstd frame".into())),
    }
    // No declared size: measure first, streaming through a small buffer (nothing is kept),
    // then decompress into a buffer of exactly the measured size. Memory follows what the
    // payload really holds, never more than `limit`, at the price of decompressing twice
    // (this encoder always declares the size; only a foreign or hostile peer omits it).
    let size = undeclared_size(payload, limit)?;
    let mut out = Vec::with_capacity(size);
    let decoder = zstd::stream::read::Decoder::with_buffer(payload)
        .map_err(|err| ProtocolError::Decompress(err.to_string()))?;
    decoder
        .take(size as u64)
        .read_to_end(&mut out)
        .map_err(|err| ProtocolError::Decompress(err.to_string()))?;
    Ok(out)
}

/// The decompressed size of a payload that does not declare it, read through a 64 KiB buffer;
/// refused as soon as it passes `limit`.
fn undeclared_size(payload: &[u8], limit: u64) -> Result<usize, ProtocolError> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(payload)
        .map_err(|err| ProtocolError::Decompress(err.to_string()))?;
    let mut scratch = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = decoder
            .read(&mut scratch)
            .map_err(|err| ProtocolError::Decompress(err.to_string()))?;
        if n == 0 {
            return usize::try_from(total)
                .map_err(|_| ProtocolError::DecompressedTooLarge { limit });
        }
        total += n as u64;
        if total > limit {
            return Err(ProtocolError::DecompressedTooLarge { limit });
        }
    }
}

/// Encodes a message as one frame. Row batches are compressed at `zstd_level`; other messages
/// are small and go uncompressed.
pub fn encode(message: &Message, zstd_level: i32) -> Result<Vec<u8>, ProtocolError> {
    encode_sized(message, zstd_level).map(|(frame, _)| frame)
}

/// Like [`encode`], also returning the payload size before compression (for raw-byte counts).
pub fn encode_sized(message: &Message, zstd_level: i32) -> Result<(Vec<u8>, usize), ProtocolError> {
    if let Message::RowBatch(batch) = message {
        return SCRATCH.with_borrow_mut(|scratch| scratch.row_batch(batch, zstd_level));
    }
    let payload = match message {
        Message::Hello(m) => to_msgpack(m)?,
        Message::Welcome(m) => to_msgpack(m)?,
        Message::Error(m) => to_msgpack(m)?,
        Message::ListTables => to_msgpack(&())?,
        Message::TableList(m) => to_msgpack(m)?,
        Message::DescribeTable(m) => to_msgpack(m)?,
        Message::TableSchema(m) => to_msgpack(m)?,
        Message::Pull(m) => to_msgpack(m)?,
        Message::RowBatch(m) => to_msgpack(m)?,
        Message::Credit(m) => to_msgpack(m)?,
        Message::PullDone(m) => to_msgpack(m)?,
        Message::ApprovalPending(m) => to_msgpack(m)?,
        Message::ApprovalStatus(m) => to_msgpack(m)?,
        Message::Cancel(m) => to_msgpack(m)?,
        Message::Verify(m) => to_msgpack(m)?,
        Message::VerifyPage(m) => to_msgpack(m)?,
        Message::Split(m) => to_msgpack(m)?,
        Message::SplitDone(m) => to_msgpack(m)?,
        Message::Ping(m) | Message::Pong(m) => to_msgpack(m)?,
    };
    let raw_len = payload.len();
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&[MAGIC, message.kind() as u8, 0, 0, 0, 0, 0, 0]);
    frame.extend_from_slice(&payload);
    set_length(&mut frame)?;
    Ok((frame, raw_len))
}

/// Like [`encode_sized`] for a row batch whose rows were encoded column by column already
/// ([`crate::message::columnar::ColumnsWriter`]): `batch.rows` is not read, `columns` stands for
/// it. The frame is the one [`encode_sized`] makes for the same rows.
pub fn encode_row_batch_columns(
    batch: &crate::message::RowBatch,
    columns: &[u8],
    zstd_level: i32,
) -> Result<(Vec<u8>, usize), ProtocolError> {
    SCRATCH.with_borrow_mut(|scratch| scratch.row_batch_columns(batch, columns, zstd_level))
}

/// Room [`encode_row_batch_in_place`] needs before a batch's rows, for a batch of the columns
/// `columns`: the fields that come before the rows at their largest.
pub fn row_batch_room(columns: &[String]) -> usize {
    // The array's header, `request_id` and `seq` (at most 9 bytes each), the column names.
    1 + 9 + 9 + to_msgpack(columns).map_or(0, |names| names.len())
}

/// Like [`encode_row_batch_columns`] for rows encoded at `page[room..]` behind `room` bytes
/// of space (see [`row_batch_room`]): the fields before the rows are written into that space
/// and the ones after them appended, and the payload is compressed where it lies, with no copy
/// of the rows (`page` is left holding it). With too little room the rows are copied as
/// [`encode_row_batch_columns`] copies them. The frame is the same.
pub fn encode_row_batch_in_place(
    batch: &crate::message::RowBatch,
    page: &mut Vec<u8>,
    room: usize,
    zstd_level: i32,
) -> Result<(Vec<u8>, usize), ProtocolError> {
    SCRATCH.with_borrow_mut(|scratch| scratch.row_batch_in_place(batch, page, room, zstd_level))
}

/// Writes the payload length (everything after the header) into a frame's header.
fn set_length(frame: &mut [u8]) -> Result<(), ProtocolError> {
    let length = u32::try_from(frame.len() - HEADER_LEN)
        .map_err(|_| ProtocolError::Encode("payload larger than 4 GiB".into()))?;
    frame[4..HEADER_LEN].copy_from_slice(&length.to_be_bytes());
    Ok(())
}

/// Largest MessagePack buffer a thread keeps between row batches.
const KEEP_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

/// A thread's zstd contexts and MessagePack buffer, reused from frame to frame: setting up a
/// context costs about a megabyte of tables, and a buffer grown from empty copies itself a
/// dozen times per batch.
#[derive(Default)]
struct Scratch {
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    payload: Vec<u8>,
    compressed: Vec<u8>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

impl Scratch {
    /// A row batch's frame: MessagePack, then zstd at `level` straight into the frame.
    fn row_batch(
        &mut self,
        batch: &crate::message::RowBatch,
        level: i32,
    ) -> Result<(Vec<u8>, usize), ProtocolError> {
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        let framed = rmp_serde::encode::write(&mut payload, batch)
            .map_err(|err| ProtocolError::Encode(err.to_string()))
            .and_then(|()| self.compress_row_batch(&payload, level));
        self.keep_payload(payload);
        framed
    }

    /// A row batch's frame from its fields and its rows already encoded column by column
    /// ([`crate::message::columnar::ColumnsWriter`]); `batch.rows` is not read.
    fn row_batch_columns(
        &mut self,
        batch: &crate::message::RowBatch,
        columns: &[u8],
        level: i32,
    ) -> Result<(Vec<u8>, usize), ProtocolError> {
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        let framed = row_batch_head(&mut payload, batch)
            .and_then(|()| {
                payload.extend_from_slice(columns);
                row_batch_tail(&mut payload, batch)
            })
            .and_then(|()| self.compress_row_batch(&payload, level));
        self.keep_payload(payload);
        framed
    }

    /// [`encode_row_batch_in_place`].
    fn row_batch_in_place(
        &mut self,
        batch: &crate::message::RowBatch,
        page: &mut Vec<u8>,
        room: usize,
        level: i32,
    ) -> Result<(Vec<u8>, usize), ProtocolError> {
        if page.len() < room {
            return Err(ProtocolError::Encode(format!(
                "a page of {} bytes has no rows after {room} bytes of room",
                page.len()
            )));
        }
        let mut head = Vec::new();
        row_batch_head(&mut head, batch)?;
        let Some(start) = room.checked_sub(head.len()) else {
            return self.row_batch_columns(batch, &page[room..], level);
        };
        page[start..room].copy_from_slice(&head);
        row_batch_tail(page, batch)?;
        self.compress_row_batch(&page[start..], level)
    }

    /// Keeps a payload buffer for the next batch unless it grew too large.
    fn keep_payload(&mut self, payload: Vec<u8>) {
        if payload.capacity() <= KEEP_PAYLOAD_BYTES {
            self.payload = payload;
        }
    }

    /// Compresses a row batch's `payload` into a frame.
    fn compress_row_batch(
        &mut self,
        payload: &[u8],
        level: i32,
    ) -> Result<(Vec<u8>, usize), ProtocolError> {
        let raw_len = payload.len();
        let compressor = match &mut self.compressor {
            Some((current, compressor)) if *current == level => compressor,
            slot => {
                let compressor = zstd::bulk::Compressor::new(level)
                    .map_err(|err| ProtocolError::Encode(err.to_string()))?;
                &mut slot.insert((level, compressor)).1
            }
        };
        // Compressed into this thread's buffer (room for the worst case, not zeroed), then
        // copied into a frame of exactly its size: a frame allocated at the worst case (~6x the
        // compressed size here) held and touched that much memory while it waited to be sent.
        self.compressed.clear();
        self.compressed
            .reserve(zstd::zstd_safe::compress_bound(raw_len));
        let written = compressor
            .compress_to_buffer(payload, &mut self.compressed)
            .map_err(|err| ProtocolError::Encode(err.to_string()))?;
        let mut frame = Vec::with_capacity(HEADER_LEN + written);
        frame.extend_from_slice(&[MAGIC, Kind::RowBatch as u8, FLAG_ZSTD, 0, 0, 0, 0, 0]);
        frame.extend_from_slice(&self.compressed);
        set_length(&mut frame)?;
        if self.compressed.capacity() > KEEP_PAYLOAD_BYTES {
            self.compressed = Vec::new();
        }
        Ok((frame, raw_len))
    }
}

/// A row batch's fields before its rows, in `RowBatch`'s order as its derived `Serialize`
/// writes them (an array of six).
fn row_batch_head(
    out: &mut Vec<u8>,
    batch: &crate::message::RowBatch,
) -> Result<(), ProtocolError> {
    let encode = |err: rmp_serde::encode::Error| ProtocolError::Encode(err.to_string());
    rmp::encode::write_array_len(out, 6).map_err(|e| encode(e.into()))?;
    rmp_serde::encode::write(out, &batch.request_id).map_err(encode)?;
    rmp_serde::encode::write(out, &batch.seq).map_err(encode)?;
    rmp_serde::encode::write(out, &batch.columns).map_err(encode)
}

/// A row batch's fields after its rows.
fn row_batch_tail(
    out: &mut Vec<u8>,
    batch: &crate::message::RowBatch,
) -> Result<(), ProtocolError> {
    let encode = |err: rmp_serde::encode::Error| ProtocolError::Encode(err.to_string());
    rmp_serde::encode::write(out, &batch.last_key).map_err(encode)?;
    rmp_serde::encode::write(out, &batch.transfer_id).map_err(encode)
}

fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    rmp_serde::to_vec(value).map_err(|err| ProtocolError::Encode(err.to_string()))
}
