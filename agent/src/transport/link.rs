//! A transport-neutral session link. A transport (WebSocket, QUIC) only moves whole frames; a
//! [`Link`] runs its reading and writing halves in their own tasks, so frames are received and
//! decoded while the session applies the previous batch, and written while it reads and encodes
//! the next one. Both sides of a session (sender and receiver) talk to a `Link`, never to a
//! socket.

use std::future::Future;

use dbsync_protocol::Message;
use dbsync_protocol::codec::{self, HEADER_LEN, Limits};
use dbsync_protocol::columns::ReceivedBatch;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Frames decoded ahead of the session (each is bounded by the codec's limits, and the peer
/// may only have its granted credits in flight). Enough to keep decoding off the session's
/// path, which applies up to two batches at once besides; more would only hold decoded batches
/// (a row batch's decompressed payload, ~3.4 MiB at 20,000 rows of the bench's table) while the
/// database is the slower side. The reading task takes a place in the queue before it decodes a
/// frame; frames past these wait undecoded, in the transport's buffers.
/// (SQLite pulls with 4 were as fast as with 16; with 2 instead of 4 the receiver's peak at 4M
/// rows stopped drifting above its peak at 1M: docs/performance.md.)
const INCOMING: usize = 2;
/// Encoded frames waiting for the socket.
const OUTGOING: usize = 4;

/// Why a transport stopped delivering frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkFailure {
    /// The peer sent something that is not a frame of this protocol at all (a WebSocket text
    /// message, a frame header declaring more than allowed): it is told `protocol_error`.
    #[error("{0}")]
    NotProtocol(String),
    /// The transport broke (reset, timeout, closed mid-frame).
    #[error("{0}")]
    Transport(String),
}

/// The reading half of a transport: whole frames, `None` at a clean end.
pub trait FrameReader: Send + 'static {
    /// The next frame (header and payload), or `None` when the peer closed.
    fn read_frame(&mut self) -> impl Future<Output = Result<Option<Vec<u8>>, LinkFailure>> + Send;
}

/// The writing half of a transport.
pub trait FrameWriter: Send + 'static {
    /// Writes one whole frame.
    fn write_frame(&mut self, frame: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send;
    /// Closes the writing side cleanly.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// What the reading task hands the session.
#[derive(Debug)]
pub enum Incoming {
    /// A decoded message and its size on the wire.
    Message(Message, usize),
    /// A row batch, checked but its rows left encoded, and its size on the wire.
    Batch(ReceivedBatch, usize),
    /// A frame that broke the codec's rules (the session answers `protocol_error`).
    Malformed(String),
    /// The transport failed.
    Failed(LinkFailure),
}

/// A running link: send messages, receive decoded ones.
#[derive(Debug)]
pub struct Link {
    outgoing: Option<mpsc::Sender<Vec<u8>>>,
    incoming: mpsc::Receiver<Incoming>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    zstd_level: i32,
    /// Choosing the level of row batches from what sending them costs (`None`: fixed).
    adaptive: Option<AdaptiveLevel>,
}

/// Most zstd level the adaptive choice goes up to. Measured on 20,000 rows of the bench's users
/// table (3.4 MB as binary COPY), `zstd` CLI: level 1 697,757 bytes in 7.5 MiB of memory, 3:
/// 693,765 in 8.2 MiB, 9: 686,555 in 19.6 MiB, 12: 686,920 in 55.5 MiB. An agent capped at 12
/// peaked at 150 MiB sending over a 10 Mbit/s link for 1.6 % fewer bytes; at 6 a batch's
/// compressor stays near 10 MiB.
pub const ADAPTIVE_MAX_LEVEL: i32 = 6;

/// The zstd level of row batches chosen from two times measured per batch: compressing it, and
/// waiting for the link to take it (the writer's queue is full while the link drains what went
/// before). A link that keeps the sender waiting longer than compressing takes has time for a
/// stronger level (fewer bytes to drain); a link that takes each batch at once waits on
/// compression, which gets cheaper. Both times are smoothed over the last few batches.
#[derive(Debug, Clone)]
pub struct AdaptiveLevel {
    level: i32,
    compress_secs: f64,
    wait_secs: f64,
    batches: u32,
}

impl AdaptiveLevel {
    /// Starting at `level`.
    pub fn new(level: i32) -> Self {
        Self {
            level: level.clamp(1, ADAPTIVE_MAX_LEVEL),
            compress_secs: 0.0,
            wait_secs: 0.0,
            batches: 0,
        }
    }

    /// The level of the next batch.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Takes one batch's times into account and moves the level by at most one.
    pub fn observe(&mut self, compress: std::time::Duration, wait: std::time::Duration) {
        const SMOOTHING: f64 = 0.5;
        let (compress, wait) = (compress.as_secs_f64(), wait.as_secs_f64());
        if self.batches == 0 {
            (self.compress_secs, self.wait_secs) = (compress, wait);
        } else {
            self.compress_secs += SMOOTHING * (compress - self.compress_secs);
            self.wait_secs += SMOOTHING * (wait - self.wait_secs);
        }
        self.batches += 1;
        // A few batches first: the first are small (slow start) and the queue still empty.
        if self.batches < 3 {
            return;
        }
        let before = self.level;
        if self.wait_secs > 1.5 * self.compress_secs {
            self.level = (self.level + 1).min(ADAPTIVE_MAX_LEVEL);
        } else if self.wait_secs < 0.25 * self.compress_secs {
            self.level = (self.level - 1).max(1);
        }
        if self.level != before {
            tracing::debug!(
                level = self.level,
                compress_ms = self.compress_secs * 1e3,
                wait_ms = self.wait_secs * 1e3,
                "zstd level of row batches changed"
            );
        }
    }
}

impl Link {
    /// Starts the reading and writing tasks of a transport.
    pub fn spawn(reader: impl FrameReader, writer: impl FrameWriter, limits: Limits) -> Self {
        let (in_tx, in_rx) = mpsc::channel(INCOMING);
        let (out_tx, out_rx) = mpsc::channel(OUTGOING);
        let reader = tokio::spawn(read_loop(reader, limits, in_tx));
        let writer = tokio::spawn(write_loop(writer, out_rx));
        Self {
            outgoing: Some(out_tx),
            incoming: in_rx,
            reader,
            writer,
            zstd_level: codec::DEFAULT_ZSTD_LEVEL,
            adaptive: None,
        }
    }

    /// Sets the zstd level of row batches sent from now on; 0: chosen batch by batch
    /// ([`AdaptiveLevel`], starting at the fastest).
    pub fn set_zstd_level(&mut self, level: i32) {
        if level == 0 {
            self.adaptive = Some(AdaptiveLevel::new(codec::DEFAULT_ZSTD_LEVEL));
            self.zstd_level = codec::DEFAULT_ZSTD_LEVEL;
        } else {
            self.adaptive = None;
            self.zstd_level = level;
        }
    }

    /// The zstd level the next row batch gets.
    pub fn zstd_level(&self) -> i32 {
        self.adaptive
            .as_ref()
            .map_or(self.zstd_level, AdaptiveLevel::level)
    }

    /// Encodes and queues a message; returns (bytes on the wire, payload bytes before
    /// compression).
    pub async fn send(&mut self, message: &Message) -> Result<(usize, usize), String> {
        self.send_sized(codec::encode_sized(message, self.zstd_level))
            .await
    }

    /// Encodes and queues a row batch whose rows are already encoded column by column, at
    /// `page[room..]` (see [`codec::encode_row_batch_in_place`]; `batch.rows` is not read);
    /// returns what [`Link::send`] returns.
    pub async fn send_row_batch_in_place(
        &mut self,
        batch: &dbsync_protocol::message::RowBatch,
        page: &mut Vec<u8>,
        room: usize,
    ) -> Result<(usize, usize), String> {
        let started = std::time::Instant::now();
        let encoded = codec::encode_row_batch_in_place(batch, page, room, self.zstd_level());
        let compressed = started.elapsed();
        let (frame, raw) = encoded.map_err(|e| e.to_string())?;
        let wire = frame.len();
        let queued = std::time::Instant::now();
        self.send_frame(frame).await?;
        if let Some(adaptive) = &mut self.adaptive {
            adaptive.observe(compressed, queued.elapsed());
        }
        Ok((wire, raw))
    }

    /// Queues a frame just encoded (with its payload size before compression); returns (bytes
    /// on the wire, that size).
    async fn send_sized(
        &mut self,
        encoded: Result<(Vec<u8>, usize), dbsync_protocol::ProtocolError>,
    ) -> Result<(usize, usize), String> {
        let (frame, raw) = encoded.map_err(|e| e.to_string())?;
        let wire = frame.len();
        self.send_frame(frame).await?;
        Ok((wire, raw))
    }

    /// Queues an encoded frame.
    pub async fn send_frame(&mut self, frame: Vec<u8>) -> Result<(), String> {
        let outgoing = self
            .outgoing
            .as_ref()
            .ok_or_else(|| "the link is closed".to_owned())?;
        outgoing
            .send(frame)
            .await
            .map_err(|_| "the connection is gone".to_owned())
    }

    /// The next incoming message; `None` when the peer closed the link.
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.incoming.recv().await
    }

    /// Flushes what was queued, closes the writing side and stops reading.
    pub async fn close(mut self) {
        self.outgoing.take();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut self.writer).await;
        self.reader.abort();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop(
    mut reader: impl FrameReader,
    limits: Limits,
    to_session: mpsc::Sender<Incoming>,
) {
    loop {
        let frame = reader.read_frame().await;
        // Room in the queue first, then decoding: a frame waits here compressed, not as a
        // decoded batch beside the queued ones (at most `INCOMING` decoded batches wait).
        let Ok(slot) = to_session.reserve().await else {
            return;
        };
        let item = match frame {
            Ok(Some(frame)) => {
                let wire = frame.len();
                // Decoding (decompression, MessagePack) runs here, beside the session's work. A
                // row batch is only checked: its rows are read where they are written.
                let batch = frame.get(1) == Some(&(dbsync_protocol::Kind::RowBatch as u8));
                let decoded = if batch {
                    codec::decode_batch_exact(&frame, &limits).map(|b| Incoming::Batch(b, wire))
                } else {
                    codec::decode_exact(&frame, &limits).map(|m| Incoming::Message(m, wire))
                };
                decoded.unwrap_or_else(|err| Incoming::Malformed(err.to_string()))
            }
            Ok(None) => return,
            Err(err) => Incoming::Failed(err),
        };
        let stop = !matches!(item, Incoming::Message(..) | Incoming::Batch(..));
        slot.send(item);
        if stop {
            return;
        }
    }
}

async fn write_loop(mut writer: impl FrameWriter, mut from_session: mpsc::Receiver<Vec<u8>>) {
    while let Some(frame) = from_session.recv().await {
        if let Err(err) = writer.write_frame(frame).await {
            tracing::debug!(error = %err, "write failed");
            return;
        }
    }
    writer.finish().await;
}

/// Reads one frame from a byte stream (QUIC): the 8-byte header, then exactly the payload it
/// declares, refused before reading when it declares more than `max_frame_bytes`. The buffer
/// grows with the bytes that arrive, never to the declared length up front: a peer that
/// declares 16 MiB and sends nothing costs nothing.
pub async fn read_framed<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    limits: &Limits,
) -> Result<Option<Vec<u8>>, LinkFailure> {
    use tokio::io::AsyncReadExt;
    let transport = |e: std::io::Error| LinkFailure::Transport(e.to_string());
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = stream
            .read(&mut header[filled..])
            .await
            .map_err(transport)?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(LinkFailure::Transport(
                    "the stream ended inside a frame header".into(),
                ))
            };
        }
        filled += n;
    }
    codec::check_header(&header, limits).map_err(|e| LinkFailure::NotProtocol(e.to_string()))?;
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let mut frame = Vec::with_capacity(HEADER_LEN + len.min(READ_CHUNK));
    frame.extend_from_slice(&header);
    let mut rest = (&mut *stream).take(len as u64);
    let mut chunk = vec![0u8; READ_CHUNK.min(len.max(1))];
    while frame.len() < HEADER_LEN + len {
        let n = rest.read(&mut chunk).await.map_err(transport)?;
        if n == 0 {
            return Err(LinkFailure::Transport(format!(
                "the stream ended {} bytes into a frame of {len}",
                frame.len() - HEADER_LEN
            )));
        }
        frame.extend_from_slice(&chunk[..n]);
    }
    Ok(Some(frame))
}

/// Bytes read from a stream at a time while a frame's payload arrives.
const READ_CHUNK: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_declared_length_costs_nothing_until_bytes_arrive() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut header = vec![codec::MAGIC, dbsync_protocol::Kind::Ping as u8, 0, 0];
        header.extend_from_slice(&(16u32 * 1024 * 1024).to_be_bytes());
        tokio::io::AsyncWriteExt::write_all(&mut client, &header)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut client, &[0u8; 100])
            .await
            .unwrap();
        drop(client);
        // The stream ends 100 bytes in: an error, after holding ~100 bytes, not 16 MiB.
        let err = read_framed(&mut server, &Limits::default())
            .await
            .unwrap_err();
        assert!(matches!(err, LinkFailure::Transport(_)), "{err:?}");
        assert!(err.to_string().contains("100 bytes into"), "{err}");
    }

    #[tokio::test]
    async fn a_header_over_the_limits_is_refused_before_reading() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut header = vec![codec::MAGIC, dbsync_protocol::Kind::RowBatch as u8, 1, 0];
        header.extend_from_slice(&100u32.to_be_bytes());
        tokio::io::AsyncWriteExt::write_all(&mut client, &header)
            .await
            .unwrap();
        let err = read_framed(&mut server, &Limits::requests())
            .await
            .unwrap_err();
        assert!(matches!(err, LinkFailure::NotProtocol(_)), "{err:?}");
    }

    #[test]
    fn the_level_follows_the_link() {
        let ms = std::time::Duration::from_millis;
        // A slow link: each batch waits far longer than it took to compress.
        let mut level = AdaptiveLevel::new(1);
        for _ in 0..30 {
            level.observe(ms(5), ms(200));
        }
        assert_eq!(level.level(), ADAPTIVE_MAX_LEVEL);
        // The link speeds up: batches go at once, compression is what waits.
        for _ in 0..30 {
            level.observe(ms(40), ms(0));
        }
        assert_eq!(level.level(), 1);
        // Balanced: the level holds.
        let mut level = AdaptiveLevel::new(4);
        for _ in 0..30 {
            level.observe(ms(10), ms(10));
        }
        assert_eq!(level.level(), 4);
    }
}
