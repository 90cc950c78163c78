//! Decoding never allocates beyond what arrived, and never beyond the frame limit.
//!
//! A separate test binary because it installs a counting global allocator. The
//! counters are per thread, so tests running in parallel do not disturb each other.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // the GlobalAlloc impl below; nothing else

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use mesh_core::clock::Timestamp;
use mesh_core::identity::NodeKey;
use mesh_core::wire::{
    Ack, DEFAULT_MAX_FRAME_LEN, Destination, Envelope, FRAME_HEADER_LEN, FRAME_VERSION,
    FrameDecoder, Payload, decode_frame,
};
use proptest::prelude::*;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK_LIVE: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn on_alloc(size: usize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + size as isize;
        l.set(now);
        let _ = PEAK_LIVE.try_with(|p| p.set(p.get().max(now)));
    });
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

fn on_free(size: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get() - size as isize));
}

// SAFETY: forwards every call unchanged to the system allocator; the counters
// are thread-locals with const initialisers, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_free(layout.size());
        on_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns (its result, largest single allocation, peak extra live bytes).
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    // The process-wide memo of validated node ids is allocated once, at its
    // fixed size, when the first node id is parsed; that one-time cost is not
    // an allocation caused by the input, so set it up before measuring.
    warm_up_node_id_memo();
    LARGEST.with(|m| m.set(0));
    let base = LIVE.with(Cell::get);
    PEAK_LIVE.with(|p| p.set(base));
    let out = f();
    let largest = LARGEST.with(Cell::get);
    let peak = (PEAK_LIVE.with(Cell::get) - base).max(0) as usize;
    (out, largest, peak)
}

fn warm_up_node_id_memo() {
    let id = NodeKey::from_secret_bytes(&[42; 32]).node_id();
    let _ = id.to_string().parse::<mesh_core::identity::NodeId>();
}

fn header(len: u32) -> Vec<u8> {
    let mut h = vec![FRAME_VERSION];
    h.extend_from_slice(&len.to_be_bytes());
    h
}

#[test]
fn oversize_header_is_refused_without_allocating() {
    let h = header(u32::MAX);
    let (res, largest, _) = measure(|| decode_frame(&h, DEFAULT_MAX_FRAME_LEN).map(|_| ()));
    assert!(res.is_err());
    assert_eq!(
        largest, 0,
        "decode_frame allocated {largest} bytes for a refused header"
    );

    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    let ((used, res), largest, _) = measure(|| {
        let (u, r) = dec.feed(&h);
        (u, r.map(|r| r.map(|_| ())))
    });
    assert_eq!(used, FRAME_HEADER_LEN);
    assert!(res.unwrap().unwrap_err().is_fatal());
    assert_eq!(largest, 0);
}

#[test]
fn streaming_decoder_grows_only_with_arrived_bytes() {
    // The header announces the full 1 MiB; only 100 bytes follow.
    let mut data = header(DEFAULT_MAX_FRAME_LEN as u32);
    data.extend_from_slice(&[0u8; 100]);
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
    let ((used, res), _, peak) = measure(|| {
        let (u, r) = dec.feed(&data);
        (u, r.is_some())
    });
    assert_eq!(used, data.len());
    assert!(!res);
    assert!(peak <= 1024, "holding 100 body bytes cost {peak} bytes");
    assert_eq!(dec.buffered(), data.len());
}

#[test]
fn huge_claimed_list_in_a_small_frame_allocates_little() {
    let k = NodeKey::from_secret_bytes(&[1; 32]);
    let mut env = postcard::to_allocvec(&Envelope::new(
        k.node_id(),
        Destination::Broadcast,
        Timestamp::from_millis(1),
        Payload::Ack(Ack { ids: vec![] }),
    ))
    .unwrap();
    env.pop();
    env.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // 2^32 - 1 ids, none present
    let mut frame = header((65 + env.len()) as u32);
    frame.extend_from_slice(&[0u8; 65]);
    frame.extend_from_slice(&env);
    let (res, largest, peak) = measure(|| decode_frame(&frame, DEFAULT_MAX_FRAME_LEN).map(|_| ()));
    assert!(res.is_err());
    assert!(
        largest <= frame.len(),
        "largest allocation {largest} for a {}-byte frame",
        frame.len()
    );
    assert!(peak <= 2 * frame.len() + 1024, "peak {peak}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any body behind a valid header: the decoder's peak memory stays within a
    /// small multiple of the bytes it was given, and far below the frame limit.
    #[test]
    fn decoding_allocates_in_proportion_to_input(body in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut frame = header(body.len() as u32);
        frame.extend_from_slice(&body);
        let (_, largest, peak) = measure(|| decode_frame(&frame, DEFAULT_MAX_FRAME_LEN).map(|_| ()));
        prop_assert!(largest <= frame.len().max(1024), "largest {} for {} bytes", largest, frame.len());
        prop_assert!(peak <= 4 * frame.len() + 16 * 1024, "peak {} for {} bytes", peak, frame.len());
    }
}
