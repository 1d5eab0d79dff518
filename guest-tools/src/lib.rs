//! What flint's tests build guests from on the host side (the programs that run inside test
//! guests are this crate's binaries): [`elf`], the ELF wrapper of tiny test guests, used by the
//! tier-2 tests of both the `flint` binary and the `vmm` crate.

pub mod elf;
