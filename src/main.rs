//! `flint`: the command-line front end of the flint microVM monitor (all of it in the library).

fn main() -> std::process::ExitCode {
    flint::main_entry()
}
