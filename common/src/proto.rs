//! Generated gRPC code for `fleet.rollback.v1` and the descriptor set it was generated from.

#![allow(clippy::all, missing_docs, clippy::unwrap_used)]

tonic::include_proto!("fleet.rollback.v1");

/// The encoded `FileDescriptorSet` of `proto/rollback.proto`.
pub const DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rollback_descriptor.bin"));

impl Step {
    /// A step of `action` with `params` and the host's default timeout.
    pub fn new(action: &str, params: &[(&str, &str)]) -> Self {
        Self {
            action: action.to_string(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timeout_secs: 0,
        }
    }
}

/// Protobuf package of every service.
pub const PACKAGE: &str = "fleet.rollback.v1";

/// One rpc of a service, as the descriptor declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodInfo {
    pub service: String,
    pub name: String,
    pub client_streaming: bool,
    pub server_streaming: bool,
}

impl MethodInfo {
    /// The HTTP/2 path gRPC uses for this method, e.g. `/fleet.rollback.v1.Console/ListAgents`.
    pub fn path(&self) -> String {
        format!("/{PACKAGE}.{}/{}", self.service, self.name)
    }
}

/// Every method of `service` (e.g. "Console") as declared in the proto file.
pub fn service_methods(service: &str) -> Vec<MethodInfo> {
    use prost::Message;
    let Ok(fds) = prost_types::FileDescriptorSet::decode(DESCRIPTOR_SET) else {
        return Vec::new();
    };
    fds.file
        .iter()
        .filter(|f| f.package() == PACKAGE)
        .flat_map(|f| f.service.iter())
        .filter(|s| s.name() == service)
        .flat_map(|s| s.method.iter())
        .map(|m| MethodInfo {
            service: service.to_string(),
            name: m.name().to_string(),
            client_streaming: m.client_streaming(),
            server_streaming: m.server_streaming(),
        })
        .collect()
}

/// Lowercase name of a `StepStatus` for people and JSON: `succeeded`, `timed_out`, ...
pub fn step_status_name(status: i32) -> &'static str {
    match StepStatus::try_from(status) {
        Ok(StepStatus::Succeeded) => "succeeded",
        Ok(StepStatus::Failed) => "failed",
        Ok(StepStatus::TimedOut) => "timed_out",
        Ok(StepStatus::Cancelled) => "cancelled",
        Ok(StepStatus::Interrupted) => "interrupted",
        Ok(StepStatus::Refused) => "refused",
        Ok(StepStatus::Skipped) => "skipped",
        Ok(StepStatus::Busy) => "busy",
        Ok(StepStatus::Unspecified) | Err(_) => "unknown",
    }
}
