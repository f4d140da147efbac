//! The transports' plumbing, for the bench, which times the steps of a dispatch one
//! by one, and for tests that drive a transport by hand. Not part of the API: it
//! may change without notice.

pub use ep_mesh::{local_comms, run_local, Control, DeviceExchange, LocalComm, Mesh};
