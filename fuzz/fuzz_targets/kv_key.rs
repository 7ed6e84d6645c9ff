//! Reading a key of KV data never panics, and an error never quotes the
//! data (the data stands in for a secret).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    credbroker_sidecar::source::kv::fuzz_extract_key(data);
});
