//! The 8250 UART console: guest output goes to a host writer, host input is queued for the
//! guest, and the UART's interrupt is an irqfd.

use std::io::Write;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use crate::bus::BusDevice;
use crate::IrqLine;

/// A 16550-compatible UART (via `vm-superio`) wired to a host writer.
pub struct SerialConsole {
    uart: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
}

/// The UART's registers and receive FIFO, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialConsoleState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialConsole {
    /// A UART that raises `irq` and writes guest output to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(irq, out),
        }
    }

    /// A UART continuing from `state` (see [`SerialConsole::state`]). Fails if the saved
    /// receive FIFO is longer than the UART's.
    pub fn from_state(
        state: &SerialConsoleState,
        irq: IrqLine,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, irq, NoEvents, out)
            .map_err(|e| format!("invalid serial port state: {e:?}"))?;
        Ok(SerialConsole { uart })
    }

    /// The UART's registers and pending input.
    pub fn state(&self) -> SerialConsoleState {
        let s = self.uart.state();
        SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queue host input for the guest. Returns how many bytes fit in the receive FIFO; the
    /// caller retries the rest later so that no input is lost.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        // The only error is a failed interrupt trigger; the bytes are queued either way.
        let _ = self.uart.enqueue_raw_bytes(&bytes[..room]);
        room
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off @ 0..=7), [first, ..]) = (u8::try_from(offset), data) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off @ 0..=7), [first, ..]) = (u8::try_from(offset), data) {
            // A failed host write loses console output but must not stop the guest.
            let _ = self.uart.write(off, *first);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, Sink, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let serial = SerialConsole::new(
            IrqLine::new(evt.try_clone().unwrap()),
            Box::new(sink.clone()),
        );
        (serial, sink, evt)
    }

    #[test]
    fn guest_output_reaches_the_host_writer() {
        let (mut serial, sink, _) = console();
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn host_input_is_readable_and_raises_the_interrupt() {
        let (mut serial, _, evt) = console();
        // Enable the "received data available" interrupt (IER bit 0).
        serial.write(1, &[1]);
        assert_eq!(serial.enqueue_input(b"ab"), 2);
        assert!(evt.read().unwrap() >= 1);
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        serial.read(0, &mut b);
        assert_eq!(b[0], b'a');
        serial.read(0, &mut b);
        assert_eq!(b[0], b'b');
    }

    #[test]
    fn a_full_fifo_accepts_only_what_fits() {
        let (mut serial, _, _) = console();
        let big = vec![b'x'; 1000];
        let taken = serial.enqueue_input(&big);
        assert!(taken > 0 && taken < big.len());
        assert_eq!(serial.enqueue_input(b"y"), 0);
    }

    #[test]
    fn state_round_trip_keeps_registers_and_input() {
        let (mut serial, _, _) = console();
        serial.write(1, &[0x3]); // IER: RDA and THR interrupts
        serial.write(7, &[0x5a]); // scratch
        serial.enqueue_input(b"xy");
        let state = serial.state();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut restored = SerialConsole::from_state(
            &state,
            IrqLine::new(evt.try_clone().unwrap()),
            Box::new(sink.clone()),
        )
        .unwrap();
        assert_eq!(restored.state(), state);
        let mut b = [0u8];
        restored.read(1, &mut b);
        assert_eq!(b[0], 0x3, "IER survives");
        restored.read(0, &mut b);
        assert_eq!(b[0], b'x');
        let mut bad = state.clone();
        bad.in_buffer = vec![0; 1000];
        let err = SerialConsole::from_state(&bad, IrqLine::new(evt), Box::new(sink)).err();
        assert!(err.is_some());
    }

    #[test]
    fn out_of_range_offsets_are_ignored() {
        let (mut serial, sink, _) = console();
        serial.write(8, b"z");
        serial.write(u64::MAX, b"z");
        serial.write(0, &[]);
        let mut data = [0xffu8; 2];
        serial.read(100, &mut data);
        assert_eq!(data, [0, 0]);
        assert!(sink.0.lock().unwrap().is_empty());
    }
}
