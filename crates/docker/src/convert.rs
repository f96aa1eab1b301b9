//! bollard's container model → the registry's [`Container`]. The only place that reads Docker's
//! labels and network settings.

use std::collections::BTreeSet;
use std::net::IpAddr;

use bollard::models::{ContainerInspectResponse, EndpointSettings, HealthStatusEnum};
use linkdns_registry::{
    Address, ComposeService, Container, ContainerId, LinkAlias, LocalContainer, NamedPort, Network,
    NodeId, Port, Protocol, Subnet, Version,
};

/// `linkdns.alias=a,b`: extra names for the container.
pub const LABEL_ALIAS: &str = "linkdns.alias";
/// `linkdns.links=mysql:db,redis`: link aliases scoped to the container.
pub const LABEL_LINKS: &str = "linkdns.links";
/// `linkdns.srv=http:8080,dns:53/udp`: named services, answered as `_http._tcp.<name>`.
pub const LABEL_SRV: &str = "linkdns.srv";
/// Docker Compose's service name, an alias too, and with the project `<service>.<project>`.
const LABEL_COMPOSE_SERVICE: &str = "com.docker.compose.service";
const LABEL_COMPOSE_PROJECT: &str = "com.docker.compose.project";

/// The registry record of an inspected container as observed at `version`, or `None` if it
/// must not be answered: not running (stopped, paused, restarting), or it has a health check
/// that does not (yet) pass. Like a load balancer, DNS sends no one to a container that says
/// it is not ready.
pub fn container_from_inspect(
    details: &ContainerInspectResponse,
    node: NodeId,
    version: Version,
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

    let mut addrs = Vec::new();
    let mut aliases = BTreeSet::new();
    for (network, endpoint) in endpoints(details) {
        addrs.extend(addresses(network, endpoint));
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
    let compose = labels.get(LABEL_COMPOSE_SERVICE).map(|service| {
        aliases.insert(service.clone());
        ComposeService {
            project: labels
                .get(LABEL_COMPOSE_PROJECT)
                .cloned()
                .unwrap_or_default(),
            service: service.clone(),
        }
    });
    let links = labels
        .get(LABEL_LINKS)
        .map(|l| parse_links(l))
        .unwrap_or_default();
    let services = labels
        .get(LABEL_SRV)
        .map(|l| parse_services(l))
        .unwrap_or_default();
    // Image EXPOSE and --expose; publishing a port exposes it too (its binding says so
    // again, in case an API version leaves it out of the exposed set).
    let exposed = details
        .config
        .as_ref()
        .and_then(|c| c.exposed_ports.as_ref())
        .into_iter()
        .flatten();
    let published = details
        .host_config
        .as_ref()
        .and_then(|h| h.port_bindings.as_ref())
        .into_iter()
        .flat_map(|b| b.keys());
    let ports = exposed
        .chain(published)
        .filter_map(|spec| parse_port(spec))
        .collect();

    Some(
        Container {
            id: ContainerId::new(id),
            name,
            node,
            version,
            addrs,
            aliases,
            links,
            ports,
            services,
            compose,
        }
        .normalized(),
    )
}

/// The container's network endpoints, by network name.
fn endpoints(
    details: &ContainerInspectResponse,
) -> impl Iterator<Item = (&String, &EndpointSettings)> {
    details
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .into_iter()
        .flatten()
}

/// The addresses an endpoint gives its container on network `name`, each with its network.
fn addresses<'a>(
    name: &'a str,
    endpoint: &'a EndpointSettings,
) -> impl Iterator<Item = Address> + 'a {
    [
        (&endpoint.ip_address, endpoint.ip_prefix_len),
        (
            &endpoint.global_ipv6_address,
            endpoint.global_ipv6_prefix_len,
        ),
    ]
    .into_iter()
    .filter_map(move |(addr, prefix)| {
        let ip: IpAddr = addr.as_deref()?.parse().ok()?;
        let network = match (&endpoint.network_id, prefix) {
            (Some(id), Some(prefix)) if !id.is_empty() => {
                Subnet::new(ip, u8::try_from(prefix).ok()?).map(|subnet| Network {
                    id: id.clone(),
                    name: name.to_string(),
                    subnet,
                })
            }
            _ => None,
        };
        Some(Address { ip, network })
    })
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
    let mut ips = Vec::new();
    let mut networks = Vec::new();
    for (name, endpoint) in endpoints(details) {
        ips.extend(addresses(name, endpoint).map(|a| a.ip));
        networks.extend(endpoint.network_id.clone().filter(|n| !n.is_empty()));
    }
    Some(LocalContainer::new(
        ContainerId::new(id),
        name,
        links,
        ips,
        networks,
    ))
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

/// Parses `http:8080,dns:53/udp` into named services (TCP unless the port says otherwise);
/// malformed items are left out.
pub fn parse_services(label: &str) -> BTreeSet<NamedPort> {
    split_list(label)
        .filter_map(|item| {
            let (name, port) = item.split_once(':')?;
            let name = name.trim();
            (!name.is_empty()).then_some(())?;
            Some(NamedPort {
                name: name.to_string(),
                port: parse_port(port.trim())?,
            })
        })
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
        port: port.trim().parse().ok().filter(|p| *p != 0)?,
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bollard::models::{
        ContainerConfig, ContainerState, EndpointSettings, Health, HostConfig, NetworkSettings,
        PortBinding,
    };

    use super::*;

    fn inspected(health: Option<HealthStatusEnum>) -> ContainerInspectResponse {
        let id = format!("{:064x}", 0xabcdefu64);
        let endpoint =
            |net: &str, ip: &str, prefix: i64, v6: &str, aliases: &[&str]| EndpointSettings {
                network_id: Some(net.into()),
                ip_address: Some(ip.into()),
                ip_prefix_len: Some(prefix),
                global_ipv6_address: Some(v6.into()),
                global_ipv6_prefix_len: Some(64),
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
                    (LABEL_COMPOSE_PROJECT.to_string(), "Shop".to_string()),
                    (
                        LABEL_SRV.to_string(),
                        "http:8080, dns:53/udp, bad, :1".to_string(),
                    ),
                ])),
                exposed_ports: Some(vec!["80/tcp".into()]),
                ..Default::default()
            }),
            host_config: Some(HostConfig {
                port_bindings: Some(HashMap::from([(
                    "443/tcp".to_string(),
                    Some(vec![PortBinding {
                        host_ip: None,
                        host_port: Some("8443".into()),
                    }]),
                )])),
                ..Default::default()
            }),
            network_settings: Some(NetworkSettings {
                networks: Some(HashMap::from([
                    (
                        "bridge".to_string(),
                        endpoint("n-bridge", "172.17.0.2", 16, "", &[]),
                    ),
                    (
                        "app".to_string(),
                        endpoint(
                            "n-app",
                            "10.1.0.5",
                            24,
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
        let c = container_from_inspect(&inspected(None), 3, 77).expect("running");
        assert_eq!(c.name, "web");
        assert_eq!(c.node, 3);
        assert_eq!(c.version, 77);
        let addrs: Vec<String> = c
            .addrs
            .iter()
            .map(|a| {
                let n = a.network.as_ref().expect("network");
                format!("{} {} {} {}", a.ip, n.name, n.id, n.subnet)
            })
            .collect();
        assert_eq!(
            addrs,
            [
                "10.1.0.5 app n-app 10.1.0.0/24",
                "172.17.0.2 bridge n-bridge 172.17.0.0/16",
                "fd00::5 app n-app fd00::/64"
            ]
        );
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
        assert_eq!(
            c.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            [80, 443],
            "exposed, and published"
        );
        let services: Vec<String> = c
            .services
            .iter()
            .map(|s| format!("{} {}/{}", s.name, s.port.port, s.port.protocol.label()))
            .collect();
        assert_eq!(services, ["dns 53/udp", "http 8080/tcp"]);
        assert_eq!(
            c.compose,
            Some(ComposeService {
                project: "shop".into(),
                service: "web-svc".into()
            })
        );
        let local = local_from_inspect(&inspected(None)).expect("local");
        assert_eq!(local.networks, ["n-app", "n-bridge"]);
    }

    #[test]
    fn only_ready_containers_are_answerable() {
        let answerable = |c: &ContainerInspectResponse| container_from_inspect(c, 1, 1).is_some();
        assert!(answerable(&inspected(Some(HealthStatusEnum::HEALTHY))));
        assert!(answerable(&inspected(Some(HealthStatusEnum::NONE))));
        assert!(!answerable(&inspected(Some(HealthStatusEnum::STARTING))));
        assert!(!answerable(&inspected(Some(HealthStatusEnum::UNHEALTHY))));
        let mut paused = inspected(None);
        if let Some(state) = paused.state.as_mut() {
            state.paused = Some(true);
        }
        assert!(!answerable(&paused));
        let mut stopped = inspected(None);
        if let Some(state) = stopped.state.as_mut() {
            state.running = Some(false);
        }
        assert!(!answerable(&stopped));
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
        assert_eq!(parse_port("0/tcp"), None);
        assert_eq!(parse_services("web:80/quic, x:y").len(), 0);
    }
}
