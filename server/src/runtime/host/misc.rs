//! The clock and randomness: the only time and entropy a plugin gets.

use super::HostState;
use crate::runtime::bindings::{clock, random};

/// Cap on one `get-bytes` call, as the WIT documents.
const MAX_RANDOM_BYTES: u32 = 65536;

impl clock::Host for HostState {
    fn now_millis(&mut self) -> wasmtime::Result<u64> {
        Ok(chrono::Utc::now().timestamp_millis().max(0) as u64)
    }
}

impl random::Host for HostState {
    fn get_bytes(&mut self, len: u32) -> wasmtime::Result<Vec<u8>> {
        let mut bytes = vec![0u8; len.min(MAX_RANDOM_BYTES) as usize];
        getrandom::fill(&mut bytes)
            .map_err(|err| wasmtime::format_err!("failed to read host randomness: {err}"))?;
        Ok(bytes)
    }

    fn get_u64(&mut self) -> wasmtime::Result<u64> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes)
            .map_err(|err| wasmtime::format_err!("failed to read host randomness: {err}"))?;
        Ok(u64::from_le_bytes(bytes))
    }
}
