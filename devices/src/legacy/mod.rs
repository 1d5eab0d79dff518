//! Legacy PC devices on port I/O: the 8250 serial console, the i8042 keyboard controller (for
//! guest reset) and the boot-timer port.

mod boot_timer;
mod i8042;
mod serial;

pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC};
pub use i8042::{I8042State, I8042};
pub use serial::{SerialConsole, SerialConsoleState};
