//! An issuer's `rateLimit`: token requests are spaced, every token is still issued, and a
//! deferred request is no failure.

use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::super::oidc;
use super::{READY_TIMEOUT, TestEnv};

/// An issuer's `rateLimit` spaces its token requests; every token still gets issued and no
/// deferred request counts as a failure.
pub async fn rate_limit_spaces_requests(env: &TestEnv) {
    env.create_issuer("limited", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    // One request every 2 s, no burst above one.
    env.issuers()
        .patch(
            "limited",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rateLimit": {"requestsPerSecond": 0.5, "burst": 1}}})),
        )
        .await
        .expect("set rateLimit");
    env.wait_issuer("limited", "True", "Ready").await;
    let names = ["limited-a", "limited-b", "limited-c"];
    for name in names {
        env.create_token(name, "limited", oidc::ORDERS, &["orders/read"], None)
            .await;
    }
    let mut issued = Vec::new();
    for name in names {
        let token = env
            .wait_condition(name, "True", "Issued", READY_TIMEOUT)
            .await;
        let status = token.status.expect("status");
        assert_eq!(
            status.failed_attempts, 0,
            "{name}: deferral is not a failure"
        );
        issued.push(status.issued_at.expect("issuedAt").0);
    }
    issued.sort();
    for pair in issued.windows(2) {
        // Admissions are 2 s apart; a request may have started its reconcile up to 1 s
        // before its admitted time (it waits inside the reconcile), so at least 1 s.
        let gap = pair[1].duration_since(pair[0]).as_secs_f64();
        assert!(
            gap >= 1.0,
            "requests 2 s apart at 0.5/s; issued at {issued:?}"
        );
    }
}
