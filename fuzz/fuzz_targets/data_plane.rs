//! Placeholder scanning, swapping (one-shot and streamed at any split) and
//! echo detection agree with each other, and no placeholder survives a swap.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    credbroker_sidecar::substitute::fuzz_data_plane(data);
});
