//! Fuzz the i8042 keyboard controller as a guest drives it: port reads and writes of any size
//! at and around its ports, through the same port bus layout as a VM, mixed with Ctrl-Alt-Del
//! presses and snapshot restores of arbitrary saved state. Nothing may panic, the output queue
//! stays bounded, and only a guest write can reset the machine (once per write).
//!
//! Input: a sequence of operations, each a control byte and its operands:
//! - bits 0-3: port 0x60 + n (data at 0x60, command/status at 0x64, gaps after);
//! - bits 4-5: access size 1, 2, 4 or 8 bytes;
//! - bits 6-7: 0 read; 1 write (the value's bytes follow); 2 Ctrl-Alt-Del; 3 restore a saved
//!   state (operands: command byte, flags, pending-command byte, output length, output bytes).

#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::legacy::{I8042State, I8042};
use devices::IrqLine;
use flint_fuzz::{port_read, PortOps};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BASE: u64 = 0x60;
/// Bytes the controller queues for the guest at most.
const MAX_OUT: usize = 16;

fuzz_target!(|data: &[u8]| {
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let resets = Arc::new(AtomicU64::new(0));
    let seen = resets.clone();
    let i8042 = Arc::new(Mutex::new(I8042::new(
        move || {
            seen.fetch_add(1, Ordering::Relaxed);
        },
        IrqLine::new(evt.try_clone().unwrap()),
    )));
    let mut bus = Bus::new();
    bus.insert(i8042.clone(), BASE, 5).unwrap();

    let mut ops = PortOps(data);
    while let Some(op) = ops.next_op() {
        let port = BASE + u64::from(op.offset);
        let before = resets.load(Ordering::Relaxed);
        let mut wrote = false;
        match op.kind {
            0 => port_read(&bus, port, op.size),
            1 => {
                let value = ops.take(op.size);
                wrote = bus.write(port, value) && !value.is_empty();
            }
            2 => i8042.lock().unwrap().press_ctrl_alt_del(),
            _ => {
                let [ctr, flags, pending, len] = *ops.take(4) else {
                    break;
                };
                let state = I8042State {
                    ctr,
                    status_cmd: flags & 1 != 0,
                    out: ops.take(usize::from(len)).to_vec(),
                    awaiting_data_for: (flags & 2 != 0).then_some(pending),
                };
                i8042.lock().unwrap().restore_state(&state);
            }
        }
        let dev = i8042.lock().unwrap();
        assert!(dev.state().out.len() <= MAX_OUT);
        let after = resets.load(Ordering::Relaxed);
        assert!(after == before || (wrote && after == before + 1));
        assert_eq!(dev.resets(), after);
    }
});
