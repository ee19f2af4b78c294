//! The HTTP endpoints: `/metrics` (Prometheus) on `--metrics-addr`, `/healthz` and `/readyz`
//! on `--health-addr` (one listener when both addresses are the same).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::telemetry::{CONTENT_TYPE, Metrics};

/// This replica's part in leader election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// Not known yet (the Lease was not read yet).
    Unknown,
    /// Another replica leads; this one waits to take over.
    Standby,
    /// This replica leads (or runs without leader election).
    Leader,
}

/// What the probes report, updated by the controller and the leader election.
#[derive(Debug)]
pub struct Health {
    leadership: AtomicU8,
    caches_synced: AtomicBool,
    stopped: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            leadership: AtomicU8::new(Leadership::Unknown as u8),
            caches_synced: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// Records this replica's leadership.
    pub fn set_leadership(&self, leadership: Leadership) {
        self.leadership.store(leadership as u8, Ordering::Release);
    }

    /// This replica's leadership.
    pub fn leadership(&self) -> Leadership {
        match self.leadership.load(Ordering::Acquire) {
            x if x == Leadership::Leader as u8 => Leadership::Leader,
            x if x == Leadership::Standby as u8 => Leadership::Standby,
            _ => Leadership::Unknown,
        }
    }

    /// Records whether the controller's caches hold a full list of what it watches.
    pub fn set_caches_synced(&self, synced: bool) {
        self.caches_synced.store(synced, Ordering::Release);
    }

    /// Records that the controller stopped (shutdown, or leadership lost): no longer ready.
    pub fn set_stopped(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Ready: leadership is known, and a leader's caches are synced. A standby is ready: it
    /// is in the election and can take over.
    pub fn readiness(&self) -> Result<&'static str, &'static str> {
        if self.stopped.load(Ordering::Acquire) {
            return Err("shutting down");
        }
        match self.leadership() {
            Leadership::Unknown => Err("leadership not known yet"),
            Leadership::Standby => Ok("standby: another replica leads"),
            Leadership::Leader if self.caches_synced.load(Ordering::Acquire) => {
                Ok("leader: caches synced")
            }
            Leadership::Leader => Err("leader: caches not synced yet"),
        }
    }
}

/// Errors starting the HTTP endpoints.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    match state.metrics.encode() {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            warn!(error = %e, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Liveness: the process answers. A stuck runtime would not.
async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.health.readiness() {
        Ok(why) => (StatusCode::OK, format!("ok: {why}\n")),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Binds both addresses (failing at once if either is taken) and serves them in the
/// background until the process ends. Returns the bound addresses (useful with port 0).
pub async fn spawn(
    metrics_addr: SocketAddr,
    health_addr: SocketAddr,
    metrics_state: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<(SocketAddr, SocketAddr), ServerError> {
    let state = AppState {
        metrics: metrics_state,
        health,
    };
    let metrics_routes = Router::new().route("/metrics", get(metrics));
    let health_routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if metrics_addr == health_addr {
        let bound = serve(metrics_addr, metrics_routes.merge(health_routes), state).await?;
        return Ok((bound, bound));
    }
    let metrics_bound = serve(metrics_addr, metrics_routes, state.clone()).await?;
    let health_bound = serve(health_addr, health_routes, state).await?;
    Ok((metrics_bound, health_bound))
}

async fn serve(
    addr: SocketAddr,
    routes: Router<AppState>,
    state: AppState,
) -> Result<SocketAddr, ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    info!(addr = %bound, "serving HTTP");
    let app = routes.with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(addr = %bound, error = %e, "HTTP server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_is_ready_only_with_synced_caches() {
        let health = Health::default();
        assert!(health.readiness().is_err());
        health.set_leadership(Leadership::Leader);
        assert!(health.readiness().is_err());
        health.set_caches_synced(true);
        assert!(health.readiness().is_ok());
        health.set_stopped();
        assert!(health.readiness().is_err());
    }

    #[test]
    fn a_standby_is_ready_once_it_knows_it_is_one() {
        let health = Health::default();
        health.set_leadership(Leadership::Standby);
        assert!(health.readiness().is_ok());
    }

    #[tokio::test]
    async fn serves_metrics_and_probes_on_one_port_when_the_addresses_match() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // Port 0 twice would be two different ports; one address means one listener.
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let (m, h) = spawn(addr, addr, metrics, health.clone()).await.unwrap();
        assert_eq!(m, h);
        let get = |path: &str| {
            let url = format!("http://{m}{path}");
            async move {
                let response = reqwest::get(url).await.unwrap();
                (response.status().as_u16(), response.text().await.unwrap())
            }
        };
        assert_eq!(get("/healthz").await.0, 200);
        assert_eq!(get("/readyz").await.0, 503);
        health.set_leadership(Leadership::Standby);
        assert_eq!(get("/readyz").await.0, 200);
        let (status, body) = get("/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("# TYPE audience_token_leader gauge"),
            "{body}"
        );
    }
}
