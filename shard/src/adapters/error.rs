//! Errors of adapter resolution, loading, merging and slot management, with their gRPC codes.

/// Why an adapter could not be resolved, loaded, merged, installed or applied.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The adapter id names nothing (missing directory, not in the hub cache offline, unknown
    /// hub repository). `NOT_FOUND`.
    #[error("adapter {id} not found: {detail}")]
    NotFound {
        /// The adapter id as given.
        id: String,
        /// Where it was looked for.
        detail: String,
    },
    /// The request is invalid: bad id or path, unsupported adapter config, shapes for another base
    /// model, modules the model does not have, an impossible merge. `INVALID_ARGUMENT`.
    #[error("{0}")]
    Invalid(String),
    /// Local adapters were requested but the shard has no `--adapter-root`. `FAILED_PRECONDITION`.
    #[error(
        "local adapter {id} refused: this shard has no adapter roots; start it with --adapter-root DIR (or ADAPTER_ROOTS) to allow local adapters"
    )]
    LocalDisabled {
        /// The adapter id as given.
        id: String,
    },
    /// The slot is outside `1..=max`. `INVALID_ARGUMENT`.
    #[error("adapter slot {slot} does not exist: slots are 1..={max} (0 is the base model)")]
    BadSlot {
        /// The slot.
        slot: u32,
        /// The number of slots.
        max: u32,
    },
    /// A request uses a slot that holds no adapter. `INVALID_ARGUMENT`.
    #[error("adapter slot {slot} is empty: load an adapter into it before using it")]
    EmptySlot {
        /// The slot.
        slot: u32,
    },
    /// Installing the adapter would exceed the memory budget. The router plans the budget with
    /// the sizes prepares report, so this is a router bug, not flow control. `INTERNAL`.
    #[error(
        "adapter slot {slot} needs {needed} bytes but only {free} of the {budget}-byte adapter memory budget are free: the router over-committed adapter memory (a bug)"
    )]
    OverBudget {
        /// The slot.
        slot: u32,
        /// Bytes of the new adapter.
        needed: u64,
        /// Bytes free (counting the slot's current adapter as freed).
        free: u64,
        /// The budget.
        budget: u64,
    },
    /// No staged adapter has this id (never prepared, already installed, or discarded).
    /// `NOT_FOUND`.
    #[error("no prepared adapter with staging id {0}")]
    NotStaged(u64),
    /// Too many adapters are staged at once (the router bounds this; a bug otherwise).
    /// `RESOURCE_EXHAUSTED`.
    #[error("{0} adapters are staged already; install or discard some first")]
    TooManyStaged(usize),
    /// The slot is used by running requests and cannot be replaced or offloaded.
    /// `FAILED_PRECONDITION`.
    #[error(
        "adapter slot {slot} is used by {requests} running request(s); it can be replaced or offloaded once they finish"
    )]
    SlotInUse {
        /// The slot.
        slot: u32,
        /// Requests using it.
        requests: usize,
    },
    /// S3 refused the server's credentials for an `S3` adapter (unknown key, wrong secret, no
    /// permission on the bucket or prefix). `PERMISSION_DENIED`.
    #[error("adapter {id}: {detail}")]
    PermissionDenied {
        /// The adapter id.
        id: String,
        /// What S3 answered and what to check.
        detail: String,
    },
    /// An `S3` adapter could not be fetched: no credentials configured, S3 unreachable or
    /// failing. `FAILED_PRECONDITION`.
    #[error("adapter {id}: {detail}")]
    S3 {
        /// The adapter id.
        id: String,
        /// The failure (what to set, or what S3 answered).
        detail: String,
    },
    /// The hub could not be reached or failed. `FAILED_PRECONDITION`.
    #[error("adapter {id}: {detail}")]
    Hub {
        /// The adapter id.
        id: String,
        /// The failure.
        detail: String,
    },
    /// An unexpected failure (I/O after the files were found, tensor allocation, a worker that
    /// died). `INTERNAL`.
    #[error("{0}")]
    Internal(String),
}

impl AdapterError {
    /// The gRPC code the router maps to an HTTP status (404, 403, 422, retry later, 424).
    pub fn code(&self) -> tonic::Code {
        match self {
            AdapterError::NotFound { .. } => tonic::Code::NotFound,
            AdapterError::Invalid(_)
            | AdapterError::BadSlot { .. }
            | AdapterError::EmptySlot { .. } => tonic::Code::InvalidArgument,
            AdapterError::NotStaged(_) => tonic::Code::NotFound,
            AdapterError::TooManyStaged(_) => tonic::Code::ResourceExhausted,
            AdapterError::LocalDisabled { .. }
            | AdapterError::SlotInUse { .. }
            | AdapterError::Hub { .. }
            | AdapterError::S3 { .. } => tonic::Code::FailedPrecondition,
            AdapterError::PermissionDenied { .. } => tonic::Code::PermissionDenied,
            AdapterError::OverBudget { .. } | AdapterError::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<medley_spec::SpecError> for AdapterError {
    /// An invalid spec: the message every entry point gives for it.
    fn from(e: medley_spec::SpecError) -> Self {
        AdapterError::Invalid(e.to_string())
    }
}

impl From<AdapterError> for tonic::Status {
    fn from(e: AdapterError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
