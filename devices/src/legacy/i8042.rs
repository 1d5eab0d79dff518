//! A minimal i8042 keyboard controller: enough for Linux's driver to probe it quickly and for a
//! guest to reset the machine (`reboot=k`), which ends the VM.
//!
//! Ports: data at 0x60 (offset 0), command/status at 0x64 (offset 4).

use std::collections::VecDeque;

use crate::bus::BusDevice;
use crate::IrqLine;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_COMMAND: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

// Controller configuration ("command byte") bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

// Replies.
const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// "Clock line stuck low": tells the guest there is no auxiliary (mouse) port.
const AUX_TEST_ABSENT: u8 = 0x01;
const KBD_ACK: u8 = 0xfa;
const KBD_CMD_ECHO: u8 = 0xee;
const KBD_CMD_GET_ID: u8 = 0xf2;
const KBD_CMD_RESET: u8 = 0xff;
/// What an MF2 keyboard (with translation) answers to "get ID".
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_RESET_OK: u8 = 0xaa;

/// Ctrl down, Alt down, Del down (extended), Del up, Alt up, Ctrl up.
const CTRL_ALT_DEL: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// Output port bit 0 low holds the CPU in reset.
const OUTP_RESET_RELEASED: u8 = 0x01;

/// The keyboard controller. Its reset line is a callback into the VMM, run synchronously on
/// the vCPU thread that wrote the reset command, so that the VMM learns of the reset before
/// that vCPU executes anything else (a Linux guest follows a keyboard reset with other reset
/// methods, ending in a triple fault, if the first one does not take effect at once).
pub struct I8042 {
    reset: Box<dyn Fn() + Send>,
    irq: IrqLine,
    ctr: u8,
    status_cmd: bool,
    out: VecDeque<u8>,
    awaiting_data_for: Option<u8>,
    resets: u64,
}

/// The controller's state, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub ctr: u8,
    pub status_cmd: bool,
    pub out: Vec<u8>,
    pub awaiting_data_for: Option<u8>,
}

impl I8042 {
    /// The controller's registers and pending output bytes.
    pub fn state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            status_cmd: self.status_cmd,
            out: self.out.iter().copied().collect(),
            awaiting_data_for: self.awaiting_data_for,
        }
    }

    /// Continue from `state` (see [`I8042::state`]); at most 16 pending bytes are kept.
    pub fn restore_state(&mut self, state: &I8042State) {
        self.ctr = state.ctr;
        self.status_cmd = state.status_cmd;
        self.out = state.out.iter().take(16).copied().collect();
        self.awaiting_data_for = state.awaiting_data_for;
        self.notify();
    }

    /// A controller that calls `reset` when the guest resets the machine and raises `irq`
    /// (IRQ 1) when it has a byte for the guest.
    pub fn new(reset: impl Fn() + Send + 'static, irq: IrqLine) -> Self {
        I8042 {
            reset: Box::new(reset),
            irq,
            ctr: CTR_KBD_INT | CTR_SYSTEM | CTR_XLATE | CTR_AUX_DISABLE,
            status_cmd: false,
            out: VecDeque::new(),
            awaiting_data_for: None,
            resets: 0,
        }
    }

    /// Press and release Ctrl-Alt-Del on the keyboard (scan code set 1, as the controller
    /// delivers it with translation on). A guest with an AT keyboard driver reboots (or
    /// does what its init was told to do with Ctrl-Alt-Del).
    pub fn press_ctrl_alt_del(&mut self) {
        for byte in CTRL_ALT_DEL {
            self.push(*byte);
        }
    }

    /// How many times the guest asked for a reset.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    fn status(&self) -> u8 {
        let mut s = SB_SYSTEM | SB_KBD_ENABLED;
        if !self.out.is_empty() {
            s |= SB_OUT_FULL;
        }
        if self.status_cmd {
            s |= SB_COMMAND;
        }
        s
    }

    fn push(&mut self, byte: u8) {
        // The guest reads one byte per response; a bounded queue keeps a misbehaving guest
        // from growing it without limit.
        if self.out.len() < 16 {
            self.out.push_back(byte);
        }
        self.notify();
    }

    fn notify(&self) {
        if !self.out.is_empty() && self.ctr & CTR_KBD_INT != 0 {
            // A lost interrupt only delays the guest's driver; it polls the status register.
            let _ = self.irq.trigger();
        }
    }

    fn request_reset(&mut self) {
        self.resets += 1;
        (self.reset)();
    }

    fn command(&mut self, cmd: u8) {
        self.status_cmd = true;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUTBUF | CMD_WRITE_AUX_OUTBUF
            | CMD_WRITE_AUX => self.awaiting_data_for = Some(cmd),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST => self.push(AUX_TEST_ABSENT),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_KBD_TEST => self.push(PORT_TEST_OK),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_OUTP => self.push(OUTP_RESET_RELEASED),
            CMD_PULSE_RESET => self.request_reset(),
            // 0xf0-0xff pulse output-port lines low for a moment; bit 0 is the CPU reset line.
            c if c >= 0xf0 && c & 1 == 0 => self.request_reset(),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status_cmd = false;
        match self.awaiting_data_for.take() {
            Some(CMD_WRITE_CTR) => {
                self.ctr = byte;
                self.notify();
            }
            Some(CMD_WRITE_OUTP) => {
                if byte & OUTP_RESET_RELEASED == 0 {
                    self.request_reset();
                }
            }
            // The loopback byte comes back at once, but as keyboard data (no AUX flag): a
            // driver probing for a mouse port sees "no auxiliary device" without waiting for
            // a timeout.
            Some(CMD_WRITE_KBD_OUTBUF) | Some(CMD_WRITE_AUX_OUTBUF) => self.push(byte),
            // No auxiliary device: commands to it get nothing back.
            Some(CMD_WRITE_AUX) => {}
            Some(_) => {}
            // A byte for the keyboard itself: answer as an MF2 keyboard would, so that a
            // driver's probe never waits for a timeout.
            None => match byte {
                KBD_CMD_ECHO => self.push(KBD_CMD_ECHO),
                KBD_CMD_GET_ID => {
                    self.push(KBD_ACK);
                    self.push(KBD_ID[0]);
                    self.push(KBD_ID[1]);
                }
                KBD_CMD_RESET => {
                    self.push(KBD_ACK);
                    self.push(KBD_RESET_OK);
                }
                _ => self.push(KBD_ACK),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            DATA => {
                let v = self.out.pop_front().unwrap_or(0);
                self.notify();
                v
            }
            COMMAND => self.status(),
            _ => return,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA => self.data(byte),
            COMMAND => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn controller() -> (I8042, EventFd, EventFd) {
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let reset_writer = reset.try_clone().unwrap();
        let dev = I8042::new(
            move || {
                reset_writer.write(1).unwrap();
            },
            IrqLine::new(irq.try_clone().unwrap()),
        );
        (dev, reset, irq)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_vmm() {
        let (mut dev, reset, _) = controller();
        assert!(reset.read().is_err(), "no reset yet");
        dev.write(COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(reset.read().unwrap(), 1);
        assert_eq!(dev.resets(), 1);
    }

    #[test]
    fn output_port_write_with_reset_low_signals_the_vmm() {
        let (mut dev, reset, _) = controller();
        dev.write(COMMAND, &[CMD_WRITE_OUTP]);
        dev.write(DATA, &[0x02]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn self_test_and_ctr_round_trip() {
        let (mut dev, reset, irq) = controller();
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_FULL, SB_OUT_FULL);
        assert_eq!(read(&mut dev, DATA), SELF_TEST_OK);
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(read(&mut dev, COMMAND) & SB_OUT_FULL, 0);

        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x45]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA), 0x45);
        assert!(reset.read().is_err(), "no reset from ordinary commands");
    }

    #[test]
    fn aux_port_reads_as_absent_and_keyboard_acks() {
        let (mut dev, _, _) = controller();
        dev.write(COMMAND, &[CMD_AUX_TEST]);
        assert_eq!(read(&mut dev, DATA), AUX_TEST_ABSENT);
        // The loopback byte comes back without the AUX flag (status bit 5): no mouse port.
        dev.write(COMMAND, &[CMD_WRITE_AUX_OUTBUF]);
        dev.write(DATA, &[0x5a]);
        let status = read(&mut dev, COMMAND);
        assert_eq!(status & SB_OUT_FULL, SB_OUT_FULL);
        assert_eq!(status & 0x20, 0);
        assert_eq!(read(&mut dev, DATA), 0x5a);
        dev.write(DATA, &[0xff]);
        assert_eq!(read(&mut dev, DATA), KBD_ACK);
        assert_eq!(read(&mut dev, DATA), KBD_RESET_OK);
        dev.write(DATA, &[KBD_CMD_GET_ID]);
        assert_eq!(read(&mut dev, DATA), KBD_ACK);
        assert_eq!([read(&mut dev, DATA), read(&mut dev, DATA)], KBD_ID);
        dev.write(DATA, &[0xed]);
        assert_eq!(read(&mut dev, DATA), KBD_ACK, "set LEDs is acknowledged");
    }

    #[test]
    fn ctrl_alt_del_arrives_as_scan_codes_with_interrupts() {
        let (mut dev, reset, irq) = controller();
        dev.press_ctrl_alt_del();
        assert!(irq.read().unwrap() >= 1);
        let mut got = Vec::new();
        while read(&mut dev, COMMAND) & SB_OUT_FULL != 0 {
            got.push(read(&mut dev, DATA));
        }
        assert_eq!(got, CTRL_ALT_DEL);
        assert!(reset.read().is_err(), "the guest decides whether to reset");
    }

    #[test]
    fn output_queue_is_bounded_and_odd_accesses_are_harmless() {
        let (mut dev, _, _) = controller();
        for _ in 0..1000 {
            dev.write(COMMAND, &[CMD_SELF_TEST]);
        }
        assert!(dev.out.len() <= 16);
        dev.write(2, &[0xfe]);
        dev.write(COMMAND, &[]);
        let mut wide = [0xffu8; 4];
        dev.read(3, &mut wide);
        assert_eq!(wide, [0; 4]);
        assert_eq!(dev.resets(), 0);
    }
}
