//! Why a call to an expert node failed ([`CallError`]) and whom to blame for it ([`Fault`]): the
//! node, whose work then goes to a replica; the request, which the node refused and every
//! replica would refuse too; or the GPU memory shared with it (CUDA IPC), after which the node
//! is asked again with the bytes.

use std::time::Duration;

/// Why one call to a node failed.
#[derive(Debug, Clone)]
pub(super) enum CallError {
    /// The connection or the stream broke.
    Transport(String),
    /// No answer before the deadline.
    Timeout(Duration),
    /// No answer within this node's hedging threshold: replicas answered instead.
    Hedged(Duration),
    /// The node answered with an error status.
    Status { code: tonic::Code, message: String },
    /// The node answered something that does not fit the request.
    BadAnswer(String),
    /// GPU memory between the coordinator and the node could not be read (the node's answer, or
    /// the rows staged for it): CUDA IPC between these processes is not possible (another IPC
    /// namespace, no peer access…).
    Ipc(String),
}

/// Whom a failed call is blamed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// The node is at fault: it is marked down and its share of the call goes to a replica.
    Node,
    /// The node refused the request itself, which no replica would accept either: the call
    /// fails.
    Refused,
    /// The answer's way back failed, not the node: it is asked again with the answer on the
    /// wire, and never again for GPU memory.
    Ipc,
}

impl CallError {
    pub(super) fn status(code: tonic::Code, message: &str) -> Self {
        CallError::Status {
            code,
            message: message.to_string(),
        }
    }

    /// Whether the node is at fault — it is then marked down and the work goes to a replica —
    /// rather than the request, which no replica would accept either.
    ///
    /// Exhaustive on purpose, with no catch-all arm: a new variant or status code must be
    /// classified by someone who thought about it.
    pub(super) fn fault(&self) -> Fault {
        use tonic::Code;
        match self {
            CallError::Transport(_)
            | CallError::Timeout(_)
            | CallError::Hedged(_)
            | CallError::BadAnswer(_) => Fault::Node,
            CallError::Ipc(_) => Fault::Ipc,
            CallError::Status { code, .. } => match code {
                // The request is malformed or too large: every replica would say the same.
                Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted => {
                    Fault::Refused
                }
                // Anything else is about this node (still loading, another model, an expert it
                // no longer holds, an internal failure…): a replica may well answer.
                Code::Ok
                | Code::Cancelled
                | Code::Unknown
                | Code::DeadlineExceeded
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::Aborted
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
                | Code::Unauthenticated => Fault::Node,
            },
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Transport(m) | CallError::BadAnswer(m) => f.write_str(m),
            CallError::Ipc(m) => write!(f, "GPU memory cannot be shared with this node: {m}"),
            CallError::Timeout(t) => {
                write!(f, "no answer within the {} ms deadline", t.as_millis())
            }
            CallError::Hedged(t) => write!(
                f,
                "no answer within {} ms, well past its usual latency; replicas answered instead",
                t.as_millis()
            ),
            CallError::Status { code, message } => write!(f, "{code:?}: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::{CallError, Fault};

    const TIMEOUT: Duration = Duration::from_millis(100);

    /// Every status code with whom it is blamed on: only a malformed or oversized request is the
    /// request's fault.
    const BLAME: [(Code, Fault); 17] = [
        (Code::Ok, Fault::Node),
        (Code::Cancelled, Fault::Node),
        (Code::Unknown, Fault::Node),
        (Code::InvalidArgument, Fault::Refused),
        (Code::DeadlineExceeded, Fault::Node),
        (Code::NotFound, Fault::Node),
        (Code::AlreadyExists, Fault::Node),
        (Code::PermissionDenied, Fault::Node),
        (Code::ResourceExhausted, Fault::Refused),
        (Code::FailedPrecondition, Fault::Node),
        (Code::Aborted, Fault::Node),
        (Code::OutOfRange, Fault::Refused),
        (Code::Unimplemented, Fault::Node),
        (Code::Internal, Fault::Node),
        (Code::Unavailable, Fault::Node),
        (Code::DataLoss, Fault::Node),
        (Code::Unauthenticated, Fault::Node),
    ];

    #[test]
    fn every_call_error_is_blamed_on_the_node_or_the_request() {
        assert_eq!(CallError::Transport("reset".into()).fault(), Fault::Node);
        assert_eq!(CallError::Timeout(TIMEOUT).fault(), Fault::Node);
        assert_eq!(CallError::Hedged(TIMEOUT).fault(), Fault::Node);
        assert_eq!(CallError::BadAnswer("short".into()).fault(), Fault::Node);
        assert_eq!(CallError::Ipc("no peer".into()).fault(), Fault::Ipc);
        for (code, blame) in BLAME {
            assert_eq!(CallError::status(code, "x").fault(), blame, "{code:?}");
        }
        // The table above is every code there is.
        for i in 0..=16 {
            assert!(BLAME.iter().any(|&(c, _)| c == Code::from(i)), "code {i}");
        }
    }
}
