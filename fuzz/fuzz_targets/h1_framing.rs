//! The HTTP/1.1 smuggling guard never panics and reaches the same verdicts
//! however the stream is split.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    credbroker_sidecar::exchange::guard::fuzz_framing(data);
});
