//! Telling cleartext HTTP from other protocols never panics, and a decision
//! once reached never changes as more bytes arrive.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    credbroker_sidecar::route::fuzz_classify_cleartext(data);
});
