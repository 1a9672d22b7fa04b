//! iperf3 for `tether-bench tunnel`: one long-lived `iperf3 -s` upstream
//! (behind both tetherds and reachable directly), client runs with `-J`, and
//! the small JSON reader that takes their results apart.
//!
//! `iperf3 -s` serves one test at a time, so the runs are sequential; a run
//! that the server refuses as busy (it may still be closing the previous
//! test, whose end crosses the tunnel) is tried again after a pause.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{Proc, Res};

/// What `tether-bench` says, and exits with, when iperf3 cannot be run.
pub(crate) const REQUIRED: &str = "iperf3 is required (apt-get install iperf3)";

/// Tries of a run that the server refused as busy.
const BUSY_TRIES: usize = 50;

/// Whether `iperf3 --version` runs.
pub(crate) fn available() -> bool {
    Command::new("iperf3")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The iperf3 server: `iperf3 -s -p PORT -B 127.0.0.1`, stopped when dropped.
pub(crate) struct Server {
    proc: Proc,
    pub(crate) addr: SocketAddr,
}

impl Server {
    /// Starts it on a port the OS had free a moment ago (log `<dir>/iperf3.log`,
    /// pid recorded in `pidfile`) and waits until it listens.
    pub(crate) fn start(dir: &Path, pidfile: Option<&Path>) -> Res<Server> {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("iperf3 server: pick a port: {e}"))?;
        let port = addr.port().to_string();
        let proc = Proc::spawn(
            Path::new("iperf3"),
            // --forceflush: the "Server listening" line reaches the pipe at once.
            &["-s", "-p", &port, "-B", "127.0.0.1", "--forceflush"],
            dir.join("iperf3.log"),
            pidfile,
        )?;
        proc.wait_line("Server listening")
            .map_err(|e| format!("iperf3 server on port {port}: {e}"))?;
        Ok(Server { proc, addr })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub(crate) fn stop(&mut self) {
        self.proc.stop();
    }
}

/// The iperf3 cases: forward (client -> server) with 1 and 8 streams, and
/// reverse (`-R`, the server sends) with 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Mode {
    One,
    Eight,
    Reverse,
}

pub(crate) const MODES: [Mode; 3] = [Mode::One, Mode::Eight, Mode::Reverse];

impl Mode {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Mode::One => &[],
            Mode::Eight => &["-P", "8"],
            Mode::Reverse => &["-R"],
        }
    }

    /// For the table's rows.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Mode::One => "1 stream",
            Mode::Eight => "8 streams",
            Mode::Reverse => "reverse (-R, 1 stream)",
        }
    }

    /// For the JSON and the progress lines.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Mode::One => "forward_1",
            Mode::Eight => "forward_8",
            Mode::Reverse => "reverse_1",
        }
    }
}

/// What one client run reports (its `end.sum_received`).
pub(crate) struct Run {
    /// Bits per second the receiver got, over the test.
    pub(crate) bps: f64,
    /// Bytes the receiver got.
    pub(crate) bytes: u64,
}

/// `iperf3 -c` to `to` for `secs` seconds in `mode`, with `-J`; `case` names
/// the run in errors.
pub(crate) fn client(to: SocketAddr, mode: Mode, secs: u64, case: &str) -> Res<Run> {
    let mut tries = 0;
    loop {
        tries += 1;
        match client_once(to, mode, secs) {
            Ok(r) => return Ok(r),
            Err(Failure::Busy(_)) if tries < BUSY_TRIES => {
                thread::sleep(Duration::from_millis(100));
            }
            Err(Failure::Busy(e) | Failure::Other(e)) => {
                return Err(format!("iperf3 {case} ({}): {e}", mode.key()))
            }
        }
    }
}

enum Failure {
    /// The server is still serving another test.
    Busy(String),
    Other(String),
}

fn client_once(to: SocketAddr, mode: Mode, secs: u64) -> Result<Run, Failure> {
    let other = Failure::Other;
    let (ip, port, t) = (to.ip().to_string(), to.port().to_string(), secs.to_string());
    let mut args = vec![
        "-c",
        &ip,
        "-p",
        &port,
        "-t",
        &t,
        "-J",
        "--connect-timeout",
        "5000",
    ];
    args.extend_from_slice(mode.flags());
    let mut child = Command::new("iperf3")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| other(format!("spawn iperf3: {e}")))?;
    let reader = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = reader(child.stdout.take().map(|r| Box::new(r) as _));
    let err = reader(child.stderr.take().map(|r| Box::new(r) as _));
    // The test, plus time to connect and to exchange the results.
    let limit = Duration::from_secs(secs + 30);
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < limit => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(other(format!(
                    "no result after {} s; killed",
                    limit.as_secs()
                )));
            }
            Err(e) => return Err(other(format!("wait: {e}"))),
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    let j = parse(&out).map_err(|e| {
        other(format!(
            "{status}, output is not JSON ({e}); stderr: {}",
            err.trim()
        ))
    })?;
    // iperf3 -J reports a failure as "error" (and exits 0 for some of them).
    if let Some(e) = j.get("error") {
        let e = e.as_str().unwrap_or("(not a string)").to_owned();
        return Err(if e.contains("busy") {
            Failure::Busy(e)
        } else {
            other(e)
        });
    }
    if !status.success() {
        return Err(other(format!("{status}; stderr: {}", err.trim())));
    }
    let sum = j
        .get("end")
        .and_then(|e| e.get("sum_received"))
        .ok_or_else(|| other("no end.sum_received in its JSON".into()))?;
    let num = |k: &str| {
        sum.get(k)
            .and_then(Json::as_f64)
            .ok_or_else(|| other(format!("no number end.sum_received.{k} in its JSON")))
    };
    let (bps, bytes) = (num("bits_per_second")?, num("bytes")?);
    if !(bytes > 0.0 && bps > 0.0) {
        return Err(other(format!(
            "received {bytes} bytes at {bps} bit/s: nothing got through"
        )));
    }
    Ok(Run {
        bps,
        bytes: bytes as u64,
    })
}

// ---------------------------------------------------------------- JSON

/// A JSON value; objects keep their keys in order.
#[derive(Debug, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// The value of `key` in an object (the first, if repeated).
    pub(crate) fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Num(x) => Some(*x),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Parses one JSON text (RFC 8259), surrounded by whitespace at most.
pub(crate) fn parse(text: &str) -> Res<Json> {
    let mut p = Parser {
        b: text.as_bytes(),
        i: 0,
        depth: 0,
    };
    let v = p.value()?;
    p.ws();
    if p.i != p.b.len() {
        return Err(p.err("trailing characters"));
    }
    Ok(v)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> String {
        if self.b.is_empty() {
            return "empty output".into();
        }
        format!("{what} at byte {}", self.i)
    }

    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn lit(&mut self, word: &str, v: Json) -> Res<Json> {
        if self.b[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(self.err("bad literal"))
        }
    }

    fn value(&mut self) -> Res<Json> {
        self.ws();
        self.depth += 1;
        if self.depth > 128 {
            return Err(self.err("nested too deeply"));
        }
        let v = match self.b.get(self.i) {
            None => Err(self.err("unexpected end")),
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => self.string().map(Json::Str),
            Some(b't') => self.lit("true", Json::Bool(true)),
            Some(b'f') => self.lit("false", Json::Bool(false)),
            Some(b'n') => self.lit("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("unexpected character")),
        };
        self.depth -= 1;
        v
    }

    fn object(&mut self) -> Res<Json> {
        self.i += 1;
        let mut kv = Vec::new();
        if self.eat(b'}') {
            return Ok(Json::Obj(kv));
        }
        loop {
            self.ws();
            if self.b.get(self.i) != Some(&b'"') {
                return Err(self.err("expected a key"));
            }
            let k = self.string()?;
            if !self.eat(b':') {
                return Err(self.err("expected ':'"));
            }
            kv.push((k, self.value()?));
            if self.eat(b'}') {
                return Ok(Json::Obj(kv));
            }
            if !self.eat(b',') {
                return Err(self.err("expected ',' or '}'"));
            }
        }
    }

    fn array(&mut self) -> Res<Json> {
        self.i += 1;
        let mut v = Vec::new();
        if self.eat(b']') {
            return Ok(Json::Arr(v));
        }
        loop {
            v.push(self.value()?);
            if self.eat(b']') {
                return Ok(Json::Arr(v));
            }
            if !self.eat(b',') {
                return Err(self.err("expected ',' or ']'"));
            }
        }
    }

    fn number(&mut self) -> Res<Json> {
        let start = self.i;
        while self.i < self.b.len()
            && matches!(
                self.b[self.i],
                b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
            )
        {
            self.i += 1;
        }
        std::str::from_utf8(&self.b[start..self.i])
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .map(Json::Num)
            .ok_or_else(|| self.err("bad number"))
    }

    fn hex4(&mut self) -> Res<u32> {
        let h = self
            .b
            .get(self.i..self.i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| self.err("bad \\u escape"))?;
        self.i += 4;
        Ok(h)
    }

    fn string(&mut self) -> Res<String> {
        self.i += 1;
        let mut s: Vec<u8> = Vec::new();
        loop {
            let Some(&c) = self.b.get(self.i) else {
                return Err(self.err("unterminated string"));
            };
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(s).map_err(|_| self.err("invalid UTF-8")),
                b'\\' => {
                    let Some(&e) = self.b.get(self.i) else {
                        return Err(self.err("unterminated string"));
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi)
                                && self.b[self.i..].starts_with(b"\\u")
                            {
                                self.i += 2;
                                let lo = self.hex4()?;
                                0x10000 + ((hi - 0xD800) << 10) + (lo.wrapping_sub(0xDC00) & 0x3FF)
                            } else {
                                hi
                            };
                            char::from_u32(code).unwrap_or('\u{FFFD}')
                        }
                        _ => return Err(self.err("bad escape")),
                    };
                    let mut buf = [0u8; 4];
                    s.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                _ => s.push(c),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_iperf3_shapes() {
        let j = parse(
            "{\n\t\"start\":\t{\"connected\": []},\n\t\"end\":\t{\"sum_received\": {\"bytes\": 3604742144, \"bits_per_second\": 2.88e10, \"sender\": true}},\n\t\"x\": [null, false, -1.5, \"a\\u00e9\\n\\ud83d\\ude00\"]\n}\n",
        )
        .unwrap();
        let sum = j.get("end").and_then(|e| e.get("sum_received")).unwrap();
        assert_eq!(sum.get("bytes").and_then(Json::as_f64), Some(3604742144.0));
        assert_eq!(
            sum.get("bits_per_second").and_then(Json::as_f64),
            Some(2.88e10)
        );
        assert_eq!(
            j.get("x"),
            Some(&Json::Arr(vec![
                Json::Null,
                Json::Bool(false),
                Json::Num(-1.5),
                Json::Str("a\u{e9}\n\u{1F600}".into())
            ]))
        );
        let e =
            parse("{\"end\": {}, \"error\": \"unable to connect to server: Connection refused\"}")
                .unwrap();
        assert_eq!(
            e.get("error").and_then(Json::as_str),
            Some("unable to connect to server: Connection refused")
        );
    }

    #[test]
    fn a_failed_run_is_an_error_naming_the_case() {
        if !available() {
            eprintln!("skipped: {REQUIRED}");
            return;
        }
        // A port nobody listens on: iperf3 -J says so in "error" (and exits 0).
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let e = client(addr, Mode::One, 1, "direct").err().unwrap();
        assert!(e.starts_with("iperf3 direct (forward_1): "), "{e}");
        assert!(e.contains("refused"), "{e}");
    }

    #[test]
    fn refuses_what_is_not_json() {
        for bad in ["", "{", "{\"a\" 1}", "[1,]", "{\"a\": 1} x", "\"abc", "tru"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
