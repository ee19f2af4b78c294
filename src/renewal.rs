//! When to renew a token and how long to wait after a failure. Pure time maths: no clock,
//! no randomness of its own (callers pass the jitter), so every rule is table-tested.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use sha2::{Digest, Sha256};

/// The latest point before expiry at which a renewed token still reaches every pod: kubelet
/// needs up to about a minute to refresh a mounted Secret.
pub const MOUNT_PROPAGATION_FLOOR: Duration = Duration::from_secs(90);

/// Renewal times spread over ±10% of the renewal window, so tokens created together do not
/// renew together.
pub const JITTER_FRACTION: f64 = 0.10;

/// The default share of the lifetime left when renewing: renewal at two thirds.
pub const DEFAULT_RENEW_BEFORE_PERCENTAGE: u8 = 33;

/// First retry delay after a failed token request.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay after repeated failures.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Longest `Retry-After` honoured; a server asking for more is retried after this.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

/// How far before expiry to renew, from the AudienceToken spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewBefore {
    /// A fixed time before expiry (`renewBefore`).
    Duration(Duration),
    /// A share of the lifetime, in percent (`renewBeforePercentage`, 1–90).
    Percentage(u8),
}

impl Default for RenewBefore {
    fn default() -> Self {
        RenewBefore::Percentage(DEFAULT_RENEW_BEFORE_PERCENTAGE)
    }
}

/// Why the renewal time differs from what the spec asked for; raised as a Warning Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewalWarning {
    /// The lifetime is too short to renew 90 s before expiry: pods may see the new token late.
    LifetimeTooShort {
        /// The token's lifetime.
        lifetime: Duration,
    },
    /// `renewBefore` is not shorter than the lifetime; the default (two thirds) was used.
    RenewBeforeTooLong {
        /// The token's lifetime.
        lifetime: Duration,
    },
}

/// When to renew a token, and whether the spec could be honoured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenewalPlan {
    /// The moment to request a new token.
    pub renewal_time: Timestamp,
    /// Set when the renewal time had to deviate from the spec.
    pub warning: Option<RenewalWarning>,
}

/// Computes when to renew a token issued at `issued_at` that expires at `expires_at`.
///
/// `jitter` in `[-1, 1]` moves the renewal by up to ±[`JITTER_FRACTION`] of the renewal
/// window; pass [`stable_jitter`] so the same token always gets the same time.
pub fn renewal_time(
    issued_at: Timestamp,
    expires_at: Timestamp,
    policy: RenewBefore,
    jitter: f64,
) -> RenewalPlan {
    let jitter = jitter.clamp(-1.0, 1.0);
    let lifetime = expires_at.duration_since(issued_at);
    if lifetime <= SignedDuration::ZERO {
        return RenewalPlan {
            renewal_time: issued_at,
            warning: None,
        };
    }
    let lifetime_std = lifetime.unsigned_abs();
    let mut warning = None;

    let mut window = match policy {
        RenewBefore::Duration(d) => SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX),
        RenewBefore::Percentage(p) => lifetime.mul_f64(f64::from(p.clamp(1, 90)) / 100.0),
    };
    if window >= lifetime {
        warning = Some(RenewalWarning::RenewBeforeTooLong {
            lifetime: lifetime_std,
        });
        window = lifetime.mul_f64(f64::from(DEFAULT_RENEW_BEFORE_PERCENTAGE) / 100.0);
    }
    let window = window.mul_f64(1.0 + JITTER_FRACTION * jitter);
    let mut renewal = expires_at - window;

    let floor = SignedDuration::try_from(MOUNT_PROPAGATION_FLOOR).unwrap_or(SignedDuration::ZERO);
    let latest = expires_at - floor;
    if renewal > latest {
        if latest > issued_at {
            // Keep the spread inside the last 10% before the floor rather than piling every
            // token onto the same instant.
            let spread = latest
                .duration_since(issued_at)
                .mul_f64(JITTER_FRACTION * (jitter + 1.0) / 2.0);
            renewal = latest - spread;
        } else {
            warning = Some(RenewalWarning::LifetimeTooShort {
                lifetime: lifetime_std,
            });
        }
    }
    RenewalPlan {
        renewal_time: renewal.max(issued_at),
        warning,
    }
}

/// A jitter in `[-1, 1]` derived from `seed` (e.g. the object's UID and the token's issue
/// time): stable across operator restarts, different for every token and every renewal.
pub fn stable_jitter(seed: &str) -> f64 {
    unit_from_seed(seed) * 2.0 - 1.0
}

/// A number in `[0, 1)` derived from `seed`.
pub fn unit_from_seed(seed: &str) -> f64 {
    let digest = Sha256::digest(seed.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // 53 bits fill an f64 mantissa exactly.
    (u64::from_be_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// How long to wait before retry number `failed_attempts` (1 after the first failure):
/// 5 s doubling to 5 min, scaled by `jitter_unit` in `[0, 1)` to ±10%, and never shorter than
/// the server's `Retry-After` (capped at an hour).
pub fn backoff_delay(
    failed_attempts: u32,
    jitter_unit: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = failed_attempts.saturating_sub(1).min(16);
    let base = BACKOFF_BASE
        .saturating_mul(1u32 << exponent)
        .min(BACKOFF_MAX);
    let jittered = base
        .mul_f64(1.0 - JITTER_FRACTION + 2.0 * JITTER_FRACTION * jitter_unit.clamp(0.0, 1.0))
        .min(BACKOFF_MAX);
    match retry_after {
        Some(wait) => jittered.max(wait.min(RETRY_AFTER_MAX)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn offset(plan: RenewalPlan) -> i64 {
        plan.renewal_time.as_second() - 1_800_000_000
    }

    #[test]
    fn renewal_table() {
        struct Case {
            name: &'static str,
            lifetime: i64,
            policy: RenewBefore,
            jitter: f64,
            want: i64,
            warning: bool,
        }
        let cases = [
            Case {
                name: "default two thirds",
                lifetime: 3600,
                policy: RenewBefore::default(),
                jitter: 0.0,
                want: 3600 - 1188,
                warning: false,
            },
            Case {
                name: "jitter +1 renews earlier",
                lifetime: 3600,
                policy: RenewBefore::default(),
                jitter: 1.0,
                want: 3600 - 1306,
                warning: false,
            },
            Case {
                name: "jitter -1 renews later",
                lifetime: 3600,
                policy: RenewBefore::default(),
                jitter: -1.0,
                want: 3600 - 1069,
                warning: false,
            },
            Case {
                name: "renewBefore 5m",
                lifetime: 3600,
                policy: RenewBefore::Duration(Duration::from_secs(300)),
                jitter: 0.0,
                want: 3300,
                warning: false,
            },
            Case {
                name: "percentage 50",
                lifetime: 1000,
                policy: RenewBefore::Percentage(50),
                jitter: 0.0,
                want: 500,
                warning: false,
            },
            Case {
                name: "percentage above 90 is clamped",
                lifetime: 1000,
                policy: RenewBefore::Percentage(99),
                jitter: 0.0,
                want: 100,
                warning: false,
            },
            Case {
                name: "renewBefore longer than lifetime falls back to default",
                lifetime: 600,
                policy: RenewBefore::Duration(Duration::from_secs(900)),
                jitter: 0.0,
                want: 402,
                warning: true,
            },
            Case {
                name: "floor: renewBefore 30s becomes 90s before expiry",
                lifetime: 3600,
                policy: RenewBefore::Duration(Duration::from_secs(30)),
                jitter: -1.0,
                want: 3510,
                warning: false,
            },
            Case {
                name: "floor keeps a spread below it",
                lifetime: 3600,
                policy: RenewBefore::Duration(Duration::from_secs(30)),
                jitter: 1.0,
                want: 3510 - 351,
                warning: false,
            },
            Case {
                name: "short lifetime: 3 minutes with default renews at floor",
                lifetime: 180,
                policy: RenewBefore::default(),
                jitter: -1.0,
                want: 90,
                warning: false,
            },
            Case {
                name: "lifetime under 90s warns and keeps two thirds",
                lifetime: 60,
                policy: RenewBefore::default(),
                jitter: 0.0,
                want: 40,
                warning: true,
            },
            Case {
                name: "expired at issue renews at once",
                lifetime: 0,
                policy: RenewBefore::default(),
                jitter: 0.0,
                want: 0,
                warning: false,
            },
        ];
        for c in cases {
            let plan = renewal_time(ts(0), ts(c.lifetime), c.policy, c.jitter);
            assert!(
                (offset(plan) - c.want).abs() <= 1,
                "{}: got {} want {}",
                c.name,
                offset(plan),
                c.want
            );
            assert_eq!(
                plan.warning.is_some(),
                c.warning,
                "{}: warning {:?}",
                c.name,
                plan.warning
            );
        }
    }

    #[test]
    fn renewal_is_never_after_expiry_nor_before_issue() {
        for lifetime in [1, 10, 89, 90, 91, 120, 600, 3600, 86_400] {
            for jitter in [-1.0, -0.3, 0.0, 0.5, 1.0] {
                for policy in [
                    RenewBefore::default(),
                    RenewBefore::Percentage(1),
                    RenewBefore::Percentage(90),
                    RenewBefore::Duration(Duration::from_secs(45)),
                ] {
                    let plan = renewal_time(ts(0), ts(lifetime), policy, jitter);
                    assert!(
                        plan.renewal_time >= ts(0) && plan.renewal_time < ts(lifetime),
                        "lifetime {lifetime} {policy:?} {jitter}"
                    );
                    if lifetime > 90 {
                        assert!(
                            plan.renewal_time <= ts(lifetime - 90),
                            "floor violated: lifetime {lifetime} {policy:?} {jitter}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn stable_jitter_is_stable_and_spread() {
        assert_eq!(
            stable_jitter("uid-1/2026-01-01T00:00:00Z"),
            stable_jitter("uid-1/2026-01-01T00:00:00Z")
        );
        let values: Vec<f64> = (0..1000)
            .map(|i| stable_jitter(&format!("uid-{i}")))
            .collect();
        assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)));
        let below = values.iter().filter(|v| **v < 0.0).count();
        assert!(
            (400..600).contains(&below),
            "jitter not centred: {below} of 1000 below zero"
        );
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let mid = 0.5;
        let secs: Vec<u64> = (1..=9)
            .map(|n| backoff_delay(n, mid, None).as_secs())
            .collect();
        assert_eq!(secs, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff_delay(1, 0.0, None), Duration::from_millis(4500));
        assert_eq!(backoff_delay(1, 1.0, None), Duration::from_millis(5500));
        assert_eq!(backoff_delay(30, 1.0, None), BACKOFF_MAX);
    }

    #[test]
    fn backoff_honours_retry_after() {
        assert_eq!(
            backoff_delay(1, 0.5, Some(Duration::from_secs(120))),
            Duration::from_secs(120)
        );
        assert_eq!(
            backoff_delay(8, 0.5, Some(Duration::from_secs(2))),
            Duration::from_secs(300)
        );
        assert_eq!(
            backoff_delay(1, 0.5, Some(Duration::from_secs(86_400))),
            RETRY_AFTER_MAX
        );
    }
}
