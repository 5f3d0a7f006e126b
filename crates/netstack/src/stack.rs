//! The stack's loop: frames from QEMU into smoltcp and back, new connections held for a
//! decision, relays between smoltcp's sockets and the host's, DNS, port forwards.
//!
//! One task owns the interface and every socket; host sockets are served by a reader and
//! a writer task per flow that talk to it through bounded channels, so a slow side holds
//! the other back (the TCP window closes) instead of growing a buffer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddrV4};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use hickory_resolver::proto::rr::RecordType;
use kiln_policy::peek::{self, HttpPeek, Peeked, RequestHead, TlsPeek};
use kiln_policy::{Decision, DecisionRecord, DnsDecision, FirstBytes, FlowProtocol, Pins};
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration as StackDuration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::dns::{self, Question};
use crate::egress::{host_target, DecisionLog, Egress, FlowFacts};
use crate::frame::{encode_frame, read_frame, write_frames};
use crate::http::RequestStream;
use crate::limits::*;
use crate::packet::{arp_from_guest, classify, guest_mac, Class};
use crate::{Addresses, EndpointConfig};

/// The stack's own MAC address (the one QEMU's user-mode network uses for its gateway).
const STACK_MAC: [u8; 6] = [0x52, 0x55, 10, 0, 2, 2];

/// Source ports of the connections port forwards open into the guest.
const FORWARD_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// Frames taken from QEMU per turn of the loop before the stack runs.
const FRAME_BATCH: usize = 64;

/// How often the stack relearns the guest's Ethernet address from its traffic: well
/// within smoltcp's neighbor cache lifetime (60 s), so that the stack never has to ask
/// by ARP before answering (an ARP round trip delayed or lost early replies, such as
/// DNS answers).
const GUEST_MAC_REFRESH: std::time::Duration = std::time::Duration::from_secs(20);

/// How long a relayed connection may go without the guest acknowledging data before it
/// is reset (smoltcp's retransmission timeout).
const GUEST_TIMEOUT: StackDuration = StackDuration::from_secs(120);

/// Waits for QEMU on `listener`, then runs the stack until QEMU's side closes or `stop`.
pub async fn serve(
    listener: StdUnixListener,
    socket_path: PathBuf,
    forwards: Vec<(std::net::TcpListener, u16)>,
    config: EndpointConfig,
    mut stop: oneshot::Receiver<()>,
) {
    let sandbox = config.sandbox.clone();
    let listener = match UnixListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!(%sandbox, %err, "network socket");
            return;
        }
    };
    let stream = tokio::select! {
        accepted = listener.accept() => match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%sandbox, %err, "network socket");
                return;
            }
        },
        _ = &mut stop => return,
    };
    drop(listener);
    let _ = std::fs::remove_file(&socket_path);
    let resolver = match dns::host_resolver() {
        Ok(resolver) => Some(resolver),
        Err(err) => {
            tracing::warn!(%sandbox, %err, "no resolver configuration: DNS queries fail");
            None
        }
    };
    let mut stack = Stack::new(config, resolver);
    if let Err(err) = stack.run(stream, forwards, stop).await {
        tracing::warn!(%sandbox, %err, "network endpoint ended");
    }
}

/// Frames between QEMU and smoltcp.
#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let result = f(&mut frame);
        self.0.push(frame);
        result
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // The guest NIC's 1500-byte MTU plus the Ethernet header.
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// What the stack's helper tasks report.
enum Event {
    /// A host-side connect for a held guest SYN ended.
    Connected {
        key: FlowKey,
        result: io::Result<TcpStream>,
    },
    /// A host-side connect for a connection accepted to read its first bytes ended.
    PeekConnected {
        handle: SocketHandle,
        result: io::Result<TcpStream>,
    },
    /// A DNS reply for the guest.
    Answer {
        to: IpEndpoint,
        reply: Vec<u8>,
        name: String,
        qtype: u16,
        pinned: Vec<IpAddr>,
    },
    /// A port forward's host listener accepted a connection for `guest_port`.
    Forwarded { stream: TcpStream, guest_port: u16 },
}

/// A guest connection: the guest's address and port, and where it connected.
type FlowKey = (SocketAddrV4, SocketAddrV4);

/// One relayed connection.
struct Flow {
    /// The guest connection it serves (port forwards have none).
    key: Option<FlowKey>,
    /// The stack's local port of a port forward's connection.
    forward_port: Option<u16>,
    /// Guest bytes to the host socket's writer; `None` once the guest sent its FIN.
    to_host: Option<mpsc::Sender<Vec<u8>>>,
    from_host: mpsc::Receiver<Vec<u8>>,
    /// A chunk from the host and how much of it the socket took.
    pending: Option<(Vec<u8>, usize)>,
    host_closed: bool,
    closing: bool,
    up: u64,
    down: u64,
    tasks: Vec<JoinHandle<()>>,
    /// The guest connection's facts, for decisions on its HTTP requests.
    facts: Option<FlowFacts>,
    /// The requests of a plain HTTP connection whose every request is decided.
    requests: Option<RequestStream>,
    /// The decision's record, logged again with the bytes when the flow ends.
    record: Option<DecisionRecord>,
    /// The 403 for a denied request, sent once the host side has closed.
    denial: Option<Vec<u8>>,
}

/// A guest connection accepted so that its first bytes (TLS SNI, HTTP Host) can decide
/// it: no host side yet.
struct Peeking {
    key: FlowKey,
    facts: FlowFacts,
    bytes: Vec<u8>,
    deadline: std::time::Instant,
    /// Set once decided and allowed: the host-side connect is under way.
    allowed: Option<Allowed>,
}

/// What an allowed peeked connection carries into its relay.
struct Allowed {
    requests: Option<RequestStream>,
    record: Option<DecisionRecord>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Stack {
    iface: Interface,
    queues: Queues,
    sockets: SocketSet<'static>,
    addresses: Addresses,
    egress: Arc<dyn Egress>,
    log: Arc<dyn DecisionLog>,
    sandbox: String,
    flows: HashMap<SocketHandle, Flow>,
    peeking: HashMap<SocketHandle, Peeking>,
    guest_flows: HashSet<FlowKey>,
    /// Guest SYNs waiting for their host-side connect: the newest copy of each.
    held: HashMap<FlowKey, Vec<u8>>,
    /// The decision records of the held SYNs.
    held_records: HashMap<FlowKey, DecisionRecord>,
    dns_socket: SocketHandle,
    dns_inflight: usize,
    resolver: Option<dns::HostResolver>,
    pins: Pins,
    notify: Arc<Notify>,
    events: mpsc::Sender<Event>,
    events_rx: Option<mpsc::Receiver<Event>>,
    next_forward_port: u16,
    /// When the guest's Ethernet address was last taught to the stack.
    guest_mac_taught: Option<std::time::Instant>,
}

impl Stack {
    fn new(config: EndpointConfig, resolver: Option<dns::HostResolver>) -> Stack {
        let addresses = config.addresses;
        let mut queues = Queues::default();
        let hardware = HardwareAddress::Ethernet(EthernetAddress(STACK_MAC));
        let mut iface = Interface::new(Config::new(hardware), &mut queues, Instant::now());
        iface.update_ip_addrs(|ips| {
            for ip in [addresses.gateway, addresses.dns] {
                let _ = ips.push(IpCidr::new(ip.into(), addresses.prefix_len));
            }
        });
        let _ = iface.routes_mut().add_default_ipv4_route(addresses.gateway);
        // Accept packets for every destination: the stack stands in for the whole network.
        iface.set_any_ip(true);

        let mut sockets = SocketSet::new(Vec::new());
        let packets = |count: usize, bytes: usize| {
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; count], vec![0u8; bytes])
        };
        let mut dns_socket = udp::Socket::new(packets(64, 64 * 512), packets(64, 64 * 1500));
        dns_socket
            .bind(IpListenEndpoint {
                addr: Some(addresses.dns.into()),
                port: 53,
            })
            .expect("a fresh UDP socket binds");
        let dns_socket = sockets.add(dns_socket);
        let (events, events_rx) = mpsc::channel(MAX_HALF_OPEN + MAX_DNS_INFLIGHT + 16);
        Stack {
            iface,
            queues,
            sockets,
            addresses,
            egress: config.egress,
            log: config.log,
            sandbox: config.sandbox,
            flows: HashMap::new(),
            peeking: HashMap::new(),
            guest_flows: HashSet::new(),
            held: HashMap::new(),
            held_records: HashMap::new(),
            dns_socket,
            dns_inflight: 0,
            resolver,
            pins: Pins::default(),
            notify: Arc::new(Notify::new()),
            events,
            events_rx: Some(events_rx),
            next_forward_port: *FORWARD_PORTS.start(),
            guest_mac_taught: None,
        }
    }

    async fn run(
        &mut self,
        qemu: UnixStream,
        forwards: Vec<(std::net::TcpListener, u16)>,
        mut stop: oneshot::Receiver<()>,
    ) -> io::Result<()> {
        let (mut qemu_read, mut qemu_write) = qemu.into_split();
        let (frames_tx, mut frames) = mpsc::channel(FRAME_QUEUE);
        let sandbox = self.sandbox.clone();
        let reader = tokio::spawn(async move {
            loop {
                match read_frame(&mut qemu_read).await {
                    Ok(Some(frame)) => {
                        if frames_tx.send(frame).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(err) => {
                        tracing::warn!(%sandbox, %err, "frame from the guest");
                        break;
                    }
                }
            }
        });
        let mut acceptors = Vec::new();
        for (listener, guest_port) in forwards {
            let listener = TcpListener::from_std(listener)?;
            let events = self.events.clone();
            acceptors.push(tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let event = Event::Forwarded { stream, guest_port };
                    if events.send(event).await.is_err() {
                        break;
                    }
                }
            }));
        }
        let mut events = self.events_rx.take().expect("run is called once");
        let notify = self.notify.clone();
        let mut out = Vec::new();
        let result = loop {
            self.poll();
            if !self.queues.tx.is_empty() {
                out.clear();
                for frame in self.queues.tx.drain(..) {
                    encode_frame(&frame, &mut out);
                }
                if let Err(err) = write_frames(&mut qemu_write, &out).await {
                    break Err(err);
                }
                continue;
            }
            let delay = self
                .iface
                .poll_delay(Instant::now(), &self.sockets)
                .map(|d| std::time::Duration::from_micros(d.total_micros()))
                .unwrap_or(std::time::Duration::from_secs(1));
            tokio::select! {
                _ = &mut stop => break Ok(()),
                frame = frames.recv() => {
                    let Some(frame) = frame else { break Ok(()) };
                    self.on_frame(frame);
                    for _ in 1..FRAME_BATCH {
                        match frames.try_recv() {
                            Ok(frame) => self.on_frame(frame),
                            Err(_) => break,
                        }
                    }
                }
                event = events.recv() => {
                    if let Some(event) = event {
                        self.on_event(event);
                    }
                }
                _ = notify.notified() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        };
        reader.abort();
        for acceptor in acceptors {
            acceptor.abort();
        }
        self.flows.clear();
        result
    }

    /// Runs the stack until neither it nor the relays have anything to move.
    fn poll(&mut self) {
        loop {
            let changed = self
                .iface
                .poll(Instant::now(), &mut self.queues, &mut self.sockets)
                != PollResult::None;
            let moved = self.service_flows() | self.service_peeking();
            self.service_dns();
            if !changed && !moved {
                break;
            }
        }
    }

    fn on_frame(&mut self, frame: Vec<u8>) {
        let stale = self
            .guest_mac_taught
            .is_none_or(|taught| taught.elapsed() >= GUEST_MAC_REFRESH);
        if stale {
            if let Some(mac) = guest_mac(&frame, self.addresses.guest) {
                let arp = arp_from_guest(mac, self.addresses.guest, self.addresses.gateway);
                self.queues.rx.push_back(arp);
                self.guest_mac_taught = Some(std::time::Instant::now());
            }
        }
        match classify(&frame, self.addresses.dns) {
            Class::Stack => self.queues.rx.push_back(frame),
            Class::Drop => {}
            Class::Syn { guest, dst } => self.on_syn(frame, guest, dst),
        }
    }

    /// A guest SYN: a retransmission of a known connection, or a new one to decide.
    fn on_syn(&mut self, frame: Vec<u8>, guest: SocketAddrV4, dst: SocketAddrV4) {
        let key = (guest, dst);
        if self.guest_flows.contains(&key) {
            // The stack answers the retransmission with its own SYN-ACK retransmits.
            return;
        }
        if let Some(held) = self.held.get_mut(&key) {
            *held = frame;
            return;
        }
        let waiting = self.held.len() + self.peeking.len();
        if self.flows.len() + waiting >= MAX_FLOWS || waiting >= MAX_HALF_OPEN {
            tracing::warn!(sandbox = %self.sandbox, %guest, %dst, "connection refused: too many connections");
            self.refuse(frame);
            return;
        }
        let facts = FlowFacts {
            dst,
            names: self.pins.names(IpAddr::V4(*dst.ip())),
        };
        let decision = self.egress.decide(&facts, FirstBytes::NotSeen);
        if decision == Decision::NeedPeek {
            self.accept_to_peek(frame, key, facts);
            return;
        }
        let record = self.record(FlowProtocol::Tcp, &facts, &decision, None);
        if !decision.lets_through() {
            self.refuse(frame);
            return;
        }
        if let Some(record) = record {
            self.held_records.insert(key, record);
        }
        let connect = host_target(dst, self.addresses.gateway);
        tracing::debug!(sandbox = %self.sandbox, %dst, names = ?facts.names, %connect, "connection allowed");
        self.held.insert(key, frame);
        let events = self.events.clone();
        tokio::spawn(async move {
            let result = connect_host(connect).await;
            let _ = events.send(Event::Connected { key, result }).await;
        });
    }

    /// Logs a final decision on a flow and returns its record (`None` for
    /// [`Decision::NeedPeek`], which is not final).
    fn record(
        &self,
        protocol: FlowProtocol,
        facts: &FlowFacts,
        decision: &Decision,
        seen: Option<&Peeked>,
    ) -> Option<DecisionRecord> {
        let dst = std::net::SocketAddr::V4(facts.dst);
        let mut record = DecisionRecord::new(now(), &self.sandbox, protocol, dst, decision)?;
        record.names = facts.names.clone();
        match seen {
            Some(Peeked::Tls(TlsPeek::ClientHello { sni })) => record.sni = sni.clone(),
            Some(Peeked::Http(HttpPeek::Request(head))) => set_request(&mut record, head),
            _ => {}
        }
        self.log.record(&record);
        Some(record)
    }

    /// Accepts a guest connection without a host side, to decide it by its first bytes.
    fn accept_to_peek(&mut self, frame: Vec<u8>, key: FlowKey, facts: FlowFacts) {
        let Some(handle) = self.accept(frame, key.1) else {
            return;
        };
        self.guest_flows.insert(key);
        self.peeking.insert(
            handle,
            Peeking {
                key,
                facts,
                bytes: Vec::new(),
                deadline: std::time::Instant::now() + PEEK_TIMEOUT,
                allowed: None,
            },
        );
    }

    /// Gives the stack `frame`, a guest SYN to `dst`, with one socket listening for it;
    /// the socket, unless the SYN did not reach it.
    fn accept(&mut self, frame: Vec<u8>, dst: SocketAddrV4) -> Option<SocketHandle> {
        // The stack must see this SYN with exactly one socket listening for it: run what
        // is queued first, then listen, hand it the SYN and run again.
        self.poll();
        let mut socket = new_tcp_socket();
        let endpoint = IpListenEndpoint {
            addr: Some((*dst.ip()).into()),
            port: dst.port(),
        };
        if socket.listen(endpoint).is_err() {
            self.refuse(frame);
            return None;
        }
        let handle = self.sockets.add(socket);
        self.queues.rx.push_back(frame);
        self.poll();
        if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
            // The SYN did not reach the socket (a bad checksum): the guest will retry.
            self.sockets.remove(handle);
            return None;
        }
        Some(handle)
    }

    /// Reads the first bytes of the connections being peeked at and decides those whose
    /// bytes (or time) are enough. Whether anything changed.
    fn service_peeking(&mut self) -> bool {
        let mut ready = Vec::new();
        for (&handle, peeking) in self.peeking.iter_mut() {
            if peeking.allowed.is_some() {
                continue;
            }
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            while socket.can_recv() && peeking.bytes.len() < peek::MAX_PEEK_BYTES {
                let room = peek::MAX_PEEK_BYTES - peeking.bytes.len();
                let _ = socket.recv(|buffer| {
                    let n = buffer.len().min(room);
                    peeking.bytes.extend_from_slice(&buffer[..n]);
                    (n, ())
                });
            }
            let gone = matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait);
            let seen = peek::peek(&peeking.bytes);
            // The guest may still send while it has not sent its FIN (its first bytes
            // can only follow the handshake, which may not be done yet).
            let guest_may_send = matches!(
                socket.state(),
                tcp::State::SynReceived
                    | tcp::State::Established
                    | tcp::State::FinWait1
                    | tcp::State::FinWait2
            );
            let waiting = seen == Peeked::NeedMore
                && guest_may_send
                && std::time::Instant::now() < peeking.deadline;
            if gone {
                ready.push((handle, None));
            } else if !waiting {
                ready.push((handle, Some(seen)));
            }
        }
        let changed = !ready.is_empty();
        for (handle, seen) in ready {
            match seen {
                Some(seen) => self.decide_peeked(handle, seen),
                None => self.end_peeking(handle),
            }
        }
        changed
    }

    fn end_peeking(&mut self, handle: SocketHandle) {
        if let Some(peeking) = self.peeking.remove(&handle) {
            self.guest_flows.remove(&peeking.key);
        }
        self.sockets.remove(handle);
    }

    /// Decides a peeked connection by what its first bytes showed: a denied one is
    /// reset (or, for HTTP, answered 403), an allowed one gets its host side.
    fn decide_peeked(&mut self, handle: SocketHandle, seen: Peeked) {
        let Some(facts) = self.peeking.get(&handle).map(|p| p.facts.clone()) else {
            return;
        };
        let (protocol, decision) = match &seen {
            Peeked::Http(HttpPeek::Request(head)) => {
                let decision = match self.egress.decide_request(&facts, &request_of(head)) {
                    Some(decision) => decision,
                    None => self.egress.decide(&facts, seen.first_bytes()),
                };
                (FlowProtocol::Http, decision)
            }
            Peeked::Tls(TlsPeek::ClientHello { .. }) => (
                FlowProtocol::Tls,
                self.egress.decide(&facts, seen.first_bytes()),
            ),
            _ => (
                FlowProtocol::Tcp,
                self.egress.decide(&facts, FirstBytes::Other),
            ),
        };
        // A decider that still asks for bytes it cannot have: nothing named the host.
        let decision = match decision {
            Decision::NeedPeek => Decision::Deny(kiln_policy::DenyReason::NoName {
                dst: std::net::SocketAddr::V4(facts.dst),
            }),
            decision => decision,
        };
        let record = self.record(protocol, &facts, &decision, Some(&seen));
        if let Decision::Deny(reason) = &decision {
            let peeking = self.peeking.remove(&handle).expect("looked up above");
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            if protocol == FlowProtocol::Http {
                // The socket sends the 403, then closes, as a flow with no host side.
                let _ = socket.send_slice(&forbidden(&self.egress.rule_set(), &reason.to_string()));
                socket.close();
                let flow = self.relay(None, Some(peeking.key), None);
                self.flows.insert(handle, flow);
            } else {
                socket.abort();
                self.guest_flows.remove(&peeking.key);
            }
            return;
        }
        let requests = (protocol == FlowProtocol::Http && self.egress.inspects_requests())
            .then(RequestStream::after_first_decision);
        if let Some(peeking) = self.peeking.get_mut(&handle) {
            peeking.allowed = Some(Allowed { requests, record });
        }
        let connect = host_target(facts.dst, self.addresses.gateway);
        let events = self.events.clone();
        tokio::spawn(async move {
            let result = connect_host(connect).await;
            let _ = events.send(Event::PeekConnected { handle, result }).await;
        });
    }

    /// A peeked connection's host side is open (or failed): relay it, first bytes first.
    fn on_peek_connected(&mut self, handle: SocketHandle, result: io::Result<TcpStream>) {
        let Some(peeking) = self.peeking.remove(&handle) else {
            return;
        };
        let allowed = peeking.allowed.expect("connected only once allowed");
        let stream = match result {
            Ok(stream) => stream,
            Err(err) => {
                tracing::info!(sandbox = %self.sandbox, dst = %peeking.facts.dst, %err, "connection reset: the host-side connect failed");
                self.sockets.get_mut::<tcp::Socket>(handle).abort();
                self.guest_flows.remove(&peeking.key);
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut flow = self.relay(Some(stream), Some(peeking.key), None);
        flow.facts = Some(peeking.facts);
        flow.record = allowed.record;
        flow.requests = allowed.requests;
        if !peeking.bytes.is_empty() {
            let (bytes, denied) = self.inspect(&mut flow, &peeking.bytes);
            if let Some(to_host) = &flow.to_host {
                flow.up += bytes.len() as u64;
                // The channel is new and empty: the first chunk fits.
                let _ = to_host.try_send(bytes);
            }
            if denied {
                flow.to_host = None;
            }
        }
        self.flows.insert(handle, flow);
    }

    /// Runs guest bytes through the flow's request stream (see [`Deciders::inspect`]).
    fn inspect(&self, flow: &mut Flow, bytes: &[u8]) -> (Vec<u8>, bool) {
        self.deciders().inspect(flow, bytes)
    }

    fn deciders(&self) -> Deciders<'_> {
        Deciders {
            egress: &*self.egress,
            log: &*self.log,
            sandbox: &self.sandbox,
        }
    }

    /// Hands a SYN to the stack with no socket listening for it: the stack resets it.
    fn refuse(&mut self, frame: Vec<u8>) {
        self.queues.rx.push_back(frame);
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected { key, result } => self.on_connected(key, result),
            Event::PeekConnected { handle, result } => self.on_peek_connected(handle, result),
            Event::Answer {
                to,
                reply,
                name,
                qtype,
                pinned,
            } => {
                self.dns_inflight -= 1;
                let mut record = dns_record(
                    &self.sandbox,
                    self.addresses.dns,
                    &name,
                    qtype,
                    &DnsDecision::Resolve,
                );
                record.answers = pinned.clone();
                self.log.record(&record);
                for address in &pinned {
                    self.pins.pin(*address, &name);
                }
                let socket = self.sockets.get_mut::<udp::Socket>(self.dns_socket);
                let _ = socket.send_slice(&reply, to);
            }
            Event::Forwarded { stream, guest_port } => self.on_forwarded(stream, guest_port),
        }
    }

    fn on_connected(&mut self, key: FlowKey, result: io::Result<TcpStream>) {
        let Some(frame) = self.held.remove(&key) else {
            return;
        };
        let record = self.held_records.remove(&key);
        let stream = match result {
            Ok(stream) => stream,
            Err(err) => {
                tracing::info!(sandbox = %self.sandbox, dst = %key.1, %err, "connection refused: the host-side connect failed");
                self.refuse(frame);
                return;
            }
        };
        let Some(handle) = self.accept(frame, key.1) else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let mut flow = self.relay(Some(stream), Some(key), None);
        flow.record = record;
        self.guest_flows.insert(key);
        self.flows.insert(handle, flow);
    }

    fn on_forwarded(&mut self, stream: TcpStream, guest_port: u16) {
        if self.flows.len() + self.held.len() >= MAX_FLOWS {
            tracing::warn!(sandbox = %self.sandbox, guest_port, "port forward refused: too many connections");
            return;
        }
        let Some(local_port) = self.forward_port() else {
            return;
        };
        let mut socket = new_tcp_socket();
        let remote = IpEndpoint::new(self.addresses.guest.into(), guest_port);
        let local = IpEndpoint::new(self.addresses.gateway.into(), local_port);
        if socket.connect(self.iface.context(), remote, local).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        let _ = stream.set_nodelay(true);
        let flow = self.relay(Some(stream), None, Some(local_port));
        self.flows.insert(handle, flow);
    }

    /// A source port for a port forward's connection that no open one uses.
    fn forward_port(&mut self) -> Option<u16> {
        let used: HashSet<u16> = self.flows.values().filter_map(|f| f.forward_port).collect();
        for _ in FORWARD_PORTS {
            let port = self.next_forward_port;
            self.next_forward_port = if port == *FORWARD_PORTS.end() {
                *FORWARD_PORTS.start()
            } else {
                port + 1
            };
            if !used.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    /// Starts the host side's reader and writer for a new flow (`None`: a flow with no
    /// host side, which only finishes sending what its socket holds).
    fn relay(
        &self,
        stream: Option<TcpStream>,
        key: Option<FlowKey>,
        forward_port: Option<u16>,
    ) -> Flow {
        let (to_host, mut to_host_rx) = mpsc::channel::<Vec<u8>>(FLOW_CHUNKS);
        let (from_host_tx, from_host) = mpsc::channel(FLOW_CHUNKS);
        let tasks = match stream {
            Some(stream) => {
                let (mut read, mut write) = stream.into_split();
                let notify = self.notify.clone();
                let reader = tokio::spawn(async move {
                    loop {
                        let mut chunk = vec![0u8; FLOW_CHUNK];
                        match read.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                chunk.truncate(n);
                                if from_host_tx.send(chunk).await.is_err() {
                                    break;
                                }
                                notify.notify_one();
                            }
                        }
                    }
                    drop(from_host_tx);
                    notify.notify_one();
                });
                let notify = self.notify.clone();
                let writer = tokio::spawn(async move {
                    while let Some(chunk) = to_host_rx.recv().await {
                        notify.notify_one();
                        if write.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                    let _ = write.shutdown().await;
                });
                vec![reader, writer]
            }
            None => Vec::new(),
        };
        Flow {
            key,
            forward_port,
            to_host: if tasks.is_empty() {
                None
            } else {
                Some(to_host)
            },
            from_host,
            pending: None,
            host_closed: tasks.is_empty(),
            closing: tasks.is_empty(),
            up: 0,
            down: 0,
            tasks,
            facts: None,
            requests: None,
            record: None,
            denial: None,
        }
    }

    /// Moves data between each flow's socket and its host side; ends finished flows.
    /// Whether anything moved.
    fn service_flows(&mut self) -> bool {
        let mut moved = false;
        let mut ended = Vec::new();
        let deciders = Deciders {
            egress: &*self.egress,
            log: &*self.log,
            sandbox: &self.sandbox,
        };
        for (&handle, flow) in self.flows.iter_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            moved |= move_flow(flow, socket, &deciders);
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                ended.push(handle);
            }
        }
        for handle in ended {
            self.sockets.remove(handle);
            if let Some(mut flow) = self.flows.remove(&handle) {
                if let Some(key) = flow.key {
                    self.guest_flows.remove(&key);
                }
                if let Some(mut record) = flow.record.take() {
                    record.time = now();
                    record.bytes_up = Some(flow.up);
                    record.bytes_down = Some(flow.down);
                    self.log.record(&record);
                }
            }
            moved = true;
        }
        moved
    }

    /// Takes the guest's DNS queries and starts answering them.
    fn service_dns(&mut self) {
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns_socket);
        while socket.can_recv() {
            let Ok((datagram, meta)) = socket.recv() else {
                break;
            };
            let to = meta.endpoint;
            let question = match Question::parse(datagram) {
                Ok(question) => question,
                Err(reply) => {
                    if let Some(reply) = reply {
                        let _ = socket.send_slice(&reply, to);
                    }
                    continue;
                }
            };
            let resolver = match &self.resolver {
                Some(resolver) if self.dns_inflight < MAX_DNS_INFLIGHT => resolver.clone(),
                _ => {
                    let reply = question.failure(dns::ResponseCode::ServFail);
                    let _ = socket.send_slice(&reply, to);
                    continue;
                }
            };
            let name = question.name();
            let qtype = u16::from(question.record_type());
            let decision = match question.record_type() {
                RecordType::A | RecordType::AAAA => self.egress.decide_dns(&name, qtype),
                other => DnsDecision::Refused {
                    reason: format!("kiln's resolver answers A and AAAA queries only, not {other}"),
                },
            };
            let code = match &decision {
                DnsDecision::Resolve => None,
                DnsDecision::NxDomain { .. } => Some(dns::ResponseCode::NXDomain),
                DnsDecision::Refused { .. } => Some(dns::ResponseCode::Refused),
            };
            if let Some(code) = code {
                let _ = socket.send_slice(&question.failure(code), to);
                self.log.record(&dns_record(
                    &self.sandbox,
                    self.addresses.dns,
                    &name,
                    qtype,
                    &decision,
                ));
                continue;
            }
            self.dns_inflight += 1;
            let events = self.events.clone();
            let gateway = self.addresses.gateway;
            tokio::spawn(async move {
                let (reply, pinned) = dns::answer(&resolver, &question, gateway).await;
                let event = Event::Answer {
                    to,
                    reply,
                    name,
                    qtype,
                    pinned,
                };
                let _ = events.send(event).await;
            });
        }
    }
}

/// What decides and logs the requests of plain HTTP connections.
struct Deciders<'a> {
    egress: &'a dyn Egress,
    log: &'a dyn DecisionLog,
    sandbox: &'a str,
}

impl Deciders<'_> {
    /// Runs guest bytes through the flow's request stream, deciding (and logging) each
    /// request head. Returns the bytes that may go to the host and whether a request
    /// was denied: then the bytes are those before it, and the flow answers the 403 once
    /// the host has answered them.
    fn inspect(&self, flow: &mut Flow, bytes: &[u8]) -> (Vec<u8>, bool) {
        let (Some(requests), Some(facts)) = (flow.requests.as_mut(), flow.facts.as_ref()) else {
            return (bytes.to_vec(), false);
        };
        let mut decided = false;
        let mut decide = |head: &RequestHead| {
            decided = true;
            let decision = self
                .egress
                .decide_request(facts, &request_of(head))
                .unwrap_or(Decision::Deny(kiln_policy::DenyReason::NoName {
                    dst: std::net::SocketAddr::V4(facts.dst),
                }));
            let seen = Peeked::Http(HttpPeek::Request(head.clone()));
            self.log_decision(facts, &decision, Some(&seen), None);
            match decision {
                Decision::Deny(reason) => Err(reason.to_string()),
                _ => Ok(()),
            }
        };
        match requests.feed(bytes, &mut decide) {
            Ok(bytes) => (bytes, false),
            Err((before, reason)) => {
                if !decided {
                    // A malformed request: no decision was asked, the refusal is logged.
                    let decision = Decision::Deny(kiln_policy::DenyReason::NoName {
                        dst: std::net::SocketAddr::V4(facts.dst),
                    });
                    self.log_decision(facts, &decision, None, Some(&reason));
                }
                let response = forbidden(&self.egress.rule_set(), &reason);
                deny_request(flow, response);
                (before, true)
            }
        }
    }

    fn log_decision(
        &self,
        facts: &FlowFacts,
        decision: &Decision,
        seen: Option<&Peeked>,
        reason: Option<&str>,
    ) {
        let dst = std::net::SocketAddr::V4(facts.dst);
        let Some(mut record) =
            DecisionRecord::new(now(), self.sandbox, FlowProtocol::Http, dst, decision)
        else {
            return;
        };
        record.names = facts.names.clone();
        if let Some(Peeked::Http(HttpPeek::Request(head))) = seen {
            set_request(&mut record, head);
        }
        if let Some(reason) = reason {
            record.reason = Some(reason.to_owned());
        }
        self.log.record(&record);
    }
}

/// Leaves `response` as what the guest gets once the host has answered the requests
/// before the denied one (the caller ends the host side's input).
fn deny_request(flow: &mut Flow, response: Vec<u8>) {
    flow.denial = Some(response);
    flow.requests = None;
}

/// The 403 a denied HTTP request gets: it names kiln, the rule set and the reason.
fn forbidden(rule_set: &str, reason: &str) -> Vec<u8> {
    let body = format!("kiln: request denied by {rule_set}: {reason}\n");
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\nX-Kiln-Denied: network policy\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// kiln-policy's view of a parsed request head.
fn request_of(head: &RequestHead) -> kiln_policy::Request<'_> {
    kiln_policy::Request {
        method: &head.method,
        path: &head.path,
        query: head.query.as_deref(),
        host: head.host.as_deref(),
    }
}

fn set_request(record: &mut DecisionRecord, head: &RequestHead) {
    record.host = head.host.clone();
    record.method = Some(head.method.clone());
    record.path = Some(match &head.query {
        Some(query) => format!("{}?{query}", head.path),
        None => head.path.clone(),
    });
}

/// Opens the host side of an allowed connection, within [`CONNECT_TIMEOUT`].
async fn connect_host(target: std::net::SocketAddr) -> io::Result<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(result) => result,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// The record of a DNS query to the resolver at `resolver`.
fn dns_record(
    sandbox: &str,
    resolver: std::net::Ipv4Addr,
    name: &str,
    qtype: u16,
    decision: &DnsDecision,
) -> DecisionRecord {
    let resolver = std::net::SocketAddr::from((resolver, 53));
    DecisionRecord::dns(now(), sandbox, resolver, name, qtype, decision)
}

/// The time now, as decision records carry it.
fn now() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    kiln_policy::rfc3339_utc(millis)
}

fn new_tcp_socket() -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; FLOW_BUFFER]),
        tcp::SocketBuffer::new(vec![0u8; FLOW_BUFFER]),
    );
    socket.set_timeout(Some(GUEST_TIMEOUT));
    socket.set_nagle_enabled(false);
    socket
}

/// Moves what can move between one flow's socket and its host side.
fn move_flow(flow: &mut Flow, socket: &mut tcp::Socket<'_>, deciders: &Deciders<'_>) -> bool {
    let mut moved = false;
    // Guest to host, while the writer has room.
    if let Some(to_host) = flow.to_host.clone() {
        while socket.can_recv() {
            match to_host.try_reserve() {
                Ok(permit) => {
                    let chunk = socket.recv(|buffer| {
                        let n = buffer.len().min(FLOW_CHUNK);
                        (n, buffer[..n].to_vec())
                    });
                    let Ok(chunk) = chunk else { break };
                    moved = true;
                    // Only inspected HTTP connections pay for a look at their bytes.
                    let (chunk, denied) = if flow.requests.is_some() {
                        deciders.inspect(flow, &chunk)
                    } else {
                        (chunk, false)
                    };
                    flow.up += chunk.len() as u64;
                    permit.send(chunk);
                    if denied {
                        // The host gets no more: it answers what it has, then closes.
                        flow.to_host = None;
                        return true;
                    }
                }
                Err(TrySendError::Full(())) => break,
                Err(TrySendError::Closed(())) => {
                    // The host side failed: the guest learns it by a reset.
                    socket.abort();
                    return true;
                }
            }
        }
        let guest_finished = matches!(
            socket.state(),
            tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::Closed
        );
        if guest_finished && !socket.can_recv() {
            // The guest sent its FIN: the writer shuts the host side's write half.
            flow.to_host = None;
            moved = true;
        }
    }
    // Host to guest, while the socket has room.
    loop {
        if flow.pending.is_none() {
            match flow.from_host.try_recv() {
                Ok(chunk) => flow.pending = Some((chunk, 0)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => match flow.denial.take() {
                    // The host answered the requests before the denied one: the 403
                    // answers that one, in order.
                    Some(response) => flow.pending = Some((response, 0)),
                    None => {
                        flow.host_closed = true;
                        break;
                    }
                },
            }
        }
        if !socket.can_send() {
            break;
        }
        let Some((chunk, offset)) = flow.pending.as_mut() else {
            break;
        };
        let n = socket.send_slice(&chunk[*offset..]).unwrap_or(0);
        *offset += n;
        flow.down += n as u64;
        moved |= n > 0;
        if *offset < chunk.len() {
            break;
        }
        flow.pending = None;
    }
    if flow.host_closed && flow.pending.is_none() && !flow.closing && socket.may_send() {
        socket.close();
        flow.closing = true;
        moved = true;
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests::tcp_frame;
    use kiln_policy::{Allowed, Decision, DenyReason};
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, TcpControl, TcpPacket};
    use std::net::Ipv4Addr;

    struct Fixed(Decision);

    impl Egress for Fixed {
        fn decide(&self, _: &FlowFacts, _: FirstBytes<'_>) -> Decision {
            self.0.clone()
        }

        fn rule_set(&self) -> String {
            "a fixed decision".into()
        }
    }

    struct Discard;

    impl DecisionLog for Discard {
        fn record(&self, _: &DecisionRecord) {}
    }

    fn stack(decision: Decision) -> Stack {
        stack_with(Arc::new(Fixed(decision)))
    }

    fn stack_with(egress: Arc<dyn Egress>) -> Stack {
        let config = EndpointConfig {
            addresses: Addresses {
                guest: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 0, 2, 2),
                dns: Ipv4Addr::new(10, 0, 2, 3),
            },
            forwards: Vec::new(),
            egress,
            log: Arc::new(Discard),
            sandbox: "test".into(),
        };
        Stack::new(config, None)
    }

    fn syn(port: u16) -> Vec<u8> {
        let dst = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), port);
        tcp_frame(dst, TcpControl::Syn, false)
    }

    /// The guest ports the stack sent a reset to.
    fn resets(stack: &mut Stack) -> Vec<u16> {
        stack
            .queues
            .tx
            .drain(..)
            .filter_map(|frame| {
                let eth = EthernetFrame::new_checked(&frame[..]).ok()?;
                let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
                let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
                tcp.rst().then(|| tcp.src_port())
            })
            .collect()
    }

    #[tokio::test]
    async fn a_denied_connection_is_reset_at_once() {
        let range = kiln_policy::refused_range("10.1.2.3".parse().unwrap(), &[]).unwrap();
        let mut stack = stack(Decision::Deny(DenyReason::Refused(range)));
        stack.on_frame(syn(80));
        stack.poll();
        assert_eq!(resets(&mut stack), [80]);
        assert!(stack.held.is_empty() && stack.flows.is_empty());
    }

    /// Needs the first bytes of every connection, and denies whatever they are.
    struct FirstBytesDecide;

    impl Egress for FirstBytesDecide {
        fn decide(&self, _: &FlowFacts, first_bytes: FirstBytes<'_>) -> Decision {
            match first_bytes {
                FirstBytes::NotSeen => Decision::NeedPeek,
                _ => Decision::Deny(DenyReason::HostGateway { port: 1 }),
            }
        }

        fn rule_set(&self) -> String {
            "first bytes decide".into()
        }
    }

    #[tokio::test]
    async fn a_connection_its_first_bytes_decide_is_accepted_and_waits_for_them() {
        let mut stack = stack_with(Arc::new(FirstBytesDecide));
        stack.on_frame(syn(80));
        stack.poll();
        // Answered with a SYN-ACK, not a reset, and not decided before any byte came.
        assert!(resets(&mut stack).is_empty());
        assert_eq!(stack.peeking.len(), 1);
        assert!(stack.flows.is_empty() && stack.held.is_empty());
        assert!(stack.peeking.values().all(|p| p.allowed.is_none()));
    }

    #[tokio::test]
    async fn half_open_connections_are_bounded_and_the_rest_reset() {
        let mut stack = stack(Decision::Allow(Allowed::Internet));
        for port in 1..=MAX_HALF_OPEN as u16 {
            stack.on_frame(syn(port));
        }
        stack.poll();
        // Allowed connections wait for their host side without an answer.
        assert!(resets(&mut stack).is_empty());
        assert_eq!(stack.held.len(), MAX_HALF_OPEN);
        // A retransmitted SYN of a held connection is no new one.
        stack.on_frame(syn(1));
        assert_eq!(stack.held.len(), MAX_HALF_OPEN);
        let over = MAX_HALF_OPEN as u16 + 1;
        stack.on_frame(syn(over));
        stack.poll();
        assert_eq!(resets(&mut stack), [over]);
        assert_eq!(stack.held.len(), MAX_HALF_OPEN);
    }
}
