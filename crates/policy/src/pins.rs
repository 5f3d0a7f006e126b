//! Name pinning: which names an enforcer's resolver answered each address with, so that a
//! later connection to that address is decided by those names. Bounded, as everything a
//! sandbox can grow.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// Addresses whose resolved names are remembered; the oldest is forgotten.
pub const MAX_PINNED_ADDRESSES: usize = 4096;

/// Names remembered per address; the oldest is forgotten.
pub const MAX_NAMES_PER_ADDRESS: usize = 8;

/// Which names each address was answered for, in one sandbox: the newest
/// [`MAX_PINNED_ADDRESSES`] addresses, [`MAX_NAMES_PER_ADDRESS`] names each.
#[derive(Debug, Default)]
pub struct Pins {
    names: HashMap<IpAddr, VecDeque<String>>,
    /// Addresses oldest first, to forget the oldest.
    order: VecDeque<IpAddr>,
}

impl Pins {
    /// Remembers that `name` resolved to `address`; the address becomes the newest.
    pub fn pin(&mut self, address: IpAddr, name: &str) {
        if let Some(names) = self.names.get_mut(&address) {
            names.retain(|known| known != name);
            names.push_front(name.to_owned());
            names.truncate(MAX_NAMES_PER_ADDRESS);
            self.order.retain(|known| *known != address);
            self.order.push_back(address);
            return;
        }
        if self.order.len() >= MAX_PINNED_ADDRESSES {
            if let Some(oldest) = self.order.pop_front() {
                self.names.remove(&oldest);
            }
        }
        self.names
            .insert(address, VecDeque::from([name.to_owned()]));
        self.order.push_back(address);
    }

    /// The names `address` was given for, newest first.
    pub fn names(&self, address: IpAddr) -> Vec<String> {
        self.names
            .get(&address)
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn pins_keep_the_newest_addresses_and_names() {
        let mut pins = Pins::default();
        let addr = |i: u32| IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i));
        for i in 0..(MAX_PINNED_ADDRESSES as u32 + 10) {
            pins.pin(addr(i), "a.example");
        }
        assert_eq!(pins.names.len(), MAX_PINNED_ADDRESSES);
        assert_eq!(pins.order.len(), MAX_PINNED_ADDRESSES);
        assert!(pins.names(addr(0)).is_empty(), "the oldest is forgotten");
        assert_eq!(
            pins.names(addr(MAX_PINNED_ADDRESSES as u32 + 9)),
            ["a.example"]
        );

        for i in 0..MAX_NAMES_PER_ADDRESS + 3 {
            pins.pin(addr(1), &format!("n{i}.example"));
        }
        let names = pins.names(addr(1));
        assert_eq!(names.len(), MAX_NAMES_PER_ADDRESS);
        assert_eq!(names[0], format!("n{}.example", MAX_NAMES_PER_ADDRESS + 2));
        // Pinning again refreshes the address: it is no longer the oldest.
        pins.pin(addr(20), "b.example");
        assert_eq!(pins.names(addr(20)), ["b.example", "a.example"]);
    }
}
