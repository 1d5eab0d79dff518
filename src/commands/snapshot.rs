//! `flint snapshot merge`: apply a diff snapshot to its base.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::cli::{CliError, Command};

pub(crate) const ABOUT: &str = "Work with snapshot files";

pub(crate) const AFTER_HELP: &str = "\
A snapshot is two files: a state file and a memory file (PUT /snapshot/create writes them).
A diff snapshot (snapshot_type \"Diff\", of a VM with track_dirty_pages) has a memory file
of the full size that holds only the pages changed since its base, the snapshot the VM wrote
or was loaded from before it; every other page is a hole. A diff does not load by itself:
'flint snapshot merge' writes its pages over a copy of its base's memory file, and the result
loads like any snapshot. It may be merged over the base's own files (they are replaced as a
whole, so a VM using the old memory file keeps it). Keep diff memory files on a filesystem
that keeps holes (ext4, xfs, btrfs, tmpfs) and copy them with tools that keep holes too.";

#[derive(Debug, Args)]
pub(crate) struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotSub,
}

#[derive(Debug, Subcommand)]
enum SnapshotSub {
    /// Merge a diff snapshot into its base: write the complete snapshot the diff describes
    Merge {
        /// The base snapshot's state and memory files
        #[arg(long, num_args = 2, value_names = ["STATE", "MEM"], required = true)]
        base: Vec<PathBuf>,
        /// The diff snapshot's state and memory files
        #[arg(long, num_args = 2, value_names = ["STATE", "MEM"], required = true)]
        diff: Vec<PathBuf>,
        /// Where the merged snapshot's state and memory files go (created or replaced)
        #[arg(long, num_args = 2, value_names = ["STATE", "MEM"], required = true)]
        out: Vec<PathBuf>,
    },
}

/// The two files of a snapshot option.
fn pair(option: &str, mut files: Vec<PathBuf>) -> Result<(PathBuf, PathBuf), CliError> {
    if files.len() != 2 {
        return Err(CliError::Repeated(option.to_string()));
    }
    let mem = files.pop().unwrap_or_default();
    let state = files.pop().unwrap_or_default();
    Ok((state, mem))
}

impl SnapshotArgs {
    pub(crate) fn into_command(self) -> Result<Command, CliError> {
        match self.command {
            SnapshotSub::Merge { base, diff, out } => Ok(Command::SnapshotMerge {
                base: pair("--base", base)?,
                diff: pair("--diff", diff)?,
                out: pair("--out", out)?,
            }),
        }
    }
}
