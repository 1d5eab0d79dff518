//! Container images for flint, on the host side: from an image reference or file to a
//! directory tree and the command line that runs in it.
//!
//! - [`reference`] tells a registry reference (`[REGISTRY/]NAME[:TAG|@DIGEST]`, with Docker
//!   Hub's defaults) from a file path (an OCI image layout directory, an OCI archive or a
//!   `docker save` tarball).
//! - [`source`] reads an image from such a file: its manifest, its configuration and its ordered
//!   layers; a multi-platform index resolves to linux/amd64.
//! - [`registry`] pulls an image from a registry (HTTPS, or plain HTTP for the registries
//!   allowed), verifying every blob into the store; an interrupted pull resumes.
//! - [`store`] is the blob cache keyed by digest and shared between images: every blob is
//!   verified while it is written and only then renamed into place.
//! - [`unpack`] applies the layers in order to an empty directory, treating each layer as hostile.
//! - [`config`] turns the image configuration and the user's overrides into a [`config::RunSpec`].
//!
//! Unpacking makes device nodes and sets ownership, so it needs root (flint has it when it runs
//! virtual machines).

pub mod config;
pub mod digest;
mod fsutil;
pub mod reference;
pub mod registry;
pub mod source;
pub mod store;
pub mod unpack;

#[cfg(test)]
mod testutil;

pub use config::{run_spec, RunOverrides, RunSpec};
pub use digest::Digest;
pub use reference::{ImageRef, Reference};
pub use registry::{Progress, PullOptions};
pub use source::{Compression, Image, ImageSource, Layer};
pub use store::Store;
pub use unpack::{read_file_beneath, unpack, LayerInput, Limits};
