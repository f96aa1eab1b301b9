//! The `linkdns` binary: command line, configuration, and the wiring of watcher, Raft node,
//! DNS and admin endpoint into one process.

mod admin;
mod announce;
mod catch_up;
mod config;
mod lifecycle;
mod members;
mod notify;
mod recovery;
mod routing;
mod run;
mod status;
mod view;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{LogFormat, RunArgs, DEFAULT_DATA_DIR};

/// This build's version and commit: `0.1.0 (5f0c2a1e9b7d)`.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("LINKDNS_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "linkdns",
    version = VERSION,
    about = "Service-discovery DNS for cross-host container links"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// `run`'s options alone, to read them from the environment when no subcommand is given.
#[derive(Debug, Parser)]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a node: watch Docker, replicate records through Raft, serve DNS.
    Run(Box<RunArgs>),
    /// Join an existing cluster through any member (one try), then run (later starts:
    /// `linkdns run`). The token comes from --token-file or LINKDNS_TOKEN; once admitted, the
    /// process continues as `linkdns run`, with no token in its arguments or environment.
    /// For a service, `linkdns run --join PEER --token-file FILE` retries until admitted.
    Join {
        /// Peer address of any member (ip:port, its --peer-listen / --advertise-addr).
        peer: String,
        /// The token itself. Discouraged: every local user sees it in the process list while
        /// the join runs. Use --token-file or LINKDNS_TOKEN.
        #[arg(long)]
        token: Option<String>,
        #[command(flatten)]
        args: Box<RunArgs>,
    },
    /// Show the cluster as the running node on this data dir sees it.
    Status {
        #[arg(long, env = "LINKDNS_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the routes and forwarding rules linkdns keeps on this host; with --plan, what it
    /// would change now and what it refuses, and why.
    Routes {
        #[arg(long, env = "LINKDNS_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Show the changes a reconciliation would make now, and the refused routes.
        #[arg(long)]
        plan: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the Docker daemon settings (daemon.json keys, JSON) that fit this host: containers
    /// ask this node for names, and with --cluster-cidr every Docker network (compose's too)
    /// is in this host's block, routed cluster-wide. Merge them into /etc/docker/daemon.json
    /// and restart Docker.
    DockerConfig {
        #[arg(long, env = "LINKDNS_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Print the token other hosts join this cluster with (one line; keep it secret). With
    /// --rotate, make a new one first: the old token is refused for new joins at once.
    Token {
        #[arg(long, env = "LINKDNS_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Replace the cluster's join secret (through the leader) and print the new token.
        #[arg(long)]
        rotate: bool,
    },
    /// Take a host out of the cluster (by node name or id); asks the running node on this
    /// data dir, which asks the leader.
    Remove {
        node: String,
        #[arg(long, env = "LINKDNS_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Take this host out of the cluster; its running node stops and moves its state aside.
    Leave {
        #[arg(long, env = "LINKDNS_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Write a consistent copy of the cluster's records, as the running node on this data dir
    /// holds them, to FILE (mode 0600).
    Backup {
        file: PathBuf,
        #[arg(long, env = "LINKDNS_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Seed an empty data dir with a backup: a new cluster (new token) whose only voter is this
    /// host; other hosts join it again. Takes `run`'s options (data dir, node name, …); start it
    /// with `linkdns run` after.
    Restore {
        file: PathBuf,
        #[command(flatten)]
        args: Box<RunArgs>,
    },
    /// Whether the running node on this data dir is ready (DNS answers from a replica that
    /// follows a leader or is caught up): exit 0 if so, 1 if not, saying why. For health
    /// checks (the Dockerfile's HEALTHCHECK, scripts).
    Ready {
        #[arg(long, env = "LINKDNS_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Print a shell completion script: `linkdns completions bash > /etc/bash_completion.d/linkdns`.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff): `linkdns man > /usr/local/share/man/man1/linkdns.1`.
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Bare `linkdns` is `linkdns run` with no flags (environment variables still apply).
    let command = cli
        .command
        .unwrap_or_else(|| Cmd::Run(Box::new(RunOnly::parse_from(["linkdns"]).args)));
    let result = match command {
        Cmd::Run(args) => run_node(*args, None),
        Cmd::Join { peer, token, args } => run_node(*args, Some((peer, token))),
        Cmd::Status { data_dir, json } => status::print(&data_dir, json),
        Cmd::Routes {
            data_dir,
            plan,
            json,
        } => status::print_routes(&data_dir, plan, json),
        Cmd::DockerConfig { data_dir } => status::print_docker_config(&data_dir),
        Cmd::Token { data_dir, rotate } => client(async move {
            let line = if rotate {
                members::rotate_token(&data_dir).await?
            } else {
                members::token(&data_dir).await?
            };
            say(&line)
        }),
        Cmd::Remove { node, data_dir } => client(async move {
            let id = members::remove(&data_dir, &node).await?;
            say(&format!("removed node {id} ({node}) from the cluster\n"))
        }),
        Cmd::Backup { file, data_dir } => {
            client(async move { say(&recovery::backup(&data_dir, &file).await?) })
        }
        Cmd::Restore { file, args } => config::Config::resolve(&args)
            .and_then(|config| recovery::restore(&file, &config))
            .and_then(|line| say(&line)),
        Cmd::Ready { data_dir } => client(async move {
            let (ready, line) = status::ready(&data_dir).await?;
            say(&line)?;
            if ready {
                Ok(())
            } else {
                Err(anyhow::anyhow!("the node is not ready"))
            }
        }),
        Cmd::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "linkdns", &mut out);
            std::io::Write::write_all(&mut std::io::stdout(), &out).map_err(Into::into)
        }
        Cmd::Man => man_page().and_then(|page| {
            std::io::Write::write_all(&mut std::io::stdout(), &page).map_err(Into::into)
        }),
        Cmd::Leave { data_dir } => client(async move {
            let id = members::leave(&data_dir).await?;
            say(&format!(
                "node {id} left the cluster; its running node stops and moves its state aside\n"
            ))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("linkdns: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `linkdns join`'s peer and `--token`.
type JoinWith = (String, Option<String>);

fn run_node(args: RunArgs, join: Option<JoinWith>) -> anyhow::Result<()> {
    linkdns_raft::limit_retained_memory();
    let config = config::Config::resolve(&args)?;
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match join {
        // `linkdns join PEER`: one try.
        Some((peer, token)) => {
            let token = members::join_token(token, config.token_file.as_deref())?;
            runtime.block_on(members::join(&config, &peer, &token))?;
            drop(runtime);
            members::continue_as(&members::run_argv(&argv))
        }
        // `linkdns run --join PEERS` on a data dir of no cluster: until admitted.
        None if !config.join.is_empty() && !members::is_member(&config.data_dir)? => {
            let token = members::join_token(None, config.token_file.as_deref())?;
            runtime.block_on(members::join_until_admitted(&config, &token))?;
            drop(runtime);
            members::continue_as(&argv)
        }
        None => runtime.block_on(run::run(config)),
    }
}

/// `linkdns(1)`: the command and every subcommand with its options, in roff.
fn man_page() -> anyhow::Result<Vec<u8>> {
    let command = Cli::command();
    let mut out = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut out)?;
    // Each subcommand's options, in a section of its own.
    for sub in command.get_subcommands() {
        out.extend(format!(".SH \"LINKDNS {}\"\n", sub.get_name().to_uppercase()).bytes());
        let man = clap_mangen::Man::new(sub.clone());
        man.render_description_section(&mut out)?;
        man.render_synopsis_section(&mut out)?;
        man.render_options_section(&mut out)?;
    }
    Ok(out)
}

/// Runs a short client command.
fn client(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn say(text: &str) -> anyhow::Result<()> {
    std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LINKDNS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,raft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manual page has every subcommand's options; the completion scripts are valid shell
    /// and know the subcommands and options.
    #[test]
    fn the_man_page_and_the_completions_cover_every_command() {
        let page = String::from_utf8(man_page().expect("man page")).expect("utf-8");
        assert!(page.contains(".TH linkdns 1"), "{page}");
        for sub in Cli::command().get_subcommands() {
            let section = format!(".SH \"LINKDNS {}\"", sub.get_name().to_uppercase());
            assert!(page.contains(&section), "{section} missing");
        }
        assert!(page.contains("\\-\\-force\\-new\\-cluster"));

        let mut bash = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "linkdns",
            &mut bash,
        );
        let script = String::from_utf8(bash).expect("utf-8");
        for word in ["backup", "restore", "--force-new-cluster", "--token-file"] {
            assert!(script.contains(word), "{word} not in the bash completions");
        }
        let check = std::process::Command::new("bash")
            .args(["-n", "-c", &script])
            .output()
            .expect("bash");
        assert!(check.status.success(), "{check:?}");
    }
}
