//! linkdns's forwarding rules through the host's `iptables` / `ip6tables` (the tools Docker
//! itself programs the host with, so both use the same backend): reads its chains and their
//! jumps, and applies chain changes atomically per table with `iptables-restore --noflush`.
//! Also the kernel's IP forwarding switches.
//!
//! Blocking; callers run it off the async runtime.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::plan::{Chain, ChainState, Family, FirewallChange, Rule};
use crate::Error;

fn iptables(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

fn forwarding_switch(family: Family) -> &'static str {
    match family {
        Family::V4 => "/proc/sys/net/ipv4/ip_forward",
        Family::V6 => "/proc/sys/net/ipv6/conf/all/forwarding",
    }
}

/// How long an iptables command waits for the xtables lock (held by Docker, say).
const LOCK_WAIT: &str = "5";

/// One of linkdns's chains as the host has it; each table is read on its own, so a table the
/// kernel lacks (nat for IPv6, say) leaves only its chain unmanaged.
pub fn read(family: Family, chain: Chain) -> Result<ChainState, Error> {
    let listing = run(
        iptables(family),
        &["-w", LOCK_WAIT, "-t", chain.table(), "-S"],
        None,
    )?;
    Ok(parse_chain(chain, &listing))
}

/// One chain and the jumps to it, from `iptables -S` of its whole table.
pub fn parse_chain(chain: Chain, listing: &str) -> ChainState {
    let mut state = ChainState::default();
    let own = format!("-A {} ", chain.name());
    let parent = format!("-A {} ", chain.parent());
    let jump = format!("-j {}", chain.name());
    let mut position = 0;
    // The parent's rules other than linkdns's jumps, in order.
    let mut others = Vec::new();
    for line in listing.lines().map(str::trim) {
        if line == format!("-N {}", chain.name()) {
            state.exists = true;
        } else if let Some(rule) = line.strip_prefix(&own) {
            state.rules.push(Rule::parse(chain, rule));
        } else if let Some(rule) = line.strip_prefix(&parent) {
            position += 1;
            if rule.trim() == jump {
                state.jumps.push(position);
            } else {
                others.push(rule.trim());
            }
        }
    }
    let user_first = chain == Chain::Forward && others.first() == Some(&"-j DOCKER-USER");
    state.position = if user_first { 2 } else { 1 };
    state
}

/// Applies one family's firewall changes: one `iptables-restore --noflush` per table, so each
/// table changes at once or not at all.
pub fn apply(family: Family, changes: &[&FirewallChange]) -> Result<(), Error> {
    for table in ["filter", "nat", "raw", "mangle"] {
        let mut script = String::new();
        for change in changes {
            match change {
                FirewallChange::WriteChain { chain, rules, .. } if chain.table() == table => {
                    // Declaring a chain creates it, or (with --noflush) empties it.
                    script.push_str(&format!(":{} - [0:0]\n", chain.name()));
                    for rule in rules {
                        script.push_str(&format!("-A {} {rule}\n", chain.name()));
                    }
                }
                FirewallChange::PlaceJump {
                    chain,
                    existing,
                    position,
                    ..
                } if chain.table() == table => {
                    for _ in existing {
                        script.push_str(&format!("-D {} -j {}\n", chain.parent(), chain.name()));
                    }
                    script.push_str(&format!(
                        "-I {} {position} -j {}\n",
                        chain.parent(),
                        chain.name()
                    ));
                }
                FirewallChange::RemoveChain {
                    chain,
                    existing_jumps,
                    ..
                } if chain.table() == table => {
                    for _ in existing_jumps {
                        script.push_str(&format!("-D {} -j {}\n", chain.parent(), chain.name()));
                    }
                    // Declared first so the flush and delete find it even if it was gone.
                    script.push_str(&format!(":{} - [0:0]\n", chain.name()));
                    script.push_str(&format!("-X {}\n", chain.name()));
                }
                _ => {}
            }
        }
        if script.is_empty() {
            continue;
        }
        let input = format!("*{table}\n{script}COMMIT\n");
        let restore = format!("{}-restore", iptables(family));
        run(&restore, &["-w", LOCK_WAIT, "--noflush"], Some(&input))?;
    }
    Ok(())
}

/// Families whose IP forwarding is on.
pub fn forwarding() -> BTreeSet<Family> {
    [Family::V4, Family::V6]
        .into_iter()
        .filter(|f| std::fs::read_to_string(forwarding_switch(*f)).is_ok_and(|v| v.trim() == "1"))
        .collect()
}

pub fn enable_forwarding(family: Family) -> Result<(), Error> {
    let path = forwarding_switch(family);
    std::fs::write(path, b"1").map_err(|e| Error::Forwarding {
        path,
        reason: e.to_string(),
    })
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, Error> {
    let command = || format!("{program} {}", args.join(" "));
    let failed = |e: std::io::Error| Error::Firewall {
        command: command(),
        reason: e.to_string(),
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(failed)?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes()).map_err(failed)?;
    }
    let out = child.wait_with_output().map_err(failed)?;
    if !out.status.success() {
        return Err(Error::Firewall {
            command: command(),
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_and_jump_positions_parse_from_a_dockers_table() {
        let listing = "\
-P FORWARD DROP
-N DOCKER
-N DOCKER-USER
-N LINKDNS-FORWARD
-A FORWARD -j DOCKER-USER
-A FORWARD -j LINKDNS-FORWARD
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -j LINKDNS-FORWARD
-A DOCKER-USER -j RETURN
-A LINKDNS-FORWARD -s 192.168.2.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
-A LINKDNS-FORWARD -s 10.0.0.0/8 -j DROP
";
        let state = parse_chain(Chain::Forward, listing);
        assert!(state.exists);
        assert_eq!(state.jumps, vec![2, 4]);
        assert_eq!(state.position, 2, "after DOCKER-USER");
        assert_eq!(
            state.rules,
            vec![
                Rule::Accept {
                    src: "192.168.2.0/24".parse().expect("subnet"),
                    dst: "192.168.1.0/24".parse().expect("subnet"),
                    in_if: "eth0".into(),
                    out_if: "docker0".into(),
                },
                Rule::Unknown("-s 10.0.0.0/8 -j DROP".into()),
            ]
        );
        assert_eq!(
            parse_chain(Chain::Postrouting, listing),
            ChainState {
                position: 1,
                ..ChainState::default()
            }
        );
    }

    #[test]
    fn the_raw_chain_parses_beside_a_current_dockers_drops() {
        // `iptables -t raw -S` on Docker 28.5 with two containers, linkdns's jump first.
        let listing = "\
-P PREROUTING ACCEPT
-P OUTPUT ACCEPT
-N LINKDNS-PREROUTING
-A PREROUTING -j LINKDNS-PREROUTING
-A PREROUTING -d 192.168.1.2/32 ! -i docker0 -j DROP
-A PREROUTING -d 192.168.1.3/32 ! -i docker0 -j DROP
-A LINKDNS-PREROUTING -s 192.168.2.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
";
        let state = parse_chain(Chain::Prerouting, listing);
        assert_eq!(
            state,
            ChainState {
                exists: true,
                rules: vec![Rule::Admit {
                    src: "192.168.2.0/24".parse().expect("subnet"),
                    dst: "192.168.1.0/24".parse().expect("subnet"),
                    in_if: "eth0".into(),
                }],
                jumps: vec![1],
                position: 1,
            }
        );
    }
}
