//! Fuzz the snapshot state file parser: arbitrary bytes as a state file are refused with an
//! error, never a panic, and allocate only in proportion to the input. What parses is then
//! restored wherever that needs no KVM (the serial UART, the keyboard controller, the
//! virtio-mmio transports onto an entropy device over a small guest memory), as a restore
//! would: each part must accept or refuse its saved state, never panic.
//!
//! Input: the state file's bytes.

#![no_main]

use std::path::Path;
use std::sync::Arc;

use arch::GuestMemoryMmap;
use devices::legacy::{SerialConsole, I8042};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::rng::Rng;
use devices::virtio::VirtioInterrupt;
use devices::IrqLine;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.state");
    let state = match vmm::snapshot::parse_state(data, path) {
        Ok(state) => state,
        Err(e) => {
            // One sentence naming the file.
            let message = e.to_string();
            assert!(!message.contains('\n'), "{message}");
            assert!(message.contains("fuzz.state"), "{message}");
            return;
        }
    };
    assert_eq!(state.vcpus.len(), state.config.vcpus as usize);

    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = || IrqLine::new(evt.try_clone().unwrap());
    if let Ok(serial) = SerialConsole::from_state(&state.serial, irq(), Box::new(std::io::sink())) {
        assert_eq!(serial.state(), state.serial);
    }
    let mut i8042 = I8042::new(|| {}, irq());
    i8042.restore_state(&state.i8042);
    assert!(i8042.state().out.len() <= 16);

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    for saved in &state.virtio {
        let interrupt = Arc::new(VirtioInterrupt::new(irq()));
        let mut transport =
            MmioTransport::new(Box::new(Rng::new()), mem.clone(), interrupt).unwrap();
        let _ = transport.restore(saved);
    }
});
