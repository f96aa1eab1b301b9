//! bollard's container model → the registry's [`Container`]. The only place that reads Docker's
//! labels and network settings.

use std::collections::BTreeSet;
use std::net::IpAddr;

use bollard::models::{ContainerInspectResponse, HealthStatusEnum};
use linkdns_registry::{Container, ContainerId, LinkAlias, LocalContainer, NodeId, Port, Protocol};

/// `linkdns.alias=a,b`: extra names for the container.
pub const LABEL_ALIAS: &str = "linkdns.alias";
/// `linkdns.links=mysql:db,redis`: link aliases scoped to the container.
pub const LABEL_LINKS: &str = "linkdns.links";
/// Docker Compose's service name, an alias too.
const LABEL_COMPOSE_SERVICE: &str = "com.docker.compose.service";

/// The registry record of an inspected container, or `None` if it must not be answered: not
/// running (stopped, paused, restarting), or it has a health check that does not (yet) pass.
/// Like a load balancer, DNS sends no one to a container that says it is not ready.
pub fn container_from_inspect(
    details: &ContainerInspectResponse,
    node: NodeId,
) -> Option<Container> {
    let state = details.state.as_ref()?;
    if state.running != Some(true) || state.paused == Some(true) || state.restarting == Some(true) {
        return None;
    }
    let health = state.health.as_ref().and_then(|h| h.status);
    if matches!(
        health,
        Some(HealthStatusEnum::STARTING | HealthStatusEnum::UNHEALTHY)
    ) {
        return None;
    }
    let id = details.id.clone()?;
    let name = details.name.clone()?;
    let labels = details
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default();
    let short_id = id.get(..12).unwrap_or(&id).to_string();

    let mut ips = Vec::new();
    let mut aliases = BTreeSet::new();
    let networks = details
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref());
    for endpoint in networks.into_iter().flat_map(|n| n.values()) {
        for addr in [&endpoint.ip_address, &endpoint.global_ipv6_address]
            .into_iter()
            .flatten()
        {
            if let Ok(ip) = addr.parse::<IpAddr>() {
                ips.push(ip);
            }
        }
        for alias in endpoint.aliases.iter().flatten() {
            // Docker adds the short id as an alias on user-defined networks; it is not a name.
            if *alias != short_id && *alias != id {
                aliases.insert(alias.clone());
            }
        }
    }
    if let Some(list) = labels.get(LABEL_ALIAS) {
        aliases.extend(split_list(list).map(str::to_string));
    }
    if let Some(service) = labels.get(LABEL_COMPOSE_SERVICE) {
        aliases.insert(service.clone());
    }
    let links = labels
        .get(LABEL_LINKS)
        .map(|l| parse_links(l))
        .unwrap_or_default();
    let ports = details
        .config
        .as_ref()
        .and_then(|c| c.exposed_ports.as_ref())
        .map(|p| p.iter().filter_map(|spec| parse_port(spec)).collect())
        .unwrap_or_default();

    Some(
        Container {
            id: ContainerId::new(id),
            name,
            node,
            ips,
            aliases,
            links,
            ports,
        }
        .normalized(),
    )
}

/// The container as an asker of this host: every running container with its addresses and
/// link aliases, ready or not (one that fails its health check still resolves its links).
pub fn local_from_inspect(details: &ContainerInspectResponse) -> Option<LocalContainer> {
    let state = details.state.as_ref()?;
    if state.running != Some(true) {
        return None;
    }
    let id = details.id.clone()?;
    let name = details.name.clone()?;
    let links = links_of(details.config.as_ref().and_then(|c| c.labels.as_ref()));
    let networks = details
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref());
    let ips = networks
        .into_iter()
        .flat_map(|n| n.values())
        .flat_map(|e| [&e.ip_address, &e.global_ipv6_address])
        .flatten()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .collect();
    Some(LocalContainer {
        id: ContainerId::new(id),
        name,
        links,
        ips,
        connecting: BTreeSet::new(),
    })
}

/// The link aliases of a container's labels (from an inspection, a listing or an event's
/// attributes), in order.
pub fn links_of(labels: Option<&std::collections::HashMap<String, String>>) -> Vec<LinkAlias> {
    labels
        .and_then(|l| l.get(LABEL_LINKS))
        .map(|l| parse_links(l).into_iter().collect())
        .unwrap_or_default()
}

/// Parses `mysql:db,redis` into link aliases (`redis` alone links `redis` as `redis`).
pub fn parse_links(label: &str) -> BTreeSet<LinkAlias> {
    split_list(label)
        .map(|item| match item.split_once(':') {
            Some((target, alias)) => LinkAlias {
                target: target.trim().to_string(),
                alias: alias.trim().to_string(),
            },
            None => LinkAlias {
                target: item.to_string(),
                alias: item.to_string(),
            },
        })
        .filter(|l| !l.target.is_empty() && !l.alias.is_empty())
        .collect()
}

fn split_list(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// `80/tcp` → port 80 over TCP.
fn parse_port(spec: &str) -> Option<Port> {
    let (port, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return None,
    };
    Some(Port {
        port: port.parse().ok()?,
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bollard::models::{
        ContainerConfig, ContainerState, EndpointSettings, Health, NetworkSettings,
    };

    use super::*;

    fn inspected(health: Option<HealthStatusEnum>) -> ContainerInspectResponse {
        let id = format!("{:064x}", 0xabcdefu64);
        let endpoint = |ip: &str, v6: &str, aliases: &[&str]| EndpointSettings {
            ip_address: Some(ip.into()),
            global_ipv6_address: Some(v6.into()),
            aliases: Some(aliases.iter().map(|a| a.to_string()).collect()),
            ..Default::default()
        };
        let short = id[..12].to_string();
        ContainerInspectResponse {
            id: Some(id.clone()),
            name: Some("/Web".into()),
            state: Some(ContainerState {
                running: Some(true),
                paused: Some(false),
                restarting: Some(false),
                health: health.map(|status| Health {
                    status: Some(status),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            config: Some(ContainerConfig {
                labels: Some(HashMap::from([
                    (LABEL_ALIAS.to_string(), "Front, www ".to_string()),
                    (LABEL_LINKS.to_string(), "mysql:db".to_string()),
                    (LABEL_COMPOSE_SERVICE.to_string(), "web-svc".to_string()),
                ])),
                exposed_ports: Some(vec!["80/tcp".into()]),
                ..Default::default()
            }),
            network_settings: Some(NetworkSettings {
                networks: Some(HashMap::from([
                    ("bridge".to_string(), endpoint("172.17.0.2", "", &[])),
                    (
                        "app".to_string(),
                        endpoint(
                            "10.1.0.5",
                            "fd00::5",
                            &[short.as_str(), &id, "db-ish", "api"],
                        ),
                    ),
                ])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn inspected_container_becomes_a_record() {
        let c = container_from_inspect(&inspected(None), 3).expect("running");
        assert_eq!(c.name, "web");
        assert_eq!(c.node, 3);
        let ips: Vec<String> = c.ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.1.0.5", "172.17.0.2", "fd00::5"]);
        let aliases: Vec<&str> = c.aliases.iter().map(String::as_str).collect();
        assert_eq!(
            aliases,
            ["api", "db-ish", "front", "web-svc", "www"],
            "ids are not aliases"
        );
        let links: Vec<(&str, &str)> = c
            .links
            .iter()
            .map(|l| (l.target.as_str(), l.alias.as_str()))
            .collect();
        assert_eq!(links, [("mysql", "db")]);
        assert_eq!(c.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [80]);
    }

    #[test]
    fn only_ready_containers_are_answerable() {
        assert!(container_from_inspect(&inspected(Some(HealthStatusEnum::HEALTHY)), 1).is_some());
        assert!(container_from_inspect(&inspected(Some(HealthStatusEnum::NONE)), 1).is_some());
        assert!(container_from_inspect(&inspected(Some(HealthStatusEnum::STARTING)), 1).is_none());
        assert!(container_from_inspect(&inspected(Some(HealthStatusEnum::UNHEALTHY)), 1).is_none());
        let mut paused = inspected(None);
        if let Some(state) = paused.state.as_mut() {
            state.paused = Some(true);
        }
        assert!(container_from_inspect(&paused, 1).is_none());
        let mut stopped = inspected(None);
        if let Some(state) = stopped.state.as_mut() {
            state.running = Some(false);
        }
        assert!(container_from_inspect(&stopped, 1).is_none());
    }

    #[test]
    fn links_label_parses_pairs_and_bare_names() {
        let links = parse_links(" mysql:db, redis ,,bad:, :x");
        let pairs: Vec<(String, String)> = links.into_iter().map(|l| (l.target, l.alias)).collect();
        assert_eq!(
            pairs,
            [
                ("mysql".to_string(), "db".to_string()),
                ("redis".to_string(), "redis".to_string())
            ]
        );
    }

    #[test]
    fn ports_parse() {
        assert_eq!(parse_port("80/tcp").map(|p| p.port), Some(80));
        assert_eq!(
            parse_port("53/udp").map(|p| p.protocol),
            Some(Protocol::Udp)
        );
        assert_eq!(parse_port("x/tcp"), None);
    }
}
