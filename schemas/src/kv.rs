//! Keys of the mesh's KV buckets that outside readers may need.
//!
//! Device keys are `{prefix}.{hex of the device id's UTF-8 bytes}`: KV keys
//! allow only `[-/_=.a-zA-Z0-9]`, and hex keeps every device id distinct.

/// `{prefix}.{hex of the device id's UTF-8 bytes}`: a valid KV key for any
/// device id (also the credentials key, `d.{hex}`).
pub fn device_key(prefix: impl std::fmt::Display, device: &str) -> String {
    use std::fmt::Write as _;
    let mut key = String::with_capacity(12 + device.len() * 2);
    let _ = write!(key, "{prefix}.");
    for b in device.as_bytes() {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// The device id in the last token of a device key, if it is valid hex of
/// UTF-8.
pub fn device_of_key(hex: &str) -> Option<String> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_are_valid_kv_keys() {
        assert_eq!(device_key(7, "a.b *>"), "7.612e62202a3e");
        assert!(device_key(63, "ü").chars().all(|c| c.is_ascii_alphanumeric() || c == '.'));
        assert_eq!(device_of_key("612e62202a3e").as_deref(), Some("a.b *>"));
        assert_eq!(device_key("d", "a.b"), "d.612e62");
        assert_eq!(device_of_key("6"), None);
        assert_eq!(device_of_key("zz"), None);
    }
}
