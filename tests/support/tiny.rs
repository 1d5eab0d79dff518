//! Tiny guests for the tier-2 tests on the local /dev/kvm (tests/tiny_guests.rs,
//! tests/jail.rs): a few bytes of 64-bit code wrapped in a minimal ELF `vmlinux` (no PVH
//! note, so flint enters it through the 64-bit boot protocol with paging on), and what it
//! takes to run the real `flint` binary on one.

use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub const COM1: u16 = 0x3f8;
pub const COM1_LSR: u16 = 0x3fd;
pub const BOOT_TIMER: u16 = 0x3f0;
pub const I8042_COMMAND: u16 = 0x64;

/// A tiny x86-64 machine-code emitter for the handful of instructions these guests use.
#[derive(Default)]
pub struct Guest {
    code: Vec<u8>,
}

impl Guest {
    fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
        self
    }

    /// `out port, byte`.
    pub fn out8(&mut self, port: u16, byte: u8) -> &mut Self {
        self.mov_dx(port);
        self.code.extend_from_slice(&[0xb0, byte, 0xee]);
        self
    }

    /// `in al, port`.
    pub fn in8(&mut self, port: u16) -> &mut Self {
        self.mov_dx(port);
        self.code.push(0xec);
        self
    }

    /// Print `text` on the serial console, one `out` per byte.
    pub fn print(&mut self, text: &str) -> &mut Self {
        self.mov_dx(COM1);
        for b in text.bytes() {
            self.code.extend_from_slice(&[0xb0, b, 0xee]);
        }
        self
    }

    /// Send `text` to `port` with one string instruction (`rep outsb`): the text sits in
    /// the code, jumped over.
    pub fn rep_outsb(&mut self, port: u16, text: &str) -> &mut Self {
        assert!(text.len() < 128);
        self.mov_dx(port);
        // lea rsi, [rip + 2]: the text, just after the 2-byte jmp.
        self.code
            .extend_from_slice(&[0x48, 0x8d, 0x35, 0x02, 0x00, 0x00, 0x00]);
        self.code.extend_from_slice(&[0xeb, text.len() as u8]);
        self.code.extend_from_slice(text.as_bytes());
        self.mov_ecx(text.len() as u32);
        self.code.extend_from_slice(&[0xfc, 0xf3, 0x6e]); // cld; rep outsb
        self
    }

    /// Read `count` bytes from `port` into guest memory at `addr` with one string
    /// instruction (`rep insb`).
    pub fn rep_insb(&mut self, port: u16, addr: u32, count: u32) -> &mut Self {
        self.mov_dx(port);
        self.code.push(0xbf); // mov edi, imm32
        self.code.extend_from_slice(&addr.to_le_bytes());
        self.mov_ecx(count);
        self.code.extend_from_slice(&[0xfc, 0xf3, 0x6c]); // cld; rep insb
        self
    }

    /// Send `count` bytes of guest memory at `addr` to `port`, one `out` per byte.
    pub fn print_memory(&mut self, addr: u32, count: u32) -> &mut Self {
        self.code.push(0xbe); // mov esi, imm32
        self.code.extend_from_slice(&addr.to_le_bytes());
        self.mov_ecx(count);
        self.mov_dx(COM1);
        // again: lodsb; out dx, al; loop again
        self.code.extend_from_slice(&[0xac, 0xee, 0xe2, 0xfc]);
        self
    }

    /// Wait until the serial port has input for the guest.
    pub fn wait_for_input(&mut self) -> &mut Self {
        // wait: mov dx, LSR; in al, dx; test al, 1; jz wait
        self.in8(COM1_LSR);
        self.code.extend_from_slice(&[0xa8, 0x01, 0x74, 0xf7]);
        self
    }

    fn mov_ecx(&mut self, value: u32) -> &mut Self {
        self.code.push(0xb9);
        self.code.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// Ask the keyboard controller to reset the machine (flint exits 0), then spin until
    /// flint stops us.
    pub fn reset(&mut self) -> &mut Self {
        self.out8(I8042_COMMAND, 0xfe).spin()
    }

    /// `jmp $`.
    pub fn spin(&mut self) -> &mut Self {
        self.code.extend_from_slice(&[0xeb, 0xfe]);
        self
    }

    /// Unless the flags say "equal", print `message` and reset.
    pub fn or_fail(&mut self, message: &str) -> &mut Self {
        let mut fail = Guest::default();
        fail.print(message).reset();
        assert!(fail.code.len() < 128);
        self.code.extend_from_slice(&[0x74, fail.code.len() as u8]);
        self.code.extend_from_slice(&fail.code);
        self
    }

    /// `cmp al, byte` then [`Self::or_fail`].
    pub fn expect_al(&mut self, byte: u8, message: &str) -> &mut Self {
        self.code.extend_from_slice(&[0x3c, byte]);
        self.or_fail(message)
    }

    /// Write then read back a 32-bit MMIO location; an unclaimed read must see all ones.
    pub fn mmio_roundtrip_unclaimed(&mut self, addr: u32, message: &str) -> &mut Self {
        self.code.push(0xbf); // mov edi, imm32
        self.code.extend_from_slice(&addr.to_le_bytes());
        self.code
            .extend_from_slice(&[0xc7, 0x07, 0x78, 0x56, 0x34, 0x12]); // mov dword [rdi], imm32
        self.code.extend_from_slice(&[0x8b, 0x07]); // mov eax, [rdi]
        self.code.extend_from_slice(&[0x83, 0xf8, 0xff]); // cmp eax, -1
        self.or_fail(message)
    }

    /// Write `byte` to the MMIO (or RAM) address `addr`.
    pub fn mmio_write8(&mut self, addr: u32, byte: u8) -> &mut Self {
        self.code.push(0xbf); // mov edi, imm32
        self.code.extend_from_slice(&addr.to_le_bytes());
        self.code.extend_from_slice(&[0xc6, 0x07, byte]); // mov byte [rdi], imm8
        self
    }

    /// Echo console input back until the guest reads `stop`.
    pub fn echo_until(&mut self, stop: u8) -> &mut Self {
        self.wait_for_input();
        // mov dx, COM1; in al, dx; cmp al, stop; je done; out dx, al; jmp wait
        self.in8(COM1);
        self.code
            .extend_from_slice(&[0x3c, stop, 0x74, 0x03, 0xee, 0xeb, 0xeb]);
        self
    }

    /// An invalid opcode with no IDT to handle it: #UD, #GP, #DF, then a triple fault.
    pub fn ud2(&mut self) -> &mut Self {
        self.code.extend_from_slice(&[0x0f, 0x0b]);
        self
    }

    /// Wrap the code in an ELF64 executable loaded and entered at 1 MiB
    /// ([`super::elf::LOAD_ADDR`]).
    pub fn elf(&self) -> Vec<u8> {
        super::elf::elf(&self.code)
    }
}

/// The `flint` binary of this test run, without the caller's `FLINT_LOG`.
pub fn flint() -> Command {
    let mut cmd = Command::new(super::flint_bin());
    cmd.env_remove("FLINT_LOG");
    cmd
}

/// Wait for `child` and collect its output, failing the test (after killing it) if it does
/// not finish within `limit`: a hang is a bug, not a slow test.
pub fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "flint did not exit within {limit:?}; stdout {:?} stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Output bytes as text (lossy).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
