//! The ClientHello peek parser never panics, and a verdict once reached
//! never changes as more bytes arrive.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    credbroker_sidecar::intercept::client_hello::fuzz_client_hello(data);
});
