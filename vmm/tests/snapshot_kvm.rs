//! Tier 2: snapshot and restore a tiny guest on the local /dev/kvm, through the vmm API.
//!
//! The guest counts in a register and in memory, checks that the two agree and prints the
//! count in hex, one line each, to the serial port. A VM is paused mid-run and snapshotted;
//! a new VM restored from the files must go on counting where the first one stopped, and a
//! snapshot of the restored VM must work too. Seccomp filters are on, as in flint: each VM is
//! built and run on its own thread (a thread that started a VM keeps the VMM filter).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_tools::elf::elf;
use vmm::{ConsoleIo, Vm, VmConfig, VsockConfig};

/// The guest (see the module doc), assembled from:
///
/// ```text
///     mov r12, 0x200000        ; the counter in memory
///     xor ebx, ebx             ; the counter in a register
///     mov qword [r12], 0
/// next:
///     inc rbx
///     inc qword [r12]
///     cmp rbx, [r12]
///     jne fail
///     mov r8, rbx
///     shl r8, 32
///     mov ecx, 8
///     mov dx, 0x3f8
/// digit:                       ; 8 hex digits, most significant first
///     rol r8, 4
///     mov al, r8b
///     and al, 0xf
///     cmp al, 10
///     jb decimal
///     add al, 39
/// decimal:
///     add al, 48
///     out dx, al
///     dec ecx
///     jnz digit
///     mov al, 10
///     out dx, al
///     mov ecx, 0x1000
/// delay:
///     dec ecx
///     jnz delay
///     jmp next
/// fail:                        ; "X\n", then a keyboard-controller reset
///     mov dx, 0x3f8
///     mov al, 'X'
///     out dx, al
///     mov al, 10
///     out dx, al
///     mov al, 0xfe
///     out 0x64, al
///     jmp $
/// ```
const COUNTER: &[u8] = &[
    0x49, 0xc7, 0xc4, 0x00, 0x00, 0x20, 0x00, 0x31, 0xdb, 0x49, 0xc7, 0x04, 0x24, 0x00, 0x00, 0x00,
    0x00, 0x48, 0xff, 0xc3, 0x49, 0xff, 0x04, 0x24, 0x49, 0x3b, 0x1c, 0x24, 0x75, 0x34, 0x49, 0x89,
    0xd8, 0x49, 0xc1, 0xe0, 0x20, 0xb9, 0x08, 0x00, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0x49, 0xc1,
    0xc0, 0x04, 0x44, 0x88, 0xc0, 0x24, 0x0f, 0x3c, 0x0a, 0x72, 0x02, 0x04, 0x27, 0x04, 0x30, 0xee,
    0xff, 0xc9, 0x75, 0xea, 0xb0, 0x0a, 0xee, 0xb9, 0x01, 0x00, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xfc,
    0xeb, 0xbf, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x58, 0xee, 0xb0, 0x0a, 0xee, 0xb0, 0xfe, 0xe6, 0x64,
    0xeb, 0xfe,
];

/// A guest driving the virtio-rng device in the first virtio-mmio slot: it sets the device up
/// with one 16-entry queue, then forever makes the same 8-byte buffer available, notifies the
/// device, waits for the used ring to catch up and prints the count, as [`COUNTER`] does.
/// A restored device that lost its place in the queue never catches up (or runs ahead).
///
/// ```text
/// start:
///     mov edi, 0xc0000000
///     mov dword ptr [rdi+0x70], 1
///     mov dword ptr [rdi+0x70], 3
///     mov dword ptr [rdi+0x24], 1
///     mov dword ptr [rdi+0x20], 1
///     mov dword ptr [rdi+0x70], 0xb
///     mov dword ptr [rdi+0x30], 0
///     mov dword ptr [rdi+0x38], 16
///     mov dword ptr [rdi+0x80], 0x300000
///     mov dword ptr [rdi+0x84], 0
///     mov dword ptr [rdi+0x90], 0x301000
///     mov dword ptr [rdi+0x94], 0
///     mov dword ptr [rdi+0xa0], 0x302000
///     mov dword ptr [rdi+0xa4], 0
///     mov dword ptr [rdi+0x44], 1
///     mov dword ptr [rdi+0x70], 0xf
///     mov eax, [rdi+0x70]
///     cmp eax, 0xf
///     jne fail
///     mov qword ptr [0x300000], 0x304000
///     mov dword ptr [0x300008], 8
///     mov dword ptr [0x30000c], 2
///     xor ebx, ebx
/// next:
///     inc ebx
///     mov word ptr [0x301002], bx
///     mov dword ptr [rdi+0x50], 0
/// wait:
///     movzx eax, word ptr [0x302002]
///     cmp ax, bx
///     jne wait
///     mov r8, rbx
///     shl r8, 32
///     mov ecx, 8
///     mov dx, 0x3f8
/// digit:
///     rol r8, 4
///     mov al, r8b
///     and al, 0xf
///     cmp al, 10
///     jb decimal
///     add al, 39
/// decimal:
///     add al, 48
///     out dx, al
///     dec ecx
///     jnz digit
///     mov al, 10
///     out dx, al
///     jmp next
/// fail:
///     mov dx, 0x3f8
///     mov al, 88
///     out dx, al
///     mov al, 10
///     out dx, al
///     mov al, 0xfe
///     out 0x64, al
/// hang:
///     jmp hang
/// ```
const RNG_DRIVER: &[u8] = &[
    0xbf, 0x00, 0x00, 0x00, 0xc0, 0xc7, 0x47, 0x70, 0x01, 0x00, 0x00, 0x00, 0xc7, 0x47, 0x70, 0x03,
    0x00, 0x00, 0x00, 0xc7, 0x47, 0x24, 0x01, 0x00, 0x00, 0x00, 0xc7, 0x47, 0x20, 0x01, 0x00, 0x00,
    0x00, 0xc7, 0x47, 0x70, 0x0b, 0x00, 0x00, 0x00, 0xc7, 0x47, 0x30, 0x00, 0x00, 0x00, 0x00, 0xc7,
    0x47, 0x38, 0x10, 0x00, 0x00, 0x00, 0xc7, 0x87, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x00,
    0xc7, 0x87, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x87, 0x90, 0x00, 0x00, 0x00,
    0x00, 0x10, 0x30, 0x00, 0xc7, 0x87, 0x94, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x87,
    0xa0, 0x00, 0x00, 0x00, 0x00, 0x20, 0x30, 0x00, 0xc7, 0x87, 0xa4, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0xc7, 0x47, 0x44, 0x01, 0x00, 0x00, 0x00, 0xc7, 0x47, 0x70, 0x0f, 0x00, 0x00, 0x00,
    0x8b, 0x47, 0x70, 0x83, 0xf8, 0x0f, 0x75, 0x6d, 0x48, 0xc7, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00,
    0x00, 0x40, 0x30, 0x00, 0xc7, 0x04, 0x25, 0x08, 0x00, 0x30, 0x00, 0x08, 0x00, 0x00, 0x00, 0xc7,
    0x04, 0x25, 0x0c, 0x00, 0x30, 0x00, 0x02, 0x00, 0x00, 0x00, 0x31, 0xdb, 0xff, 0xc3, 0x66, 0x89,
    0x1c, 0x25, 0x02, 0x10, 0x30, 0x00, 0xc7, 0x47, 0x50, 0x00, 0x00, 0x00, 0x00, 0x0f, 0xb7, 0x04,
    0x25, 0x02, 0x20, 0x30, 0x00, 0x66, 0x39, 0xd8, 0x75, 0xf3, 0x49, 0x89, 0xd8, 0x49, 0xc1, 0xe0,
    0x20, 0xb9, 0x08, 0x00, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0x49, 0xc1, 0xc0, 0x04, 0x44, 0x88,
    0xc0, 0x24, 0x0f, 0x3c, 0x0a, 0x72, 0x02, 0x04, 0x27, 0x04, 0x30, 0xee, 0xff, 0xc9, 0x75, 0xea,
    0xb0, 0x0a, 0xee, 0xeb, 0xb7, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x58, 0xee, 0xb0, 0x0a, 0xee, 0xb0,
    0xfe, 0xe6, 0x64, 0xeb, 0xfe,
];

/// A guest that prints the 16-byte VM generation ID at 0xf0000 (`VMGENID_START`) as 32 hex
/// digits in memory order, one line after another, forever:
///
/// ```text
///     mov edi, 0xf0000
/// next:
///     xor esi, esi
/// half:                        ; two 8-byte halves
///     mov r8, [rdi+rsi*8]
///     bswap r8
///     mov ecx, 16
///     mov dx, 0x3f8
/// digit:
///     rol r8, 4
///     mov al, r8b
///     and al, 0xf
///     cmp al, 10
///     jb decimal
///     add al, 39
/// decimal:
///     add al, 48
///     out dx, al
///     dec ecx
///     jnz digit
///     inc esi
///     cmp esi, 2
///     jne half
///     mov al, 10
///     out dx, al
///     mov ecx, 0x1000
/// delay:
///     dec ecx
///     jnz delay
///     jmp next
/// ```
const GENERATION_ID: &[u8] = &[
    0xbf, 0x00, 0x00, 0x0f, 0x00, 0x31, 0xf6, 0x4c, 0x8b, 0x04, 0xf7, 0x49, 0x0f, 0xc8, 0xb9, 0x10,
    0x00, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0x49, 0xc1, 0xc0, 0x04, 0x44, 0x88, 0xc0, 0x24, 0x0f,
    0x3c, 0x0a, 0x72, 0x02, 0x04, 0x27, 0x04, 0x30, 0xee, 0xff, 0xc9, 0x75, 0xea, 0xff, 0xc6, 0x83,
    0xfe, 0x02, 0x75, 0xd3, 0xb0, 0x0a, 0xee, 0xb9, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xfc,
    0xeb, 0xc3,
];

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("flint-snapkvm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Console output shared with the test. With `hold_at`, the write that reaches that many
/// bytes keeps the vCPU thread for a while, to let the test pause the VM while the vCPU is in
/// the middle of an I/O exit.
#[derive(Clone, Default)]
struct Output {
    buf: Arc<Mutex<Vec<u8>>>,
    hold_at: Option<usize>,
    holding: Arc<std::sync::atomic::AtomicBool>,
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let len = {
            let mut out = self.buf.lock().unwrap();
            out.extend_from_slice(buf);
            out.len()
        };
        if self.hold_at == Some(len) {
            self.holding
                .store(true, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Output {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
    fn console(&self) -> ConsoleIo {
        ConsoleIo {
            output: Box::new(self.clone()),
            input: None,
            escape: false,
        }
    }
    /// Wait until the guest printed `lines` lines or, with `hold_at`, until the output is
    /// held.
    fn wait_lines(&self, lines: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let done = |out: &Output| match out.hold_at {
            Some(_) => out.holding.load(std::sync::atomic::Ordering::SeqCst),
            None => out.text().matches('\n').count() >= lines,
        };
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "the guest printed only {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Run `vm` until it printed `lines` lines, pause it, snapshot it to `files` and check that it
/// prints nothing while paused. Returns everything it printed.
fn run_and_snapshot(mut vm: Vm, out: &Output, lines: usize, files: (&Path, &Path)) -> String {
    vm.start(&vmm::seccomp::Filter::vmm_thread()).unwrap();
    let err = vm
        .snapshot(files.0, files.1, vmm::SnapshotType::Full)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "cannot snapshot the VM: it is not paused");
    out.wait_lines(lines);
    vm.pause().unwrap();
    let printed = out.text();
    vm.snapshot(files.0, files.1, vmm::SnapshotType::Full)
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(out.text(), printed, "the guest ran while paused");
    drop(vm);
    printed
}

/// Every line is the next count after the one before, the first being `first`; the last
/// line may be cut short (the VM was paused in the middle of it).
fn assert_counts_from(text: &str, first: u64) {
    assert!(!text.contains('X'), "the counters disagreed: {text:?}");
    let mut expect = first;
    let mut lines = text.split('\n').peekable();
    while let Some(line) = lines.next() {
        let want = format!("{expect:08x}");
        if lines.peek().is_some() {
            assert_eq!(line, want, "in {text:?}");
        } else {
            assert!(want.starts_with(line), "last line {line:?} in {text:?}");
        }
        expect += 1;
    }
}

fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().unwrap()
}

fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn restored_guest_continues_counting() {
    let dir = TempDir::new("count");
    let kernel = dir.path("vmlinux");
    std::fs::write(&kernel, elf(COUNTER)).unwrap();
    let (state1, mem1) = (dir.path("1.state"), dir.path("1.mem"));
    let (state2, mem2) = (dir.path("2.state"), dir.path("2.mem"));

    let mut config = VmConfig::new(&kernel);
    // The second vCPU is never started by the guest: it waits for an INIT-SIPI, in the kernel.
    config.vcpus = 2;
    config.mem_mib = 128;
    // Devices the guest never uses: their (reset) state goes through the snapshot too, and
    // the restored vsock device listens where `adjust` says.
    assert!(config.entropy);
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.path("v1.sock"),
    });
    let v2_sock = dir.path("v2.sock");
    let first = {
        let (state1, mem1) = (state1.clone(), mem1.clone());
        on_thread(move || {
            // Paused while its vCPU handles the `out` of the 4th digit of line 21: KVM
            // completes that instruction only when the vCPU next enters the guest, which a
            // snapshot must take care of (or the restored guest prints the digit again).
            let out = Output {
                hold_at: Some(20 * 9 + 4),
                ..Output::default()
            };
            let vm = Vm::build(&config, out.console(), Instant::now()).unwrap();
            assert!(
                vm.snapshot(&state1, &mem1, vmm::SnapshotType::Full)
                    .is_err(),
                "an unstarted VM is not paused"
            );
            run_and_snapshot(vm, &out, 20, (&state1, &mem1))
        })
    };
    assert!(first.ends_with("\n0000"), "paused at {first:?}");
    assert_counts_from(&first, 1);

    let saved = vmm::snapshot::read_state(&state1).unwrap();
    let mp_states: Vec<u32> = saved.vcpus.iter().map(|v| v.mp_state.mp_state).collect();
    assert_eq!(
        mp_states,
        [
            kvm_bindings::KVM_MP_STATE_RUNNABLE,
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED
        ]
    );
    assert!(!saved.vcpus[0].msrs.is_empty());
    // Paused in the middle of printing the next count, which `rbx` holds.
    assert_eq!(
        saved.vcpus[0].regs.rbx,
        first.matches('\n').count() as u64 + 1
    );

    // The memory file is sparse: the guest touched a few pages of 128 MiB.
    let meta = std::fs::metadata(&mem1).unwrap();
    assert_eq!(meta.len(), 128 << 20);
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    assert!(allocated < 16 << 20, "{allocated} bytes allocated");
    let mem1_before = file_bytes(&mem1);

    // A second VM goes on from the snapshot, and can itself be snapshotted.
    let second = {
        let (state1, mem1, state2, mem2) =
            (state1.clone(), mem1.clone(), state2.clone(), mem2.clone());
        on_thread(move || {
            let out = Output::default();
            let mut seen = None;
            let (vm, config) = Vm::restore(
                &state1,
                &mem1,
                &mut |c: &mut VmConfig| {
                    seen = Some(c.clone());
                    c.vsock.as_mut().unwrap().uds_path = v2_sock.clone();
                },
                out.console(),
                Instant::now(),
            )
            .unwrap();
            let seen = seen.expect("adjust was called");
            assert!(seen.vsock.as_ref().unwrap().uds_path.ends_with("v1.sock"));
            assert_eq!(config.vsock.as_ref().unwrap().uds_path, v2_sock);
            assert!(v2_sock.exists());
            assert_eq!(config.vcpus, 2);
            assert_eq!(vm.config(), &config);
            run_and_snapshot(vm, &out, 20, (&state2, &mem2))
        })
    };
    assert!(
        !second.starts_with("00000001"),
        "the restored guest started over: {second:?}"
    );
    let both = format!("{first}{second}");
    assert_counts_from(&both, 1);
    assert!(
        file_bytes(&mem1) == mem1_before,
        "the restored guest wrote its memory file"
    );

    // A third VM, from the restored VM's snapshot, starting paused.
    let third = on_thread(move || {
        let out = Output::default();
        let (mut vm, _) =
            Vm::restore(&state2, &mem2, &mut |_| {}, out.console(), Instant::now()).unwrap();
        vm.start_paused(&vmm::seccomp::Filter::vmm_thread())
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(out.text(), "", "a VM started paused ran");
        vm.resume();
        out.wait_lines(5);
        vm.pause().unwrap();
        out.text()
    });
    assert_counts_from(&format!("{both}{third}"), 1);
}

#[test]
fn restore_refuses_a_memory_file_of_the_wrong_size() {
    let dir = TempDir::new("wrongsize");
    let kernel = dir.path("vmlinux");
    std::fs::write(&kernel, elf(COUNTER)).unwrap();
    let (state, mem) = (dir.path("s"), dir.path("m"));
    let mut config = VmConfig::new(&kernel);
    config.vcpus = 1;
    config.mem_mib = 128;
    {
        let (state, mem) = (state.clone(), mem.clone());
        on_thread(move || {
            let out = Output::default();
            let vm = Vm::build(&config, out.console(), Instant::now()).unwrap();
            run_and_snapshot(vm, &out, 2, (&state, &mem));
        });
    }
    // `adjust` may change backends, not what the guest sees.
    let err = {
        let (state, mem) = (state.clone(), mem.clone());
        on_thread(move || {
            let mut adjust = |c: &mut VmConfig| c.vcpus = 2;
            Vm::restore(
                &state,
                &mem,
                &mut adjust,
                Output::default().console(),
                Instant::now(),
            )
            .err()
            .unwrap()
            .to_string()
        })
    };
    assert!(
        err.ends_with("the adjusted configuration changes the VM's devices, vCPUs or memory"),
        "{err}"
    );
    let short = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    short.set_len(64 << 20).unwrap();
    let err = on_thread(move || {
        Vm::restore(
            &state,
            &mem,
            &mut |_| {},
            Output::default().console(),
            Instant::now(),
        )
        .err()
        .unwrap()
        .to_string()
    });
    assert!(
        err.contains("holds 67108864 bytes but the snapshot's VM has 134217728 bytes"),
        "{err}"
    );
}

#[test]
fn restored_virtio_device_continues_its_queue() {
    let dir = TempDir::new("virtio");
    let kernel = dir.path("vmlinux");
    std::fs::write(&kernel, elf(RNG_DRIVER)).unwrap();
    let (state1, mem1) = (dir.path("1.state"), dir.path("1.mem"));
    let (state2, mem2) = (dir.path("2.state"), dir.path("2.mem"));
    let mut config = VmConfig::new(&kernel);
    config.vcpus = 1;
    config.mem_mib = 128;
    config.entropy = true;

    let first = {
        let (state1, mem1) = (state1.clone(), mem1.clone());
        on_thread(move || {
            let out = Output::default();
            let vm = Vm::build(&config, out.console(), Instant::now()).unwrap();
            run_and_snapshot(vm, &out, 30, (&state1, &mem1))
        })
    };
    assert_counts_from(&first, 1);
    let saved = vmm::snapshot::read_state(&state1).unwrap();
    assert_eq!(saved.virtio.len(), 1);
    let rng = &saved.virtio[0];
    assert!(rng.activated, "{rng:?}");
    let lines = first.matches('\n').count() as u16;
    // The guest may have made one more buffer available than it printed.
    assert!(
        [lines, lines + 1].contains(&rng.queues[0].next_avail),
        "{lines} lines, {rng:?}"
    );

    let second = {
        let (state1, mem1) = (state1.clone(), mem1.clone());
        on_thread(move || {
            let out = Output::default();
            let (vm, _) =
                Vm::restore(&state1, &mem1, &mut |_| {}, out.console(), Instant::now()).unwrap();
            run_and_snapshot(vm, &out, 30, (&state2, &mem2))
        })
    };
    assert_counts_from(&format!("{first}{second}"), 1);
}

/// The last complete line of `text`.
fn last_line(text: &str) -> &str {
    let complete = &text[..text.rfind('\n').expect("no complete line")];
    complete.rsplit('\n').next().unwrap()
}

/// Boot the [`GENERATION_ID`] guest with `cmdline`, snapshot it, restore it twice (as two
/// clones of one snapshot are) and return the generation ID each of the three saw last.
fn generation_ids(dir: &TempDir, cmdline: &str) -> [String; 3] {
    let kernel = dir.path("vmlinux");
    std::fs::write(&kernel, elf(GENERATION_ID)).unwrap();
    let (state, mem) = (dir.path("s"), dir.path("m"));
    let mut config = VmConfig::new(&kernel);
    config.cmdline = cmdline.into();
    config.mem_mib = 128;
    let booted = {
        let (state, mem) = (state.clone(), mem.clone());
        on_thread(move || {
            let out = Output::default();
            let vm = Vm::build(&config, out.console(), Instant::now()).unwrap();
            run_and_snapshot(vm, &out, 3, (&state, &mem))
        })
    };
    let restore = || {
        let (state, mem) = (state.clone(), mem.clone());
        on_thread(move || {
            let out = Output::default();
            let (mut vm, _) =
                Vm::restore(&state, &mem, &mut |_| {}, out.console(), Instant::now()).unwrap();
            vm.start(&vmm::seccomp::Filter::vmm_thread()).unwrap();
            // The first line may have begun before the snapshot.
            out.wait_lines(3);
            vm.pause().unwrap();
            out.text()
        })
    };
    let (first, second) = (restore(), restore());
    [booted, first, second].map(|text| last_line(&text).to_string())
}

#[test]
fn each_restored_guest_sees_a_new_generation_id() {
    let dir = TempDir::new("genid");
    let [booted, first, second] = generation_ids(&dir, vmm::config::DEFAULT_CMDLINE);
    for id in [&booted, &first, &second] {
        assert_eq!(id.len(), 32, "{id:?}");
        assert_ne!(id, &"0".repeat(32), "no generation ID");
    }
    assert_ne!(booted, first, "the restored guest kept the snapshot's ID");
    assert_ne!(first, second, "two restored guests got the same ID");
    assert_ne!(booted, second);
    let saved = vmm::snapshot::read_state(&dir.path("s")).unwrap();
    assert_eq!(
        saved.vmgenid,
        Some(vmm::snapshot::VmGenIdState {
            addr: arch::layout::VMGENID_START
        })
    );

    // A guest booted with acpi=off has no ACPI tables, so no generation ID to read: flint
    // writes none (nothing the guest does not know about), and none on restore.
    let dir = TempDir::new("genid-off");
    let ids = generation_ids(&dir, "console=ttyS0 acpi=off");
    assert_eq!(ids, ["0".repeat(32), "0".repeat(32), "0".repeat(32)]);
    let saved = vmm::snapshot::read_state(&dir.path("s")).unwrap();
    assert_eq!(saved.vmgenid, None);
}

/// The ranges of `path` that hold data rather than holes.
fn data_ranges(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    let (fd, mut at, mut ranges) = (file.as_raw_fd(), 0u64, Vec::new());
    while at < len {
        // SAFETY: lseek on an open descriptor; no memory is touched.
        let start = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
        if start < 0 {
            break;
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        assert!(end > start);
        ranges.push((start as u64, end as u64));
        at = end as u64;
    }
    ranges
}

#[test]
fn diff_snapshots_hold_the_changed_pages_and_load_merged_into_their_base() {
    let dir = TempDir::new("diff");
    let kernel = dir.path("vmlinux");
    std::fs::write(&kernel, elf(RNG_DRIVER)).unwrap();
    let base = (dir.path("base.state"), dir.path("base.mem"));
    let diff = (dir.path("diff.state"), dir.path("diff.mem"));
    let merged = (dir.path("merged.state"), dir.path("merged.mem"));
    let mut config = VmConfig::new(&kernel);
    config.mem_mib = 128;
    config.entropy = true;

    // Without tracking, a diff is refused; a full snapshot works as ever.
    let untracked = {
        let (config, base) = (config.clone(), base.clone());
        on_thread(move || {
            let out = Output::default();
            let mut vm = Vm::build(&config, out.console(), Instant::now()).unwrap();
            vm.start(&vmm::seccomp::Filter::vmm_thread()).unwrap();
            out.wait_lines(2);
            vm.pause().unwrap();
            vm.snapshot(&base.0, &base.1, vmm::SnapshotType::Diff)
                .unwrap_err()
                .to_string()
        })
    };
    assert_eq!(
        untracked,
        "a diff snapshot needs dirty-page tracking: set track_dirty_pages in the machine \
         configuration (or the snapshot load) before the VM starts"
    );

    config.track_dirty_pages = true;
    let (before, between, no_base) = {
        let (base, diff) = (base.clone(), diff.clone());
        on_thread(move || {
            let out = Output::default();
            let mut vm = Vm::build(&config, out.console(), Instant::now()).unwrap();
            vm.start(&vmm::seccomp::Filter::vmm_thread()).unwrap();
            out.wait_lines(20);
            vm.pause().unwrap();
            // A diff needs a snapshot before it.
            let no_base = vm
                .snapshot(&diff.0, &diff.1, vmm::SnapshotType::Diff)
                .unwrap_err()
                .to_string();
            vm.snapshot(&base.0, &base.1, vmm::SnapshotType::Full)
                .unwrap();
            let before = out.text();
            vm.resume();
            out.wait_lines(before.matches('\n').count() + 20);
            vm.pause().unwrap();
            vm.snapshot(&diff.0, &diff.1, vmm::SnapshotType::Diff)
                .unwrap();
            let between = out.text()[before.len()..].to_string();
            (before, between, no_base)
        })
    };
    assert_eq!(
        no_base,
        "a diff snapshot needs a base, and this VM has written no snapshot yet (nor was it \
         loaded from one that names its memory): create a Full snapshot first"
    );
    assert_counts_from(&format!("{before}{between}"), 1);

    // Between the two snapshots the guest wrote the available ring's index (0x301000, seen
    // by KVM) and the device the used ring (0x302000) and random bytes (0x304000), written by
    // flint: the diff holds those pages and not much else.
    let meta = std::fs::metadata(&diff.1).unwrap();
    assert_eq!(meta.len(), 128 << 20);
    let ranges = data_ranges(&diff.1);
    for page in [0x30_1000u64, 0x30_2000, 0x30_4000] {
        assert!(
            ranges.iter().any(|(s, e)| *s <= page && page + 4096 <= *e),
            "page {page:#x} is not in the diff: {ranges:?}"
        );
    }
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    assert!(
        allocated <= 64 << 10,
        "{allocated} bytes allocated: {ranges:?}"
    );
    let saved_base = vmm::snapshot::read_state(&base.0).unwrap();
    let saved_diff = vmm::snapshot::read_state(&diff.0).unwrap();
    assert!(saved_base.memory_id.is_some() && saved_base.diff_base.is_none());
    assert_eq!(saved_diff.diff_base, saved_base.memory_id);

    // A diff does not load by itself.
    let err = {
        let diff = diff.clone();
        on_thread(move || {
            Vm::restore(
                &diff.0,
                &diff.1,
                &mut |_| {},
                Output::default().console(),
                Instant::now(),
            )
            .err()
            .unwrap()
            .to_string()
        })
    };
    assert!(
        err.ends_with("is a diff snapshot, which holds only the pages changed since its base: merge it into its base first (flint snapshot merge)"),
        "{err}"
    );
    // Nor merges into a snapshot that is not its base.
    let err = vmm::snapshot::merge(
        (&diff.0, &diff.1),
        (&diff.0, &diff.1),
        (&merged.0, &merged.1),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("applies on top of a different snapshot"),
        "{err}"
    );

    // Merged into its base, it loads: the guest goes on from where the diff was taken (not
    // from the base), and the device from its queue's place then.
    vmm::snapshot::merge(
        (&base.0, &base.1),
        (&diff.0, &diff.1),
        (&merged.0, &merged.1),
    )
    .unwrap();
    let after = on_thread(move || {
        let out = Output::default();
        let (mut vm, config) = Vm::restore(
            &merged.0,
            &merged.1,
            &mut |_| {},
            out.console(),
            Instant::now(),
        )
        .unwrap();
        assert!(config.track_dirty_pages);
        vm.start(&vmm::seccomp::Filter::vmm_thread()).unwrap();
        out.wait_lines(10);
        vm.pause().unwrap();
        // The loaded snapshot is the next diff's base.
        let next = (
            merged.0.with_extension("next"),
            merged.1.with_extension("next"),
        );
        vm.snapshot(&next.0, &next.1, vmm::SnapshotType::Diff)
            .unwrap();
        let next_state = vmm::snapshot::read_state(&next.0).unwrap();
        let merged_state = vmm::snapshot::read_state(&merged.0).unwrap();
        assert_eq!(next_state.diff_base, merged_state.memory_id);
        out.text()
    });
    assert_counts_from(&format!("{before}{between}{after}"), 1);
}

/// The example page-fault handler serving `mem` on `socket`, once it listens.
fn start_handler(socket: &Path, mem: &Path) -> std::process::Child {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_flint-uffd-handler"))
        .arg(socket)
        .arg(mem)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the handler never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// Wait (at most 10 s) for `child` to exit; its status.
fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the handler did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Load the snapshot `state` with the `Uffd` backend through `socket`.
fn restore_uffd(state: &Path, socket: &Path, out: &Output) -> vmm::Result<Vm> {
    Vm::restore_with_clock(
        state,
        &vmm::MemBackend::Uffd(socket.to_path_buf()),
        &mut |_| {},
        out.console(),
        Instant::now(),
        vmm::ClockRestore::AsSaved,
    )
    .map(|(vm, _)| vm)
}

/// A snapshot of the counting guest after `lines` lines, in `dir`; what it printed.
fn counting_snapshot(dir: &TempDir, lines: usize) -> (PathBuf, PathBuf, String) {
    let kernel = dir.path("vmlinux");
    std::fs::write(&kernel, elf(COUNTER)).unwrap();
    let (state, mem) = (dir.path("s"), dir.path("m"));
    let mut config = VmConfig::new(&kernel);
    config.vcpus = 1;
    config.mem_mib = 128;
    let printed = {
        let (state, mem) = (state.clone(), mem.clone());
        on_thread(move || {
            let out = Output::default();
            let vm = Vm::build(&config, out.console(), Instant::now()).unwrap();
            run_and_snapshot(vm, &out, lines, (&state, &mem))
        })
    };
    (state, mem, printed)
}

#[test]
fn a_page_fault_handler_fills_guest_memory_and_the_restored_guest_counts_on() {
    let dir = TempDir::new("uffd");
    let (state, mem, first) = counting_snapshot(&dir, 10);
    let socket = dir.path("uffd.sock");
    let mut handler = start_handler(&socket, &mem);
    let (state2, mem2) = (dir.path("s2"), dir.path("m2"));
    let second = {
        let (state2, mem2) = (state2.clone(), mem2.clone());
        on_thread(move || {
            let out = Output::default();
            let vm = restore_uffd(&state, &socket, &out).unwrap();
            // Its memory is anonymous: the guest's code and counter come from the handler.
            // A snapshot of it reads every page, through the handler too.
            run_and_snapshot(vm, &out, 10, (&state2, &mem2))
        })
    };
    assert!(!second.starts_with("00000001"), "started over: {second:?}");
    let both = format!("{first}{second}");
    assert_counts_from(&both, 1);
    // flint closed the connection with the VM: the handler is done.
    assert!(wait_exit(&mut handler).success());
    // The snapshot of the lazily restored VM restores as usual.
    let third = on_thread(move || {
        let out = Output::default();
        let (mut vm, _) =
            Vm::restore(&state2, &mem2, &mut |_| {}, out.console(), Instant::now()).unwrap();
        vm.start(&vmm::seccomp::Filter::vmm_thread()).unwrap();
        out.wait_lines(3);
        vm.pause().unwrap();
        out.text()
    });
    assert_counts_from(&format!("{both}{third}"), 1);
}

#[test]
fn a_page_fault_handler_that_dies_ends_the_vm_with_one_sentence() {
    let dir = TempDir::new("uffd-dies");
    let (state, mem, _) = counting_snapshot(&dir, 3);
    let socket = dir.path("uffd.sock");
    // No handler listening: refused at once.
    let err = {
        let (state, socket) = (state.clone(), socket.clone());
        on_thread(move || {
            restore_uffd(&state, &socket, &Output::default())
                .err()
                .unwrap()
                .to_string()
        })
    };
    assert!(
        err.starts_with(&format!(
            "cannot connect to the page-fault handler's socket {}: ",
            socket.display()
        )),
        "{err}"
    );

    let mut handler = start_handler(&socket, &mem);
    let (tx, rx) = std::sync::mpsc::channel();
    let sock = socket.clone();
    std::thread::spawn(move || {
        let out = Output::default();
        let mut vm = restore_uffd(&state, &sock, &out).unwrap();
        vm.start(&vmm::seccomp::Filter::vmm_thread()).unwrap();
        out.wait_lines(3);
        let _ = tx.send(None);
        let ending = vm.wait_for_ending();
        vm.shutdown(ending.clone());
        let _ = tx.send(Some(ending));
    });
    // The restored guest runs; then its handler dies.
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(None));
    handler.kill().unwrap();
    wait_exit(&mut handler);
    let ending = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the VM did not stop when its page-fault handler died")
        .unwrap();
    assert_eq!(ending, vmm::Ending::PageFaultHandlerGone(socket.clone()));
    assert_eq!(
        vmm::Error::PageFaultHandlerGone(socket.clone()).to_string(),
        format!(
            "the page-fault handler for guest memory ({}) went away, so the guest cannot continue",
            socket.display()
        )
    );
}
