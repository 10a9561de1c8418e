//! What decoding costs in memory, counted by a global allocator: a zstd payload that does not
//! declare its size is decompressed into exactly what it holds (never twice the limit), and a
//! sender's request limits refuse compressed frames and row batches before any work.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use dbsync_protocol::codec::{self, FLAG_ZSTD, Limits, MAGIC};
use dbsync_protocol::{Kind, ProtocolError};

/// The system allocator, counting bytes held and their peak.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Measurements run one at a time (the counters are process-wide).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

// SAFETY: every call is passed to the system allocator unchanged; only counters are added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let held = HELD.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(held, Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on as it came.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most bytes held above the level when `work` started.
fn peak_of(work: impl FnOnce()) -> usize {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let base = HELD.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    work();
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

fn frame(kind: Kind, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![MAGIC, kind as u8, flags, 0];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn undeclared(bytes: usize) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    encoder.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut encoder, &vec![7u8; bytes]).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn an_undeclared_zstd_size_costs_what_the_payload_holds() {
    const MIB: usize = 1024 * 1024;
    let limit = 64 * MIB as u64;
    // 48 MiB: under the limit, decompressed into one buffer of exactly that size.
    let payload = undeclared(48 * MIB);
    let peak = peak_of(|| {
        let out = codec::decompress_bounded(&payload, limit).unwrap();
        assert_eq!(out.len(), 48 * MIB);
    });
    assert!(peak < 49 * MIB, "peak {} MiB for 48 MiB", peak / MIB);
    // 200 MiB of output: refused while streaming, before the limit is ever allocated.
    let bomb = undeclared(200 * MIB);
    let peak = peak_of(|| {
        assert!(matches!(
            codec::decompress_bounded(&bomb, limit),
            Err(ProtocolError::DecompressedTooLarge { .. })
        ));
    });
    assert!(peak < 4 * MIB, "peak {} MiB for a refused bomb", peak / MIB);
}

#[test]
fn request_limits_refuse_compressed_frames_and_row_batches_from_the_header() {
    let bomb = zstd::bulk::compress(&vec![0u8; 32 * 1024 * 1024], 3).unwrap();
    for bad in [
        frame(Kind::Ping, FLAG_ZSTD, &bomb),
        frame(Kind::RowBatch, 0, &[0x90]),
        frame(Kind::RowBatch, FLAG_ZSTD, &bomb),
    ] {
        let peak = peak_of(|| {
            assert!(matches!(
                codec::decode_exact(&bad, &Limits::requests()),
                Err(ProtocolError::BadHeader(_))
            ));
        });
        assert!(peak < 64 * 1024, "refused after {peak} bytes of work");
    }
    // The same frames under a receiver's limits are read as usual (the bomb is refused for its
    // size, the tiny batch for its shape).
    assert!(codec::decode_exact(&frame(Kind::RowBatch, 0, &[0x90]), &Limits::default()).is_err());
    // A request over MAX_REQUEST_BYTES is refused from its header.
    let mut header = vec![MAGIC, Kind::Pull as u8, 0, 0];
    header.extend_from_slice(&(codec::MAX_REQUEST_BYTES + 1).to_be_bytes());
    assert!(matches!(
        codec::check_header(&header, &Limits::requests()),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
}
