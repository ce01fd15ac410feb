//! Events of the way in: device authentication and the JSON mirror.

use super::{names, InternalEvent};
use fluxmesh_mesh::error_chain;
use metrics::counter;
use std::error::Error;

/// A device authenticated (`result`: `ok`, `anonymous`) or was refused
/// (`result`: why), over `source` (`mqtt`, `http`).
#[derive(Debug)]
pub struct AuthAttempted<'a> {
    pub source: &'static str,
    pub device: &'a str,
    pub result: &'static str,
    pub refused: bool,
}

impl InternalEvent for AuthAttempted<'_> {
    fn emit(self) {
        counter!(names::AUTH_ATTEMPTS_TOTAL, "source" => self.source, "result" => self.result).increment(1);
        if self.refused {
            tracing::warn!(
                source = self.source,
                device = self.device,
                reason = self.result,
                "device authentication failed"
            );
        }
    }
}

/// A stored message's JSON mirror could not be published (the stream
/// holds the message; the mirror is best effort).
#[derive(Debug)]
pub struct JsonMirrorFailed<'a> {
    pub error: &'a dyn Error,
}

impl InternalEvent for JsonMirrorFailed<'_> {
    fn emit(self) {
        counter!(names::JSON_MIRROR_FAILED_TOTAL).increment(1);
        tracing::warn!(error = %error_chain(self.error), "JSON mirror publish failed");
    }
}
