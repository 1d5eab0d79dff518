//! The REST API: Firecracker's HTTP+JSON API on a Unix socket, turned into the VMM thread's
//! typed [`vmm::controller::Request`]s and their answers back into HTTP. Described for clients
//! in `docs/api.yaml`.
//!
//! - `http`: HTTP/1.1 framing (request limits, answers),
//! - `routes`: paths and methods to requests, answers to status codes,
//! - `schema`: the JSON bodies, shared with the config file,
//! - `server`: the socket, the server thread and its connections.

pub mod http;
pub mod routes;
pub mod schema;
pub mod server;

pub use server::{ApiError, ApiServer};

use crate::logger::LoggerConfig;

/// What the API and a config file ask of the VMM thread: the VMM's own requests, and the
/// front end's (where flint logs), which the VMM thread carries out beside the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    Vmm(vmm::controller::Request),
    SetLogger(LoggerConfig),
}

impl From<vmm::controller::Request> for ApiRequest {
    fn from(r: vmm::controller::Request) -> ApiRequest {
        ApiRequest::Vmm(r)
    }
}
