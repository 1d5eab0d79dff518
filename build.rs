//! Build options of the `flint` binary.
//!
//! `FLINT_NO_PIE=1` links `flint` as a position-dependent executable (`-no-pie`). A
//! position-independent one (the default) is loaded at a random address, and the dynamic
//! loader then writes every pointer in its relocated read-only data (about 90 KiB: vtables,
//! tables of strings and functions): pages private to each process. Without PIE those pages
//! are clean and shared by every flint process, which saves each sandbox about 85 KiB, at the
//! price of address space layout randomisation for flint's own code and data (its stacks,
//! heap, libraries and the guest's memory stay randomised). See README, "Density against
//! Firecracker".

fn main() {
    println!("cargo:rerun-if-env-changed=FLINT_NO_PIE");
    if std::env::var_os("FLINT_NO_PIE").is_some_and(|v| v == "1") {
        println!("cargo:rustc-link-arg-bin=flint=-no-pie");
    }
}
