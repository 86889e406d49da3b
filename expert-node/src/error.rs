//! Why a request failed on an expert node ([`NodeError`]), and the gRPC status each failure is
//! answered with (INVALID_ARGUMENT for the request's fault, FAILED_PRECONDITION for the node's,
//! UNAVAILABLE where a replica should take the call).

use omnishard_model::ExpertError;
use omnishard_model::wire::DecodeError;
use omnishard_proto::ServiceError;
use omnishard_proto::wire::IPC_READ_FAILED;

/// Why a request failed on the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("the node is still loading its experts; retry when its health is SERVING")]
    Loading,
    #[error("the node is shutting down; send the call to a replica")]
    ShuttingDown,
    #[error("model fingerprint mismatch: the request is for {got}, this node serves {expected}")]
    Fingerprint { expected: String, got: String },
    #[error(
        "token_index, expert_id and weight must have equal lengths (got {tokens}, {experts}, {weights})"
    )]
    Lengths {
        tokens: usize,
        experts: usize,
        weights: usize,
    },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Expert(#[from] ExpertError),
    #[error("output encoding failed: {0}")]
    Encode(String),
    #[error("a request carries its hidden states as bytes or in GPU memory, not both")]
    TwoHiddens,
    #[error("{IPC_READ_FAILED}: {0}")]
    Ipc(String),
    #[error(
        "a routed call (device_routed) carries its hidden states and routing in GPU memory only, not as bytes or assignment lists"
    )]
    RoutedExtra,
    #[error("a routed pass (device_pass) must say how long the node may wait for it (deadline_ms)")]
    PassDeadline,
    #[error("a routed pass: {0}")]
    BadPass(String),
    #[error(
        "the routed pass was not done on the GPU by its deadline (the coordinator's ready flags never came); its waits were released"
    )]
    PassTimeout,
    #[error("the GPU failed: {0}")]
    Gpu(String),
    #[error("shared-memory lane: {0}")]
    Lane(String),
    #[error("compute task failed: {0}")]
    Join(String),
}

impl ServiceError for NodeError {
    fn status_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            NodeError::Loading | NodeError::ShuttingDown => Code::Unavailable,
            NodeError::Fingerprint { .. } => Code::FailedPrecondition,
            NodeError::Lengths { .. }
            | NodeError::Decode(_)
            | NodeError::TwoHiddens
            | NodeError::RoutedExtra
            | NodeError::PassDeadline
            | NodeError::BadPass(_) => Code::InvalidArgument,
            NodeError::PassTimeout => Code::DeadlineExceeded,
            // This node cannot map the coordinator's memory (another host, no GPU, no peer
            // access): about this node, not the request.
            NodeError::Ipc(_) | NodeError::Lane(_) => Code::FailedPrecondition,
            NodeError::Expert(e) => match e {
                ExpertError::UnknownLayer { .. }
                | ExpertError::InvalidInput { .. }
                | ExpertError::InvalidRouting { .. } => Code::InvalidArgument,
                // The node is not what its cluster expects: a fault of the node, which its
                // replicas cover while the coordinator re-checks it.
                ExpertError::NotHeld { .. } | ExpertError::Dtype { .. } => Code::FailedPrecondition,
                ExpertError::Candle(_)
                | ExpertError::Inconsistent(_)
                | ExpertError::Rejected { .. } => Code::Internal,
                ExpertError::Node { .. } | ExpertError::NoLiveHolder { .. } => Code::Unavailable,
            },
            NodeError::Encode(_) | NodeError::Join(_) | NodeError::Gpu(_) => Code::Internal,
        }
    }
}
