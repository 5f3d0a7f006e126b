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

use crate::dns::{self, Pins, Question};
use crate::egress::{host_target, Egress, FlowFacts};
use crate::frame::{encode_frame, read_frame, write_frames};
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
    /// A DNS reply for the guest.
    Answer {
        to: IpEndpoint,
        reply: Vec<u8>,
        name: String,
        pinned: Vec<IpAddr>,
    },
    /// A port forward's host listener accepted a connection for `guest_port`.
    Forwarded { stream: TcpStream, guest_port: u16 },
}

/// A guest connection: the guest's address and port, and where it connected.
type FlowKey = (SocketAddrV4, SocketAddrV4);

/// One relayed connection.
struct Flow {
    /// For log lines: `guest -> destination` or `forward :host -> guest`.
    label: String,
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
    tasks: [JoinHandle<()>; 2],
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
    sandbox: String,
    flows: HashMap<SocketHandle, Flow>,
    guest_flows: HashSet<FlowKey>,
    /// Guest SYNs waiting for their host-side connect: the newest copy of each.
    held: HashMap<FlowKey, Vec<u8>>,
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
            sandbox: config.sandbox,
            flows: HashMap::new(),
            guest_flows: HashSet::new(),
            held: HashMap::new(),
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
            let moved = self.service_flows();
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
        if self.flows.len() + self.held.len() >= MAX_FLOWS || self.held.len() >= MAX_HALF_OPEN {
            tracing::warn!(sandbox = %self.sandbox, %guest, %dst, "connection refused: too many connections");
            self.refuse(frame);
            return;
        }
        let facts = FlowFacts {
            dst,
            names: self.pins.names(IpAddr::V4(*dst.ip())),
        };
        let decision = self.egress.decide(&facts);
        if !decision.lets_through() {
            let reason = match &decision {
                kiln_policy::Decision::Deny(reason) => reason.to_string(),
                // The default mode never asks for a flow's first bytes; a decider that
                // does needs an endpoint that reads them before connecting.
                _ => "the decision needs the flow's first bytes, which this endpoint does not read"
                    .into(),
            };
            tracing::info!(sandbox = %self.sandbox, %dst, names = ?facts.names, %reason, "connection denied");
            self.refuse(frame);
            return;
        }
        let connect = host_target(dst, self.addresses.gateway);
        tracing::debug!(sandbox = %self.sandbox, %dst, names = ?facts.names, %connect, "connection allowed");
        self.held.insert(key, frame);
        let events = self.events.clone();
        tokio::spawn(async move {
            let result =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(connect)).await {
                    Ok(result) => result,
                    Err(_) => Err(io::ErrorKind::TimedOut.into()),
                };
            let _ = events.send(Event::Connected { key, result }).await;
        });
    }

    /// Hands a SYN to the stack with no socket listening for it: the stack resets it.
    fn refuse(&mut self, frame: Vec<u8>) {
        self.queues.rx.push_back(frame);
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected { key, result } => self.on_connected(key, result),
            Event::Answer {
                to,
                reply,
                name,
                pinned,
            } => {
                self.dns_inflight -= 1;
                tracing::info!(sandbox = %self.sandbox, %name, answers = ?pinned, "dns query");
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
        let (guest, dst) = key;
        let stream = match result {
            Ok(stream) => stream,
            Err(err) => {
                tracing::info!(sandbox = %self.sandbox, %dst, %err, "connection refused: the host-side connect failed");
                self.refuse(frame);
                return;
            }
        };
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
            return;
        }
        let handle = self.sockets.add(socket);
        self.queues.rx.push_back(frame);
        self.poll();
        if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
            // The SYN did not reach the socket (a bad checksum): the guest will retry.
            self.sockets.remove(handle);
            return;
        }
        let _ = stream.set_nodelay(true);
        let flow = self.relay(stream, format!("{guest} -> {dst}"), Some(key), None);
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
        let label = format!("forward -> guest port {guest_port}");
        let flow = self.relay(stream, label, None, Some(local_port));
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

    /// Starts the host side's reader and writer for a new flow.
    fn relay(
        &self,
        stream: TcpStream,
        label: String,
        key: Option<FlowKey>,
        forward_port: Option<u16>,
    ) -> Flow {
        let (mut read, mut write) = stream.into_split();
        let (to_host, mut to_host_rx) = mpsc::channel::<Vec<u8>>(FLOW_CHUNKS);
        let (from_host_tx, from_host) = mpsc::channel(FLOW_CHUNKS);
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
        Flow {
            label,
            key,
            forward_port,
            to_host: Some(to_host),
            from_host,
            pending: None,
            host_closed: false,
            closing: false,
            up: 0,
            down: 0,
            tasks: [reader, writer],
        }
    }

    /// Moves data between each flow's socket and its host side; ends finished flows.
    /// Whether anything moved.
    fn service_flows(&mut self) -> bool {
        let mut moved = false;
        let mut ended = Vec::new();
        for (&handle, flow) in self.flows.iter_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            moved |= move_flow(flow, socket);
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                ended.push(handle);
            }
        }
        for handle in ended {
            self.sockets.remove(handle);
            if let Some(flow) = self.flows.remove(&handle) {
                if let Some(key) = flow.key {
                    self.guest_flows.remove(&key);
                }
                tracing::debug!(sandbox = %self.sandbox, flow = %flow.label, up = flow.up, down = flow.down, "connection ended");
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
            tracing::debug!(sandbox = %self.sandbox, name = %question.name(), record_type = %question.record_type(), "dns query received");
            self.dns_inflight += 1;
            let events = self.events.clone();
            let gateway = self.addresses.gateway;
            tokio::spawn(async move {
                let (reply, pinned) = dns::answer(&resolver, &question, gateway).await;
                let name = question.name();
                let event = Event::Answer {
                    to,
                    reply,
                    name,
                    pinned,
                };
                let _ = events.send(event).await;
            });
        }
    }
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
fn move_flow(flow: &mut Flow, socket: &mut tcp::Socket<'_>) -> bool {
    let mut moved = false;
    // Guest to host, while the writer has room.
    if let Some(to_host) = &flow.to_host {
        while socket.can_recv() {
            match to_host.try_reserve() {
                Ok(permit) => {
                    let chunk = socket.recv(|buffer| {
                        let n = buffer.len().min(FLOW_CHUNK);
                        (n, buffer[..n].to_vec())
                    });
                    let Ok(chunk) = chunk else { break };
                    flow.up += chunk.len() as u64;
                    permit.send(chunk);
                    moved = true;
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
                Err(TryRecvError::Disconnected) => {
                    flow.host_closed = true;
                    break;
                }
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
        fn decide(&self, _: &FlowFacts) -> Decision {
            self.0.clone()
        }
    }

    fn stack(decision: Decision) -> Stack {
        let config = EndpointConfig {
            addresses: Addresses {
                guest: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 0, 2, 2),
                dns: Ipv4Addr::new(10, 0, 2, 3),
            },
            forwards: Vec::new(),
            egress: Arc::new(Fixed(decision)),
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
