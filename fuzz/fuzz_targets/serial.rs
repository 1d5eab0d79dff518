//! Fuzz the serial console (the 8250 UART on vm-superio) and the boot-timer port as a guest
//! drives them: port reads and writes of any size at and around their ports, through the same
//! port bus layout as a VM, mixed with host console input and snapshot round trips. Nothing may
//! panic, the receive FIFO stays bounded, and console output never exceeds what the guest wrote.
//!
//! Input: a sequence of operations, each a control byte and its operands:
//! - bits 0-3: port 0x3f0 + n (the boot timer at 0x3f0, the UART at 0x3f8-0x3ff, gaps between);
//! - bits 4-5: access size 1, 2, 4 or 8 bytes;
//! - bits 6-7: 0 read; 1 write (the value's bytes follow); 2 host input (a length byte, then
//!   that many bytes); 3 save the UART's state and continue from it.

#![no_main]

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::Bus;
use devices::legacy::{BootTimer, SerialConsole};
use devices::IrqLine;
use flint_fuzz::{port_read, PortOps};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BASE: u16 = 0x3f0;
const SERIAL_PORT: u64 = 0x3f8;
const BOOT_TIMER_PORT: u64 = 0x3f0;
/// The UART's receive FIFO (vm-superio's).
const FIFO_SIZE: usize = 64;

/// Console output: counted, not kept (bounded memory however much the guest writes).
#[derive(Clone, Default)]
struct Sink(Arc<AtomicUsize>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(buf.len(), Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn irq(evt: &EventFd) -> IrqLine {
    IrqLine::new(evt.try_clone().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let sink = Sink::default();
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        irq(&evt),
        Box::new(sink.clone()),
    )));
    let mut bus = Bus::new();
    bus.insert(serial.clone(), SERIAL_PORT, 8).unwrap();
    bus.insert(
        Arc::new(Mutex::new(BootTimer::new(Instant::now(), |_| {}))),
        BOOT_TIMER_PORT,
        1,
    )
    .unwrap();

    // Bytes the guest wrote to the data port: an upper bound for console output.
    let mut data_writes = 0usize;
    let mut ops = PortOps(data);
    while let Some(op) = ops.next_op() {
        let port = u64::from(BASE + u16::from(op.offset));
        match op.kind {
            0 => port_read(&bus, port, op.size),
            1 => {
                let value = ops.take(op.size);
                if bus.write(port, value) && port == SERIAL_PORT && !value.is_empty() {
                    data_writes += 1;
                }
            }
            2 => {
                let [len] = *ops.take(1) else {
                    break;
                };
                let input = ops.take(usize::from(len));
                let taken = serial.lock().unwrap().enqueue_input(input);
                assert!(taken <= input.len());
            }
            _ => {
                let mut uart = serial.lock().unwrap();
                let state = uart.state();
                let restored = SerialConsole::from_state(&state, irq(&evt), Box::new(sink.clone()))
                    .expect("a UART's own state is accepted");
                assert_eq!(restored.state(), state);
                *uart = restored;
            }
        }
        let state = serial.lock().unwrap().state();
        assert!(state.in_buffer.len() <= FIFO_SIZE);
        assert!(sink.0.load(Ordering::Relaxed) <= data_writes);
    }
});
