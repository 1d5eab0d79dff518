//! `flint image`: manage the cache of container images that `flint run --image` uses.

use clap::{Args, Subcommand};
use flint_image::ImageRef;

use crate::cli::{CliError, Command};
use crate::sandbox::image_cache::ImageCommand;

pub(crate) const ABOUT: &str = "Manage the cache of container images 'flint run --image' uses";

pub(crate) const AFTER_HELP: &str = "\
The cache is $FLINT_CACHE/images: each image's blobs (shared between images) and the
read-only ext4 disk of its files that sandboxes mount. 'flint run --image' fills it on an
image's first run; 'flint image pull' does the same without running anything.

Registry images are pulled over HTTPS (plain HTTP only from a registry named by
--insecure-registry), anonymously or with the credentials 'docker login' or 'podman login'
keep in $DOCKER_CONFIG/config.json (default ~/.docker/config.json: auths.<registry>.auth, or
a credential helper docker-credential-NAME); a multi-platform index resolves to linux/amd64.
Each blob is verified against its digest before it enters the cache, and blobs already
cached are not downloaded again. A download cut short is resumed (three tries), and then by
the next pull. Limits: manifests and configurations of 4 MiB, 256 layers, 64 GiB of layers;
30 s to connect and 60 s without a byte from the registry. On a terminal, a line shows the
bytes and layers pulled.

An image being started or running in a sandbox is in use: 'flint image rm' refuses it, and
'flint image prune' leaves its disk.";

#[derive(Debug, Args)]
pub(crate) struct ImageArgs {
    #[command(subcommand)]
    command: ImageSub,
}

#[derive(Debug, Subcommand)]
enum ImageSub {
    /// Pull an image from a registry (again, if cached: its tag may have moved) or import
    /// one from a file, and build its disk, as the first 'flint run --image' of it does;
    /// print its manifest digest
    Pull {
        /// The image: a registry reference [REGISTRY/]NAME[:TAG|@DIGEST] (Docker Hub without a
        /// REGISTRY), or a path to an OCI image layout directory, an OCI archive or a `docker
        /// save` tarball
        #[arg(value_name = "REF", allow_hyphen_values = true, value_parser = pull_ref)]
        reference: ImageRef,
        /// Allow pulling from this registry over plain HTTP instead of HTTPS (repeatable)
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]",
              allow_hyphen_values = true, value_parser = super::run::insecure_registry)]
        insecure_registry: Vec<String>,
    },
    /// List the cached images: digest, size of their blobs, size of their disk ('-' if not
    /// built), and the names they were imported as
    #[command(visible_alias = "list")]
    Ls {
        /// Print only the images' full manifest digests
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove images (their record, disk and account files); their blobs stay until 'flint
    /// image prune'
    #[command(visible_alias = "remove")]
    Rm {
        /// An image's manifest digest (sha256:HEX, HEX, or at least its first 4 hex digits)
        /// or a name it was imported as
        #[arg(value_name = "IMAGE", required = true, allow_hyphen_values = true)]
        images: Vec<String>,
    },
    /// Remove the blobs no cached image uses and the disks of images no longer cached
    Prune,
}

/// `pull REF`: as `--image REF`, with the errors naming the image rather than `--image`.
fn pull_ref(value: &str) -> Result<ImageRef, CliError> {
    super::run::image_ref(value).map_err(|e| match e {
        CliError::ImageMissing(value) => CliError::PullMissing(value),
        CliError::ImageRef { value, reason } => CliError::PullRef { value, reason },
        other => other,
    })
}

impl ImageArgs {
    pub(crate) fn into_command(self) -> Result<Command, CliError> {
        Ok(Command::Image(match self.command {
            ImageSub::Pull {
                reference,
                insecure_registry,
            } => ImageCommand::Pull {
                reference,
                insecure: insecure_registry,
            },
            ImageSub::Ls { quiet } => ImageCommand::List { quiet },
            ImageSub::Rm { images } => ImageCommand::Remove(images),
            ImageSub::Prune => ImageCommand::Prune,
        }))
    }
}
