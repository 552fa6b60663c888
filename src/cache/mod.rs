//! The response cache (pingora-cache): where responses are kept.
//!
//! [`storage::MemoryStorage`] keeps complete responses in memory, bounded in bytes through
//! pingora's eviction manager. It belongs to the runtime, not to a config snapshot, so that
//! what is cached survives reloads.

pub mod storage;
