//! Network bring-up with the classic interface ioctls: lo always, eth0 with a static IPv4
//! address and an optional default route (resolv.conf is etc.rs's).
//! The ioctls are a dozen lines; a netlink stack would be most of init's size.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use kiln_protocol::NetConfig;

/// The kernel's `struct rtentry` (include/uapi/linux/route.h); glibc's libc crate binding
/// does not carry it.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

const RTF_UP: libc::c_ushort = 0x0001;
const RTF_GATEWAY: libc::c_ushort = 0x0002;

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; the kernel reads the
    // family to know which it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn netmask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0),
    )
}

struct Control(OwnedFd);

impl Control {
    fn new() -> io::Result<Control> {
        // SAFETY: socket(2) without pointers; the fd is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Control(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ifreq(name: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        req
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T, what: &str) -> io::Result<()> {
        // SAFETY: `arg` is the structure `request` expects and lives across the call.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), request, arg as *mut T) } < 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
        }
        Ok(())
    }

    fn set_up(&self, name: &str) -> io::Result<()> {
        let mut req = Self::ifreq(name);
        self.ioctl(
            libc::SIOCGIFFLAGS,
            &mut req,
            &format!("reading the flags of {name}"),
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, &format!("bringing {name} up"))
    }

    fn set_address(&self, name: &str, address: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
        let mut req = Self::ifreq(name);
        req.ifr_ifru.ifru_addr = sockaddr_in(address);
        self.ioctl(
            libc::SIOCSIFADDR,
            &mut req,
            &format!("setting the address of {name} to {address}"),
        )?;
        let mut req = Self::ifreq(name);
        req.ifr_ifru.ifru_netmask = sockaddr_in(netmask(prefix_len));
        self.ioctl(
            libc::SIOCSIFNETMASK,
            &mut req,
            &format!("setting the netmask of {name} to /{prefix_len}"),
        )
    }

    fn add_default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        // SAFETY: RtEntry is plain data; all-zero is a valid value (null device pointer).
        let mut route: RtEntry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        route.rt_gateway = sockaddr_in(gateway);
        route.rt_flags = RTF_UP | RTF_GATEWAY;
        self.ioctl(
            libc::SIOCADDRT,
            &mut route,
            &format!("adding the default route via {gateway}"),
        )
    }
}

/// Brings up the loopback interface.
pub fn loopback_up() -> io::Result<()> {
    Control::new()?.set_up("lo")
}

/// Configures and brings up `interface` as `config` says, IPv4 only: kiln's network
/// carries no IPv6, so the interface gets none (no link-local address, no duplicate
/// address detection, router solicitations or multicast reports, which cost a TCG boot
/// a few milliseconds and would only be dropped).
pub fn configure(interface: &str, config: &NetConfig) -> io::Result<()> {
    let control = Control::new()?;
    let no_ipv6 = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
    std::fs::write(&no_ipv6, "1")
        .map_err(|e| io::Error::new(e.kind(), format!("writing {no_ipv6}: {e}")))?;
    control.set_address(interface, config.address, config.prefix_len)?;
    control.set_up(interface)?;
    if let Some(gateway) = config.gateway {
        control.add_default_route(gateway)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(1), Ipv4Addr::new(128, 0, 0, 0));
    }

    #[test]
    fn rtentry_has_the_kernel_layout() {
        // 8 + 3*16 + 2 + 2 (pad to 8 is in rt_pad3's alignment) + 8 + 8 + 2(+6) + 8 + 8 + 8 + 2(+6)
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }
}
