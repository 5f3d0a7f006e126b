//! A look at each frame from the guest before the stack sees it: which frames the stack
//! may have at all, and which open a new TCP connection (they wait for a decision).

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};

/// What to do with one frame from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// ARP, TCP that is not a new connection, DNS to the resolver: the stack handles it.
    Stack,
    /// A TCP SYN without ACK: a new connection from `guest` to `dst`.
    Syn {
        guest: SocketAddrV4,
        dst: SocketAddrV4,
    },
    /// Everything else: other UDP, ICMP, IPv6, fragments, malformed frames.
    Drop,
}

/// Classifies `frame`; `dns` is the resolver address (UDP port 53 there is served).
pub fn classify(frame: &[u8], dns: Ipv4Addr) -> Class {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Class::Drop;
    };
    match eth.ethertype() {
        EthernetProtocol::Arp => return Class::Stack,
        EthernetProtocol::Ipv4 => {}
        _ => return Class::Drop,
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return Class::Drop;
    };
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Class::Drop;
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    match ip.next_header() {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                return Class::Drop;
            };
            if tcp.syn() && !tcp.ack() && !tcp.rst() {
                Class::Syn {
                    guest: SocketAddrV4::new(src, tcp.src_port()),
                    dst: SocketAddrV4::new(dst, tcp.dst_port()),
                }
            } else {
                Class::Stack
            }
        }
        IpProtocol::Udp => match UdpPacket::new_checked(ip.payload()) {
            Ok(udp) if dst == dns && udp.dst_port() == 53 => Class::Stack,
            _ => Class::Drop,
        },
        _ => Class::Drop,
    }
}

/// The Ethernet address `frame` came from, when it is an IPv4 packet from `guest`.
pub fn guest_mac(frame: &[u8], guest: Ipv4Addr) -> Option<EthernetAddress> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    (ip.src_addr() == guest).then(|| eth.src_addr())
}

/// An ARP request from the guest (`mac`, `guest`) for `target`, as if the guest had sent
/// it: the stack learns the guest's address from it, so its replies never wait on ARP.
pub fn arp_from_guest(mac: EthernetAddress, guest: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: mac,
        source_protocol_addr: guest,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let eth = EthernetRepr {
        src_addr: mac,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    let mut eth_frame = EthernetFrame::new_unchecked(&mut frame);
    eth.emit(&mut eth_frame);
    arp.emit(&mut ArpPacket::new_unchecked(eth_frame.payload_mut()));
    frame
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetRepr, IpAddress, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber,
        UdpRepr,
    };

    const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    fn ipv4_frame(dst: Ipv4Addr, protocol: IpProtocol, payload: &[u8]) -> Vec<u8> {
        let eth = EthernetRepr {
            src_addr: EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            dst_addr: EthernetAddress([0x52, 0x55, 10, 0, 2, 2]),
            ethertype: EthernetProtocol::Ipv4,
        };
        let ip = Ipv4Repr {
            src_addr: GUEST,
            dst_addr: dst,
            next_header: protocol,
            payload_len: payload.len(),
            hop_limit: 64,
        };
        let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + payload.len()];
        let mut eth_frame = EthernetFrame::new_unchecked(&mut frame);
        eth.emit(&mut eth_frame);
        let mut packet = Ipv4Packet::new_unchecked(eth_frame.payload_mut());
        ip.emit(&mut packet, &ChecksumCapabilities::default());
        packet.payload_mut().copy_from_slice(payload);
        frame
    }

    /// A TCP segment from the guest to `dst` with `control` (and an ACK when `ack`).
    pub fn tcp_frame(dst: SocketAddrV4, control: TcpControl, ack: bool) -> Vec<u8> {
        let repr = TcpRepr {
            src_port: 40000,
            dst_port: dst.port(),
            control,
            seq_number: TcpSeqNumber(1),
            ack_number: ack.then_some(TcpSeqNumber(1)),
            window_len: 1024,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let mut segment = vec![0u8; repr.buffer_len()];
        repr.emit(
            &mut TcpPacket::new_unchecked(&mut segment),
            &IpAddress::Ipv4(GUEST),
            &IpAddress::Ipv4(*dst.ip()),
            &ChecksumCapabilities::default(),
        );
        ipv4_frame(*dst.ip(), IpProtocol::Tcp, &segment)
    }

    fn udp_frame(dst: Ipv4Addr, port: u16) -> Vec<u8> {
        let repr = UdpRepr {
            src_port: 5000,
            dst_port: port,
        };
        let mut datagram = vec![0u8; repr.header_len() + 4];
        repr.emit(
            &mut UdpPacket::new_unchecked(&mut datagram),
            &IpAddress::Ipv4(GUEST),
            &IpAddress::Ipv4(dst),
            4,
            |payload| payload.copy_from_slice(b"abcd"),
            &ChecksumCapabilities::default(),
        );
        ipv4_frame(dst, IpProtocol::Udp, &datagram)
    }

    #[test]
    fn a_syn_is_a_new_connection_and_the_rest_of_tcp_goes_to_the_stack() {
        let dst = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 80);
        assert_eq!(
            classify(&tcp_frame(dst, TcpControl::Syn, false), DNS),
            Class::Syn {
                guest: SocketAddrV4::new(GUEST, 40000),
                dst
            }
        );
        // A SYN-ACK (the guest answering a port forward) and plain segments are not new.
        assert_eq!(
            classify(&tcp_frame(dst, TcpControl::Syn, true), DNS),
            Class::Stack
        );
        assert_eq!(
            classify(&tcp_frame(dst, TcpControl::None, true), DNS),
            Class::Stack
        );
        assert_eq!(
            classify(&tcp_frame(dst, TcpControl::Rst, false), DNS),
            Class::Stack
        );
    }

    #[test]
    fn the_guest_is_known_by_its_frames_and_announced_by_arp() {
        let frame = udp_frame(DNS, 53);
        let mac = guest_mac(&frame, GUEST).unwrap();
        assert_eq!(mac, EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(guest_mac(&frame, Ipv4Addr::new(10, 0, 2, 16)), None);
        let arp = arp_from_guest(mac, GUEST, DNS);
        assert_eq!(classify(&arp, DNS), Class::Stack);
        let eth = EthernetFrame::new_checked(&arp[..]).unwrap();
        let repr = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
        assert!(matches!(
            repr,
            ArpRepr::EthernetIpv4 { source_protocol_addr, target_protocol_addr, .. }
                if source_protocol_addr == GUEST && target_protocol_addr == DNS
        ));
    }

    #[test]
    fn only_dns_to_the_resolver_crosses_as_udp() {
        assert_eq!(classify(&udp_frame(DNS, 53), DNS), Class::Stack);
        assert_eq!(classify(&udp_frame(DNS, 54), DNS), Class::Drop);
        assert_eq!(
            classify(&udp_frame(Ipv4Addr::new(8, 8, 8, 8), 53), DNS),
            Class::Drop
        );
        assert_eq!(
            classify(&ipv4_frame(DNS, IpProtocol::Icmp, &[8, 0, 0, 0]), DNS),
            Class::Drop
        );
    }

    #[test]
    fn short_and_foreign_frames_are_dropped() {
        assert_eq!(classify(&[], DNS), Class::Drop);
        assert_eq!(classify(&[0u8; 13], DNS), Class::Drop);
        let mut ipv6 = udp_frame(DNS, 53);
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(classify(&ipv6, DNS), Class::Drop);
        let mut truncated = tcp_frame(
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 80),
            TcpControl::Syn,
            false,
        );
        truncated.truncate(40);
        assert_eq!(classify(&truncated, DNS), Class::Drop);
    }
}
