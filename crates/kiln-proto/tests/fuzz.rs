//! The decoder against arbitrary bytes: never a panic, and never an
//! allocation larger than the limits allow for the frame at hand.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use kiln_proto::{
    encode, read_frame, ProtoError, Request, Response, BODY_MAX, CHUNK, HEADER_MAX, VERSION,
};
use proptest::prelude::*;

/// The system allocator, noting the largest single allocation made on the
/// current thread (tests run on threads of their own).
struct Largest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed through to the system allocator unchanged.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

fn largest_allocation_while(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    f();
    LARGEST.with(|l| l.get())
}

/// Reads frames until the stream ends or goes out of step.
fn drain<T: kiln_proto::Message>(mut bytes: &[u8]) -> usize {
    let mut frames = 0;
    loop {
        match read_frame::<T>(&mut bytes) {
            Ok(_) => frames += 1,
            Err(error) if error.recoverable() => {}
            Err(_) => return frames,
        }
    }
}

/// A prefix with the right version and small lengths, then anything: the
/// shape that reaches the header parser and the body check most often.
fn framed() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(any::<u8>(), 0..256),
        0u32..4096,
        proptest::collection::vec(any::<u8>(), 0..4096),
    )
        .prop_map(|(header, body_len, rest)| {
            let mut out = vec![VERSION];
            out.extend((header.len() as u32).to_le_bytes());
            out.extend(body_len.to_le_bytes());
            out.extend(header);
            out.extend(rest);
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        drain::<Request>(&bytes);
        drain::<Response>(&bytes);
    }

    #[test]
    fn arbitrary_frames_never_panic(bytes in framed()) {
        drain::<Request>(&bytes);
        drain::<Response>(&bytes);
    }

    #[test]
    fn requests_round_trip(id in any::<u64>(), command in "\\PC{0,40}", args in proptest::collection::vec("\\PC{0,20}", 0..4), body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let request = Request::Exec(kiln_proto::Exec { id, command, args, ..Default::default() });
        let bytes = encode(&request, &body).unwrap();
        let (back, got): (Request, Vec<u8>) = read_frame(&mut bytes.as_slice()).unwrap();
        prop_assert_eq!(back, request);
        prop_assert_eq!(got, body);
    }
}

#[test]
fn a_lying_length_costs_no_more_than_its_message_allows() {
    // Output chunk announcing the largest body any frame may have: refused
    // after the header, its body skipped without being held.
    let header = serde_json::to_vec(&Response::Stdout { id: 1 }).unwrap();
    let mut bytes = vec![VERSION];
    bytes.extend((header.len() as u32).to_le_bytes());
    bytes.extend((BODY_MAX as u32).to_le_bytes());
    bytes.extend(&header);
    bytes.extend(vec![0u8; BODY_MAX]);
    let largest = largest_allocation_while(|| {
        let error = read_frame::<Response>(&mut bytes.as_slice()).unwrap_err();
        assert!(matches!(error, ProtoError::Body { .. }), "{error}");
    });
    assert!(largest <= CHUNK, "largest allocation {largest} bytes");

    // Lengths past the limits are refused from the prefix alone.
    let mut bytes = vec![VERSION];
    bytes.extend(u32::MAX.to_le_bytes());
    bytes.extend(u32::MAX.to_le_bytes());
    let largest = largest_allocation_while(|| {
        assert!(matches!(
            read_frame::<Request>(&mut bytes.as_slice()),
            Err(ProtoError::TooLarge { .. })
        ));
    });
    assert!(largest < HEADER_MAX, "largest allocation {largest} bytes");
}
