//! Writes the committed seed corpus under `corpus/<target>/`.
//!
//! ```sh
//! cd proto/fuzz && cargo +nightly run --example gen_corpus
//! ```
//!
//! `frame_decoder` and `control_decoder` seeds are wire bytes made with
//! `tether-proto`'s own encoders. `mux_ops` seeds are operation sequences
//! encoded in the byte format that `arbitrary` 1.x reads (enum index as a u32
//! scaled to the variant count, little-endian integers, a "keep going" byte
//! before each element of a `Vec`, string lengths taken from the end); each
//! one is decoded again here and compared with the intended operations, so a
//! change in that format fails loudly instead of writing useless seeds.

use std::fs;
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use tether_proto::control::Secret;
use tether_proto::frame::{write_frame, FrameHeader, FrameKind, StreamId, FLAG_FIN};
use tether_proto::{ClientCert, Control, EndpointKind, ErrorCode, PeerAddr, StreamMeta, MAX_FRAME};
use tether_proto_fuzz::mux_ops::{
    AppOp, CfgSpec, CtlSpec, FrameSpec, Input, MetaSpec, Mutation, PairOp, PeerSpec, Sel, SoloOp,
};

// ------------------------------------------------------------------ wire bytes

fn frame(kind: FrameKind, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let h = match StreamId::new(stream) {
        Some(id) if !kind.is_session() => {
            FrameHeader::stream(kind, flags, payload.len() as u16, id)
        }
        _ => FrameHeader::session(kind, flags, payload.len() as u16),
    };
    let mut out = vec![0u8; MAX_FRAME];
    let n = write_frame(&mut out, h, payload).expect("seed frame fits");
    out.truncate(n);
    out
}

fn control(m: &Control<'_>) -> Vec<u8> {
    let mut buf = [0u8; 1024];
    m.encode(&mut buf).expect("seed control encodes").to_vec()
}

fn meta(m: &StreamMeta<'_>) -> Vec<u8> {
    let mut buf = [0u8; 512];
    m.encode(&mut buf).expect("seed meta encodes").to_vec()
}

fn hello() -> Control<'static> {
    Control::Hello {
        version: 1,
        min_version: 1,
        token: Secret("tok_seed.secret"),
        agent: "tetherd/0.1.0",
        arch: "aarch64",
    }
}

fn web_meta() -> StreamMeta<'static> {
    StreamMeta {
        endpoint: "web",
        peer: PeerAddr::V4([192, 0, 2, 7], 50_000),
        sni: Some("web.example.com"),
        client: None,
    }
}

/// A client's first bytes: `CONTROL(Hello)`, then `OPEN` 1 with `DATA`
/// "hello" and a `FIN`.
fn hello_open_data() -> Vec<u8> {
    let mut b = frame(FrameKind::Control, 0, 0, &control(&hello()));
    b.extend(frame(FrameKind::Open, 0, 1, &meta(&web_meta())));
    b.extend(frame(FrameKind::Data, 0, 1, b"hello"));
    b.extend(frame(FrameKind::Data, FLAG_FIN, 1, b""));
    b
}

// ------------------------------------------------------------------ arbitrary format

/// Builds bytes in the layout `arbitrary` 1.x decodes: most values from the
/// front, collection and string lengths from the back.
#[derive(Default)]
struct Enc {
    front: Vec<u8>,
    /// Length bytes, in the order they are read (the last byte first).
    back: Vec<u8>,
}

impl Enc {
    fn tag(&mut self, idx: u32, count: u32) {
        // The derive picks `(u64::from(u32) * count) >> 32`.
        let t = ((u64::from(idx) << 32).div_ceil(u64::from(count))) as u32;
        self.u32(t);
    }
    fn u8(&mut self, v: u8) {
        self.front.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.front.extend(v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.front.extend(v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.front.extend(v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    /// A short string: its length is one byte at the back (seeds stay under
    /// 257 bytes where they hold strings, so one byte is what is read).
    fn str(&mut self, s: &str) {
        self.back
            .push(u8::try_from(s.len()).expect("short seed string"));
        self.front.extend(s.as_bytes());
    }
    fn opt_str(&mut self, s: &Option<String>) {
        self.bool(s.is_some());
        if let Some(s) = s {
            self.str(s);
        }
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.bool(true);
            self.u8(x);
        }
        self.bool(false);
    }
    fn finish(mut self) -> Vec<u8> {
        self.back.reverse();
        self.front.extend(self.back);
        self.front
    }

    fn input(&mut self, i: &Input) {
        match i {
            Input::Solo { cfg, ops } => {
                self.tag(0, 2);
                self.cfg(cfg);
                for op in ops {
                    self.bool(true);
                    self.solo_op(op);
                }
            }
            Input::Paired {
                client,
                server,
                ops,
            } => {
                self.tag(1, 2);
                self.cfg(client);
                self.cfg(server);
                for op in ops {
                    self.bool(true);
                    self.pair_op(op);
                }
            }
        }
    }
    fn cfg(&mut self, c: &CfgSpec) {
        self.u8(c.streams);
        self.u16(c.window);
        self.u16(c.ping);
        self.u16(c.dead);
    }
    fn sel(&mut self, s: &Sel) {
        match s {
            Sel::Known(i) => {
                self.tag(0, 2);
                self.u8(*i);
            }
            Sel::Raw(r) => {
                self.tag(1, 2);
                self.u8(*r);
            }
        }
    }
    fn meta(&mut self, m: &MetaSpec) {
        self.str(&m.endpoint);
        match m.peer {
            PeerSpec::V4(a, p) => {
                self.tag(0, 3);
                a.iter().for_each(|&x| self.u8(x));
                self.u16(p);
            }
            PeerSpec::V6(a, p) => {
                self.tag(1, 3);
                a.iter().for_each(|&x| self.u8(x));
                self.u16(p);
            }
            PeerSpec::Unknown => self.tag(2, 3),
        }
        self.opt_str(&m.sni);
        self.opt_str(&m.subject);
    }
    fn ctl(&mut self, c: &CtlSpec) {
        match c {
            CtlSpec::Hello {
                version,
                min_version,
                token,
                agent,
                arch,
            } => {
                self.tag(0, 9);
                self.u16(*version);
                self.u16(*min_version);
                self.str(token);
                self.str(agent);
                self.str(arch);
            }
            CtlSpec::Welcome {
                version,
                session,
                edge,
            } => {
                self.tag(1, 9);
                self.u16(*version);
                self.u64(*session);
                self.str(edge);
            }
            CtlSpec::Bind {
                endpoint,
                tls,
                url,
                upstream,
                policy,
            } => {
                self.tag(3, 9);
                self.str(endpoint);
                self.bool(*tls);
                self.str(url);
                self.str(upstream);
                self.str(policy);
            }
            CtlSpec::BindOk { endpoint, url } => {
                self.tag(4, 9);
                self.str(endpoint);
                self.str(url);
            }
            other => panic!("no seed uses {other:?}: add its encoding here first"),
        }
    }
    fn app(&mut self, op: &AppOp) {
        match op {
            AppOp::Open(m) => {
                self.tag(0, 12);
                self.meta(m);
            }
            AppOp::Send { s, len } => {
                self.tag(1, 12);
                self.sel(s);
                self.u16(*len);
            }
            AppOp::Recv { s, len } => {
                self.tag(2, 12);
                self.sel(s);
                self.u16(*len);
            }
            AppOp::Finish(s) => {
                self.tag(3, 12);
                self.sel(s);
            }
            AppOp::Reset { s, code } => {
                self.tag(4, 12);
                self.sel(s);
                self.u32(*code);
            }
            AppOp::Release(s) => {
                self.tag(5, 12);
                self.sel(s);
            }
            AppOp::GoAway { error, code } => {
                self.tag(6, 12);
                self.bool(*error);
                self.u32(*code);
            }
            AppOp::SendControl(c) => {
                self.tag(7, 12);
                self.ctl(c);
            }
            AppOp::TakeControl => self.tag(8, 12),
            AppOp::HandleTimeout => self.tag(9, 12),
            AppOp::PollEvent => self.tag(10, 12),
            AppOp::DrainEvents => self.tag(11, 12),
        }
    }
    fn frame_spec(&mut self, f: &FrameSpec) {
        match f {
            FrameSpec::Data { s, fin, len } => {
                self.tag(0, 8);
                self.u8(*s);
                self.bool(*fin);
                self.u16(*len);
            }
            FrameSpec::Open { s, meta } => {
                self.tag(1, 8);
                self.u8(*s);
                self.meta(meta);
            }
            FrameSpec::Window { s, inc } => {
                self.tag(2, 8);
                self.u8(*s);
                self.u32(*inc);
            }
            FrameSpec::Reset { s, code } => {
                self.tag(3, 8);
                self.u8(*s);
                self.u32(*code);
            }
            FrameSpec::Ping { ack, data } => {
                self.tag(4, 8);
                self.bool(*ack);
                self.u64(*data);
            }
            FrameSpec::Control(c) => {
                self.tag(5, 8);
                self.ctl(c);
            }
            FrameSpec::GoAway { last, code } => {
                self.tag(6, 8);
                self.u32(*last);
                self.u32(*code);
            }
            FrameSpec::Any {
                kind,
                flags,
                stream,
                len,
                payload,
            } => {
                self.tag(7, 8);
                self.u8(*kind);
                self.u8(*flags);
                self.u32(*stream);
                self.u16(*len);
                self.bytes(payload);
            }
        }
    }
    fn opt_u16(&mut self, v: &Option<u16>) {
        self.bool(v.is_some());
        if let Some(v) = v {
            self.u16(*v);
        }
    }
    fn solo_op(&mut self, op: &SoloOp) {
        match op {
            SoloOp::App(a) => {
                self.tag(0, 5);
                self.app(a);
            }
            SoloOp::Raw { dt, bytes } => {
                self.tag(1, 5);
                self.u16(*dt);
                self.bytes(bytes);
            }
            SoloOp::Frame { dt, f, split } => {
                self.tag(2, 5);
                self.u16(*dt);
                self.frame_spec(f);
                self.u16(*split);
            }
            SoloOp::Advance { dt } => {
                self.tag(3, 5);
                self.u16(*dt);
            }
            SoloOp::Transmit { cap } => {
                self.tag(4, 5);
                self.opt_u16(cap);
            }
        }
    }
    fn pair_op(&mut self, op: &PairOp) {
        match op {
            PairOp::App { client, op } => {
                self.tag(0, 5);
                self.bool(*client);
                self.app(op);
            }
            PairOp::Transmit {
                client,
                cap,
                mutate,
            } => {
                self.tag(1, 5);
                self.bool(*client);
                self.opt_u16(cap);
                self.bool(mutate.is_some());
                match mutate {
                    None => {}
                    Some(Mutation::Flip { pos, mask }) => {
                        self.tag(0, 5);
                        self.u16(*pos);
                        self.u8(*mask);
                    }
                    Some(Mutation::Truncate { len }) => {
                        self.tag(3, 5);
                        self.u16(*len);
                    }
                    Some(other) => panic!("no seed uses {other:?}: add its encoding here first"),
                }
            }
            PairOp::Deliver { to_server, max } => {
                self.tag(2, 5);
                self.bool(*to_server);
                self.u16(*max);
            }
            PairOp::Advance { dt } => {
                self.tag(3, 5);
                self.u16(*dt);
            }
            PairOp::Settle => self.tag(4, 5),
        }
    }
}

/// Encodes `input` and checks that `arbitrary` reads it back as `input`.
fn encode_ops(name: &str, input: &Input) -> Vec<u8> {
    let mut e = Enc::default();
    e.input(input);
    let bytes = e.finish();
    let back = Input::arbitrary_take_rest(Unstructured::new(&bytes))
        .unwrap_or_else(|err| panic!("{name}: seed does not decode: {err}"));
    assert_eq!(
        format!("{back:?}"),
        format!("{input:?}"),
        "{name}: seed decodes to other operations"
    );
    bytes
}

fn s(v: &str) -> String {
    v.to_owned()
}

fn mux_seeds() -> Vec<(&'static str, Input)> {
    let cfg = CfgSpec {
        streams: 3,
        window: 0,
        ping: 14_000,
        dead: 29_000,
    };
    let big = CfgSpec {
        streams: 3,
        window: 49_152,
        ping: 14_000,
        dead: 29_000,
    };
    let web = MetaSpec {
        endpoint: s("web"),
        peer: PeerSpec::Unknown,
        sni: Some(s("w.example")),
        subject: None,
    };
    let empty = MetaSpec {
        endpoint: s(""),
        peer: PeerSpec::V4([127, 0, 0, 1], 8080),
        sni: None,
        subject: None,
    };
    let k0 = Sel::Known(0);
    vec![
        // A client's real first bytes, then the server reads, answers and
        // lets the heartbeat fire.
        (
            "solo_hello_open_data",
            Input::Solo {
                cfg,
                ops: vec![
                    SoloOp::Raw {
                        dt: 1,
                        bytes: hello_open_data(),
                    },
                    SoloOp::App(AppOp::DrainEvents),
                    SoloOp::App(AppOp::TakeControl),
                    SoloOp::App(AppOp::Recv { s: k0, len: 100 }),
                    SoloOp::App(AppOp::Send { s: k0, len: 300 }),
                    SoloOp::App(AppOp::Finish(k0)),
                    SoloOp::Transmit { cap: None },
                    SoloOp::Advance { dt: 20_000 },
                    SoloOp::Transmit { cap: None },
                ],
            },
        ),
        // Hand-built frames: OPEN, DATA up to the window, WINDOW, PING,
        // RESET, GOAWAY, cut at odd places.
        (
            "solo_frames",
            Input::Solo {
                cfg: big,
                ops: vec![
                    SoloOp::Frame {
                        dt: 5,
                        f: FrameSpec::Open {
                            s: 1,
                            meta: empty.clone(),
                        },
                        split: 3,
                    },
                    SoloOp::Frame {
                        dt: 5,
                        f: FrameSpec::Data {
                            s: 1,
                            fin: false,
                            len: 16_384,
                        },
                        split: 100,
                    },
                    SoloOp::App(AppOp::DrainEvents),
                    SoloOp::App(AppOp::Recv { s: k0, len: 9000 }),
                    SoloOp::Transmit { cap: None },
                    SoloOp::Frame {
                        dt: 5,
                        f: FrameSpec::Window { s: 1, inc: 4096 },
                        split: 0,
                    },
                    SoloOp::Frame {
                        dt: 5,
                        f: FrameSpec::Ping {
                            ack: false,
                            data: 7,
                        },
                        split: 9,
                    },
                    SoloOp::Frame {
                        dt: 5,
                        f: FrameSpec::Open { s: 3, meta: empty },
                        split: 0,
                    },
                    SoloOp::Frame {
                        dt: 5,
                        f: FrameSpec::Reset { s: 3, code: 7 },
                        split: 0,
                    },
                    SoloOp::Transmit { cap: Some(40) },
                    SoloOp::Frame {
                        dt: 5,
                        f: FrameSpec::GoAway { last: 0, code: 0 },
                        split: 0,
                    },
                    SoloOp::App(AppOp::DrainEvents),
                    SoloOp::Transmit { cap: None },
                ],
            },
        ),
        // Client and server: Hello, a stream in each direction, data past
        // the initial window, half-closes, a graceful GOAWAY.
        (
            "paired_hello_stream",
            Input::Paired {
                client: big,
                server: cfg,
                ops: vec![
                    PairOp::App {
                        client: true,
                        op: AppOp::SendControl(CtlSpec::Hello {
                            version: 1,
                            min_version: 1,
                            token: s("t"),
                            agent: s("a"),
                            arch: s("x"),
                        }),
                    },
                    PairOp::App {
                        client: true,
                        op: AppOp::Open(web),
                    },
                    PairOp::App {
                        client: true,
                        op: AppOp::Send { s: k0, len: 20_000 },
                    },
                    PairOp::Settle,
                    PairOp::App {
                        client: false,
                        op: AppOp::Recv { s: k0, len: 12_000 },
                    },
                    PairOp::App {
                        client: false,
                        op: AppOp::Send { s: k0, len: 5000 },
                    },
                    PairOp::App {
                        client: false,
                        op: AppOp::Finish(k0),
                    },
                    PairOp::Settle,
                    PairOp::App {
                        client: true,
                        op: AppOp::Send { s: k0, len: 20_000 },
                    },
                    PairOp::App {
                        client: true,
                        op: AppOp::Recv { s: k0, len: 8000 },
                    },
                    PairOp::App {
                        client: true,
                        op: AppOp::Finish(k0),
                    },
                    PairOp::Transmit {
                        client: true,
                        cap: None,
                        mutate: None,
                    },
                    PairOp::Deliver {
                        to_server: true,
                        max: 100,
                    },
                    PairOp::Settle,
                    PairOp::App {
                        client: false,
                        op: AppOp::GoAway {
                            error: false,
                            code: 0,
                        },
                    },
                    PairOp::Settle,
                ],
            },
        ),
        // The same start, with one byte of the client's output flipped.
        (
            "paired_mutated",
            Input::Paired {
                client: cfg,
                server: cfg,
                ops: vec![
                    PairOp::App {
                        client: true,
                        op: AppOp::SendControl(CtlSpec::BindOk {
                            endpoint: s("e"),
                            url: s("u"),
                        }),
                    },
                    PairOp::App {
                        client: true,
                        op: AppOp::Open(MetaSpec {
                            endpoint: s("e"),
                            peer: PeerSpec::Unknown,
                            sni: None,
                            subject: None,
                        }),
                    },
                    PairOp::Transmit {
                        client: true,
                        cap: None,
                        mutate: Some(Mutation::Flip { pos: 9, mask: 0x80 }),
                    },
                    PairOp::Deliver {
                        to_server: true,
                        max: 0,
                    },
                    PairOp::Advance { dt: 16_000 },
                    PairOp::Settle,
                ],
            },
        ),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("create corpus dir");
    fs::write(dir.join(name), bytes).expect("write seed");
    println!("{:>6} bytes  {}/{name}", bytes.len(), dir.display());
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");

    let d = root.join("frame_decoder");
    write(
        &d,
        "hello_control_frame",
        &frame(FrameKind::Control, 0, 0, &control(&hello())),
    );
    write(
        &d,
        "open_data_fin",
        &hello_open_data()[frame(FrameKind::Control, 0, 0, &control(&hello())).len()..],
    );
    let mut misc = frame(FrameKind::Window, 0, 1, &4096u32.to_be_bytes());
    misc.extend(frame(FrameKind::Ping, 0, 0, &42u64.to_be_bytes()));
    misc.extend(frame(
        FrameKind::Reset,
        0,
        2,
        &ErrorCode::CANCEL.0.to_be_bytes(),
    ));
    let mut goaway = [0u8; 8];
    goaway[..4].copy_from_slice(&1u32.to_be_bytes());
    misc.extend(frame(FrameKind::GoAway, 0, 0, &goaway));
    write(&d, "window_ping_reset_goaway", &misc);
    // DATA one byte over MAX_PAYLOAD: a FRAME_SIZE error.
    write(&d, "oversized_data", &[0, 0, 0x40, 0x01, 0, 0, 0, 1]);

    let d = root.join("control_decoder");
    write(&d, "hello", &control(&hello()));
    write(
        &d,
        "welcome",
        &control(&Control::Welcome {
            version: 1,
            session: 300,
            edge: "tether-edge/0.1.0",
        }),
    );
    write(
        &d,
        "bind",
        &control(&Control::Bind {
            endpoint: "web",
            kind: EndpointKind::Tls,
            url: "",
            upstream: "127.0.0.1:8080",
            policy: "allow = [\"10.0.0.0/8\"]",
        }),
    );
    write(
        &d,
        "rotate_offer",
        &control(&Control::RotateOffer {
            token_id: "tok_2",
            token: Secret("s3cr3t"),
        }),
    );
    write(&d, "meta_v4_sni", &meta(&web_meta()));
    write(
        &d,
        "meta_v6_subject",
        &meta(&StreamMeta {
            endpoint: "db",
            peer: PeerAddr::V6(
                [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                443,
            ),
            sni: None,
            client: Some(ClientCert {
                subject: "CN=client",
                common_name: "client",
                names: "DNS:client.example",
                sha256: [1; 32],
            }),
        }),
    );

    let d = root.join("mux_ops");
    for (name, input) in mux_seeds() {
        write(&d, name, &encode_ops(name, &input));
    }
}
