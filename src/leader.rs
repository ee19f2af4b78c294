//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager): only the leader
//! runs the controllers, so only it requests tokens and writes. A standby takes over when the
//! Lease is released (graceful shutdown) or expires (a crashed leader).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::server::{Health, Leadership};
use crate::telemetry::Metrics;

/// Where the Lease is and how long it lasts.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Lease namespace (the operator's own).
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease holds without renewal; a standby takes over at most this long (plus
    /// up to a second) after the leader's last renewal.
    pub duration: Duration,
}

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease could not be read or created.
    #[error("leader election on Lease {namespace}/{name} failed: {source}")]
    Lease {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// The cause.
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    /// Another replica took the Lease while this one led. The process should exit so that
    /// it restarts as a standby with fresh state.
    #[error("lost the leader Lease {0}; stopped the controllers")]
    Lost(String),
}

/// A shutdown request that any number of waiters can await.
pub type Shutdown = Shared<BoxFuture<'static, ()>>;

/// `stop` as a future that is cheap to poll, for a controller's `graceful_shutdown_on`. A
/// controller polls that future every time it wakes, for every watch event and every
/// finished reconcile; polling the shared signal future itself each time (its lock, its
/// waker slot, then the signal handlers and Lease futures inside) cost about 1% of the
/// operator's CPU at 10,000 tokens. Here it is awaited once, in a task of its own, and each
/// poll reads a flag. Call it inside the runtime.
pub fn cheap_to_poll(stop: Shutdown) -> impl Future<Output = ()> + Send + Unpin + 'static {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::Poll;

    #[derive(Default)]
    struct Stopped {
        flag: AtomicBool,
        waker: futures::task::AtomicWaker,
    }
    let state = Arc::new(Stopped::default());
    let setter = Arc::clone(&state);
    // The task ends with this view too: it must not keep `stop` (and, while leading, the
    // Lease watch inside it, whose receivers must all close for the Lease to be released)
    // alive after the controller that polled the view is gone.
    let (alive, dropped) = futures::channel::oneshot::channel::<()>();
    tokio::spawn(async move {
        if let futures::future::Either::Left(_) = futures::future::select(stop, dropped).await {
            setter.flag.store(true, Ordering::Release);
            setter.waker.wake();
        }
    });
    futures::future::poll_fn(move |cx| {
        let _alive = &alive;
        if state.flag.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        state.waker.register(cx.waker());
        // The flag may have been set between the first look and the registration.
        if state.flag.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
}

/// Waits to lead, then runs `work` until `shutdown` or lost leadership (whichever is first,
/// passed to `work` as its stop signal). Releases the Lease on shutdown so that a standby
/// takes over at once instead of after the Lease expires.
pub async fn run_as_leader<W, F, E>(
    client: Client,
    lease: LeaseSettings,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    work: W,
) -> Result<Result<(), E>, LeaderError>
where
    W: FnOnce(Shutdown) -> F,
    F: Future<Output = Result<(), E>>,
{
    let lease_error = |source| LeaderError::Lease {
        namespace: lease.namespace.clone(),
        name: lease.name.clone(),
        source,
    };
    // The lease renews after duration − grace; a third of the duration leaves time for a
    // slow API server.
    let duration_secs = lease.duration.as_secs().clamp(3, 3600);
    let grace_secs = (duration_secs / 3).max(1);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    let manager = LeaseManagerBuilder::new(client, &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_field_manager(format!("{}-{}", crate::secret::MANAGER, lease.identity))
        .with_duration(duration_secs)
        .with_grace(grace_secs)
        .build()
        .await
        .map_err(lease_error)?;
    let (mut leading, task) = manager.watch().await;
    // The Lease exists and is being contended for: until told otherwise, another leads.
    health.set_leadership(Leadership::Standby);
    info!(lease = %lease.name, identity = %lease.identity, "waiting for the leader Lease");

    let mut shutdown_wait = shutdown.clone();
    loop {
        if *leading.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() {
                    // The election task ended; its result says why.
                    return match task.await {
                        Ok(Err(e)) => Err(lease_error(e)),
                        _ => Err(LeaderError::Lost(lease.name.clone())),
                    };
                }
            }
            () = &mut shutdown_wait => {
                info!("shutdown while standing by");
                health.set_stopped();
                return Ok(Ok(()));
            }
        }
    }

    info!(lease = %lease.name, identity = %lease.identity, "became the leader");
    health.set_leadership(Leadership::Leader);
    metrics.set_leader(true);

    // Stop the work on shutdown, or as soon as the Lease is no longer ours: the election
    // task says so, or this replica cannot confirm it holds the Lease for two thirds of its
    // duration (cut off from the API server, it would otherwise go on requesting tokens
    // while another replica takes over).
    let lost = {
        let mut leading = leading.clone();
        let told = async move {
            while leading.changed().await.is_ok() {
                if !*leading.borrow_and_update() {
                    return;
                }
            }
            // The election task ended without saying we lost: treat it as lost.
        };
        let deadline = Duration::from_secs(duration_secs * 2 / 3);
        let unconfirmed = confirm_holder(leases, lease.clone(), deadline);
        async move {
            futures::future::select(std::pin::pin!(told), std::pin::pin!(unconfirmed)).await;
            true
        }
    };
    let lost = lost.shared();
    let stop: Shutdown = {
        let lost = lost.clone();
        let shutdown = shutdown.clone();
        async move {
            futures::future::select(std::pin::pin!(lost), shutdown).await;
        }
        .boxed()
        .shared()
    };
    let result = work(stop).await;
    health.set_stopped();
    metrics.set_leader(false);

    if lost.peek().is_some() && shutdown.peek().is_none() {
        warn!(lease = %lease.name, "lost the leader Lease");
        return Err(LeaderError::Lost(lease.name));
    }
    // Closing the channel (every receiver) makes the election task release the Lease.
    drop(lost);
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Ok(_))) => info!(lease = %lease.name, "released the leader Lease"),
        Ok(Ok(Err(e))) => {
            warn!(error = %e, "cannot release the leader Lease; it expires on its own")
        }
        Ok(Err(e)) => warn!(error = %e, "leader election task failed"),
        Err(_) => warn!("releasing the leader Lease timed out; it expires on its own"),
    }
    Ok(result)
}

/// Reads the Lease every `deadline / 4` and returns when this replica has not been seen
/// holding a current Lease for `deadline`, or sees another holder.
async fn confirm_holder(leases: Api<Lease>, lease: LeaseSettings, deadline: Duration) {
    let mut confirmed = Instant::now();
    loop {
        tokio::time::sleep(deadline / 4).await;
        match leases.get(&lease.name).await {
            Ok(current) => match held_by(&current) {
                Some(holder) if holder == lease.identity => confirmed = Instant::now(),
                Some(holder) => {
                    warn!(lease = %lease.name, %holder, "another replica holds the leader Lease");
                    return;
                }
                None => {}
            },
            Err(e) => warn!(lease = %lease.name, error = %e, "cannot read the leader Lease"),
        }
        if confirmed.elapsed() >= deadline {
            warn!(lease = %lease.name, "could not confirm holding the leader Lease; stepping down");
            return;
        }
    }
}

/// The Lease's holder, if it has one.
fn held_by(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cheap_stop_resolves_once_the_shutdown_does_and_not_before() {
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        let stop: Shutdown = async move {
            let _ = rx.await;
        }
        .boxed()
        .shared();
        let mut cheap = cheap_to_poll(stop.clone());
        let waited = tokio::time::timeout(Duration::from_millis(50), &mut cheap).await;
        assert!(waited.is_err(), "resolved before the shutdown");
        tx.send(()).expect("receiver alive");
        tokio::time::timeout(Duration::from_secs(5), cheap)
            .await
            .expect("resolves after the shutdown");
        // A view taken after the shutdown resolved resolves too.
        tokio::time::timeout(Duration::from_secs(5), cheap_to_poll(stop))
            .await
            .expect("resolves when taken late");
    }

    #[tokio::test]
    async fn a_dropped_view_lets_go_of_the_shutdown_future() {
        // The shutdown future holds `held` (as the Lease watch's receiver is held while
        // leading); once the view and every other clone are gone, nothing may hold it.
        let held = Arc::new(());
        let inner = Arc::clone(&held);
        let stop: Shutdown = async move {
            let _inner = inner;
            futures::future::pending::<()>().await;
        }
        .boxed()
        .shared();
        let view = cheap_to_poll(stop.clone());
        drop(stop);
        tokio::task::yield_now().await;
        assert_eq!(
            Arc::strong_count(&held),
            2,
            "the view's task holds the future"
        );
        drop(view);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&held) > 1 {
            assert!(
                Instant::now() < deadline,
                "the shutdown future is still held"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
