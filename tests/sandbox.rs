//! Tier 3: `flint run` runs untrusted commands in throwaway microVMs with the default sandbox
//! image (resources/build-sandbox-image.sh), in the nested KVM host (or directly on a host
//! whose KVM boots Linux). One host VM runs every case; each case is one or more `flint run`s.

mod support;

use std::path::PathBuf;

use support::{cache_dir, run_scenario_with, ScenarioOptions};

const SCENARIO: &str = r#"
R="$FLINT run --kernel $VMLINUX --image $FILES/sandbox.cpio.gz"
state() { # processes, mounts and flint temporary directories, to compare before and after
    echo "procs=$(ps -o comm 2>/dev/null | grep -c flint) mounts=$(wc -l </proc/mounts) tmp=$(ls -d /tmp/flint-run-* 2>/dev/null | wc -l)"
}
echo "STATE before $(state)"
for code in 0 1 42; do
    $R -- sh -c "exit $code" </dev/null; echo "STATUS exit$code $?"
done
$R -- sh -c 'kill -9 $$' </dev/null; echo "STATUS killed $?"
$R -- sh -c 'echo out1; echo err1 >&2; echo out2; echo err2 >&2' </dev/null >"$WORK/out" 2>"$WORK/err"
echo "STATUS streams $?"; echo "OUT $(tr '\n' ' ' <"$WORK/out")"; echo "ERR $(tr '\n' ' ' <"$WORK/err")"
head -c 1048576 /dev/urandom >"$WORK/blob"
echo "MD5 blob $(md5sum <"$WORK/blob" | cut -d' ' -f1)"
$R -- md5sum <"$WORK/blob" >"$WORK/stdin.out"; echo "STATUS stdin $?"
echo "MD5 stdin $(cut -d' ' -f1 <"$WORK/stdin.out")"
$R --copy-in "$WORK/blob:/data/blob" --copy-out "/data/blob:$WORK/blob.back" \
   --env GREETING=hello --workdir /data -- sh -c 'echo "$GREETING from $(pwd)"' </dev/null >"$WORK/env.out"
echo "STATUS copies $?"; echo "ENV $(cat "$WORK/env.out")"
echo "MD5 back $(md5sum <"$WORK/blob.back" | cut -d' ' -f1)"
$R -- /no/such/command </dev/null 2>"$WORK/nf.err"; echo "STATUS notfound $?"; echo "NFERR $(cat "$WORK/nf.err")"
t0=$(cut -d. -f1 /proc/uptime)
$R --timeout 2 -- sleep 60 </dev/null 2>"$WORK/to.err"; echo "STATUS timeout $?"
echo "TIMEOUT_SECS $(( $(cut -d. -f1 /proc/uptime) - t0 ))"
# A fork bomb and a memory hog are contained by the VM: flint returns, the host still works.
$R --timeout 10 -- sh -c 'bomb() { bomb | bomb & }; bomb' </dev/null >/dev/null 2>&1; echo "STATUS forkbomb $?"
$R --memory 128 -- sh -c 'x=$(head -c 400000000 /dev/zero | tr "\0" x); echo survived' </dev/null >/dev/null 2>&1
echo "STATUS memhog $?"
echo "HOST_OK $(echo alive)"
# Four sandboxes at once.
for i in 1 2 3 4; do
    ( $R -- sh -c "echo parallel-$i" </dev/null >"$WORK/par$i.out" 2>&1; echo $? >"$WORK/par$i.rc" ) &
done
wait
for i in 1 2 3 4; do echo "PAR $i $(cat "$WORK/par$i.rc") $(cat "$WORK/par$i.out" | tr '\n' ' ')"; done
sleep 1
echo "STATE after $(state)"
"#;

fn line<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("no {key:?} line in the scenario output:\n{output}"))
}

#[test]
fn flint_run_sandboxes() {
    let image = cache_dir().join("sandbox/initramfs.cpio.gz");
    assert!(
        image.is_file(),
        "sandbox image missing: run resources/build-sandbox-image.sh (resources/run-tests.sh does)"
    );
    let options = ScenarioOptions {
        timeout_secs: 900,
        ..ScenarioOptions::default()
    };
    let run = run_scenario_with(
        SCENARIO,
        &[(PathBuf::from(&image), "sandbox.cpio.gz")],
        &options,
    );
    assert_eq!(run.status, 0, "scenario failed");
    let out = &run.output;
    let status = |name: &str| line(out, &format!("STATUS {name} "));
    assert_eq!(status("exit0"), "0");
    assert_eq!(status("exit1"), "1");
    assert_eq!(status("exit42"), "42");
    assert_eq!(status("killed"), "137", "death by SIGKILL is 128+9");
    assert_eq!(status("streams"), "0");
    assert_eq!(
        line(out, "OUT "),
        "out1 out2",
        "stdout in order, without stderr"
    );
    assert_eq!(
        line(out, "ERR "),
        "err1 err2",
        "stderr in order, without stdout"
    );
    assert_eq!(status("stdin"), "0");
    assert_eq!(
        line(out, "MD5 stdin "),
        line(out, "MD5 blob "),
        "stdin reached the command"
    );
    assert_eq!(status("copies"), "0");
    assert_eq!(line(out, "ENV "), "hello from /data");
    assert_eq!(
        line(out, "MD5 back "),
        line(out, "MD5 blob "),
        "copy in then out kept the bytes"
    );
    assert_eq!(status("notfound"), "127");
    assert!(line(out, "NFERR ").contains("/no/such/command"), "{out}");
    assert_eq!(status("timeout"), "124");
    let secs: u64 = line(out, "TIMEOUT_SECS ").parse().unwrap();
    assert!(secs < 30, "--timeout 2 took {secs} s");
    let forkbomb = status("forkbomb");
    assert!(
        forkbomb == "124" || forkbomb.parse::<u32>().is_ok(),
        "{out}"
    );
    assert_ne!(
        status("memhog"),
        "0",
        "a guest out of memory cannot succeed"
    );
    assert_ne!(
        status("memhog"),
        "125",
        "the sandbox must survive its command's OOM"
    );
    assert_eq!(line(out, "HOST_OK "), "alive");
    for i in 1..=4 {
        assert_eq!(
            line(out, &format!("PAR {i} ")),
            format!("0 parallel-{i}"),
            "parallel sandbox {i}"
        );
    }
    let before = line(out, "STATE before ");
    let after = line(out, "STATE after ");
    assert_eq!(
        before, after,
        "a sandbox left processes, mounts or files behind"
    );
    assert!(after.ends_with("tmp=0"), "{after}");
}
