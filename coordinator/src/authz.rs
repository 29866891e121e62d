//! Authorization, in one place and default deny. A tower layer in front of every gRPC service
//! reads the peer's certificate (verified by our acceptor against the fleet CA and the CRL, and
//! carried in `PeerInfo`), derives the principal, and checks the method's rule. Handlers find
//! the `Principal` in request extensions (and the peer address where tonic's
//! `Request::remote_addr` looks).
//!
//! Invariant: a gRPC path without a rule in `rule_for` is denied for everyone. The operator
//! table is swapped whole on reload (SIGHUP): a call is decided against one table, old or new.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use rollback_common::identity::{CertFacts, Identity, Role};
use rollback_common::proto::PACKAGE;

use crate::peer_conn::PeerInfo;
use serde::Deserialize;
use tonic::transport::server::TcpConnectInfo;
use tracing::warn;

/// Operator roles, each including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorRole {
    Viewer,
    Operator,
    Approver,
    Admin,
}

/// Who is calling, as proven by the certificate.
#[derive(Debug, Clone)]
pub struct Principal {
    pub identity: Identity,
    /// Set for operators: their role from the coordinator config.
    pub operator_role: Option<OperatorRole>,
    /// The presented certificate's not-after (Unix seconds), for expiry warnings.
    pub cert_not_after_unix: Option<i64>,
}

impl Principal {
    /// The operator a job was started by, acting again through that job (a deployment
    /// guard's `--auto` rollback): their stored identity with the operator role `StartGuard`
    /// required of them. `None` when the stored identity is not an operator's.
    pub fn acting_for(identity: &str) -> Option<Self> {
        let identity = Identity::parse_uri(identity).ok()?;
        (identity.role == rollback_common::identity::Role::Operator).then_some(Self {
            identity,
            operator_role: Some(OperatorRole::Operator),
            cert_not_after_unix: None,
        })
    }
}

/// What a method requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Only agents; the session itself checks the host id in Hello against the certificate.
    AgentSession,
    /// Only operators holding at least this role.
    Console(OperatorRole),
    /// The gRPC health service: any agent, and any operator with a role.
    Health,
}

/// The standard gRPC health service (`grpc.health.v1.Health`), served beside ours.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The method table. A method not named here has no rule and is denied.
pub fn rule_for(service: &str, method: &str) -> Option<Rule> {
    match (service, method) {
        ("AgentGateway", "Session") => Some(Rule::AgentSession),
        ("Console", "ListAgents") => Some(Rule::Console(OperatorRole::Viewer)),
        ("Console", "Exec") => Some(Rule::Console(OperatorRole::Operator)),
        (
            "Console",
            "GetRunbook" | "Plan" | "WatchJob" | "GetJob" | "ListJobs" | "GetReport"
            | "ListSnapshots",
        ) => Some(Rule::Console(OperatorRole::Viewer)),
        (
            "Console",
            "StartRollback" | "CancelJob" | "ResumeJob" | "Snapshot" | "Diagnose" | "StartGuard",
        ) => Some(Rule::Console(OperatorRole::Operator)),
        ("Console", "ApproveJob" | "DenyJob") => Some(Rule::Console(OperatorRole::Approver)),
        // The inventory decides which hosts destructive steps reach: admin only.
        ("Console", "ForgetAgent" | "LabelAgent") => Some(Rule::Console(OperatorRole::Admin)),
        // The trail shows every operator's actions, exec parameters and reasons: reading it is
        // oversight, for approvers. Whether it is intact reveals nothing of that (a count, a
        // head hash, the seq of a broken record): any operator may check it.
        ("Console", "ListAudit") => Some(Rule::Console(OperatorRole::Approver)),
        ("Console", "VerifyAudit") => Some(Rule::Console(OperatorRole::Operator)),
        ("Console", "ListCoordinators") => Some(Rule::Console(OperatorRole::Viewer)),
        (HEALTH_SERVICE, "Check" | "Watch") => Some(Rule::Health),
        _ => None,
    }
}

/// The decision for one call.
#[derive(Debug)]
pub struct Policy {
    trust_domain: String,
    operators: RwLock<Arc<BTreeMap<String, OperatorRole>>>,
}

impl Policy {
    pub fn new(trust_domain: String, operators: BTreeMap<String, OperatorRole>) -> Self {
        Self {
            trust_domain,
            operators: RwLock::new(Arc::new(operators)),
        }
    }

    /// The operator table in force.
    fn operators(&self) -> Arc<BTreeMap<String, OperatorRole>> {
        self.operators
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `operators` in force for every call decided from now on (SIGHUP reload).
    pub fn replace_operators(&self, operators: BTreeMap<String, OperatorRole>) {
        *self
            .operators
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(operators);
    }

    /// Decides a call to `path` from a peer that presented `peer_cert_der`.
    pub fn authorize(
        &self,
        path: &str,
        peer_cert_der: Option<&[u8]>,
    ) -> Result<Principal, tonic::Status> {
        let Some(der) = peer_cert_der else {
            warn!(method = path, "denied: no client certificate");
            return Err(tonic::Status::unauthenticated(
                "a client certificate from the fleet CA is required",
            ));
        };
        let identity = Identity::from_cert_der(der).map_err(|e| {
            warn!(method = path, error = %e, "denied: unusable client certificate");
            tonic::Status::unauthenticated(format!("client certificate: {e}"))
        })?;
        let cert_not_after_unix = CertFacts::from_der(der).ok().map(|f| f.not_after_unix);
        let deny = |reason: String| {
            warn!(peer = %identity, method = path, reason = %reason, "denied");
            Err(tonic::Status::permission_denied(format!(
                "{identity} may not call {path}: {reason}"
            )))
        };
        if identity.trust_domain != self.trust_domain {
            return deny(format!("trust domain is not `{}`", self.trust_domain));
        }
        let Some((service, method)) = split_path(path) else {
            return deny("unknown method".into());
        };
        let Some(rule) = rule_for(service, method) else {
            return deny("no authorization rule for this method".into());
        };
        match (rule, identity.role) {
            (Rule::AgentSession, Role::Agent) => Ok(Principal {
                identity,
                operator_role: None,
                cert_not_after_unix,
            }),
            (Rule::AgentSession, _) => deny("only agent certificates may open a session".into()),
            (Rule::Health, Role::Agent) => Ok(Principal {
                identity,
                operator_role: None,
                cert_not_after_unix,
            }),
            (Rule::Health, Role::Operator) => match self.operators().get(&identity.name).copied() {
                Some(role) => Ok(Principal {
                    identity,
                    operator_role: Some(role),
                    cert_not_after_unix,
                }),
                None => deny(format!(
                    "operator `{}` has no role in the coordinator config ([operators] table)",
                    identity.name
                )),
            },
            (Rule::Health, _) => {
                deny("only agent and operator certificates may check health".into())
            }
            (Rule::Console(needed), Role::Operator) => {
                match self.operators().get(&identity.name).copied() {
                    Some(role) if role >= needed => Ok(Principal {
                        identity,
                        operator_role: Some(role),
                        cert_not_after_unix,
                    }),
                    Some(role) => deny(
                        format!("role {role:?} is below the required {needed:?}").to_lowercase(),
                    ),
                    None => deny(format!(
                        "operator `{}` has no role in the coordinator config ([operators] table)",
                        identity.name
                    )),
                }
            }
            (Rule::Console(_), _) => deny("only operator certificates may use the console".into()),
        }
    }
}

/// `/fleet.rollback.v1.Console/ListAgents` → ("Console", "ListAgents"); the health service
/// keeps its full name (`/grpc.health.v1.Health/Check` → ("grpc.health.v1.Health", "Check")).
fn split_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (qualified, method) = rest.split_once('/')?;
    if qualified == HEALTH_SERVICE {
        return Some((qualified, method));
    }
    let service = qualified.strip_prefix(PACKAGE)?.strip_prefix('.')?;
    Some((service, method))
}

/// Tower layer applying the policy to every request.
#[derive(Debug, Clone)]
pub struct AuthzLayer {
    policy: Arc<Policy>,
}

impl AuthzLayer {
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Authz<S> {
    inner: S,
    policy: Arc<Policy>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let leaf = peer.as_ref().and_then(PeerInfo::leaf);
        match self.policy.authorize(req.uri().path(), leaf) {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                if let Some(peer) = &peer {
                    req.extensions_mut().insert(TcpConnectInfo {
                        local_addr: peer.local_addr,
                        remote_addr: Some(peer.remote_addr),
                    });
                }
                // Every handler runs to its end in a task of its own: the server drops a
                // handler whose connection closed, and one cut between two of its effects
                // (a job stored but not started, an agent recorded but not registered) would
                // leave them half done. A handler that panicked answers `internal`.
                let handler = tokio::spawn(self.inner.call(req));
                Box::pin(async move {
                    match handler.await {
                        Ok(answer) => answer,
                        Err(e) => Ok(tonic::Status::internal(format!(
                            "the coordinator failed handling this call: {e}"
                        ))
                        .into_http()),
                    }
                })
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_method_has_a_rule() {
        for service in ["AgentGateway", "Console"] {
            let methods = rollback_common::proto::service_methods(service);
            assert!(!methods.is_empty(), "{service} has methods");
            for m in methods {
                assert!(
                    rule_for(service, &m.name).is_some(),
                    "{} has no authorization rule",
                    m.path()
                );
            }
        }
    }

    #[test]
    fn splits_paths() {
        assert_eq!(
            split_path("/fleet.rollback.v1.Console/ListAgents"),
            Some(("Console", "ListAgents"))
        );
        assert_eq!(split_path("/other.v1.Console/ListAgents"), None);
        assert_eq!(split_path("/fleet.rollback.v1Console/ListAgents"), None);
        assert_eq!(
            split_path("/grpc.health.v1.Health/Check"),
            Some((HEALTH_SERVICE, "Check"))
        );
        assert_eq!(split_path("/grpc.health.v1.Healthz/Check"), None);
    }

    #[test]
    fn health_is_for_agents_and_operators_with_a_role_only() {
        assert_eq!(rule_for(HEALTH_SERVICE, "Check"), Some(Rule::Health));
        assert_eq!(rule_for(HEALTH_SERVICE, "Watch"), Some(Rule::Health));
        // Not a catch-all: another method of the health service has no rule.
        assert_eq!(rule_for(HEALTH_SERVICE, "List"), None);
        assert_eq!(rule_for("Health", "Check"), None);
    }
}
