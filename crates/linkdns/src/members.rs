//! Membership commands: `token` (print the join token), `join` (admit this host, then run),
//! `remove` and `leave` (take a host out).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use linkdns_cluster::{Identity, JoinAs, Token};
use linkdns_raft::SledStore;

use crate::config::Config;

/// Prints the join token of the cluster this data dir belongs to, as this host holds it; if the
/// running node says the cluster's secret was rotated since, says so instead.
pub async fn token(data_dir: &Path) -> anyhow::Result<String> {
    let identity = load(data_dir)?;
    if let Ok(status) = crate::status::fetch(data_dir).await {
        let ours = linkdns_cluster::identity::hex(&identity.secret.hash());
        if status
            .join_secret_sha256
            .as_ref()
            .is_some_and(|h| *h != ours)
        {
            bail!("the join secret was rotated on another host; use the token printed there, or run `linkdns token --rotate` here for a new one");
        }
    }
    Ok(format!("{}\n", identity.token()))
}

/// `linkdns token --rotate`: asks the leader for a new join secret (through the node on this
/// data dir, with this host's certificate), keeps it in this host's identity file and returns
/// the new token. Tokens with the old secret are refused from then on; members are unaffected.
pub async fn rotate_token(data_dir: &Path) -> anyhow::Result<String> {
    let identity = load(data_dir)?;
    let target = local_node(data_dir).await?;
    let token = linkdns_cluster::rotate_token(&target, &identity)
        .await
        .context("cannot rotate the join token")?;
    // Changed in place, under the file's lock: the node may renew its certificate meanwhile.
    let written = Identity::update(data_dir, |current| current.secret = token.secret.clone())?;
    if written.is_none() {
        bail!(
            "no identity in {}: was this host removed meanwhile?",
            data_dir.display()
        );
    }
    Ok(format!("{token}\n"))
}

/// The peer address of the node running on this data dir, reachable from this host.
async fn local_node(data_dir: &Path) -> anyhow::Result<String> {
    let status = crate::status::fetch(data_dir).await?;
    let own = status
        .members
        .iter()
        .find(|m| m.id == status.node_id)
        .map(|m| m.peer_addr.clone())
        .context("the local node is not a member of its cluster")?;
    local_peer(&own)
}

fn load(data_dir: &Path) -> anyhow::Result<Identity> {
    match Identity::load(data_dir)? {
        Some(identity) => Ok(identity),
        None => bail!(
            "data dir {} belongs to no cluster yet: start the first host with `linkdns run`, or join one with `linkdns join`",
            data_dir.display()
        ),
    }
}

/// The join token: from `--token-file`, else `LINKDNS_TOKEN`, else `--token` (with a warning:
/// the process list shows it). It is a credential: never logged, never echoed in errors.
pub fn join_token(flag: Option<String>, file: Option<&Path>) -> anyhow::Result<Token> {
    let env = std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty());
    let given = [file.is_some(), env.is_some(), flag.is_some()];
    if given.iter().filter(|&&g| g).count() > 1 {
        bail!("give the join token one way: --token-file, {TOKEN_ENV} or --token");
    }
    let text = if let Some(path) = file {
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the token file is readable by other users; make it mode 0600");
            }
        }
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?
    } else if let Some(env) = env {
        env
    } else if let Some(flag) = flag {
        tracing::warn!("--token puts the token in the process list, where every local user can read it while the join runs; use --token-file or {TOKEN_ENV}");
        flag
    } else {
        bail!("no join token: give --token-file FILE or {TOKEN_ENV} (`linkdns token` on a member prints it)");
    };
    Ok(text.trim().parse()?)
}

/// The environment variable a join token may come from.
const TOKEN_ENV: &str = "LINKDNS_TOKEN";

/// After a join: this process becomes `linkdns run` with the same options (`argv`, without the
/// token), so that no process keeps the token in its arguments (`/proc/PID/cmdline`) or
/// environment. The pid stays the same (exec).
pub fn continue_as(argv: &[std::ffi::OsString]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let (first, rest) = argv.split_first().context("no argv[0]")?;
    tracing::info!("admitted; continuing as `linkdns run`");
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(first)
        .args(rest)
        .env_remove(TOKEN_ENV)
        .exec();
    Err(anyhow::anyhow!(
        "joined, but cannot continue as `linkdns run` ({err}); start it with `linkdns run` and the same options"
    ))
}

/// The `run` options that take no value.
const RUN_FLAGS: [&str; 1] = ["--force-new-cluster"];

/// `linkdns join PEER [--token T | --token-file F] OPTIONS` as `linkdns run OPTIONS`: the
/// subcommand becomes `run`, the peer (the one positional argument) and the token options go.
/// Every `run` option but those of [`RUN_FLAGS`] takes a value (a unit test holds that), so
/// any other option without `=` is followed by its value.
pub fn run_argv(argv: &[std::ffi::OsString]) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(argv.len());
    let mut args = argv.iter();
    for a in args.by_ref() {
        if a == "join" {
            out.push("run".into());
            break;
        }
        out.push(a.clone());
    }
    let mut peer_dropped = false;
    while let Some(a) = args.next() {
        let text = a.to_string_lossy();
        if text == "--token" || text == "--token-file" {
            args.next();
        } else if text.starts_with("--token=") || text.starts_with("--token-file=") {
        } else if text.starts_with('-') {
            out.push(a.clone());
            if !text.contains('=') && !RUN_FLAGS.contains(&&*text) {
                if let Some(value) = args.next() {
                    out.push(value.clone());
                }
            }
        } else if !peer_dropped {
            peer_dropped = true;
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// Whether the data dir holds a cluster identity (a damaged one is an error).
pub fn is_member(data_dir: &Path) -> anyhow::Result<bool> {
    Ok(Identity::load(data_dir)?.is_some())
}

/// `linkdns join PEER --token-file FILE`: asks the cluster to admit this host and stores the
/// identity it gets; the caller then continues as `linkdns run` ([`continue_as`]).
pub async fn join(config: &Config, peer: &str, token: &Token) -> anyhow::Result<()> {
    let me = joinable(config)?;
    tracing::info!(%peer, cluster = %token.cluster, name = %config.node_name, "asking to join");
    let identity = linkdns_cluster::join(peer, token, &me)
        .await
        .with_context(|| format!("cannot join the cluster through {peer}"))?;
    admitted(config, &identity)
}

/// First wait after a round of join attempts that all failed, and the longest.
const JOIN_RETRY_FIRST: Duration = Duration::from_secs(1);
const JOIN_RETRY_MAX: Duration = Duration::from_secs(30);

/// `linkdns run --join PEER[,PEER…]` on a data dir of no cluster: asks each listed member in
/// turn until one admits this host. A round that fails is followed by a wait that doubles
/// from 1 s to 30 s, with jitter (so hosts started together do not ask in step). A refusal
/// that asking again cannot change (a wrong token, a taken name) ends it with that error.
pub async fn join_until_admitted(config: &Config, token: &Token) -> anyhow::Result<()> {
    let me = joinable(config)?;
    let mut wait = JOIN_RETRY_FIRST;
    let mut round = 0u64;
    loop {
        round += 1;
        for peer in &config.join {
            tracing::info!(%peer, cluster = %token.cluster, name = %config.node_name, round, "asking to join");
            match linkdns_cluster::join(peer, token, &me).await {
                Ok(identity) => return admitted(config, &identity),
                Err(e) if e.is_transient() => {
                    tracing::warn!(%peer, error = %e, "not admitted through this member yet");
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot join the cluster through {peer}"))
                }
            }
        }
        let pause = jittered(wait);
        tracing::info!(
            retry_in_ms = pause.as_millis() as u64,
            "no member admitted this host yet; trying again"
        );
        tokio::time::sleep(pause).await;
        wait = (wait * 2).min(JOIN_RETRY_MAX);
    }
}

/// `wait` scaled by a random factor from 0.5 to 1.5.
fn jittered(wait: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(wait.as_nanos());
    let per_mille = 500 + hasher.finish() % 1001;
    wait * per_mille as u32 / 1000
}

/// What this host says about itself when it asks to join, once the data dir is checked to be
/// one it may join with: no identity, no log.
fn joinable(config: &Config) -> anyhow::Result<JoinAs> {
    crate::run::private_dir(&config.data_dir)?;
    if let Some(identity) = Identity::load(&config.data_dir)? {
        bail!(
            "data dir {} already belongs to cluster {} as node {}; start it with `linkdns run`",
            config.data_dir.display(),
            identity.cluster,
            identity.node_id
        );
    }
    {
        let store = SledStore::open(&config.data_dir)?;
        if !store.is_fresh() {
            bail!(
                "data dir {} holds another node's log; join with an empty data dir",
                config.data_dir.display()
            );
        }
    }
    Ok(JoinAs {
        name: config.node_name.clone(),
        advertise: config.advertise_addr,
        listen_port: config.peer_listen.port(),
    })
}

/// Stores the identity an admission gave.
fn admitted(config: &Config, identity: &Identity) -> anyhow::Result<()> {
    identity.save(&config.data_dir)?;
    tracing::info!(node = identity.node_id, cluster = %identity.cluster, "admitted as a learner; catching up");
    Ok(())
}

/// `linkdns remove NODE`: asks the leader (through the node on this data dir) to take `node`
/// (a name or an id) out of the cluster.
pub async fn remove(data_dir: &Path, node: &str) -> anyhow::Result<u64> {
    let identity = load(data_dir)?;
    let target = local_node(data_dir).await?;
    let id = linkdns_cluster::remove(&target, &identity, node)
        .await
        .with_context(|| format!("cannot remove {node}"))?;
    Ok(id)
}

/// `linkdns leave`: removes this host's own node; the running node then stops and moves its
/// state aside.
pub async fn leave(data_dir: &Path) -> anyhow::Result<u64> {
    let identity = load(data_dir)?;
    remove(data_dir, &identity.node_id.to_string()).await
}

/// The local node's peer address, reachable from this host.
fn local_peer(addr: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("peer address {addr:?}"))?;
    Ok(crate::run::reachable(addr).to_string())
}

#[cfg(test)]
mod tests {
    use super::run_argv;
    use clap::CommandFactory;

    fn argv(s: &str) -> Vec<std::ffi::OsString> {
        s.split_whitespace().map(Into::into).collect()
    }

    #[test]
    fn a_join_continues_as_run_without_peer_or_token() {
        for (join, run) in [
            (
                "linkdns join 10.0.0.1:7380 --token-file /t --data-dir /d",
                "linkdns run --data-dir /d",
            ),
            (
                "linkdns join --node-name h2 10.0.0.1:7380 --token LDNS1-x --routing=false",
                "linkdns run --node-name h2 --routing=false",
            ),
            (
                "linkdns join --token=LDNS1-x --docker unix:///s 10.0.0.1:7380 --token-file=/t",
                "linkdns run --docker unix:///s",
            ),
        ] {
            assert_eq!(run_argv(&argv(join)), argv(run), "{join}");
        }
    }

    /// Join retries spread from half to one and a half times the wait, and differ between
    /// hosts (each draw is random).
    #[test]
    fn join_retries_are_jittered() {
        let wait = std::time::Duration::from_secs(4);
        let draws: std::collections::BTreeSet<_> =
            (0..200).map(|_| super::jittered(wait)).collect();
        assert!(draws.len() > 50, "{draws:?}");
        assert!(draws.iter().all(|d| *d >= wait / 2 && *d <= wait * 3 / 2));
    }

    /// `run_argv` tells options from the peer by this: every `run` option takes a value, but
    /// those it knows as flags.
    #[test]
    fn every_run_option_takes_a_value() {
        let command = crate::RunOnly::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let long = format!("--{}", arg.get_long().unwrap_or(id));
            assert!(!arg.is_positional(), "{long} is positional");
            assert_eq!(
                !arg.get_action().takes_values(),
                super::RUN_FLAGS.contains(&long.as_str()),
                "{long}: teach run_argv whether it takes a value"
            );
        }
    }
}
