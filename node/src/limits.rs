//! Per-device message rate limits (token buckets, `governor`).
//!
//! `ingest.device_rate_per_sec` messages a second per device, with bursts
//! up to `ingest.device_burst`. On MQTT the bucket belongs to the
//! connection (one per client id across the cluster): a device over its
//! rate is not refused but slowed, as its next publish waits for a token
//! and the connection stops reading its socket meanwhile (TCP
//! backpressure, nothing dropped). HTTP ingest has no such channel, so a
//! request over the rate gets `429` with `Retry-After`.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use std::num::NonZeroU32;
use std::time::Duration;

/// The quota for `rate` messages a second and bursts of `burst` (0: the
/// same as the rate); `None` when `rate` is 0 (no limit).
pub fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

/// One bucket per device id (HTTP ingest).
#[derive(Debug)]
pub struct DeviceLimiter {
    buckets: DefaultKeyedRateLimiter<String>,
}

impl DeviceLimiter {
    pub fn new(quota: Quota) -> Self {
        DeviceLimiter { buckets: governor::RateLimiter::keyed(quota) }
    }

    /// Takes a token for `device`, or says how long until one is there.
    pub fn check(&self, device: &str) -> Result<(), Duration> {
        self.buckets
            .check_key(&device.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Drops buckets that are full again (devices idle for a while), so
    /// memory follows the active devices. Call it now and then.
    pub fn prune(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

/// One connection's bucket (MQTT).
#[derive(Debug)]
pub struct ConnectionLimiter {
    bucket: DefaultDirectRateLimiter,
}

impl ConnectionLimiter {
    pub fn new(quota: Quota) -> Self {
        ConnectionLimiter { bucket: governor::RateLimiter::direct(quota) }
    }

    /// Takes a token, or says how long until one is there.
    pub fn check(&self) -> Result<(), Duration> {
        self.bucket.check().map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_waits() {
        assert!(quota(0, 10).is_none());
        let limiter = DeviceLimiter::new(quota(10, 3).expect("quota"));
        for _ in 0..3 {
            assert!(limiter.check("a").is_ok());
        }
        let wait = limiter.check("a").expect_err("burst used up");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limiter.check("b").is_ok(), "buckets are per device");
    }
}
