//! Configuration: embedded defaults, then a TOML file, then `LINKDNS_*` environment variables,
//! then command-line flags, each overriding the one before. `config/linkdns.toml` documents
//! every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use linkdns_dns::Limits;
use linkdns_registry::{ClaimLimit, Subnet};
use serde::Deserialize;

/// The file layer: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub join: Option<Vec<String>>,
    pub token_file: Option<PathBuf>,
    pub node_name: Option<String>,
    pub dns_listen: Option<Vec<SocketAddr>>,
    pub peer_listen: Option<SocketAddr>,
    pub advertise_addr: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub admin_public: Option<bool>,
    pub docker: Option<String>,
    pub domain: Option<String>,
    pub upstreams: Option<Vec<SocketAddr>>,
    pub ttl: Option<u32>,
    pub allowed_clients: Option<Vec<String>>,
    pub bridge_network: Option<String>,
    pub snapshot_every: Option<u64>,
    pub voters: Option<usize>,
    pub liveness_timeout_secs: Option<u64>,
    pub routing: Option<bool>,
    pub route_protocol: Option<u8>,
    pub encapsulation: Option<String>,
    pub bgp_peers: Option<Vec<String>>,
    pub bgp_asn: Option<u32>,
    pub bgp_peer_asn: Option<u32>,
    pub reach_from: Option<Vec<String>>,
    pub claimable: Option<Vec<String>>,
    pub cluster_cidr: Option<String>,
    pub subnet_prefix: Option<u8>,
    pub max_claim_prefix: Option<u8>,
    pub max_claim_prefix_v6: Option<u8>,
    pub rrl_rate: Option<u32>,
    pub rrl_cluster_rate: Option<u32>,
    pub rrl_slip: Option<u32>,
    pub dns_tcp_connections: Option<usize>,
    pub dns_tcp_per_client: Option<usize>,
    pub dns_threads: Option<usize>,
    pub cert_validity_days: Option<u64>,
    pub max_snapshot_mb: Option<u64>,
    pub log_format: Option<LogFormat>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The flag/environment layer (`linkdns run` options). Each is also `LINKDNS_<NAME>`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct RunArgs {
    /// TOML config file (see config/linkdns.toml).
    #[arg(long, env = "LINKDNS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the Raft log, snapshots and node identity live.
    #[arg(long, env = "LINKDNS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Members to join through (host:port, repeatable; comma-separated in the environment) while
    /// the data dir belongs to no cluster: tried in turn, with backoff, until one admits this
    /// host. On a member's data dir it is ignored, so one command serves every start.
    #[arg(long, env = "LINKDNS_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// A file holding the join token (`linkdns token` on a member; keep it mode 0600). Read only
    /// to join. LINKDNS_TOKEN may hold the token instead.
    #[arg(long, env = "LINKDNS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// This host's name in the cluster (`<container>.<node>.cluster`); default: the hostname.
    #[arg(long, env = "LINKDNS_NODE_NAME")]
    pub node_name: Option<String>,
    /// DNS listen address (repeatable; comma-separated in the environment).
    #[arg(long, env = "LINKDNS_DNS_LISTEN", value_delimiter = ',')]
    pub dns_listen: Vec<SocketAddr>,
    /// Raft peer transport address.
    #[arg(long, env = "LINKDNS_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// The address other hosts reach this node's peer transport at; default: the listen
    /// address, or if that is 0.0.0.0, the address the cluster sees this host connect from.
    #[arg(long, env = "LINKDNS_ADVERTISE_ADDR")]
    pub advertise_addr: Option<SocketAddr>,
    /// Admin HTTP address for /health, /ready and /metrics (the rest is served on
    /// `admin.sock` in the data dir, to root only). Loopback unless --admin-public true.
    #[arg(long, env = "LINKDNS_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Allow --admin-listen on an address other hosts reach (true/false): /metrics then
    /// tells them this node's record counts and peers.
    #[arg(long, env = "LINKDNS_ADMIN_PUBLIC")]
    pub admin_public: Option<bool>,
    /// Docker engine socket (unix:///var/run/docker.sock).
    #[arg(long, env = "LINKDNS_DOCKER")]
    pub docker: Option<String>,
    /// The cluster DNS domain.
    #[arg(long, env = "LINKDNS_DOMAIN")]
    pub domain: Option<String>,
    /// Upstream resolver for other names (repeatable); default: the host's resolv.conf.
    #[arg(long = "upstream", env = "LINKDNS_UPSTREAMS", value_delimiter = ',')]
    pub upstreams: Vec<SocketAddr>,
    /// TTL of answers, seconds.
    #[arg(long, env = "LINKDNS_TTL")]
    pub ttl: Option<u32>,
    /// Extra networks allowed to use forwarding (repeatable).
    #[arg(long = "allow", env = "LINKDNS_ALLOWED_CLIENTS", value_delimiter = ',')]
    pub allowed_clients: Vec<String>,
    /// The Docker network whose subnet is this host's container subnet.
    #[arg(long, env = "LINKDNS_BRIDGE_NETWORK")]
    pub bridge_network: Option<String>,
    /// Applied log entries between registry snapshots.
    #[arg(long, env = "LINKDNS_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// Voters the cluster keeps (1, 3 or 5); later hosts are learners. Read by the leader.
    #[arg(long, env = "LINKDNS_VOTERS")]
    pub voters: Option<usize>,
    /// Seconds of silence after which a host's records are hidden from answers.
    #[arg(long = "liveness-timeout", env = "LINKDNS_LIVENESS_TIMEOUT")]
    pub liveness_timeout_secs: Option<u64>,
    /// Program routes to the other hosts' container subnets, and the forwarding rules they
    /// need (true/false).
    #[arg(long, env = "LINKDNS_ROUTING")]
    pub routing: Option<bool>,
    /// Route protocol number that marks linkdns's routes (`ip route show proto N`).
    #[arg(long, env = "LINKDNS_ROUTE_PROTOCOL")]
    pub route_protocol: Option<u8>,
    /// How hosts not on a directly connected network are reached: auto (VXLAN to those, plain
    /// routes to the others), always (VXLAN to every host) or never (plain routes only; the
    /// others are refused).
    #[arg(long, env = "LINKDNS_ENCAPSULATION")]
    pub encapsulation: Option<linkdns_routes::Encapsulation>,
    /// A router to announce this host's container subnets to over BGP, ADDR[:PORT] (179);
    /// repeatable, comma-separated in the environment. This node connects to it.
    #[arg(long = "bgp-peer", env = "LINKDNS_BGP_PEERS", value_delimiter = ',')]
    pub bgp_peers: Vec<String>,
    /// This node's AS number (64512).
    #[arg(long, env = "LINKDNS_BGP_ASN")]
    pub bgp_asn: Option<u32>,
    /// The routers' AS number (default: the node's own, internal BGP).
    #[arg(long, env = "LINKDNS_BGP_PEER_ASN")]
    pub bgp_peer_asn: Option<u32>,
    /// A network outside the cluster whose machines may reach containers directly (routed,
    /// un-NATed: its router learned the routes over BGP); repeatable, comma-separated in the
    /// environment.
    #[arg(long = "reach-from", env = "LINKDNS_REACH_FROM", value_delimiter = ',')]
    pub reach_from: Vec<String>,
    /// A range other hosts' claims may lie in (repeatable, comma-separated in the
    /// environment): a claim outside every one is not routed here. Default: --cluster-cidr if
    /// set, else the private ranges (10/8, 172.16/12, 192.168/16, fc00::/7).
    #[arg(long = "claimable", env = "LINKDNS_CLAIMABLE", value_delimiter = ',')]
    pub claimable: Vec<String>,
    /// Give each host a free subnet of this network for its containers (a Docker network
    /// `linkdns`, or --bridge-network, created with it) instead of claiming Docker's bridge.
    #[arg(long, env = "LINKDNS_CLUSTER_CIDR")]
    pub cluster_cidr: Option<String>,
    /// Prefix length of each host's subnet allocated from --cluster-cidr (24; 64 for IPv6).
    #[arg(long, env = "LINKDNS_SUBNET_PREFIX")]
    pub subnet_prefix: Option<u8>,
    /// The widest IPv4 subnet one host may claim (a prefix length; 16). Set by the leader
    /// for the whole cluster.
    #[arg(long, env = "LINKDNS_MAX_CLAIM_PREFIX")]
    pub max_claim_prefix: Option<u8>,
    /// The widest IPv6 subnet one host may claim (48).
    #[arg(long, env = "LINKDNS_MAX_CLAIM_PREFIX_V6")]
    pub max_claim_prefix_v6: Option<u8>,
    /// UDP responses per second to one client prefix (/24, /56) outside the allowed set;
    /// 0 turns response-rate limiting off (20).
    #[arg(long, env = "LINKDNS_RRL_RATE")]
    pub rrl_rate: Option<u32>,
    /// UDP responses per second to one client prefix elsewhere in the cluster (another host's
    /// containers or address, which a LAN machine can forge); 0 turns it off (200). This
    /// host's own clients are never limited.
    #[arg(long, env = "LINKDNS_RRL_CLUSTER_RATE")]
    pub rrl_cluster_rate: Option<u32>,
    /// Of the responses over the rate, every Nth goes out truncated (TC=1), the rest are
    /// dropped; 0 drops them all (2).
    #[arg(long, env = "LINKDNS_RRL_SLIP")]
    pub rrl_slip: Option<u32>,
    /// DNS-over-TCP connections at once (1024); clients outside the allowed set get half.
    #[arg(long, env = "LINKDNS_DNS_TCP_CONNECTIONS")]
    pub dns_tcp_connections: Option<usize>,
    /// DNS-over-TCP connections at once from one client address (16).
    #[arg(long, env = "LINKDNS_DNS_TCP_PER_CLIENT")]
    pub dns_tcp_per_client: Option<usize>,
    /// UDP threads per DNS listen address, sharing its port (one per core, at most 4).
    #[arg(long, env = "LINKDNS_DNS_THREADS")]
    pub dns_threads: Option<usize>,
    /// Days a node certificate this node issues as leader is valid (90); each node renews
    /// its own through the leader when a third is left.
    #[arg(long, env = "LINKDNS_CERT_VALIDITY_DAYS")]
    pub cert_validity_days: Option<u64>,
    /// The largest snapshot this node takes from its leader, in MiB (1024): reassembled one at
    /// a time, from the leader only.
    #[arg(long, env = "LINKDNS_MAX_SNAPSHOT_MB")]
    pub max_snapshot_mb: Option<u64>,
    /// Log format: text or json.
    #[arg(long, env = "LINKDNS_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// The last resort when the majority of voters is gone for good: this member becomes the
    /// only voter of its cluster, with what it committed, and takes writes again; every other
    /// host must empty its data dir and join again. Once, by hand (no variable, no file key).
    #[arg(long)]
    pub force_new_cluster: bool,
}

/// The resolved configuration the node runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Members to join through while the data dir belongs to no cluster.
    pub join: Vec<String>,
    pub token_file: Option<PathBuf>,
    pub node_name: String,
    /// Listen addresses; `None` means the defaults (loopback, plus the Docker bridge gateway).
    pub dns_listen: Option<Vec<SocketAddr>>,
    pub peer_listen: SocketAddr,
    pub advertise_addr: Option<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub docker: String,
    pub domain: String,
    pub upstreams: Vec<SocketAddr>,
    pub ttl: u32,
    pub allowed_clients: Vec<Subnet>,
    pub bridge_network: String,
    pub snapshot_every: u64,
    pub voters: usize,
    pub liveness_timeout: Duration,
    /// The widest subnets a host may claim (the leader keeps the cluster's at this).
    pub claim_limit: ClaimLimit,
    /// Response-rate limiting and DNS TCP caps.
    pub dns_limits: Limits,
    /// How long certificates issued by this node (as leader) are valid.
    pub cert_validity: Duration,
    /// The largest snapshot taken from the leader, in bytes.
    pub max_snapshot: u64,
    pub routing: bool,
    pub route_protocol: u8,
    pub encapsulation: linkdns_routes::Encapsulation,
    /// The routers to announce to (none: no BGP).
    pub bgp: linkdns_bgp::Config,
    /// Networks outside the cluster let in to this host's containers.
    pub reach_from: Vec<Subnet>,
    /// The ranges other hosts' claims must lie in to be routed here.
    pub claimable: Vec<Subnet>,
    /// Allocate each host's subnet from this pool, in blocks of the given prefix length.
    pub cluster_cidr: Option<(Subnet, u8)>,
    pub log_format: LogFormat,
    pub proposal_timeout: Duration,
    /// `--force-new-cluster`: make this member a one-voter cluster before starting.
    pub force_new_cluster: bool,
}

/// The subnets of setting `key`, each parsed; the first that does not parse is named.
fn subnets(key: &str, texts: &[String]) -> anyhow::Result<Vec<Subnet>> {
    texts
        .iter()
        .map(|text| {
            text.parse::<Subnet>()
                .map_err(|e| anyhow::anyhow!("{key}: {text:?}: {e}"))
        })
        .collect()
}

/// The flag layer's list if given, else the file's.
fn pick_strings<'a>(args: &'a [String], file: &'a Option<Vec<String>>) -> &'a [String] {
    if args.is_empty() {
        file.as_deref().unwrap_or_default()
    } else {
        args
    }
}

/// The BGP settings: routers (`ADDR[:PORT]`, 179 by default) and AS numbers, each checked.
fn bgp_config(args: &RunArgs, file: &FileConfig) -> anyhow::Result<linkdns_bgp::Config> {
    let peers = pick_strings(&args.bgp_peers, &file.bgp_peers)
        .iter()
        .map(|text| {
            let text = text.trim();
            text.parse::<SocketAddr>()
                .or_else(|_| {
                    text.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, linkdns_bgp::PORT))
                })
                .map_err(|_| {
                    anyhow::anyhow!("bgp_peers: {text:?} is not ADDR or ADDR:PORT (e.g. 172.31.0.254 or 172.31.0.254:179)")
                })
        })
        .collect::<anyhow::Result<Vec<SocketAddr>>>()?;
    let asn = args
        .bgp_asn
        .or(file.bgp_asn)
        .unwrap_or(linkdns_bgp::DEFAULT_ASN);
    linkdns_bgp::check_asn(asn).map_err(|e| {
        anyhow::anyhow!("bgp_asn: {e}; use an AS number from 1 to 4294967294 (64512 by default)")
    })?;
    let peer_asn = args.bgp_peer_asn.or(file.bgp_peer_asn).unwrap_or(asn);
    linkdns_bgp::check_asn(peer_asn).map_err(|e| {
        anyhow::anyhow!(
            "bgp_peer_asn: {e}; use an AS number from 1 to 4294967294 (default: bgp_asn)"
        )
    })?;
    Ok(linkdns_bgp::Config {
        peers,
        asn,
        peer_asn,
        hold_time: linkdns_bgp::HOLD_TIME,
    })
}

pub const DEFAULT_DATA_DIR: &str = "/var/lib/linkdns";
pub const DEFAULT_DNS_LISTEN: &str = "127.0.0.1:53";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7381";
pub const DEFAULT_PEER_LISTEN: &str = "0.0.0.0:7380";

impl FileConfig {
    /// Reads and parses a config file; errors name the file, the key and the problem.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        FileConfig::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<FileConfig> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
    }
}

impl Config {
    /// Merges the layers: flags and environment over the file over the defaults.
    pub fn resolve(args: &RunArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Config::resolve_with(args, file)
    }

    /// [`Config::resolve`] with the file layer given.
    pub fn resolve_with(args: &RunArgs, file: FileConfig) -> anyhow::Result<Config> {
        let bgp = bgp_config(args, &file)?;
        let reach_from = subnets(
            "reach_from",
            pick_strings(&args.reach_from, &file.reach_from),
        )?;
        let claimable = subnets("claimable", pick_strings(&args.claimable, &file.claimable))?;
        let pick_list = |flag: &Vec<SocketAddr>, file: &Option<Vec<SocketAddr>>| {
            if flag.is_empty() {
                file.clone()
            } else {
                Some(flag.clone())
            }
        };
        let parse = |s: &str| -> anyhow::Result<SocketAddr> { Ok(s.parse()?) };
        let allowed_clients = subnets(
            "allowed_clients",
            pick_strings(&args.allowed_clients, &file.allowed_clients),
        )?;
        if args.snapshot_every.or(file.snapshot_every) == Some(0) {
            bail!("snapshot_every: must be at least 1 (applied entries between snapshots)");
        }
        let voters = args.voters.or(file.voters).unwrap_or(3);
        if ![1, 3, 5].contains(&voters) {
            bail!("voters: {voters}; use 1, 3 or 5 (an odd number keeps a majority after one or two losses)");
        }
        let liveness = args
            .liveness_timeout_secs
            .or(file.liveness_timeout_secs)
            .unwrap_or(15);
        if liveness < 2 {
            bail!("liveness_timeout_secs: {liveness}; use at least 2 (peers ping once a second)");
        }
        let claim_limit = ClaimLimit {
            v4: args
                .max_claim_prefix
                .or(file.max_claim_prefix)
                .unwrap_or(ClaimLimit::default().v4),
            v6: args
                .max_claim_prefix_v6
                .or(file.max_claim_prefix_v6)
                .unwrap_or(ClaimLimit::default().v6),
        };
        if !claim_limit.is_valid() {
            bail!(
                "max_claim_prefix {} / max_claim_prefix_v6 {}: use prefix lengths (1-32, 1-128)",
                claim_limit.v4,
                claim_limit.v6
            );
        }
        let defaults = Limits::default();
        let dns_limits = Limits {
            rrl_rate: args.rrl_rate.or(file.rrl_rate).unwrap_or(defaults.rrl_rate),
            rrl_cluster_rate: args
                .rrl_cluster_rate
                .or(file.rrl_cluster_rate)
                .unwrap_or(defaults.rrl_cluster_rate),
            rrl_slip: args.rrl_slip.or(file.rrl_slip).unwrap_or(defaults.rrl_slip),
            tcp_connections: args
                .dns_tcp_connections
                .or(file.dns_tcp_connections)
                .unwrap_or(defaults.tcp_connections),
            tcp_per_client: args
                .dns_tcp_per_client
                .or(file.dns_tcp_per_client)
                .unwrap_or(defaults.tcp_per_client),
            tcp_idle: defaults.tcp_idle,
            udp_threads: args
                .dns_threads
                .or(file.dns_threads)
                .unwrap_or(defaults.udp_threads),
        };
        if dns_limits.tcp_connections < 2 || dns_limits.tcp_per_client == 0 {
            bail!("dns_tcp_connections must be at least 2 and dns_tcp_per_client at least 1");
        }
        if !(1..=64).contains(&dns_limits.udp_threads) {
            bail!(
                "dns_threads: {}; use 1 to 64 (one per core is enough)",
                dns_limits.udp_threads
            );
        }
        let validity_days = args
            .cert_validity_days
            .or(file.cert_validity_days)
            .unwrap_or(90);
        if !(1..=3650).contains(&validity_days) {
            bail!("cert_validity_days: {validity_days}; use 1 to 3650 days");
        }
        let max_snapshot_mb = args
            .max_snapshot_mb
            .or(file.max_snapshot_mb)
            .unwrap_or(1024);
        if !(1..=16384).contains(&max_snapshot_mb) {
            bail!("max_snapshot_mb: {max_snapshot_mb}; use 1 to 16384");
        }
        let ttl = args.ttl.or(file.ttl).unwrap_or(5);
        if ttl == 0 {
            bail!("ttl: 0 would disable caching in every client; use at least 1 (seconds)");
        }
        let domain = args
            .domain
            .clone()
            .or(file.domain)
            .unwrap_or_else(|| "cluster".to_string());
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty() || domain.split('.').any(|l| l.is_empty() || l.len() > 63) {
            bail!("domain: {domain:?} is not a DNS name (expected e.g. \"cluster\")");
        }
        let join = if args.join.is_empty() {
            file.join.clone().unwrap_or_default()
        } else {
            args.join.clone()
        };
        for peer in &join {
            let port = peer
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0) {
                bail!(
                    "join: {peer:?} is not a member's peer address (host:port, e.g. 10.0.0.1:7380)"
                );
            }
        }
        let node_name = match args.node_name.clone().or(file.node_name) {
            Some(n) => n,
            None => default_node_name(),
        };
        let node_name = node_name.trim().to_ascii_lowercase();
        if node_name.is_empty()
            || node_name.len() > 63
            || !node_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("node_name: {node_name:?} must be one DNS label (letters, digits, '-')");
        }
        let encapsulation = match (args.encapsulation, &file.encapsulation) {
            (Some(e), _) => e,
            (None, Some(text)) => text
                .parse()
                .map_err(|e: String| anyhow::anyhow!("encapsulation: {e}"))?,
            (None, None) => linkdns_routes::Encapsulation::Auto,
        };
        let route_protocol = args
            .route_protocol
            .or(file.route_protocol)
            .unwrap_or(linkdns_routes::DEFAULT_PROTOCOL);
        if route_protocol <= 4 || route_protocol == 255 {
            bail!("route_protocol: {route_protocol} is reserved (0-4 belong to the kernel, boot-time and static routes); use a number of its own, e.g. {}", linkdns_routes::DEFAULT_PROTOCOL);
        }
        let cluster_cidr = match args.cluster_cidr.clone().or(file.cluster_cidr) {
            None => None,
            Some(text) => {
                let pool: Subnet = text
                    .parse()
                    .map_err(|e| anyhow::anyhow!("cluster_cidr: {e}"))?;
                // A block of 16 IPv4 networks of /24 (Docker's bridge, the `linkdns` network,
                // compose's); one /64 for IPv6.
                let default_prefix = if pool.is_ipv4() { 20 } else { 64 };
                let prefix = args
                    .subnet_prefix
                    .or(file.subnet_prefix)
                    .unwrap_or(default_prefix);
                let most = if pool.is_ipv4() { 30 } else { 126 };
                if prefix < pool.prefix() || prefix > most {
                    bail!("subnet_prefix: {prefix} does not fit cluster_cidr {pool}; use a length from {} to {most}", pool.prefix());
                }
                Some((pool, prefix))
            }
        };
        Ok(Config {
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            join,
            token_file: args.token_file.clone().or(file.token_file),
            node_name,
            dns_listen: pick_list(&args.dns_listen, &file.dns_listen),
            peer_listen: match args.peer_listen.or(file.peer_listen) {
                Some(a) => a,
                None => parse(DEFAULT_PEER_LISTEN)?,
            },
            advertise_addr: args.advertise_addr.or(file.advertise_addr),
            admin_listen: match args.admin_listen.or(file.admin_listen) {
                Some(a) if !a.ip().is_loopback() && args.admin_public.or(file.admin_public) != Some(true) => bail!(
                    "admin_listen {a} is not a loopback address: /metrics would be open to other hosts; set admin_public = true (--admin-public true) to mean it, or listen on 127.0.0.1"
                ),
                Some(a) => a,
                None => parse(DEFAULT_ADMIN_LISTEN)?,
            },
            docker: args
                .docker
                .clone()
                .or(file.docker)
                .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string()),
            domain,
            upstreams: pick_list(&args.upstreams, &file.upstreams).unwrap_or_default(),
            ttl,
            allowed_clients,
            // An allocated subnet needs a network of its own: Docker's default bridge takes
            // its subnet from the daemon's configuration.
            bridge_network: args
                .bridge_network
                .clone()
                .or(file.bridge_network)
                .unwrap_or_else(|| {
                    if cluster_cidr.is_some() {
                        "linkdns"
                    } else {
                        "bridge"
                    }
                    .to_string()
                }),
            snapshot_every: args
                .snapshot_every
                .or(file.snapshot_every)
                .unwrap_or(10_000),
            voters,
            liveness_timeout: Duration::from_secs(liveness),
            claim_limit,
            dns_limits,
            cert_validity: Duration::from_secs(validity_days * 24 * 3600),
            max_snapshot: max_snapshot_mb * 1024 * 1024,
            routing: args.routing.or(file.routing).unwrap_or(true),
            route_protocol,
            encapsulation,
            bgp,
            reach_from,
            claimable: match (claimable.is_empty(), cluster_cidr) {
                (false, Some((pool, _))) => claimable.into_iter().chain([pool]).collect(),
                (false, None) => claimable,
                (true, Some((pool, _))) => vec![pool],
                (true, None) => linkdns_routes::private_ranges(),
            },
            cluster_cidr,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            proposal_timeout: Duration::from_secs(5),
            force_new_cluster: args.force_new_cluster,
        })
    }
}

/// The kernel's hostname, first label, lowercased.
fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|h| h.trim().split('.').next().map(str::to_string))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_config_dir_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("config dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                FileConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                let args = RunArgs {
                    config: Some(path.clone()),
                    ..RunArgs::default()
                };
                Config::resolve(&args).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen > 0, "no config files found in {}", dir.display());
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let err = FileConfig::parse("dns_listne = [\"127.0.0.1:53\"]")
            .expect_err("typo")
            .to_string();
        assert!(err.contains("dns_listne"), "{err}");
        let err = FileConfig::parse("ttl = \"five\"")
            .expect_err("type")
            .to_string();
        assert!(err.contains("ttl"), "{err}");
        let err = FileConfig::parse("dns_listen = [\"localhost\"]")
            .expect_err("addr")
            .to_string();
        assert!(err.contains("dns_listen"), "{err}");
        let args = RunArgs {
            allowed_clients: vec!["10.0.0.0/99".into()],
            ..RunArgs::default()
        };
        let err = Config::resolve(&args).expect_err("prefix").to_string();
        assert!(err.contains("allowed_clients"), "{err}");
        let args = RunArgs {
            node_name: Some("no spaces".into()),
            ..RunArgs::default()
        };
        assert!(Config::resolve(&args)
            .expect_err("name")
            .to_string()
            .contains("node_name"));
    }

    #[test]
    fn claimable_ranges_default_to_the_cluster_cidr_else_the_private_ones() {
        let strings =
            |c: &Config| -> Vec<String> { c.claimable.iter().map(ToString::to_string).collect() };
        let c = Config::resolve(&RunArgs::default()).expect("defaults");
        assert_eq!(
            strings(&c),
            ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
        );
        let pool = RunArgs {
            cluster_cidr: Some("10.77.0.0/16".into()),
            ..RunArgs::default()
        };
        assert_eq!(
            strings(&Config::resolve(&pool).expect("pool")),
            ["10.77.0.0/16"]
        );
        let both = RunArgs {
            claimable: vec!["100.64.0.0/10".into()],
            ..pool
        };
        assert_eq!(
            strings(&Config::resolve(&both).expect("both")),
            ["100.64.0.0/10", "10.77.0.0/16"]
        );
        let bad = RunArgs {
            claimable: vec!["10.0.0.0/40".into()],
            ..RunArgs::default()
        };
        let err = Config::resolve(&bad).expect_err("bad").to_string();
        assert!(err.contains("claimable"), "{err}");
    }

    #[test]
    fn a_non_loopback_admin_address_needs_admin_public() {
        let args = RunArgs {
            admin_listen: Some("0.0.0.0:7381".parse().expect("addr")),
            ..RunArgs::default()
        };
        let err = Config::resolve(&args).expect_err("refused").to_string();
        assert!(err.contains("admin_public"), "{err}");
        let args = RunArgs {
            admin_public: Some(true),
            ..args
        };
        let c = Config::resolve(&args).expect("meant");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:7381");
        let file = FileConfig::parse("admin_listen = \"[::1]:7381\"").expect("parse");
        assert!(
            Config::resolve_with(&RunArgs::default(), file).is_ok(),
            "loopback"
        );
    }

    #[test]
    fn flags_override_file_over_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "ttl = 9\ndomain = \"Corp.Example.\"\nnode_name = \"filehost\"\n",
        )
        .expect("write");
        let args = RunArgs {
            config: Some(path),
            node_name: Some("flaghost".into()),
            ..RunArgs::default()
        };
        let c = Config::resolve(&args).expect("resolve");
        assert_eq!(
            (c.ttl, c.domain.as_str(), c.node_name.as_str()),
            (9, "corp.example", "flaghost")
        );
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert!(c.dns_listen.is_none());
    }

    #[test]
    fn routing_options_are_checked_and_cluster_cidr_brings_its_own_network() {
        let c = Config::resolve(&RunArgs::default()).expect("defaults");
        assert!(c.routing);
        assert_eq!(c.route_protocol, linkdns_routes::DEFAULT_PROTOCOL);
        assert_eq!(
            (c.bridge_network.as_str(), c.cluster_cidr),
            ("bridge", None)
        );

        let args = RunArgs {
            cluster_cidr: Some("10.77.0.0/16".into()),
            ..RunArgs::default()
        };
        let c = Config::resolve(&args).expect("pool");
        assert_eq!(c.bridge_network, "linkdns");
        // A block of 16 /24 networks per host by default.
        assert_eq!(
            c.cluster_cidr,
            Some(("10.77.0.0/16".parse().expect("subnet"), 20))
        );
        let args = RunArgs {
            cluster_cidr: Some("fd00:77::/48".into()),
            ..RunArgs::default()
        };
        assert_eq!(
            Config::resolve(&args)
                .expect("v6 pool")
                .cluster_cidr
                .map(|c| c.1),
            Some(64)
        );

        for (args, key) in [
            (
                RunArgs {
                    route_protocol: Some(4),
                    ..RunArgs::default()
                },
                "route_protocol: 4 is reserved",
            ),
            (
                RunArgs {
                    cluster_cidr: Some("10.77.0.0/16".into()),
                    subnet_prefix: Some(12),
                    ..RunArgs::default()
                },
                "subnet_prefix: 12 does not fit cluster_cidr 10.77.0.0/16",
            ),
            (
                RunArgs {
                    cluster_cidr: Some("10.77.0.0/33".into()),
                    ..RunArgs::default()
                },
                "cluster_cidr:",
            ),
        ] {
            let err = Config::resolve(&args).expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn bgp_and_reach_from_options_are_checked() {
        let c = Config::resolve(&RunArgs::default()).expect("defaults");
        assert!(c.bgp.peers.is_empty(), "no BGP unless asked");
        assert_eq!((c.bgp.asn, c.bgp.peer_asn), (64512, 64512));
        assert_eq!(c.encapsulation, linkdns_routes::Encapsulation::Auto);
        let args = RunArgs {
            bgp_peers: vec!["172.31.201.254".into(), "10.0.0.1:1179".into()],
            bgp_asn: Some(4_200_000_001),
            reach_from: vec!["172.31.202.0/24".into()],
            encapsulation: Some(linkdns_routes::Encapsulation::Never),
            ..RunArgs::default()
        };
        let c = Config::resolve(&args).expect("bgp");
        assert_eq!(
            c.bgp.peers,
            [
                "172.31.201.254:179".parse::<SocketAddr>().expect("addr"),
                "10.0.0.1:1179".parse().expect("addr")
            ]
        );
        assert_eq!((c.bgp.asn, c.bgp.peer_asn), (4_200_000_001, 4_200_000_001));
        assert_eq!(
            c.reach_from,
            ["172.31.202.0/24".parse::<Subnet>().expect("net")]
        );
        for (args, key) in [
            (
                RunArgs {
                    bgp_asn: Some(0),
                    ..RunArgs::default()
                },
                "bgp_asn: AS 0 is reserved; use an AS number from 1 to 4294967294",
            ),
            (
                RunArgs {
                    bgp_peer_asn: Some(23456),
                    ..RunArgs::default()
                },
                "bgp_peer_asn: AS 23456 is AS_TRANS",
            ),
            (
                RunArgs {
                    bgp_peers: vec!["router.lan".into()],
                    ..RunArgs::default()
                },
                "bgp_peers: \"router.lan\" is not ADDR or ADDR:PORT",
            ),
            (
                RunArgs {
                    reach_from: vec!["172.31.202.0/33".into()],
                    ..RunArgs::default()
                },
                "reach_from: \"172.31.202.0/33\"",
            ),
        ] {
            let err = Config::resolve(&args).expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
        // From the file too; an ASN past 32 bits does not parse at all.
        let file = FileConfig::parse("bgp_asn = 4294967296\n");
        assert!(
            file.is_err_and(|e| e.to_string().contains("bgp_asn")),
            "out of range in the file"
        );
        let file = FileConfig::parse("encapsulation = \"sometimes\"\n").expect("parses");
        let args = RunArgs::default();
        assert!(Config::resolve_with(&args, file)
            .expect_err("bad value")
            .to_string()
            .contains("encapsulation: encapsulation must be auto, always or never"));
    }
}
