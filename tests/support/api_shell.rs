//! Shell helpers for tier-3 scenarios that drive flint's REST API with curl, and the parsers
//! of what they print. A scenario starts with [`API_SHELL`] (after setting `$CURL` and `$SOCK`).

/// `call NAME METHOD PATH [BODY]` sends one request to `$SOCK` and prints `STEP NAME status`
/// and `BODY NAME body`; `check_for NAME FILE TEXT SECONDS` waits for TEXT in FILE (with the
/// preamble's `wait_for`) and prints `CHECK NAME yes` or `no`; `start_flint NAME` starts a flint
/// serving `$WORK/NAME.sock` (its id NAME), its console typed into through `$WORK/NAME.in` and
/// written to `$WORK/NAME.console`, its stderr in `$WORK/NAME.stderr`, and sets `$SOCK` and
/// `$pid`; `stop_flint NAME` kills it.
pub const API_SHELL: &str = r#"
call() { # name method path [body]
    name=$1; method=$2; path=$3; body=${4:-}
    if [ -n "$body" ]; then
        code=$("$CURL" -s -o "$WORK/$name.body" -w '%{http_code}' --unix-socket "$SOCK" -X "$method" \
            -H 'Content-Type: application/json' -d "$body" "http://localhost$path")
    else
        code=$("$CURL" -s -o "$WORK/$name.body" -w '%{http_code}' --unix-socket "$SOCK" -X "$method" \
            "http://localhost$path")
    fi
    echo "STEP $name $code"
    echo "BODY $name $(cat "$WORK/$name.body")"
}
check_for() { # name file text seconds
    if wait_for "$2" "$3" "$4"; then echo "CHECK $1 yes"; else echo "CHECK $1 no"; fi
}
start_flint() { # name
    mkfifo "$WORK/$1.in"
    sleep 900 >"$WORK/$1.in" &
    eval "keep_$1=\$!"
    SOCK=$WORK/$1.sock
    "$FLINT" --api-sock "$SOCK" --id "$1" <"$WORK/$1.in" >"$WORK/$1.console" 2>"$WORK/$1.stderr" &
    pid=$!
    i=0; while [ ! -S "$SOCK" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
}
stop_flint() { # name
    kill -KILL $pid 2>/dev/null; wait $pid 2>/dev/null
    eval "kill \$keep_$1" 2>/dev/null
}
"#;

/// The value of the first `KIND NAME value` line of `output` (`STEP`, `BODY`, `CHECK`, ...).
pub fn value<'a>(output: &'a str, kind: &str, name: &str) -> &'a str {
    let prefix = format!("{kind} {name} ");
    output
        .lines()
        .find_map(|l| l.split_once(&prefix).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("no {kind} {name} line in the output:\n{output}"))
}

/// The JSON body that step `name` got.
pub fn json(output: &str, name: &str) -> serde_json::Value {
    let body = value(output, "BODY", name);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{name}: {e}: {body}"))
}
