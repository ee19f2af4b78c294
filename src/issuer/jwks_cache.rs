//! The key sets (JWKS) of the optional signature check of JWT access tokens
//! (`verifyAccessTokenSignature`), cached per URL.
//!
//! A key set is fetched once and kept for [`JWKS_TTL`]. A token naming a key the set lacks
//! (the server rotated its keys) makes it fetch again, at most every [`JWKS_MIN_REFRESH`] per
//! URL, so tokens with unknown keys cannot turn into a stream of JWKS requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;
use url::Url;

use crate::oauth::jwks::{self, JwkSet};
use crate::oauth::{Tls, TokenClient, TokenError};

/// Where an issuer's key set is, and how to connect there.
pub(super) struct JwksSource<'a> {
    pub url: &'a Url,
    pub tls: Tls<'a>,
    pub allow_insecure_http: bool,
}

/// How long a fetched key set is used before it is fetched again.
pub const JWKS_TTL: Duration = Duration::from_secs(3600);
/// The shortest time between two fetches of one key set (after an unknown `kid`, or a
/// failed fetch).
pub const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);

/// Key sets by JWKS URL.
#[derive(Default)]
pub struct JwksCache {
    sets: Mutex<HashMap<String, CachedSet>>,
    /// One fetch at a time: reconciles that want the same set wait and then find it cached.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct CachedSet {
    set: Arc<JwkSet>,
    /// The last successful fetch.
    fetched: Instant,
    /// The last fetch attempt, successful or not.
    attempted: Instant,
}

impl CachedSet {
    fn wants_fetch(&self, token: &str) -> bool {
        (self.fetched.elapsed() >= JWKS_TTL || jwks::key_missing(token, &self.set))
            && self.attempted.elapsed() >= JWKS_MIN_REFRESH
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl JwksCache {
    fn cached(&self, url: &Url) -> Option<CachedSet> {
        lock(&self.sets).get(url.as_str()).cloned()
    }

    /// The key set to verify `token` with: cached, or fetched when absent, older than the
    /// TTL, or lacking the token's key (rate limited).
    pub(super) async fn key_set(
        &self,
        tokens: &TokenClient,
        issuer: &str,
        source: JwksSource<'_>,
        timeout: Duration,
        token: &str,
    ) -> Result<Arc<JwkSet>, TokenError> {
        let url = source.url;
        match self.cached(url) {
            Some(entry) if !entry.wants_fetch(token) => return Ok(entry.set),
            _ => {}
        }
        let _one_at_a_time = self.fetching.lock().await;
        // Another reconcile may have fetched while this one waited.
        let cached = self.cached(url);
        if let Some(entry) = &cached
            && !entry.wants_fetch(token)
        {
            return Ok(entry.set.clone());
        }
        let fetched = tokens
            .fetch_jwks(url, source.tls, timeout, source.allow_insecure_http)
            .await;
        let now = Instant::now();
        let mut sets = lock(&self.sets);
        match (fetched, cached) {
            (Ok(set), _) => {
                let set = Arc::new(set);
                sets.insert(
                    url.to_string(),
                    CachedSet {
                        set: set.clone(),
                        fetched: now,
                        attempted: now,
                    },
                );
                Ok(set)
            }
            // Keep using the keys we have; the check fails anyway if they do not fit.
            (Err(error), Some(entry)) => {
                warn!(issuer, jwks_uri = %url, error = %error, "cannot refresh the JWKS; using the cached one");
                let set = entry.set.clone();
                sets.insert(
                    url.to_string(),
                    CachedSet {
                        attempted: now,
                        ..entry
                    },
                );
                Ok(set)
            }
            (Err(error), None) => Err(error),
        }
    }
}
