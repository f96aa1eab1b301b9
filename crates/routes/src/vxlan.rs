//! How another host's containers are reached when that host is not on a directly connected
//! network (hosts on several subnets, no shared LAN): the kernel's VXLAN, as flannel's vxlan
//! backend does it. One device (`linkdns.vx`, learning off); per remote host a permanent FDB
//! entry (its VTEP MAC → its host address) and, per remote subnet, a permanent neighbour entry
//! (the subnet's network address → that MAC) and a route `subnet via <its network address> dev
//! linkdns.vx onlink`.
//!
//! Nothing needs replicating for it: a host's VTEP address is its host address (the one in its
//! peer address), and its VTEP MAC is derived from that address ([`mac_of`]), so every node
//! computes every other node's entries from the registry it already has.
//!
//! Pure: what the tunnel should be, compared with what the host has, gives the changes. The
//! netlink edge applies them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

/// The tunnel device linkdns makes and owns.
pub const DEVICE: &str = "linkdns.vx";

/// The VXLAN network identifier of linkdns's tunnel (the same number as its route protocol).
pub const VNI: u32 = 151;

/// The VXLAN UDP port (IANA's).
pub const PORT: u16 = 4789;

/// What VXLAN adds to a packet over IPv4: outer IPv4 (20) + UDP (8) + VXLAN (8) + the inner
/// Ethernet header (14).
pub const OVERHEAD: u32 = 50;

/// TCP and IPv4 headers, taken off the tunnel's payload for the clamped MSS.
const TCP_IP_HEADERS: u32 = 40;

/// An Ethernet address.
pub type Mac = [u8; 6];

/// A neighbour entry: address → MAC.
pub type Neighbour = (IpAddr, Mac);

/// An FDB entry: MAC → remote host.
pub type FdbEntry = (Mac, IpAddr);

/// The VTEP MAC of the host whose host address is `host`: locally administered, unicast
/// (`0e:6c:` and the address's four bytes), so it is the same on every node that computes it.
pub fn mac_of(host: Ipv4Addr) -> Mac {
    let [a, b, c, d] = host.octets();
    [0x0e, 0x6c, a, b, c, d]
}

/// `0e:6c:ac:1f:ca:01`.
pub fn mac_text(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How large packets cross the tunnel: the device's MTU is the uplink's, so no packet a
/// container sends is refused at the tunnel (a 1,500-byte packet with DF set never meets a
/// smaller MTU, and so never blackholes behind an ICMP that does not come back); the kernel
/// fragments the outer UDP packet when it exceeds the uplink (the outer header's DF is clear,
/// the VXLAN default). TCP, the bulk of the traffic, does not fragment: its MSS is clamped to
/// what fits the uplink after the encapsulation.
pub fn clamped_mss(uplink_mtu: u32) -> u32 {
    uplink_mtu
        .saturating_sub(OVERHEAD + TCP_IP_HEADERS)
        .max(536)
}

/// The tunnel device as linkdns wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub vni: u32,
    /// This host's address: the outer source of what it sends.
    pub local: Ipv4Addr,
    pub port: u16,
    pub mac: Mac,
    pub mtu: u32,
}

impl Device {
    /// The device for a host whose host address is `local`, on an uplink of `uplink_mtu`.
    pub fn new(local: Ipv4Addr, uplink_mtu: u32) -> Device {
        Device {
            vni: VNI,
            local,
            port: PORT,
            mac: mac_of(local),
            mtu: uplink_mtu,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{DEVICE} vxlan id {} local {} dstport {} nolearning address {} mtu {}",
            self.vni,
            self.local,
            self.port,
            mac_text(&self.mac),
            self.mtu
        )
    }
}

/// A VXLAN device as the host has it (any of them: another one on linkdns's port and VNI is in
/// the way).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanLink {
    pub index: u32,
    pub name: String,
    pub vni: u32,
    pub local: Option<Ipv4Addr>,
    pub port: u16,
    pub learning: bool,
    pub mac: Option<Mac>,
    pub mtu: u32,
    pub up: bool,
}

impl VxlanLink {
    /// Whether this is `want` in everything that cannot change in place (a device that
    /// differs there is made again).
    fn is_made_as(&self, want: &Device) -> bool {
        self.vni == want.vni
            && self.local == Some(want.local)
            && self.port == want.port
            && !self.learning
            && self.mac == Some(want.mac)
    }
}

/// linkdns's tunnel device and its entries, as the host has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelState {
    /// Every VXLAN device of the host.
    pub links: Vec<VxlanLink>,
    /// A link named [`DEVICE`] that is not a VXLAN device (someone else's: in the way).
    pub foreign_device: bool,
    /// Permanent neighbour entries on [`DEVICE`].
    pub neighbours: Vec<Neighbour>,
    /// FDB entries on [`DEVICE`].
    pub fdb: Vec<FdbEntry>,
}

impl TunnelState {
    pub fn device(&self) -> Option<&VxlanLink> {
        self.links.iter().find(|l| l.name == DEVICE)
    }

    /// Why linkdns cannot have its tunnel here, if something is in the way.
    pub fn blocked(&self) -> Option<String> {
        if self.foreign_device {
            return Some(format!(
                "a link named {DEVICE} that is not a VXLAN device is in the way"
            ));
        }
        self.links
            .iter()
            .find(|l| l.name != DEVICE && l.vni == VNI && l.port == PORT)
            .map(|l| {
                format!(
                    "the VXLAN device {} already uses VNI {VNI} on UDP port {PORT}",
                    l.name
                )
            })
    }
}

/// One remote host reached through the tunnel: its address and its subnets' network addresses
/// (the onlink gateways of the routes to them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub host: Ipv4Addr,
    pub gateways: Vec<IpAddr>,
}

/// A change to the tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelChange {
    /// Make the device (and bring it up).
    Create(Device),
    /// Delete the device (with its entries and routes): not wanted, or made otherwise.
    Remove {
        index: u32,
        why: String,
    },
    /// Set the device's MTU and bring it up.
    Set {
        index: u32,
        mtu: u32,
    },
    /// `bridge fdb replace MAC dev linkdns.vx dst HOST self permanent`.
    SetFdb {
        mac: Mac,
        remote: Ipv4Addr,
    },
    RemoveFdb {
        mac: Mac,
    },
    /// `ip neigh replace GATEWAY lladdr MAC dev linkdns.vx nud permanent`.
    SetNeighbour {
        ip: IpAddr,
        mac: Mac,
    },
    RemoveNeighbour {
        ip: IpAddr,
    },
}

impl fmt::Display for TunnelChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelChange::Create(device) => write!(f, "create   {device}"),
            TunnelChange::Remove { why, .. } => write!(f, "delete   {DEVICE}: {why}"),
            TunnelChange::Set { mtu, .. } => write!(f, "set      {DEVICE} mtu {mtu} up"),
            TunnelChange::SetFdb { mac, remote } => {
                write!(f, "fdb      {} dst {remote} dev {DEVICE}", mac_text(mac))
            }
            TunnelChange::RemoveFdb { mac } => {
                write!(f, "fdb del  {} dev {DEVICE}", mac_text(mac))
            }
            TunnelChange::SetNeighbour { ip, mac } => {
                write!(f, "neigh    {ip} lladdr {} dev {DEVICE}", mac_text(mac))
            }
            TunnelChange::RemoveNeighbour { ip } => write!(f, "neigh del {ip} dev {DEVICE}"),
        }
    }
}

/// The changes that bring the host's tunnel to `want` (`None`: no tunnel) with `remotes`.
/// Entries on linkdns's device that are not wanted go; a device made otherwise is made again.
pub fn plan(want: Option<&Device>, remotes: &[Remote], host: &TunnelState) -> Vec<TunnelChange> {
    let mut changes = Vec::new();
    let existing = host.device();
    let Some(want) = want else {
        if let Some(link) = existing {
            changes.push(TunnelChange::Remove {
                index: link.index,
                why: "no host is reached through it".to_string(),
            });
        }
        return changes;
    };
    // The entries the device has (none once it is made again).
    let (neighbours, fdb): (&[Neighbour], &[FdbEntry]) = match existing {
        Some(link) if link.is_made_as(want) => {
            if link.mtu != want.mtu || !link.up {
                changes.push(TunnelChange::Set {
                    index: link.index,
                    mtu: want.mtu,
                });
            }
            (&host.neighbours, &host.fdb)
        }
        Some(link) => {
            changes.push(TunnelChange::Remove {
                index: link.index,
                why: "made with other settings".to_string(),
            });
            changes.push(TunnelChange::Create(want.clone()));
            (&[], &[])
        }
        None => {
            changes.push(TunnelChange::Create(want.clone()));
            (&[], &[])
        }
    };
    let mut wanted_fdb: Vec<(Mac, Ipv4Addr)> =
        remotes.iter().map(|r| (mac_of(r.host), r.host)).collect();
    wanted_fdb.sort();
    wanted_fdb.dedup();
    let mut wanted_neighbours: Vec<Neighbour> = remotes
        .iter()
        .flat_map(|r| r.gateways.iter().map(move |g| (*g, mac_of(r.host))))
        .collect();
    wanted_neighbours.sort();
    wanted_neighbours.dedup();

    let mut have_fdb = fdb.to_vec();
    have_fdb.sort();
    for (mac, remote) in &have_fdb {
        if !wanted_fdb.iter().any(|(m, _)| m == mac) {
            changes.push(TunnelChange::RemoveFdb { mac: *mac });
        } else if !wanted_fdb
            .iter()
            .any(|(m, r)| m == mac && IpAddr::V4(*r) == *remote)
        {
            // Replaced below; a second remote of the same MAC goes first.
            if have_fdb.iter().filter(|(m, _)| m == mac).count() > 1 {
                changes.push(TunnelChange::RemoveFdb { mac: *mac });
            }
        }
    }
    for (mac, remote) in &wanted_fdb {
        let right = have_fdb.iter().filter(|(m, _)| m == mac).count() == 1
            && have_fdb.contains(&(*mac, IpAddr::V4(*remote)));
        if !right {
            changes.push(TunnelChange::SetFdb {
                mac: *mac,
                remote: *remote,
            });
        }
    }
    let mut have_neighbours = neighbours.to_vec();
    have_neighbours.sort();
    for (ip, _) in &have_neighbours {
        if !wanted_neighbours.iter().any(|(w, _)| w == ip) {
            changes.push(TunnelChange::RemoveNeighbour { ip: *ip });
        }
    }
    for entry in &wanted_neighbours {
        if !have_neighbours.contains(entry) {
            changes.push(TunnelChange::SetNeighbour {
                ip: entry.0,
                mac: entry.1,
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().expect("ipv4")
    }

    fn remote(host: &str, gateways: &[&str]) -> Remote {
        Remote {
            host: v4(host),
            gateways: gateways.iter().map(|g| ip(g)).collect(),
        }
    }

    fn render(changes: &[TunnelChange]) -> String {
        changes.iter().map(|c| format!("{c}\n")).collect()
    }

    fn made(device: &Device) -> VxlanLink {
        VxlanLink {
            index: 7,
            name: DEVICE.into(),
            vni: device.vni,
            local: Some(device.local),
            port: device.port,
            learning: false,
            mac: Some(device.mac),
            mtu: device.mtu,
            up: true,
        }
    }

    #[test]
    fn a_host_behind_a_router_gets_the_device_its_fdb_entry_and_a_neighbour_per_subnet() {
        let device = Device::new(v4("172.31.201.1"), 1500);
        let remotes = [
            remote("172.31.202.2", &["192.168.2.0", "10.77.16.0"]),
            remote("172.31.202.3", &["192.168.3.0"]),
        ];
        let changes = plan(Some(&device), &remotes, &TunnelState::default());
        assert_eq!(
            render(&changes),
            "\
create   linkdns.vx vxlan id 151 local 172.31.201.1 dstport 4789 nolearning address 0e:6c:ac:1f:c9:01 mtu 1500
fdb      0e:6c:ac:1f:ca:02 dst 172.31.202.2 dev linkdns.vx
fdb      0e:6c:ac:1f:ca:03 dst 172.31.202.3 dev linkdns.vx
neigh    10.77.16.0 lladdr 0e:6c:ac:1f:ca:02 dev linkdns.vx
neigh    192.168.2.0 lladdr 0e:6c:ac:1f:ca:02 dev linkdns.vx
neigh    192.168.3.0 lladdr 0e:6c:ac:1f:ca:03 dev linkdns.vx
"
        );
        // Applied, nothing more to do.
        let host = TunnelState {
            links: vec![made(&device)],
            neighbours: vec![
                (ip("192.168.3.0"), mac_of(v4("172.31.202.3"))),
                (ip("192.168.2.0"), mac_of(v4("172.31.202.2"))),
                (ip("10.77.16.0"), mac_of(v4("172.31.202.2"))),
            ],
            fdb: vec![
                (mac_of(v4("172.31.202.3")), ip("172.31.202.3")),
                (mac_of(v4("172.31.202.2")), ip("172.31.202.2")),
            ],
            foreign_device: false,
        };
        assert_eq!(plan(Some(&device), &remotes, &host), vec![]);

        // h3 leaves, h2 moves to another address: its entries follow, h3's go.
        let moved = [remote("172.31.202.9", &["192.168.2.0", "10.77.16.0"])];
        assert_eq!(
            render(&plan(Some(&device), &moved, &host)),
            "\
fdb del  0e:6c:ac:1f:ca:02 dev linkdns.vx
fdb del  0e:6c:ac:1f:ca:03 dev linkdns.vx
fdb      0e:6c:ac:1f:ca:09 dst 172.31.202.9 dev linkdns.vx
neigh del 192.168.3.0 dev linkdns.vx
neigh    10.77.16.0 lladdr 0e:6c:ac:1f:ca:09 dev linkdns.vx
neigh    192.168.2.0 lladdr 0e:6c:ac:1f:ca:09 dev linkdns.vx
"
        );
        // Nobody reached through it: the device goes (with its entries and routes).
        assert_eq!(
            render(&plan(None, &[], &host)),
            "delete   linkdns.vx: no host is reached through it\n"
        );
    }

    #[test]
    fn a_device_made_otherwise_is_made_again_and_a_lower_mtu_or_down_is_set() {
        let device = Device::new(v4("172.31.201.1"), 1500);
        let remotes = [remote("172.31.202.2", &["192.168.2.0"])];
        let mut learning = made(&device);
        learning.learning = true;
        let host = TunnelState {
            links: vec![learning],
            fdb: vec![(mac_of(v4("172.31.202.2")), ip("172.31.202.2"))],
            ..TunnelState::default()
        };
        assert_eq!(
            render(&plan(Some(&device), &remotes, &host)),
            "\
delete   linkdns.vx: made with other settings
create   linkdns.vx vxlan id 151 local 172.31.201.1 dstport 4789 nolearning address 0e:6c:ac:1f:c9:01 mtu 1500
fdb      0e:6c:ac:1f:ca:02 dst 172.31.202.2 dev linkdns.vx
neigh    192.168.2.0 lladdr 0e:6c:ac:1f:ca:02 dev linkdns.vx
"
        );
        let mut down = made(&device);
        down.up = false;
        down.mtu = 1450;
        let host = TunnelState {
            links: vec![down],
            ..TunnelState::default()
        };
        assert_eq!(
            render(&plan(Some(&device), &remotes, &host)),
            "\
set      linkdns.vx mtu 1500 up
fdb      0e:6c:ac:1f:ca:02 dst 172.31.202.2 dev linkdns.vx
neigh    192.168.2.0 lladdr 0e:6c:ac:1f:ca:02 dev linkdns.vx
"
        );
    }

    #[test]
    fn what_is_in_the_way_blocks_the_tunnel() {
        let flannel = VxlanLink {
            index: 3,
            name: "vxlan0".into(),
            vni: VNI,
            local: None,
            port: PORT,
            learning: true,
            mac: None,
            mtu: 1450,
            up: true,
        };
        let host = TunnelState {
            links: vec![flannel.clone()],
            ..TunnelState::default()
        };
        assert_eq!(
            host.blocked().as_deref(),
            Some("the VXLAN device vxlan0 already uses VNI 151 on UDP port 4789")
        );
        // Another VNI on the port is no conflict: the kernel shares the socket.
        let other = TunnelState {
            links: vec![VxlanLink { vni: 1, ..flannel }],
            ..TunnelState::default()
        };
        assert_eq!(other.blocked(), None);
        let foreign = TunnelState {
            foreign_device: true,
            ..TunnelState::default()
        };
        assert!(foreign.blocked().is_some_and(|w| w.contains("not a VXLAN")));
        assert_eq!(clamped_mss(1500), 1410);
        assert_eq!(clamped_mss(9001), 8911);
    }
}
