//! Client-side token-bucket limits on token requests, one bucket per issuer
//! (`spec.rateLimit`). Pure: the caller supplies the time.
//!
//! A request that would wait briefly reserves its place and waits; one that would wait
//! longer does not reserve and is retried later, so a slow limit on one issuer never holds
//! `--concurrency` slots that other issuers' tokens need.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::api::RateLimit;

/// The longest wait a request sleeps through while holding a reconcile slot.
pub const MAX_INLINE_WAIT: Duration = Duration::from_secs(1);

/// What a request may do now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Admission {
    /// Go now.
    Now,
    /// A place is reserved: go after this wait.
    After(Duration),
    /// Nothing reserved: try again after this long.
    Later(Duration),
}

#[derive(Debug)]
struct Bucket {
    limit: (f64, f64),
    /// Tokens available at `at`; negative when waits are reserved.
    tokens: f64,
    at: Instant,
}

/// Buckets by issuer key.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Admits one request to the issuer `key` under `limit` at `now`. A changed limit starts
    /// a full bucket.
    pub fn admit(&self, key: &str, limit: &RateLimit, now: Instant) -> Admission {
        let rate = if limit.requests_per_second.is_finite() && limit.requests_per_second > 0.0 {
            limit.requests_per_second
        } else {
            // The CRD refuses this; treat a bad value as no limit rather than a stall.
            return Admission::Now;
        };
        let burst = f64::from(limit.burst.max(1));
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            limit: (rate, burst),
            tokens: burst,
            at: now,
        });
        if bucket.limit != (rate, burst) {
            *bucket = Bucket {
                limit: (rate, burst),
                tokens: burst,
                at: now,
            };
        }
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Admission::Now;
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / rate);
        if wait <= MAX_INLINE_WAIT {
            bucket.tokens -= 1.0;
            Admission::After(wait)
        } else {
            Admission::Later(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rps: f64, burst: i32) -> RateLimit {
        RateLimit {
            requests_per_second: rps,
            burst,
        }
    }

    #[test]
    fn a_burst_goes_at_once_then_requests_are_spaced_at_the_rate() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let l = limit(10.0, 3);
        for _ in 0..3 {
            assert_eq!(limiter.admit("a", &l, t0), Admission::Now);
        }
        // The 4th waits 100 ms, the 5th (reserved behind it) 200 ms.
        assert_eq!(
            limiter.admit("a", &l, t0),
            Admission::After(Duration::from_millis(100))
        );
        match limiter.admit("a", &l, t0) {
            Admission::After(d) => assert!((d.as_secs_f64() - 0.2).abs() < 1e-9, "{d:?}"),
            other => panic!("{other:?}"),
        }
        // A second later the bucket has refilled by 10, capped at the burst.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(limiter.admit("a", &l, t1), Admission::Now);
        }
    }

    #[test]
    fn a_long_wait_reserves_nothing() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let l = limit(0.1, 1);
        assert_eq!(limiter.admit("a", &l, t0), Admission::Now);
        let Admission::Later(wait) = limiter.admit("a", &l, t0) else {
            panic!("a 10 s wait is not slept through");
        };
        assert!((wait.as_secs_f64() - 10.0).abs() < 1e-9);
        // Not reserved: after the wait, one request goes at once.
        assert_eq!(limiter.admit("a", &l, t0 + wait), Admission::Now);
    }

    #[test]
    fn issuers_have_their_own_buckets_and_a_new_limit_starts_full() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        assert_eq!(limiter.admit("a", &limit(1.0, 1), t0), Admission::Now);
        assert_eq!(limiter.admit("b", &limit(1.0, 1), t0), Admission::Now);
        assert!(matches!(
            limiter.admit("a", &limit(1.0, 1), t0),
            Admission::After(_)
        ));
        assert_eq!(limiter.admit("a", &limit(1.0, 5), t0), Admission::Now);
    }

    #[test]
    fn over_a_long_run_the_rate_holds() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        let l = limit(5.0, 2);
        let mut now = t0;
        let mut sent = 0;
        // Callers that retry exactly when told, for 60 simulated seconds.
        while now < t0 + Duration::from_secs(60) {
            match limiter.admit("a", &l, now) {
                Admission::Now => sent += 1,
                Admission::After(d) => {
                    sent += 1;
                    now += d;
                }
                Admission::Later(d) => now += d,
            }
        }
        // 5/s for 60 s plus the burst, give or take the last one.
        assert!((300..=303).contains(&sent), "{sent}");
    }
}
