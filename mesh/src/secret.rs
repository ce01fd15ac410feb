//! A config value that must never be shown: passwords, tokens, keys.

use serde::{Deserialize, Serialize, Serializer};

/// What a set secret looks like wherever it is printed or serialized.
pub const REDACTED: &str = "<redacted>";

/// A secret string from the config. Its `Debug`, `Display` and `Serialize`
/// all print [`REDACTED`] (or `""` when unset), so printing a config, a
/// log line or an error can never leak it; [`Secret::expose`] is the one way
/// to the value.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn shown(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            REDACTED
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.shown())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_shown() {
        let s = Secret::new("hunter2-hunter2");
        assert_eq!(format!("{s:?} {s}"), format!("\"{REDACTED}\" {REDACTED}"));
        assert_eq!(serde_json::to_string(&s).expect("json"), format!("\"{REDACTED}\""));
        assert_eq!(s.expose(), "hunter2-hunter2");
        assert_eq!(serde_json::to_string(&Secret::default()).expect("json"), "\"\"");
        let back: Secret = serde_json::from_str("\"x\"").expect("json");
        assert_eq!(back.expose(), "x");
    }
}
