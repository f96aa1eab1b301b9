//! Which container holds an address, read off the host's processes: a process in the
//! container's cgroup whose network namespace has the address as a local one. Docker tells a
//! starting container's address only once its start is over, and its process may ask DNS
//! before that; `/proc` knows already. Needs linkdns in the host's PID namespace (as root).

use std::net::IpAddr;
use std::path::Path;

use linkdns_registry::ContainerId;

/// The one of `candidates` (containers of this host's Docker) that holds `ip` now, if exactly
/// one does. Blocking: it reads `/proc`.
pub fn container_at_address(ip: IpAddr, candidates: &[ContainerId]) -> Option<ContainerId> {
    containers_at_addresses_in(Path::new("/proc"), &[(ip, candidates.to_vec())])
        .pop()
        .map(|(_, id)| id)
}

/// For each address asked about with its candidates, the one candidate that holds it now, if
/// exactly one does (addresses no candidate or several hold are left out). One walk of
/// `/proc` for them all: each process's cgroup is read once, its network namespace's
/// addresses at most once. Blocking.
pub fn containers_at_addresses(asks: &[(IpAddr, Vec<ContainerId>)]) -> Vec<(IpAddr, ContainerId)> {
    containers_at_addresses_in(Path::new("/proc"), asks)
}

fn containers_at_addresses_in(
    proc: &Path,
    asks: &[(IpAddr, Vec<ContainerId>)],
) -> Vec<(IpAddr, ContainerId)> {
    let asks: Vec<&(IpAddr, Vec<ContainerId>)> =
        asks.iter().filter(|(_, c)| !c.is_empty()).collect();
    if asks.is_empty() {
        return Vec::new();
    }
    let mut ids: Vec<(&ContainerId, String)> = asks
        .iter()
        .flat_map(|(_, c)| c.iter())
        .map(|c| (c, String::from(c)))
        .collect();
    ids.sort();
    ids.dedup();
    // Per ask: the candidate found holding it, and whether another did too.
    let mut found: Vec<(Option<&ContainerId>, bool)> = vec![(None, false); asks.len()];
    let walked = container_processes(proc, &ids, |dir, id| {
        let mut addresses = NetnsAddresses::of(dir);
        for (i, (ip, candidates)) in asks.iter().enumerate() {
            let slot = &mut found[i];
            if !candidates.contains(id) || slot.0 == Some(id) || slot.1 {
                continue;
            }
            if addresses.has(*ip) {
                // Two containers with the address (one shares the other's namespace): either
                // could be asking.
                if slot.0.is_some() {
                    slot.1 = true;
                } else {
                    slot.0 = Some(id);
                }
            }
        }
    });
    if walked.is_none() {
        return Vec::new();
    }
    asks.iter()
        .zip(found)
        .filter_map(|((ip, _), (id, ambiguous))| match (id, ambiguous) {
            (Some(id), false) => Some((*ip, id.clone())),
            _ => None,
        })
        .collect()
}

/// A process's network namespace's local addresses, read when first asked (IPv4 and IPv6 from
/// their own files).
struct NetnsAddresses<'a> {
    dir: &'a Path,
    v4: Option<String>,
    v6: Option<String>,
}

impl<'a> NetnsAddresses<'a> {
    fn of(dir: &'a Path) -> NetnsAddresses<'a> {
        NetnsAddresses {
            dir,
            v4: None,
            v6: None,
        }
    }

    fn has(&mut self, ip: IpAddr) -> bool {
        let dir = self.dir;
        match ip {
            IpAddr::V4(_) => {
                let trie = self.v4.get_or_insert_with(|| {
                    std::fs::read_to_string(dir.join("net/fib_trie")).unwrap_or_default()
                });
                fib_trie_has_local(trie, ip)
            }
            IpAddr::V6(_) => {
                let list = self.v6.get_or_insert_with(|| {
                    std::fs::read_to_string(dir.join("net/if_inet6")).unwrap_or_default()
                });
                if_inet6_has(list, ip)
            }
        }
    }
}

/// The inode of the host's (the initial) PID namespace: `/proc/self/ns/pid` reads
/// `pid:[4026531836]` there.
const HOST_PID_NAMESPACE: &str = "pid:[4026531836]";

/// Which of `ids` (containers of this host's Docker) have a process on this host now, read off
/// `/proc` in one walk. `None` when this process cannot tell: it runs outside the host's PID
/// namespace (it would see none of them: a container without `--pid host`), or `/proc` cannot
/// be read. Blocking.
pub fn running_containers(ids: &[ContainerId]) -> Option<Vec<ContainerId>> {
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    if ns.to_str() != Some(HOST_PID_NAMESPACE) {
        return None;
    }
    running_in(Path::new("/proc"), ids)
}

fn running_in(proc: &Path, ids: &[ContainerId]) -> Option<Vec<ContainerId>> {
    let texts: Vec<(&ContainerId, String)> = ids.iter().map(|c| (c, String::from(c))).collect();
    let mut running: Vec<ContainerId> = Vec::new();
    container_processes(proc, &texts, |_, id| {
        if !running.contains(id) {
            running.push(id.clone());
        }
    })?;
    Some(running)
}

/// Walks the processes under `proc` (`/proc`): for each whose cgroup names one of `ids` (each
/// container with its id's text), calls `each` with the process's directory and that
/// container. `None` if `proc` cannot be read.
fn container_processes<'a>(
    proc: &Path,
    ids: &[(&'a ContainerId, String)],
    mut each: impl FnMut(&Path, &'a ContainerId),
) -> Option<()> {
    for entry in std::fs::read_dir(proc).ok()?.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let dir = entry.path();
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        if let Some((id, _)) = ids.iter().find(|(_, text)| cgroup.contains(text.as_str())) {
            each(&dir, id);
        }
    }
    Some(())
}

/// Whether `/proc/<pid>/net/fib_trie` lists `ip` as a local host address (`|-- a.b.c.d`
/// followed by `/32 host LOCAL`).
fn fib_trie_has_local(trie: &str, ip: IpAddr) -> bool {
    let mut leaf: Option<&str> = None;
    for line in trie.lines().map(str::trim) {
        if let Some(addr) = line.strip_prefix("|-- ") {
            leaf = Some(addr);
        } else if line.starts_with("/32 host LOCAL")
            && leaf.and_then(|a| a.parse::<IpAddr>().ok()) == Some(ip)
        {
            return true;
        }
    }
    false
}

/// Whether `/proc/<pid>/net/if_inet6` lists `ip` (32 hex digits at the start of a line).
fn if_inet6_has(list: &str, ip: IpAddr) -> bool {
    let IpAddr::V6(v6) = ip else {
        return false;
    };
    let hex: String = v6.octets().iter().map(|b| format!("{b:02x}")).collect();
    list.lines()
        .any(|l| l.split_whitespace().next() == Some(hex.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRIE: &str = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 192.168.2.0/24 2 0 2
        |-- 192.168.2.0
           /24 link UNICAST
        |-- 192.168.2.7
           /32 host LOCAL
        |-- 192.168.2.255
           /32 link BROADCAST
";

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn local_addresses_are_read_off_the_namespace() {
        assert!(fib_trie_has_local(TRIE, ip("192.168.2.7")));
        assert!(!fib_trie_has_local(TRIE, ip("192.168.2.255")), "broadcast");
        assert!(!fib_trie_has_local(TRIE, ip("192.168.2.0")), "the network");
        assert!(!fib_trie_has_local(TRIE, ip("192.168.2.8")));
        let inet6 = "fd000000000000000000000000000002 04 40 00 82     eth0\n";
        assert!(if_inet6_has(inet6, ip("fd00::2")));
        assert!(!if_inet6_has(inet6, ip("fd00::3")));
    }

    #[test]
    fn running_containers_are_those_with_a_process() {
        let proc = tempfile::tempdir().expect("tempdir");
        let (a, b) = (format!("{:064x}", 0xa), format!("{:064x}", 0xb));
        let dir = proc.path().join("42");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("cgroup"),
            format!("0::/system.slice/docker-{a}.scope\n"),
        )
        .expect("cgroup");
        let ids = [ContainerId::new(a.clone()), ContainerId::new(b)];
        assert_eq!(
            running_in(proc.path(), &ids),
            Some(vec![ContainerId::new(a)])
        );
        assert_eq!(running_in(&proc.path().join("nope"), &ids), None);
    }

    #[test]
    fn the_container_whose_processes_hold_the_address() {
        let proc = tempfile::tempdir().expect("tempdir");
        let (a, b) = (format!("{:064x}", 0xa), format!("{:064x}", 0xb));
        let process = |pid: &str, id: &str, trie: &str| {
            let dir = proc.path().join(pid);
            std::fs::create_dir_all(dir.join("net")).expect("dir");
            std::fs::write(dir.join("cgroup"), format!("0::/docker/{id}\n")).expect("cgroup");
            std::fs::write(dir.join("net/fib_trie"), trie).expect("trie");
        };
        process("10", &a, TRIE);
        process("11", &b, &TRIE.replace("192.168.2.7", "192.168.2.8"));
        process("12", "not-a-container", TRIE);
        let candidates = vec![ContainerId::new(a.clone()), ContainerId::new(b.clone())];
        let at = |s: &str| {
            containers_at_addresses_in(proc.path(), &[(ip(s), candidates.clone())])
                .pop()
                .map(|(_, id)| id)
        };
        assert_eq!(at("192.168.2.7"), Some(ContainerId::new(a.clone())));
        assert_eq!(at("192.168.2.8"), Some(ContainerId::new(b.clone())));
        assert_eq!(at("192.168.2.9"), None);
        // All three at once, in one walk: the two held, the free one left out; an address
        // asked with only `b` as candidate is not `a`'s.
        let all = containers_at_addresses_in(
            proc.path(),
            &[
                (ip("192.168.2.7"), candidates.clone()),
                (ip("192.168.2.8"), candidates.clone()),
                (ip("192.168.2.9"), candidates.clone()),
                (ip("192.168.2.7"), vec![ContainerId::new(b.clone())]),
            ],
        );
        assert_eq!(
            all,
            vec![
                (ip("192.168.2.7"), ContainerId::new(a.clone())),
                (ip("192.168.2.8"), ContainerId::new(b.clone())),
            ]
        );
        // A process outside the candidates with the address does not count; a second
        // candidate with it makes the answer unknown.
        process("13", &b, TRIE);
        assert_eq!(at("192.168.2.7"), None);
    }
}
