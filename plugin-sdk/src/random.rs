//! Randomness from the host's secure generator, the plugin's only source.

/// `len` random bytes; at most 65536 per call.
pub fn bytes(len: usize) -> Vec<u8> {
    crate::host::random_bytes(len.min(u32::MAX as usize) as u32)
}

/// A random 64-bit integer.
pub fn u64() -> u64 {
    crate::host::random_u64()
}
