//! NDJSON: one object per line. Field names are documented in README.md and
//! docs/event.schema.json; every field is always present (null when unknown)
//! so log pipelines see one stable shape.
//!
//! Lines are written here field by field rather than derived with serde:
//! serde_json runs every key through its escaping loop, a byte at a time,
//! and that was half the CPU of a reset record (#11). Keys are literals,
//! written whole with their comma and quotes (`key!`); tcprst's own names
//! (`Name`) and the node (`Rendered`) are copied without an escape check;
//! other strings are copied whole unless they need escapes, which
//! serde_json then writes by its rules as before. Numbers are itoa's, as in
//! serde_json, and addresses are written without `core::fmt` (`model::text`).
//! Where a socket is (namespace, cgroup, container, pod, service) is
//! rendered once per place and copied into each record after (`Places`).

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt::Display,
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    rc::Rc,
    sync::Arc,
    time::SystemTime,
};

use super::{
    LineOutput, LossReport, ResolvedReport, RstReport, Sink, StuckReport,
    stamp::{Stamp, StampCache},
};
use crate::{
    bpf::attach::{hook_name, tier_name},
    host::conntrack::{Found, Tuple},
    host::{cgroup::CgroupInfo, enrich::Attribution, k8s::PodMeta, runtimes::ContainerMeta},
    memo::same_value,
    model::event::{
        CloseOp, Errno, ExecContext, Initiator, NfHook, Process, RstKind, Task, TcpState,
    },
    model::{flow::push_flow, text::push_ip},
    pipeline::diagnosis::RstDiagnosis,
    pipeline::origin::Origin,
    pipeline::tracker::Connection,
};
use tcprst_common::{AttachTier, ResetHook};

pub struct JsonSink {
    lines: Lines,
    /// Every record names the node, for logs shipped off a cluster.
    node: Rendered,
    stamps: StampCache,
    places: Places,
    runs: RunsCache,
}

impl JsonSink {
    pub fn new(out: Box<dyn LineOutput>, node: String) -> Self {
        Self {
            lines: Lines {
                out,
                line: Vec::new(),
            },
            node: Rendered::new(&*node),
            stamps: StampCache::default(),
            places: Places::default(),
            runs: RunsCache::default(),
        }
    }
}

/// Writes each record whole: a line is built in the output's own buffer
/// where it keeps one (a storm's lines were copied over once more, 4 % of
/// the event loop's time), else in a Vec, kept from line to line so that
/// it stops allocating once it has held the longest, and written with one
/// call through `dyn Write`.
struct Lines {
    out: Box<dyn LineOutput>,
    line: Vec<u8>,
}

impl Lines {
    fn write(&mut self, value: &impl Json) -> io::Result<()> {
        if let Some(buffer) = self.out.line_buffer()? {
            value.write(buffer);
            buffer.push(b'\n');
            return Ok(());
        }
        self.line.clear();
        value.write(&mut self.line);
        self.line.push(b'\n');
        self.out.write_all(&self.line)
    }
}

/// A value written as JSON onto the end of a line.
trait Json {
    fn write(&self, out: &mut Vec<u8>);
}

/// An object being written: `{`, then `"key":value` for each field, then
/// `}` from `end`.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    /// Where the object starts in `out`.
    start: usize,
}

/// A field's key as `Object::field` writes it, `,"name":`, joined at
/// compile time (`key!`) so that a field costs one copy of a known length.
struct Key(&'static [u8]);

macro_rules! key {
    ($name:literal) => {
        Key(concat!(",\"", $name, "\":").as_bytes())
    };
}

impl<'a> Object<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        let start = out.len();
        Self { out, start }
    }

    /// Every key is written with its comma; the first one's becomes the
    /// object's `{`. Inlined, so that the copy is a few moves.
    #[inline(always)]
    fn field(&mut self, key: Key, value: &(impl Json + ?Sized)) -> &mut Self {
        let at = self.out.len();
        self.out.extend_from_slice(key.0);
        if at == self.start {
            self.out[at] = b'{';
        }
        value.write(self.out);
        self
    }

    /// Fields to be copied into objects begun elsewhere
    /// (`rendered_fields`): every one keeps its comma.
    fn continuing(out: &'a mut Vec<u8>) -> Self {
        Self {
            out,
            start: usize::MAX,
        }
    }

    /// Fields a `continuing` object wrote, copied whole.
    fn rendered_fields(&mut self, fields: &[u8]) -> &mut Self {
        let at = self.out.len();
        self.out.extend_from_slice(fields);
        if at == self.start && !fields.is_empty() {
            self.out[at] = b'{';
        }
        self
    }

    /// Where the next field will start in the buffer.
    fn written(&self) -> usize {
        self.out.len()
    }

    fn end(&mut self) {
        if self.out.len() == self.start {
            self.out.push(b'{');
        }
        self.out.push(b'}');
    }
}

/// What serde_json writes for a string that needs escapes.
fn by_serde(value: &(impl serde::Serialize + ?Sized), out: &mut Vec<u8>) {
    serde_json::to_writer(out, value).expect("writing JSON into a Vec cannot fail");
}

/// serde_json escapes `"`, `\` and control characters, nothing else.
fn needs_escapes(text: &[u8]) -> bool {
    // A fold, not `any`: without the early exit the loop is vectorized, and
    // almost every string is read to its end anyway.
    text.iter().fold(false, |found, &b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

impl Json for str {
    fn write(&self, out: &mut Vec<u8>) {
        if needs_escapes(self.as_bytes()) {
            return by_serde(self, out);
        }
        out.push(b'"');
        out.extend_from_slice(self.as_bytes());
        out.push(b'"');
    }
}

/// A name tcprst itself defines: a record kind, a state, a hook, a cause.
/// They are ASCII words, never quotes, backslashes or control characters,
/// so they are copied without the escape check every other string gets:
/// a reset line writes a dozen of them (#11).
#[derive(Clone, Copy)]
struct Name(&'static str);

impl Json for Name {
    fn write(&self, out: &mut Vec<u8>) {
        debug_assert!(!needs_escapes(self.0.as_bytes()), "{:?}", self.0);
        out.push(b'"');
        out.extend_from_slice(self.0.as_bytes());
        out.push(b'"');
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

/// A value that every record repeats, such as the node's name: escaped and
/// written once, then copied.
struct Rendered(Vec<u8>);

impl Rendered {
    fn new(value: &(impl Json + ?Sized)) -> Self {
        let mut json = Vec::new();
        value.write(&mut json);
        Self(json)
    }
}

impl Json for Rendered {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
}

impl Json for String {
    fn write(&self, out: &mut Vec<u8>) {
        self.as_str().write(out);
    }
}

impl<T: Json + ?Sized> Json for &T {
    fn write(&self, out: &mut Vec<u8>) {
        (**self).write(out);
    }
}

impl<T: Json + ?Sized> Json for Arc<T> {
    fn write(&self, out: &mut Vec<u8>) {
        (**self).write(out);
    }
}

impl<T: Json> Json for Option<T> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Some(value) => value.write(out),
            None => out.extend_from_slice(b"null"),
        }
    }
}

impl<T: Json> Json for [T] {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        for (i, item) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            item.write(out);
        }
        out.push(b']');
    }
}

impl<T: Json> Json for Vec<T> {
    fn write(&self, out: &mut Vec<u8>) {
        self.as_slice().write(out);
    }
}

macro_rules! json_integers {
    ($($t:ty),*) => {
        $(impl Json for $t {
            fn write(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(itoa::Buffer::new().format(*self).as_bytes());
            }
        })*
    };
}

json_integers!(u16, u32, u64);

impl Json for bool {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if *self { b"true" } else { b"false" });
    }
}

/// Digits, dots, colons and `%`: nothing to escape.
impl Json for IpAddr {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(b'"');
        push_ip(out, *self);
        out.push(b'"');
    }
}

/// The flow key (`model::flow`), written in place.
struct Flow(SocketAddr, SocketAddr);

impl Json for Flow {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(b'"');
        push_flow(out, self.0, self.1);
        out.push(b'"');
    }
}

/// Digits, dashes, colons, a dot, `T` and `Z`: nothing to escape.
impl Json for Stamp {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(b'"');
        out.extend_from_slice(self.as_bytes());
        out.push(b'"');
    }
}

/// Pod labels, by key.
impl Json for BTreeMap<String, String> {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (key, value)) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            key.write(out);
            out.push(b':');
            value.write(out);
        }
        out.push(b'}');
    }
}

/// A string from a Display, written in place instead of into a String
/// first, and escaped after in the rare case it needs it.
struct Text<T>(T);

impl<T: Display> Json for Text<T> {
    fn write(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.push(b'"');
        write!(out, "{}", self.0).expect("writing into a Vec cannot fail");
        if needs_escapes(&out[start + 1..]) {
            let text = out.split_off(start + 1);
            out.truncate(start);
            by_serde(
                std::str::from_utf8(&text).expect("Display writes UTF-8"),
                out,
            );
        } else {
            out.push(b'"');
        }
    }
}

fn ms_before(at: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(at).unwrap_or_default().as_millis() as u64
}

/// The fields every connection record starts with.
struct Head {
    time: Stamp,
    kind: Name,
    endpoints: Endpoints,
    netns: Option<u32>,
}

impl Head {
    fn new(time: Stamp, kind: &'static str, conn: &Connection) -> Self {
        Self {
            time,
            kind: Name(kind),
            endpoints: Endpoints::new(conn.key.local, conn.key.remote),
            netns: (conn.key.netns != 0).then_some(conn.key.netns),
        }
    }

    fn fields<'o>(&self, out: &'o mut Vec<u8>) -> Object<'o> {
        let mut o = Object::new(out);
        o.field(key!("time"), &self.time)
            .field(key!("kind"), &self.kind);
        self.endpoints.fields(&mut o);
        o.field(key!("netns"), &self.netns);
        o
    }
}

/// A connection's two ends as every record shows them; `tcprst snapshot`'s
/// rows too, through serde.
#[derive(serde::Serialize)]
pub(crate) struct Endpoints {
    family: Name,
    local_addr: IpAddr,
    pub local_port: u16,
    remote_addr: IpAddr,
    pub remote_port: u16,
}

impl Endpoints {
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        Self {
            family: Name(if local.is_ipv6() { "ipv6" } else { "ipv4" }),
            local_addr: local.ip(),
            local_port: local.port(),
            remote_addr: remote.ip(),
            remote_port: remote.port(),
        }
    }

    pub(crate) fn local(&self) -> SocketAddr {
        SocketAddr::new(self.local_addr, self.local_port)
    }

    pub(crate) fn remote(&self) -> SocketAddr {
        SocketAddr::new(self.remote_addr, self.remote_port)
    }

    fn fields(&self, o: &mut Object) {
        self.local_addr_fields(o);
        o.field(key!("local_port"), &self.local_port);
        self.remote_addr_field(o);
        o.field(key!("remote_port"), &self.remote_port);
    }

    /// The fields before the local port, which a reset line shares with
    /// every reset of its key (`KeyRuns`), as it does the remote address.
    fn local_addr_fields(&self, o: &mut Object) {
        o.field(key!("family"), &self.family)
            .field(key!("local_addr"), &self.local_addr);
    }

    fn remote_addr_field(&self, o: &mut Object) {
        o.field(key!("remote_addr"), &self.remote_addr);
    }
}

struct InitiatorJson<'a> {
    op: Name,
    how: Option<Name>,
    pid: u32,
    comm: &'a str,
    ago_ms: u64,
}

impl Json for InitiatorJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        Object::new(out)
            .field(key!("op"), &self.op)
            .field(key!("how"), &self.how)
            .field(key!("pid"), &self.pid)
            .field(key!("comm"), self.comm)
            .field(key!("ago_ms"), &self.ago_ms)
            .end();
    }
}

fn initiator(conn: Option<&Connection>, now: SystemTime) -> Option<InitiatorJson<'_>> {
    let conn = conn?;
    let Initiator { op, task } = conn.initiator.as_ref()?;
    let (op, how) = match op {
        CloseOp::Shutdown(how) => ("shutdown", Some(how.name())),
        CloseOp::Close => ("close", None),
        CloseOp::Exit => ("exit", None),
    };
    Some(InitiatorJson {
        op: Name(op),
        how: how.map(Name),
        pid: task.pid,
        comm: &task.comm,
        ago_ms: conn.initiated_at.map_or(0, |at| ms_before(at, now)),
    })
}

struct StepJson<'a> {
    state: Name,
    /// None for the state a close mark found, whose start it did not see.
    ago_ms: Option<u64>,
    by: Option<Text<&'a Initiator>>,
}

impl Json for StepJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        Object::new(out)
            .field(key!("state"), &self.state)
            .field(key!("ago_ms"), &self.ago_ms)
            .field(key!("by"), &self.by)
            .end();
    }
}

fn history(conn: Option<&Connection>, now: SystemTime) -> Vec<StepJson<'_>> {
    conn.map(|c| {
        c.history
            .iter()
            .map(|step| StepJson {
                state: Name(step.state.name()),
                ago_ms: step.at.map(|at| ms_before(at, now)),
                by: step.by.as_ref().map(Text),
            })
            .collect()
    })
    .unwrap_or_default()
}

/// A process as records and `tcprst snapshot`'s rows show it; `comm` is
/// borrowed here, owned in a snapshot row.
#[derive(serde::Serialize)]
pub(crate) struct ProcessJson<Comm> {
    pub pid: u32,
    pub comm: Comm,
}

impl<Comm: AsRef<str>> Json for ProcessJson<Comm> {
    fn write(&self, out: &mut Vec<u8>) {
        Object::new(out)
            .field(key!("pid"), &self.pid)
            .field(key!("comm"), self.comm.as_ref())
            .end();
    }
}

struct CgroupJson<'a> {
    id: u64,
    path: Option<&'a str>,
}

impl Json for CgroupJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        Object::new(out)
            .field(key!("id"), &self.id)
            .field(key!("path"), &self.path)
            .end();
    }
}

struct ContainerJson<'a> {
    runtime: Option<Name>,
    id: &'a str,
    name: Option<&'a str>,
    image: Option<&'a str>,
}

impl Json for ContainerJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        Object::new(out)
            .field(key!("runtime"), &self.runtime)
            .field(key!("id"), self.id)
            .field(key!("name"), &self.name)
            .field(key!("image"), &self.image)
            .end();
    }
}

struct PodJson<'a> {
    uid: &'a str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    qos: Option<Name>,
    labels: Option<&'a BTreeMap<String, String>>,
}

impl Json for PodJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        Object::new(out)
            .field(key!("uid"), self.uid)
            .field(key!("namespace"), &self.namespace)
            .field(key!("name"), &self.name)
            .field(key!("qos"), &self.qos)
            .field(key!("labels"), &self.labels)
            .end();
    }
}

/// Where a socket is: namespace, cgroup, container, pod, service. Rendered
/// once for each place (`Places`), not once per record.
struct PlaceJson<'a> {
    netns_name: Option<&'a str>,
    cgroup: Option<CgroupJson<'a>>,
    container: Option<ContainerJson<'a>>,
    pod: Option<PodJson<'a>>,
    service: Option<&'a str>,
}

impl<'a> PlaceJson<'a> {
    fn new(a: &'a Attribution) -> Self {
        let cgroup = a.cgroup.as_deref();
        Self {
            netns_name: a.netns_name.as_deref(),
            cgroup: a.cgroup_id.map(|id| CgroupJson {
                id,
                path: cgroup.map(|c| c.path.as_str()),
            }),
            container: cgroup.and_then(|c| {
                let from_runtime = a.from_runtime.as_deref();
                Some(ContainerJson {
                    // A cgroupfs path (/kubepods/<qos>/pod<uid>/<id>)
                    // names no runtime; the one that answered for it does.
                    runtime: c.runtime.or(from_runtime.map(|m| m.runtime)).map(Name),
                    id: c.container_id.as_deref()?,
                    name: a.container_name.as_deref(),
                    image: from_runtime.and_then(|m| m.image.as_deref()),
                })
            }),
            pod: cgroup.and_then(|c| {
                Some(PodJson {
                    uid: c.pod_uid.as_deref()?,
                    namespace: a.pod.as_ref().map(|p| p.namespace.as_str()),
                    name: a.pod.as_ref().map(|p| p.name.as_str()),
                    qos: c.qos.map(Name),
                    labels: a.pod.as_ref().map(|p| &p.labels),
                })
            }),
            service: cgroup.and_then(|c| c.service.as_deref()),
        }
    }

    fn fields(&self, o: &mut Object) {
        o.field(key!("netns_name"), &self.netns_name)
            .field(key!("cgroup"), &self.cgroup)
            .field(key!("container"), &self.container)
            .field(key!("pod"), &self.pod)
            .field(key!("service"), &self.service);
    }
}

/// Places rendered lately, each as its fields (`,"netns_name":…` through
/// `"service":…`). Every reset of a storm from one container or namespace
/// has the same place, and in a cluster it is the longest part of a line:
/// pod labels, the container's name and image (#11).
#[derive(Default)]
struct Places {
    slots: [Option<(PlaceKey, Rc<[u8]>)>; PLACE_SLOTS],
}

/// Enough for the places one storm alternates between: each end's, and the
/// peer's.
const PLACE_SLOTS: usize = 8;

/// What a place is rendered from: the shared parts of an `Attribution`,
/// each compared by address. The enricher hands out one `Arc` per
/// namespace name, cgroup, pod, container name and runtime answer, so the
/// same place has the same addresses; a changed one (a pod relabelled, a
/// container's runtime answering) is a new `Arc`, and rendered anew. The
/// key holds its `Arc`s, so no address can be reused while it is cached.
struct PlaceKey {
    netns_name: Option<Arc<str>>,
    cgroup_id: Option<u64>,
    cgroup: Option<Arc<CgroupInfo>>,
    pod: Option<Arc<PodMeta>>,
    container_name: Option<Arc<str>>,
    from_runtime: Option<Arc<ContainerMeta>>,
}

impl PlaceKey {
    fn of(a: &Attribution) -> Self {
        Self {
            netns_name: a.netns_name.clone(),
            cgroup_id: a.cgroup_id,
            cgroup: a.cgroup.clone(),
            pod: a.pod.clone(),
            container_name: a.container_name.clone(),
            from_runtime: a.from_runtime.clone(),
        }
    }

    fn is(&self, a: &Attribution) -> bool {
        self.cgroup_id == a.cgroup_id
            && same_value(self.netns_name.as_ref(), a.netns_name.as_ref())
            && same_value(self.cgroup.as_ref(), a.cgroup.as_ref())
            && same_value(self.pod.as_ref(), a.pod.as_ref())
            && same_value(self.container_name.as_ref(), a.container_name.as_ref())
            && same_value(self.from_runtime.as_ref(), a.from_runtime.as_ref())
    }
}

impl Places {
    fn rendered(&mut self, a: &Attribution) -> Rc<[u8]> {
        // The cgroup tells containers apart, the namespace's name the
        // sockets of hosts and bare namespaces.
        let netns = a
            .netns_name
            .as_ref()
            .map_or(0, |n| Arc::as_ptr(n).cast::<u8>() as u64);
        let mixed = (a.cgroup_id.unwrap_or(0) ^ netns).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let slot = &mut self.slots[(mixed >> 32) as usize % PLACE_SLOTS];
        if let Some((key, fields)) = slot
            && key.is(a)
        {
            return fields.clone();
        }
        let mut fields = Vec::new();
        PlaceJson::new(a).fields(&mut Object::continuing(&mut fields));
        let fields: Rc<[u8]> = fields.into();
        *slot = Some((PlaceKey::of(a), fields.clone()));
        fields
    }
}

/// Whose socket it is: its place, then the process holding it.
struct WhoJson<'a> {
    place: Rc<[u8]>,
    owner: Option<ProcessJson<&'a str>>,
}

impl<'a> WhoJson<'a> {
    fn new(a: &'a Attribution, places: &mut Places) -> Self {
        Self {
            place: places.rendered(a),
            owner: a.owner.as_ref().map(|o| ProcessJson {
                pid: o.pid,
                comm: &*o.comm,
            }),
        }
    }

    fn fields(&self, o: &mut Object) {
        o.rendered_fields(&self.place)
            .field(key!("owner"), &self.owner);
    }
}

struct PeerJson<'a> {
    netns: Option<u32>,
    who: WhoJson<'a>,
}

impl Json for PeerJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let mut o = Object::new(out);
        o.field(key!("netns"), &self.netns);
        self.who.fields(&mut o);
        o.end();
    }
}

struct AggregateJson<'a> {
    first_time: Stamp,
    ports: &'a [u16],
}

impl Json for AggregateJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        Object::new(out)
            .field(key!("first_time"), &self.first_time)
            .field(key!("ports"), self.ports)
            .end();
    }
}

/// A reset line: the fields each reset has of its own, between the runs of
/// fields that its key fixes (`KeyRuns`).
struct RstJson<'a> {
    time: Stamp,
    local_port: u16,
    remote_port: u16,
    /// Both ends in a fixed order: the key another node's record of the
    /// same reset shares (`tcprst correlate`).
    flow: Flow,
    socket_cookie: Option<u64>,
    pid: Option<u32>,
    tid: Option<u32>,
    comm: Option<&'a str>,
    uid: Option<u32>,
    initiator: Option<InitiatorJson<'a>>,
    history: Vec<StepJson<'a>>,
    shared: &'a KeyRuns,
}

/// The fields of a reset line that every reset of one key has alike:
/// every one but the time, the ports and flow, the cookie, the task and
/// the connection's history. In a storm they are most of the line, and
/// the same from one reset to the next (#11), so they are rendered once
/// per key (`KeyRuns`) and copied.
struct SharedFields<'a> {
    kind: Name,
    /// The resets this record stands for: 1, or an aggregate's count.
    count: u64,
    aggregate: Option<AggregateJson<'a>>,
    endpoints: Endpoints,
    state: Option<Name>,
    reason: Option<&'a str>,
    errno: Option<Name>,
    netns: Option<u32>,
    context: Name,
    diagnosis: Option<&'a str>,
    cause: Option<Name>,
    caller: Option<&'a str>,
    stack: Option<&'a [Arc<str>]>,
    hook: Name,
    tier: Name,
    nf_hook: Option<Name>,
    origin: Option<Cow<'static, str>>,
    node: &'a Rendered,
    who: WhoJson<'a>,
    peer: Option<PeerJson<'a>>,
    nat: Option<NatJson<'a>>,
}

/// One direction of a conntrack entry.
struct TupleJson {
    src: String,
    dst: String,
}

impl TupleJson {
    fn new(t: &Tuple) -> Self {
        Self {
            src: t.src.to_string(),
            dst: t.dst.to_string(),
        }
    }
}

impl Json for TupleJson {
    fn write(&self, out: &mut Vec<u8>) {
        let mut o = Object::new(out);
        o.field(key!("src"), self.src.as_str())
            .field(key!("dst"), self.dst.as_str())
            .end();
    }
}

/// A NAT'd connection's conntrack entry, and the namespace it is in.
struct NatJson<'a> {
    original: TupleJson,
    reply: TupleJson,
    state: Option<Name>,
    netns: u32,
    netns_name: &'a str,
}

impl<'a> NatJson<'a> {
    fn new(found: &'a Found) -> Self {
        Self {
            original: TupleJson::new(&found.entry.original),
            reply: TupleJson::new(&found.entry.reply),
            state: found.entry.tcp_state_name().map(Name),
            netns: found.netns,
            netns_name: &found.netns_name,
        }
    }
}

impl Json for NatJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let mut o = Object::new(out);
        o.field(key!("original"), &self.original)
            .field(key!("reply"), &self.reply)
            .field(key!("state"), &self.state)
            .field(key!("netns"), &self.netns)
            .field(key!("netns_name"), self.netns_name)
            .end();
    }
}

/// Who a reset's socket belongs to, and its peer's, as the line shows them.
fn who_and_peer<'a>(
    report: &'a RstReport,
    places: &mut Places,
) -> (WhoJson<'a>, Option<PeerJson<'a>>) {
    let who = WhoJson::new(&report.attribution, places);
    let peer = report.peer.as_ref().map(|p| PeerJson {
        netns: p.netns,
        who: WhoJson::new(&p.attribution, places),
    });
    (who, peer)
}

impl<'a> RstJson<'a> {
    fn new(
        report: &'a RstReport,
        node: &'a Rendered,
        stamps: &mut StampCache,
        places: &mut Places,
        runs: &'a mut RunsCache,
    ) -> Self {
        let ev = &report.ev;
        let task: Option<&Task> = ev.task.as_ref();
        let conn = report.conn.as_ref();
        let (who, peer) = who_and_peer(report, places);
        let aggregate = ev.aggregate.as_ref().map(|a| AggregateJson {
            first_time: stamps.stamp(a.first),
            ports: &a.ports,
        });
        let shared = runs.of(report, who, peer, |who, peer| SharedFields {
            kind: Name(match ev.aggregate {
                Some(_) => ev.kind.aggregate_name(),
                None => ev.kind.name(),
            }),
            count: ev.resets(),
            aggregate,
            endpoints: Endpoints::new(ev.local, ev.remote),
            state: ev.state.map(|s| Name(s.name())),
            reason: ev.reason.as_deref(),
            errno: ev.errno.map(|e| Name(e.name())),
            netns: ev.netns,
            context: Name(ev.context.name()),
            diagnosis: report.diagnosis.as_ref().map(|d| &*d.text),
            cause: report.diagnosis.as_ref().map(|d| Name(d.cause.name())),
            caller: report.caller.as_deref(),
            stack: report.stack.as_deref(),
            hook: Name(hook_name(ev.hook)),
            tier: Name(tier_name(ev.tier)),
            nf_hook: ev.nf_hook.map(|h| Name(h.name())),
            origin: report.origin.as_ref().map(Origin::text),
            node,
            who,
            peer,
            nat: report
                .conntrack
                .as_ref()
                .filter(|found| found.entry.natted())
                .map(NatJson::new),
        });
        Self {
            time: stamps.stamp(ev.time),
            local_port: ev.local.port(),
            remote_port: ev.remote.port(),
            flow: Flow(ev.local, ev.remote),
            socket_cookie: ev.sock_cookie,
            pid: task.map(|t| t.pid),
            tid: task.map(|t| t.tid),
            comm: task.map(|t| &*t.comm),
            uid: task.map(|t| t.uid),
            initiator: initiator(conn, ev.time),
            history: history(conn, ev.time),
            shared,
        }
    }
}

impl Json for RstJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let [head, remote_addr, reason, place, tail] = self.shared.runs();
        Object::new(out)
            .field(key!("time"), &self.time)
            .rendered_fields(head)
            .field(key!("local_port"), &self.local_port)
            .rendered_fields(remote_addr)
            .field(key!("remote_port"), &self.remote_port)
            .field(key!("flow"), &self.flow)
            .rendered_fields(reason)
            .field(key!("socket_cookie"), &self.socket_cookie)
            .rendered_fields(place)
            .field(key!("pid"), &self.pid)
            .field(key!("tid"), &self.tid)
            .field(key!("comm"), &self.comm)
            .field(key!("uid"), &self.uid)
            .field(key!("initiator"), &self.initiator)
            .field(key!("history"), &self.history)
            .rendered_fields(tail)
            .end();
    }
}

/// A key's shared fields (`SharedFields`) rendered, as the five runs a
/// reset line puts them in, one after the other.
#[derive(Default)]
struct KeyRuns {
    bytes: Vec<u8>,
    /// Where each run ends in `bytes`.
    ends: [usize; 5],
}

impl KeyRuns {
    fn render(&mut self, fields: &SharedFields) {
        let f = fields;
        self.bytes.clear();
        let mut o = Object::continuing(&mut self.bytes);
        o.field(key!("kind"), &f.kind)
            .field(key!("count"), &f.count)
            .field(key!("aggregate"), &f.aggregate);
        f.endpoints.local_addr_fields(&mut o);
        let head = o.written();
        f.endpoints.remote_addr_field(&mut o);
        let remote_addr = o.written();
        o.field(key!("state"), &f.state)
            .field(key!("reason"), &f.reason)
            .field(key!("errno"), &f.errno);
        let reason = o.written();
        o.field(key!("netns"), &f.netns)
            .field(key!("context"), &f.context);
        let place = o.written();
        o.field(key!("diagnosis"), &f.diagnosis)
            .field(key!("cause"), &f.cause)
            .field(key!("caller"), &f.caller)
            .field(key!("stack"), &f.stack)
            .field(key!("hook"), &f.hook)
            .field(key!("tier"), &f.tier)
            .field(key!("nf_hook"), &f.nf_hook)
            .field(key!("origin"), &f.origin.as_deref())
            .field(key!("node"), f.node);
        f.who.fields(&mut o);
        o.field(key!("peer"), &f.peer).field(key!("nat"), &f.nat);
        let tail = o.written();
        self.ends = [head, remote_addr, reason, place, tail];
    }

    fn runs(&self) -> [&[u8]; 5] {
        let mut start = 0;
        self.ends.map(|end| {
            let run = &self.bytes[start..end];
            start = end;
            run
        })
    }
}

/// The runs of the keys reset lines had lately. A storm alternates
/// between a few keys (the sent and the received reset of each
/// connection, a few listeners), each of whose resets differ only in the
/// ports, the cookie and the task.
struct RunsCache {
    slots: [Option<(RunsKey, KeyRuns)>; RUN_SLOTS],
    /// For a line no key stands for: an aggregate (its count), a whole
    /// stack, a NAT'd connection's conntrack entry.
    once: KeyRuns,
}

/// Room for the keys a host's resets come from at once: its listeners,
/// clients and namespaces. 16 slots, enough for one storm, thrashed on the
/// few dozen keys of the mixed Criterion stream. A slot's runs are about
/// 600 bytes.
const RUN_SLOTS: usize = 64;

impl Default for RunsCache {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| None),
            once: KeyRuns::default(),
        }
    }
}

impl RunsCache {
    /// The runs of `report`'s key, rendered from `fields` unless they are
    /// cached.
    fn of<'a>(
        &mut self,
        report: &RstReport,
        who: WhoJson<'a>,
        peer: Option<PeerJson<'a>>,
        fields: impl FnOnce(WhoJson<'a>, Option<PeerJson<'a>>) -> SharedFields<'a>,
    ) -> &KeyRuns {
        let ev = &report.ev;
        let keyed = ev.aggregate.is_none()
            && report.stack.is_none()
            && !report
                .conntrack
                .as_ref()
                .is_some_and(|found| found.entry.natted());
        if !keyed {
            self.once.render(&fields(who, peer));
            return &self.once;
        }
        let slot = &mut self.slots[RunsKey::slot(report)];
        let cached = slot
            .as_ref()
            .is_some_and(|(key, _)| key.is(report, &who, peer.as_ref()));
        if !cached {
            let key = RunsKey::of(report, &who, peer.as_ref());
            let mut runs = slot.take().map(|(_, runs)| runs).unwrap_or_default();
            runs.render(&fields(who, peer));
            *slot = Some((key, runs));
        }
        &slot.as_ref().expect("filled above").1
    }
}

/// What a reset line's shared fields are rendered from, short of the
/// node, which is the sink's. Places are compared by their rendered
/// bytes (`WhoKey::is`).
struct RunsKey {
    kind: RstKind,
    local: IpAddr,
    remote: IpAddr,
    state: Option<TcpState>,
    reason: Option<Arc<str>>,
    errno: Option<Errno>,
    netns: Option<u32>,
    context: ExecContext,
    diagnosis: Option<RstDiagnosis>,
    caller: Option<Arc<str>>,
    hook: ResetHook,
    tier: AttachTier,
    nf_hook: Option<NfHook>,
    origin: Option<Origin>,
    who: WhoKey,
    peer: Option<(Option<u32>, WhoKey)>,
}

struct WhoKey {
    place: Rc<[u8]>,
    owner: Option<Process>,
}

impl WhoKey {
    fn of(a: &Attribution, who: &WhoJson) -> Self {
        Self {
            place: who.place.clone(),
            owner: a.owner.clone(),
        }
    }

    /// Places compare by their bytes: the same place rendered anew, after
    /// `Places` gave its slot to another, still serves.
    fn is(&self, a: &Attribution, who: &WhoJson) -> bool {
        self.place == who.place && self.owner == a.owner
    }
}

impl RunsKey {
    /// A slot for `report`'s key, from the parts that tell keys apart
    /// most often: the ends, the kind and state, the reason (interned by
    /// the decoder, so its address stands for it), the namespace, the
    /// cgroup and the owner. Keys alike in all of these share a slot.
    fn slot(report: &RstReport) -> usize {
        let ev = &report.ev;
        let owner = report.attribution.owner.as_ref();
        let parts = [
            ip_bits(ev.local.ip()),
            ip_bits(ev.remote.ip()),
            (ev.kind as u64) << 8 | ev.state.map_or(0, |s| s as u64 + 1),
            ev.reason
                .as_ref()
                .map_or(0, |r| Arc::as_ptr(r).cast::<u8>() as u64),
            u64::from(ev.netns.unwrap_or(0)),
            report.attribution.cgroup_id.unwrap_or(0),
            owner.map_or(0, |o| u64::from(o.pid) + 1),
        ];
        let mixed = parts.iter().fold(0u64, |h, &part| {
            (h.rotate_left(23) ^ part).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        });
        (mixed >> 32) as usize % RUN_SLOTS
    }

    fn of(report: &RstReport, who: &WhoJson, peer: Option<&PeerJson>) -> Self {
        let ev = &report.ev;
        Self {
            kind: ev.kind,
            local: ev.local.ip(),
            remote: ev.remote.ip(),
            state: ev.state,
            reason: ev.reason.clone(),
            errno: ev.errno,
            netns: ev.netns,
            context: ev.context,
            diagnosis: report.diagnosis.clone(),
            caller: report.caller.clone(),
            hook: ev.hook,
            tier: ev.tier,
            nf_hook: ev.nf_hook,
            origin: report.origin.clone(),
            who: WhoKey::of(&report.attribution, who),
            peer: report
                .peer
                .as_ref()
                .zip(peer)
                .map(|(p, json)| (p.netns, WhoKey::of(&p.attribution, &json.who))),
        }
    }

    fn is(&self, report: &RstReport, who: &WhoJson, peer: Option<&PeerJson>) -> bool {
        let ev = &report.ev;
        self.kind == ev.kind
            && self.local == ev.local.ip()
            && self.remote == ev.remote.ip()
            && self.state == ev.state
            && self.reason == ev.reason
            && self.errno == ev.errno
            && self.netns == ev.netns
            && self.context == ev.context
            && self.diagnosis == report.diagnosis
            && self.caller == report.caller
            && self.hook == ev.hook
            && self.tier == ev.tier
            && self.nf_hook == ev.nf_hook
            && self.origin == report.origin
            && self.who.is(&report.attribution, who)
            && match (&self.peer, report.peer.as_ref().zip(peer)) {
                (Some((netns, kept)), Some((p, json))) => {
                    *netns == p.netns && kept.is(&p.attribution, &json.who)
                }
                (None, None) => true,
                _ => false,
            }
    }
}

/// An address's bits, folded to 64 for `RunsKey::slot`.
fn ip_bits(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(v4.to_bits()),
        IpAddr::V6(v6) => {
            let bits = v6.to_bits();
            (bits >> 64) as u64 ^ bits as u64
        }
    }
}

struct StuckJson<'a> {
    head: Head,
    state: Name,
    stuck_for_ms: u64,
    age_is_lower_bound: bool,
    waiting_for: Name,
    blame: Name,
    orphaned: Option<bool>,
    initiator: Option<InitiatorJson<'a>>,
    our_fin_ago_ms: Option<u64>,
    peer_fin_ago_ms: Option<u64>,
    history: Vec<StepJson<'a>>,
    diagnosis: &'a str,
    node: &'a Rendered,
    who: WhoJson<'a>,
}

impl Json for StuckJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let mut o = self.head.fields(out);
        o.field(key!("state"), &self.state)
            .field(key!("stuck_for_ms"), &self.stuck_for_ms)
            .field(key!("age_is_lower_bound"), &self.age_is_lower_bound)
            .field(key!("waiting_for"), &self.waiting_for)
            .field(key!("blame"), &self.blame)
            .field(key!("orphaned"), &self.orphaned)
            .field(key!("initiator"), &self.initiator)
            .field(key!("our_fin_ago_ms"), &self.our_fin_ago_ms)
            .field(key!("peer_fin_ago_ms"), &self.peer_fin_ago_ms)
            .field(key!("history"), &self.history)
            .field(key!("diagnosis"), self.diagnosis)
            .field(key!("node"), self.node);
        self.who.fields(&mut o);
        o.end();
    }
}

struct ResolvedJson<'a> {
    head: Head,
    state: Name,
    now_state: Name,
    stuck_for_ms: u64,
    initiator: Option<InitiatorJson<'a>>,
    diagnosis: &'a str,
    node: &'a Rendered,
}

impl Json for ResolvedJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        self.head
            .fields(out)
            .field(key!("state"), &self.state)
            .field(key!("now_state"), &self.now_state)
            .field(key!("stuck_for_ms"), &self.stuck_for_ms)
            .field(key!("initiator"), &self.initiator)
            .field(key!("diagnosis"), self.diagnosis)
            .field(key!("node"), self.node)
            .end();
    }
}

struct LostJson<'a> {
    time: Stamp,
    kind: Name,
    lost: u64,
    lost_total: u64,
    node: &'a Rendered,
}

impl Json for LostJson<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        Object::new(out)
            .field(key!("time"), &self.time)
            .field(key!("kind"), &self.kind)
            .field(key!("lost"), &self.lost)
            .field(key!("lost_total"), &self.lost_total)
            .field(key!("node"), self.node)
            .end();
    }
}

impl Sink for JsonSink {
    fn rst(&mut self, report: &RstReport) -> io::Result<()> {
        let line = RstJson::new(
            report,
            &self.node,
            &mut self.stamps,
            &mut self.places,
            &mut self.runs,
        );
        self.lines.write(&line)
    }

    fn stuck(&mut self, r: &StuckReport) -> io::Result<()> {
        let conn = &r.conn;
        self.lines.write(&StuckJson {
            head: Head::new(self.stamps.stamp(r.time), "halfclose_stuck", conn),
            state: Name(conn.state.name()),
            stuck_for_ms: ms_before(conn.since, r.time),
            age_is_lower_bound: !conn.seen_from_start,
            waiting_for: Name(r.diagnosis.waiting_for.name()),
            blame: Name(r.diagnosis.blame.name()),
            orphaned: conn.orphaned,
            initiator: initiator(Some(conn), r.time),
            our_fin_ago_ms: conn.our_fin_at.map(|at| ms_before(at, r.time)),
            peer_fin_ago_ms: conn.peer_fin_at.map(|at| ms_before(at, r.time)),
            history: history(Some(conn), r.time),
            diagnosis: &r.diagnosis.text,
            node: &self.node,
            who: WhoJson::new(&r.attribution, &mut self.places),
        })
    }

    fn resolved(&mut self, r: &ResolvedReport) -> io::Result<()> {
        let conn = &r.resolved.conn;
        self.lines.write(&ResolvedJson {
            head: Head::new(self.stamps.stamp(conn.since), "halfclose_resolved", conn),
            state: Name(r.resolved.stuck_state.name()),
            now_state: Name(conn.state.name()),
            stuck_for_ms: r.resolved.stuck_for.as_millis() as u64,
            initiator: initiator(Some(conn), conn.since),
            diagnosis: &r.diagnosis,
            node: &self.node,
        })
    }

    fn lost(&mut self, report: &LossReport) -> io::Result<()> {
        self.lines.write(&LostJson {
            time: self.stamps.stamp(SystemTime::now()),
            kind: Name("lost"),
            lost: report.lost,
            lost_total: report.lost_total,
            node: &self.node,
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.lines.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::{
        model::event::{Errno, ExecContext, RstEvent, RstKind, TcpState},
        output::{Peer, testing::Shared},
        pipeline::diagnosis::{self, Blame, WaitingFor},
        pipeline::tracker::{RstContext, Tracker},
        testing::{bare_report, facts, proxy_half_close, reset, scanned, t},
    };

    #[test]
    fn objects_open_at_their_first_field() {
        let mut out = Vec::new();
        Object::new(&mut out).end();
        Object::new(&mut out).field(key!("a"), &1u32).end();
        Object::new(&mut out)
            .field(key!("a"), &1u32)
            .field(key!("b"), &[2u32][..])
            .end();
        assert_eq!(out, br#"{}{"a":1}{"a":1,"b":[2]}"#);
    }

    fn lines(buf: &Shared) -> Vec<serde_json::Value> {
        buf.text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn received(at: SystemTime) -> RstEvent {
        let mut ev = reset(RstKind::Received, at, Some(TcpState::FinWait2), None);
        ev.socket = Some(facts(true, false));
        ev.history = Some(proxy_half_close());
        ev.sock_cookie = Some(4097);
        ev.context = ExecContext::Process;
        ev.task = Some(Task {
            pid: 10,
            tid: 11,
            comm: "nc".into(),
            uid: 0,
        });
        ev
    }

    const CONTAINER: &str = "0e7859b44b4e93d620108bda2c5103614fd6ff83a2798742f0ddd3fa3db3b3b7";
    const POD: &str = "2e7a1c5d-8f0b-4c3a-9d6e-1f2a3b4c5d6e";

    /// A socket of container "web" in pod shop/web-1, owned by envoy.
    fn attribution() -> Attribution {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CONTAINER}.scope",
            POD.replace('-', "_")
        );
        Attribution {
            netns_name: Some("cri-containerd:0e7859b44b4e".into()),
            cgroup_id: Some(8812),
            cgroup: Some(std::sync::Arc::new(crate::host::cgroup::parse_path(&path))),
            pod: Some(std::sync::Arc::new(crate::host::k8s::PodMeta {
                namespace: "shop".into(),
                name: "web-1".into(),
                uid: POD.into(),
                labels: [("app".to_owned(), "web".to_owned())].into(),
                containers: [(CONTAINER.to_owned(), "web".into())].into(),
            })),
            container_name: Some("web".into()),
            from_runtime: Some(std::sync::Arc::new(crate::host::runtimes::ContainerMeta {
                runtime: "containerd",
                name: Some("web".into()),
                image: Some("registry.example/shop/web:2.1".into()),
            })),
            owner: Some(crate::model::event::Process {
                pid: 7,
                comm: "envoy".into(),
            }),
        }
    }

    /// One record of each kind, from a real tracker sequence.
    fn every_kind() -> Shared {
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()), "node-a".into());
        let mut tracker = Tracker::new(10);
        tracker.scan(t(0), Vec::new());
        tracker.scan(
            t(11),
            vec![scanned(TcpState::FinWait2, Some(proxy_half_close()), false)],
        );
        let ev = received(t(15));
        let ctx = RstContext::of(&ev);
        sink.rst(&RstReport {
            diagnosis: diagnosis::rst(&ev, &ctx, &diagnosis::KernelView::default()),
            ev,
            conn: ctx.conn,
            attribution: attribution(),
            peer: Some(Peer {
                sent_reason: None,
                netns: Some(4026532999),
                attribution: Attribution {
                    netns_name: Some("host".into()),
                    owner: Some(crate::model::event::Process {
                        pid: 99,
                        comm: "curl".into(),
                    }),
                    ..Attribution::default()
                },
            }),
            caller: Some("tcp_v4_rcv".into()),
            stack: Some(
                ["tcp_v4_send_reset", "tcp_v4_rcv"]
                    .map(std::sync::Arc::from)
                    .into(),
            ),
            origin: Some(Origin::LocalTcp),
            conntrack: None,
        })
        .unwrap();
        let conn = tracker
            .stuck(t(40), Duration::from_secs(2), Duration::from_secs(60))
            .remove(0);
        sink.stuck(&StuckReport {
            time: t(40),
            diagnosis: diagnosis::stuck(&conn, t(40), None, Duration::from_secs(60)),
            attribution: Attribution {
                owner: Some(crate::model::event::Process {
                    pid: 7,
                    comm: "socat".into(),
                }),
                ..Attribution::default()
            },
            conn,
        })
        .unwrap();
        let resolved = tracker.scan(t(50), Vec::new()).remove(0);
        sink.resolved(&ResolvedReport {
            diagnosis: diagnosis::resolved(&resolved),
            resolved,
            netns_name: None,
        })
        .unwrap();
        sink.lost(&LossReport {
            lost: 3,
            lost_total: 10,
        })
        .unwrap();
        buf
    }

    #[test]
    fn rst_shape() {
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()), "node-a".into());
        let mut ev = received(UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456));
        ev.local = "[::1]:5000".parse().unwrap();
        ev.remote = "[::1]:40000".parse().unwrap();
        ev.state = Some(TcpState::SynSent);
        ev.errno = Some(Errno::ConnRefused);
        sink.rst(&RstReport {
            origin: Some(Origin::NotLocal {
                netfilter_watched: false,
            }),
            ..bare_report(ev)
        })
        .unwrap();
        let expected = serde_json::json!({
            "time": "2026-11-18T11:06:40.123456Z",
            "kind": "rst_received",
            "count": 1,
            "aggregate": null,
            "family": "ipv6",
            "local_addr": "::1", "local_port": 5000,
            "remote_addr": "::1", "remote_port": 40000,
            "flow": "[::1]:5000-[::1]:40000",
            "state": "SYN_SENT",
            "reason": null,
            "errno": "ECONNREFUSED",
            "socket_cookie": 4097,
            "netns": 4026532000u32,
            "context": "process",
            "pid": 10, "tid": 11, "comm": "nc", "uid": 0,
            "initiator": null,
            "history": [],
            "diagnosis": null,
            "cause": null,
            "node": "node-a",
            "netns_name": null,
            "cgroup": null,
            "container": null,
            "pod": null,
            "service": null,
            "owner": null,
            "peer": null,
            "nat": null,
            "caller": null,
            "stack": null,
            "hook": "tcp:tcp_receive_reset",
            "tier": "tracepoint",
            "nf_hook": null,
            "origin": "not a local TCP socket (netfilter, middlebox or userspace stack)",
        });
        assert_eq!(lines(&buf)[0], expected);
        // Byte for byte, in the order log pipelines have always seen.
        assert_eq!(
            buf.text(),
            concat!(
                r#"{"time":"2026-11-18T11:06:40.123456Z","kind":"rst_received","count":1"#,
                r#","aggregate":null,"family":"ipv6","local_addr":"::1","local_port":5000"#,
                r#","remote_addr":"::1","remote_port":40000,"flow":"[::1]:5000-[::1]:40000""#,
                r#","state":"SYN_SENT","reason":null"#,
                r#","errno":"ECONNREFUSED","socket_cookie":4097,"netns":4026532000"#,
                r#","context":"process","pid":10,"tid":11,"comm":"nc","uid":0,"initiator":null"#,
                r#","history":[],"diagnosis":null,"cause":null,"caller":null,"stack":null"#,
                r#","hook":"tcp:tcp_receive_reset","tier":"tracepoint","nf_hook":null"#,
                r#","origin":"not a local TCP socket (netfilter, middlebox or userspace stack)""#,
                r#","node":"node-a","netns_name":null,"cgroup":null,"container":null,"pod":null"#,
                r#","service":null,"owner":null,"peer":null,"nat":null}"#,
                "\n"
            )
        );
    }

    /// A storm's resets of one key, and resets that differ from them in one
    /// part each: those that differ in what the line's shared fields are
    /// rendered from have another key, and every line written by one sink,
    /// whose runs are cached, is the line a new sink writes for that reset
    /// alone.
    #[test]
    fn a_key_s_runs_serve_only_resets_of_that_key() {
        // One place for every reset, as the enricher shares it.
        let place = attribution();
        let storm = |port: u16, at: u64| {
            let mut ev = reset(RstKind::Sent, t(at), None, Some("NO_SOCKET"));
            ev.remote.set_port(port);
            let mut report = bare_report(ev);
            report.diagnosis = diagnosis::rst(
                &report.ev,
                &RstContext::of(&report.ev),
                &diagnosis::KernelView::default(),
            );
            report.caller = Some("tcp_v4_rcv".into());
            report.attribution = place.clone();
            report
        };
        let name: Arc<str> = "other".into();
        // Each change, and whether the reset it makes still has the storm's
        // key: a whole stack or an aggregate is rendered apart, whatever
        // its key.
        type Change = fn(&mut RstReport, &Arc<str>);
        let variants: Vec<(bool, Change)> = vec![
            (true, |_, _| {}),
            (false, |r, _| r.ev.kind = RstKind::Received),
            (false, |r, _| r.ev.local.set_ip("10.9.9.9".parse().unwrap())),
            (false, |r, _| r.ev.remote.set_ip("::1".parse().unwrap())),
            (false, |r, _| r.ev.state = Some(TcpState::Established)),
            (false, |r, _| {
                r.ev.reason = Some("TCP_ABORT_ON_CLOSE".into())
            }),
            (false, |r, _| r.ev.errno = Some(Errno::ConnReset)),
            (false, |r, _| r.ev.netns = Some(7)),
            (false, |r, _| r.ev.context = ExecContext::Process),
            (false, |r, _| r.diagnosis = None),
            (false, |r, _| {
                r.diagnosis.as_mut().unwrap().text = "another text".into()
            }),
            (false, |r, _| r.caller = Some("tcp_v6_rcv".into())),
            (false, |r, _| r.ev.hook = ResetHook::V4SendReset),
            (false, |r, _| r.ev.tier = AttachTier::Kprobe),
            (false, |r, _| r.ev.nf_hook = Some(NfHook::Input)),
            (false, |r, _| r.origin = Some(Origin::LocalTcp)),
            (false, |r, name| {
                r.attribution.netns_name = Some(name.clone())
            }),
            (false, |r, _| r.attribution.owner.as_mut().unwrap().pid = 8),
            (false, |r, _| {
                r.attribution.owner.as_mut().unwrap().comm = "nginx".into()
            }),
            (false, |r, _| r.attribution.owner = None),
            (false, |r, _| {
                r.peer = Some(Peer {
                    sent_reason: None,
                    netns: Some(5),
                    attribution: Attribution::default(),
                })
            }),
            (true, |r, _| {
                r.stack = Some(["tcp_v4_send_reset"].map(Arc::from).into())
            }),
            (true, |r, _| {
                r.ev.aggregate = Some(crate::model::event::Aggregate {
                    count: 9,
                    first: t(1),
                    last: t(2),
                    ports: vec![1, 2],
                })
            }),
        ];
        // The key alone, whatever slot either reset would take.
        let mut places = Places::default();
        let base = storm(40000, 10);
        for (i, (same, change)) in variants.iter().enumerate() {
            let (who, peer) = who_and_peer(&base, &mut places);
            let key = RunsKey::of(&base, &who, peer.as_ref());
            let mut report = storm(40001, 10);
            change(&mut report, &name);
            let (who, peer) = who_and_peer(&report, &mut places);
            assert_eq!(key.is(&report, &who, peer.as_ref()), *same, "variant {i}");
        }
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()), "node-a".into());
        let mut expected = String::new();
        for (i, (_, change)) in variants.iter().enumerate() {
            // Each variant between two resets of the storm's key.
            for (port, change) in [
                (40000, None),
                (40001 + i as u16, Some(change)),
                (50000, None),
            ] {
                let mut report = storm(port, 10 + i as u64);
                if let Some(change) = change {
                    change(&mut report, &name);
                }
                sink.rst(&report).unwrap();
                let alone = Shared::default();
                JsonSink::new(Box::new(alone.clone()), "node-a".into())
                    .rst(&report)
                    .unwrap();
                expected.push_str(&alone.text());
            }
        }
        let written = buf.text();
        for (i, (got, want)) in written.lines().zip(expected.lines()).enumerate() {
            assert_eq!(got, want, "line {i}");
        }
        assert_eq!(written.lines().count(), 3 * variants.len());
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for text in [
            "",
            "plain",
            "quote \" and backslash \\",
            "tab\t newline\n \u{1} \u{1f} delete\u{7f} é ☃",
        ] {
            let serde = serde_json::to_vec(text).unwrap();
            let mut out = b"[".to_vec();
            text.write(&mut out);
            assert_eq!(out[1..], serde, "{text:?}");
            let mut out = Vec::new();
            Text(text).write(&mut out);
            assert_eq!(out, serde, "{text:?}");
        }
    }

    #[test]
    fn aggregate_shape() {
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()), "node-a".into());
        let last = UNIX_EPOCH + Duration::from_micros(1_795_000_001_000_000);
        let mut ev = reset(RstKind::Sent, last, None, Some("NO_SOCKET"));
        ev.remote = "127.0.0.1:0".parse().unwrap();
        ev.aggregate = Some(crate::model::event::Aggregate {
            count: 48211,
            first: UNIX_EPOCH + Duration::from_micros(1_795_000_000_000_000),
            last,
            ports: vec![40001, 40002],
        });
        sink.rst(&RstReport {
            caller: Some("tcp_v4_rcv".into()),
            ..bare_report(ev)
        })
        .unwrap();
        let v = &lines(&buf)[0];
        assert_eq!(v["kind"], "rst_sent_aggregate");
        assert_eq!(v["count"], 48211);
        assert_eq!(v["time"], "2026-11-18T11:06:41.000000Z");
        assert_eq!(
            v["aggregate"],
            serde_json::json!({
                "first_time": "2026-11-18T11:06:40.000000Z",
                "ports": [40001, 40002],
            })
        );
        assert_eq!(v["remote_port"], 0);
        assert_eq!(v["reason"], "NO_SOCKET");
        assert_eq!(v["caller"], "tcp_v4_rcv");
    }

    #[test]
    fn reset_names_the_container_pod_and_owner() {
        let v = &lines(&every_kind())[0];
        assert_eq!(v["node"], "node-a");
        assert_eq!(v["netns_name"], "cri-containerd:0e7859b44b4e");
        assert_eq!(v["cgroup"]["id"], 8812);
        assert!(v["cgroup"]["path"].as_str().unwrap().ends_with(".scope"));
        assert_eq!(
            v["container"],
            serde_json::json!({"runtime": "containerd", "id": CONTAINER, "name": "web", "image": "registry.example/shop/web:2.1"})
        );
        assert_eq!(
            v["pod"],
            serde_json::json!({"uid": POD, "namespace": "shop", "name": "web-1", "qos": "burstable", "labels": {"app": "web"}})
        );
        assert_eq!(v["owner"], serde_json::json!({"pid": 7, "comm": "envoy"}));
        assert_eq!(v["caller"], "tcp_v4_rcv");
        assert_eq!(
            v["stack"],
            serde_json::json!(["tcp_v4_send_reset", "tcp_v4_rcv"])
        );
        assert_eq!(
            v["peer"],
            serde_json::json!({
                "netns": 4026532999u32, "netns_name": "host", "cgroup": null, "container": null,
                "pod": null, "service": null, "owner": {"pid": 99, "comm": "curl"},
            })
        );
    }

    #[test]
    fn a_place_is_rendered_anew_when_any_of_its_parts_changes() {
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()), "node-a".into());
        let mut write = |attribution: &Attribution| {
            let mut report = bare_report(received(t(1)));
            report.attribution = attribution.clone();
            sink.rst(&report).unwrap();
        };
        let web = attribution();
        write(&web);
        // The runtime answers later, with another name: a new Arc.
        let renamed = Attribution {
            container_name: Some("web-2".into()),
            ..web.clone()
        };
        write(&renamed);
        // Relabelled: the pod watch stores a new PodMeta.
        let mut pod = crate::host::k8s::PodMeta::clone(web.pod.as_deref().unwrap());
        pod.labels.insert("app".into(), "shop".into());
        let relabelled = Attribution {
            pod: Some(Arc::new(pod)),
            ..web.clone()
        };
        write(&relabelled);
        // Another process, the same place.
        let other_owner = Attribution {
            owner: Some(crate::model::event::Process {
                pid: 8,
                comm: "nginx".into(),
            }),
            ..web.clone()
        };
        write(&other_owner);
        // The same namespace name, with no cgroup.
        write(&Attribution {
            netns_name: web.netns_name.clone(),
            ..Attribution::default()
        });
        write(&web);

        let v = lines(&buf);
        let names: Vec<_> = v.iter().map(|v| v["container"]["name"].as_str()).collect();
        let web_named = Some("web");
        assert_eq!(
            names,
            [
                web_named,
                Some("web-2"),
                web_named,
                web_named,
                None,
                web_named
            ]
        );
        assert_eq!(v[2]["pod"]["labels"]["app"], "shop");
        assert_eq!(v[3]["pod"]["labels"]["app"], "web");
        assert_eq!(v[3]["owner"]["comm"], "nginx");
        assert!(v[4]["cgroup"].is_null());
        assert_eq!(v[4]["netns_name"], "cri-containerd:0e7859b44b4e");
        assert!(v[4]["owner"].is_null());
        assert_eq!(v[5], v[0]);
    }

    #[test]
    fn explained_reset_carries_history_and_initiator() {
        let v = &lines(&every_kind())[0];
        assert_eq!(
            v["initiator"],
            serde_json::json!({"op": "shutdown", "how": "SHUT_WR", "pid": 51435, "comm": "envoy", "ago_ms": 5000})
        );
        assert_eq!(
            v["history"],
            serde_json::json!([
                // The mark began at the shutdown: when ESTABLISHED began is unknown.
                {"state": "ESTABLISHED", "ago_ms": null, "by": null},
                {"state": "FIN_WAIT1", "ago_ms": 5000, "by": "shutdown(SHUT_WR) by envoy[51435]"},
                {"state": "FIN_WAIT2", "ago_ms": 5000, "by": null},
            ])
        );
        assert!(
            v["diagnosis"]
                .as_str()
                .unwrap()
                .starts_with("the peer reset a connection we half-closed")
        );
    }

    #[test]
    fn stuck_and_resolved_shapes() {
        let all = lines(&every_kind());
        let stuck = &all[1];
        assert_eq!(stuck["kind"], "halfclose_stuck");
        assert_eq!(stuck["state"], "FIN_WAIT2");
        assert_eq!(stuck["stuck_for_ms"], 30_000);
        assert_eq!(stuck["age_is_lower_bound"], false);
        assert_eq!(stuck["waiting_for"], WaitingFor::PeerFin.name());
        assert_eq!(stuck["blame"], Blame::Peer.name());
        assert_eq!(stuck["orphaned"], false);
        assert_eq!(
            stuck["owner"],
            serde_json::json!({"pid": 7, "comm": "socat"})
        );
        assert_eq!(stuck["our_fin_ago_ms"], 30_000);
        assert!(stuck["peer_fin_ago_ms"].is_null());
        assert_eq!(stuck["initiator"]["pid"], 51435);
        let resolved = &all[2];
        assert_eq!(resolved["kind"], "halfclose_resolved");
        assert_eq!(resolved["state"], "FIN_WAIT2");
        assert_eq!(resolved["now_state"], "CLOSE");
        assert_eq!(resolved["stuck_for_ms"], 40_000);
    }

    /// docs/event.schema.json documents exactly the fields we print.
    #[test]
    fn schema_lists_every_field() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/event.schema.json")).unwrap();
        let all = lines(&every_kind());
        for (line, def) in all.iter().zip(["rst", "stuck", "resolved", "lost"]) {
            let mut printed: Vec<&str> = line
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let def = &schema["$defs"][def];
            let mut required: Vec<&str> = def["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let mut documented: Vec<&str> = def["properties"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            printed.sort();
            required.sort();
            documented.sort();
            assert_eq!(printed, required, "{def}");
            assert_eq!(printed, documented, "{def}");
        }
    }

    #[test]
    fn lost_shape() {
        let v = &lines(&every_kind())[3];
        assert_eq!(v["kind"], "lost");
        assert_eq!(v["lost"], 3);
        assert_eq!(v["lost_total"], 10);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
}
