//! Asks the other controllers to look again, instead of calling into them: a refresh chain
//! that was lost or recovered signals its issuer's status controller and the issuer's
//! AudienceTokens, and nothing imports back.

use futures::channel::mpsc::{self, UnboundedReceiver, UnboundedSender};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::reflector::ObjectRef;

use crate::api::{ClusterTokenIssuer, IssuerKind, TokenIssuer};

/// An issuer named by kind, namespace (TokenIssuers only) and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerName {
    /// TokenIssuer or ClusterTokenIssuer.
    pub kind: IssuerKind,
    /// The namespace of a TokenIssuer.
    pub namespace: Option<String>,
    /// The issuer's name.
    pub name: String,
}

impl IssuerName {
    fn of(issuer: &ObjectReference) -> Option<Self> {
        let kind = match issuer.kind.as_deref()? {
            "TokenIssuer" => IssuerKind::TokenIssuer,
            "ClusterTokenIssuer" => IssuerKind::ClusterTokenIssuer,
            _ => return None,
        };
        Some(Self {
            kind,
            namespace: issuer.namespace.clone(),
            name: issuer.name.clone()?,
        })
    }
}

/// The sending side, kept in the controller's `Context`.
#[derive(Clone)]
pub struct Signals {
    token_issuer_status: UnboundedSender<ObjectRef<TokenIssuer>>,
    cluster_issuer_status: UnboundedSender<ObjectRef<ClusterTokenIssuer>>,
    tokens_of_issuer: UnboundedSender<IssuerName>,
}

/// The receiving side, wired into the controllers by `run`.
pub struct SignalStreams {
    /// TokenIssuers whose status should be recomputed.
    pub token_issuer_status: UnboundedReceiver<ObjectRef<TokenIssuer>>,
    /// ClusterTokenIssuers whose status should be recomputed.
    pub cluster_issuer_status: UnboundedReceiver<ObjectRef<ClusterTokenIssuer>>,
    /// Issuers whose AudienceTokens should be reconciled now.
    pub tokens_of_issuer: UnboundedReceiver<IssuerName>,
}

impl Signals {
    /// A connected pair.
    pub fn new() -> (Self, SignalStreams) {
        let (a, token_issuer_status) = mpsc::unbounded();
        let (b, cluster_issuer_status) = mpsc::unbounded();
        let (c, tokens_of_issuer) = mpsc::unbounded();
        (
            Self {
                token_issuer_status: a,
                cluster_issuer_status: b,
                tokens_of_issuer: c,
            },
            SignalStreams {
                token_issuer_status,
                cluster_issuer_status,
                tokens_of_issuer,
            },
        )
    }

    /// The issuer's status should be recomputed now.
    pub fn recheck_issuer(&self, issuer: &ObjectReference) {
        let Some(name) = IssuerName::of(issuer) else {
            return;
        };
        // A stopped controller needs no signal: send errors are ignored.
        match name.kind {
            IssuerKind::TokenIssuer => {
                let namespace = name.namespace.unwrap_or_default();
                let _ = self
                    .token_issuer_status
                    .unbounded_send(ObjectRef::new(&name.name).within(&namespace));
            }
            IssuerKind::ClusterTokenIssuer => {
                let _ = self
                    .cluster_issuer_status
                    .unbounded_send(ObjectRef::new(&name.name));
            }
        }
    }

    /// Every AudienceToken of the issuer should be reconciled now (its backoff is waived
    /// where the cause may be gone).
    pub fn retry_tokens_of(&self, issuer: &ObjectReference) {
        if let Some(name) = IssuerName::of(issuer) {
            let _ = self.tokens_of_issuer.unbounded_send(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn signals_reach_the_stream_of_their_kind() {
        let (signals, mut streams) = Signals::new();
        let token_issuer = ObjectReference {
            kind: Some("TokenIssuer".into()),
            namespace: Some("shop".into()),
            name: Some("idp".into()),
            ..ObjectReference::default()
        };
        let cluster_issuer = ObjectReference {
            kind: Some("ClusterTokenIssuer".into()),
            name: Some("corp".into()),
            ..ObjectReference::default()
        };
        signals.recheck_issuer(&token_issuer);
        signals.recheck_issuer(&cluster_issuer);
        signals.retry_tokens_of(&cluster_issuer);
        assert_eq!(
            streams.token_issuer_status.next().await,
            Some(ObjectRef::new("idp").within("shop"))
        );
        assert_eq!(
            streams.cluster_issuer_status.next().await,
            Some(ObjectRef::new("corp"))
        );
        assert_eq!(
            streams.tokens_of_issuer.next().await,
            Some(IssuerName {
                kind: IssuerKind::ClusterTokenIssuer,
                namespace: None,
                name: "corp".into()
            })
        );
    }
}
