//! The WebAssembly plugin ABI, version 1.
//!
//! A plugin is a core WebAssembly module (no WASI, no imports) that
//! transforms one JSON document into another. A rule calls it with
//! `plugin("name", input)`: the input is the rule's value written as JSON,
//! and the plugin's output, parsed as JSON, is what `plugin(…)` returns.
//!
//! # Exports
//!
//! | export | type | what |
//! |---|---|---|
//! | `memory` | memory | the guest's linear memory |
//! | `fm_alloc` | `(len: i32) -> i32` | a buffer of `len` bytes for the input; returns its offset |
//! | `fm_process` | `(ptr: i32, len: i32) -> i64` | reads the input at `ptr..ptr+len`, returns `(out_ptr << 32) \| out_len`, or a negative error code |
//!
//! The host calls `fm_alloc`, writes the input, then calls `fm_process`,
//! and copies `out_len` bytes from `out_ptr` before anything else runs in
//! that instance. The output must be UTF-8 JSON.
//!
//! # What the host guarantees and enforces
//!
//! - Instances are reused: a warm instance from the plugin's pool serves
//!   one call at a time, so a plugin may reset its own allocator at the
//!   start of `fm_process`, but must not rely on memory surviving from one
//!   call to the next (a failed call discards its instance).
//! - Each call has a fuel budget (`plugins.fuel_per_call`, roughly one unit
//!   per WebAssembly instruction); a call that runs out stops with
//!   `timeout`.
//! - Linear memory is capped at `plugins.max_memory_bytes`; a `memory.grow`
//!   past it traps (`memory`).
//! - A trap, a negative return, an output outside memory, larger than
//!   `plugins.max_output_bytes`, or not JSON is an error for that call: the
//!   rule's run fails with it and an error frame is emitted. The node never
//!   crashes for a plugin.
//!
//! Text-format modules (WAT) are accepted at upload and stored compiled to
//! binary. See `configs/plugins/` for examples.

/// The ABI version this crate describes.
pub const ABI_VERSION: u32 = 1;
/// The guest's memory export.
pub const MEMORY: &str = "memory";
/// `(len: i32) -> i32`.
pub const ALLOC: &str = "fm_alloc";
/// `(ptr: i32, len: i32) -> i64`.
pub const PROCESS: &str = "fm_process";

/// Packs an output location as `fm_process` returns it.
pub fn pack(ptr: u32, len: u32) -> i64 {
    ((u64::from(ptr) << 32) | u64::from(len)) as i64
}

/// Unpacks `fm_process`'s return value: `Err(code)` for a negative one.
pub fn unpack(value: i64) -> Result<(u32, u32), i64> {
    if value < 0 {
        return Err(value);
    }
    let v = value as u64;
    Ok(((v >> 32) as u32, (v & 0xffff_ffff) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_round_trip() {
        for (p, l) in [(0, 0), (1, 2), (0x7fff_ffff, 0xffff_ffff)] {
            assert_eq!(unpack(pack(p, l)), Ok((p, l)));
        }
        assert_eq!(unpack(-3), Err(-3));
    }
}
