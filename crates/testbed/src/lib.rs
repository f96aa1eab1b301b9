//! The test bed: each host is a network namespace with its own Docker engine, a veth to the root
//! namespace, and (when started) a real `linkdns` process. The repository's tests/README.md says
//! how it is built.
//!
//! Prerequisites are checked once and fail loudly: root, iproute2, nsenter, dockerd, dig,
//! busybox, docker-compose. Nothing here is skipped.
//!
//! It leaves the machine as it found it: each host's namespace, veth, daemons and directory go
//! when it is dropped (also when its test fails), and the shared LAN bridge, its FORWARD rule
//! and the image go with the last host. Processes are stopped by the pids the test bed started
//! (a crashed earlier run's by the pid files it wrote), never by name.
//!
//! Runs do not meet: each process that makes hosts claims names and addresses of its own (see
//! [`Run`]), so two test or benchmark runs on one machine neither collide nor clean up each
//! other; what a run that died left is cleared by the next one.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Root of everything the test bed writes: a directory per run.
const ROOT: &str = "/tmp/linkdns-e2e";
/// Name of the image every host gets: busybox, built offline.
pub const IMAGE: &str = "ldt-busybox:latest";

/// The variable naming a directory of another Docker engine's binaries (`dockerd`,
/// `containerd`, `docker-proxy`), put first in each host's engine's `PATH`:
/// `scripts/current-docker` unpacks Debian sid's current engine and prints it. Unset: the
/// machine's `dockerd` (Debian's 20.10).
pub const ENGINE_VAR: &str = "LINKDNS_TEST_DOCKER";

static NEXT_HOST: AtomicU8 = AtomicU8::new(1);
/// The version of the engine in [`ENGINE_VAR`]'s directory, which every host must run.
static ENGINE_VERSION: OnceLock<String> = OnceLock::new();
static CHECKED: OnceLock<()> = OnceLock::new();

/// What the hosts alive in this process share, made with the first and removed with the last.
#[derive(Default)]
struct Shared {
    /// Hosts alive.
    hosts: usize,
    /// Hosts alive on the LAN.
    lan_hosts: usize,
    /// The image tar and its rootfs are built.
    prepared: bool,
    /// The LAN bridge is up; whether its FORWARD rule was added by this process.
    lan: Option<bool>,
    /// Hosts and VMs alive on the routed LANs (the router namespace lives while there are).
    routed: usize,
    /// This run's claim, from the first host to the last.
    run: Option<Run>,
}

static SHARED: Mutex<Shared> = Mutex::new(Shared {
    hosts: 0,
    lan_hosts: 0,
    prepared: false,
    lan: None,
    routed: 0,
    run: None,
});

/// What one run of the test bed (one process, while it has hosts) uses alone: its directory
/// `ROOT/<pid>` (holding `owner` and `octet`, the claim), namespaces `ldt<pid>-h<N>`, links
/// `l<pid>-…`, and the addresses 172.<octet>.0.0/16 in the root namespace. The octet is one
/// no other live run claims and no address of the machine uses.
#[derive(Clone, Debug)]
pub struct Run {
    tag: String,
    base: PathBuf,
    octet: u8,
}

impl Run {
    fn ns(&self, index: u8) -> String {
        format!("ldt{}-h{index}", self.tag)
    }
    fn veth(&self, index: u8, side: char) -> String {
        format!("l{}-{index}{side}", self.tag)
    }
    fn lan_bridge(&self) -> String {
        format!("l{}-lan", self.tag)
    }
    fn lan_root(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, self.octet, 0, 254)
    }
    /// The router of the routed LANs.
    fn router(&self) -> String {
        format!("ldt{}-r", self.tag)
    }
    /// A VM's namespace.
    fn vm(&self, index: u8) -> String {
        format!("ldt{}-v{index}", self.tag)
    }
    /// The FORWARD rule that lets bridged LAN traffic through the root namespace (Docker
    /// loads br_netfilter and may set the policy to DROP).
    fn lan_rule(&self) -> Vec<String> {
        let bridge = self.lan_bridge();
        ["FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT"]
            .map(String::from)
            .to_vec()
    }
}

/// One of the two routed LANs: each its own subnet (172.R.201.0/24, 172.R.202.0/24), joined
/// only by the router namespace (172.R.20x.254 on each), every host's and VM's default route;
/// no LAN is shared between them. Hosts on different routed LANs are not on-link: what reaches
/// across is routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lan {
    A,
    B,
}

impl Lan {
    fn third_octet(self) -> u8 {
        match self {
            Lan::A => 201,
            Lan::B => 202,
        }
    }
    /// The bridge of this LAN, inside the router namespace.
    fn bridge(self) -> &'static str {
        match self {
            Lan::A => "lana",
            Lan::B => "lanb",
        }
    }
    /// The address of machine `index` on this LAN (254 is the router's).
    pub fn addr(self, index: u8) -> Ipv4Addr {
        let octet = shared()
            .run
            .as_ref()
            .map(|r| r.octet)
            .expect("Lan::addr: make a host first");
        Ipv4Addr::new(172, octet, self.third_octet(), index)
    }
    /// The LAN's subnet, `172.R.20x.0/24`.
    pub fn subnet(self) -> String {
        format!("{}/24", self.addr(0))
    }
    /// The router's address on this LAN.
    pub fn router(self) -> Ipv4Addr {
        self.addr(254)
    }
}

/// The router namespace's name (BIRD runs there in the BGP tests).
pub fn router_ns() -> String {
    shared()
        .run
        .as_ref()
        .map(Run::router)
        .expect("router_ns: make a routed host first")
}

/// Brings the router up for the first machine on a routed LAN (with the shared state locked):
/// a namespace with a bridge per LAN, its address on each, forwarding on.
fn routed_up(shared: &mut Shared, run: &Run) {
    shared.routed += 1;
    if shared.routed > 1 {
        return;
    }
    let ns = run.router();
    sh("ip", &["netns", "add", &ns]);
    let in_router = |args: &[&str]| {
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full);
    };
    in_router(&["link", "set", "lo", "up"]);
    for lan in [Lan::A, Lan::B] {
        let bridge = lan.bridge();
        in_router(&["link", "add", bridge, "type", "bridge"]);
        let addr = format!(
            "{}/24",
            Ipv4Addr::new(172, run.octet, lan.third_octet(), 254)
        );
        in_router(&["addr", "add", &addr, "dev", bridge]);
        in_router(&["link", "set", bridge, "up"]);
    }
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    );
}

/// Takes the router down after the last machine on a routed LAN.
fn routed_down(shared: &mut Shared, run: &Run) {
    shared.routed = shared.routed.saturating_sub(1);
    if shared.routed == 0 {
        let _ = self::run("ip", &["netns", "delete", &run.router()]);
    }
}

/// Links namespace `ns` to the routed LAN `lan` as machine `index`: a veth pair whose one end
/// (`inside`) is the machine's, the other a port of the LAN's bridge in the router; the
/// machine's default route goes via the router.
fn attach_routed(run: &Run, ns: &str, lan: Lan, index: u8, outside: &str, inside: &str) {
    let router = run.router();
    sh(
        "ip",
        &[
            "link", "add", outside, "type", "veth", "peer", "name", inside,
        ],
    );
    sh("ip", &["link", "set", inside, "netns", ns]);
    sh("ip", &["link", "set", outside, "netns", &router]);
    sh(
        "ip",
        &[
            "-n",
            &router,
            "link",
            "set",
            outside,
            "master",
            lan.bridge(),
        ],
    );
    sh("ip", &["-n", &router, "link", "set", outside, "up"]);
    let addr = Ipv4Addr::new(172, run.octet, lan.third_octet(), index);
    let gateway = Ipv4Addr::new(172, run.octet, lan.third_octet(), 254);
    sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
    sh(
        "ip",
        &[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            inside,
        ],
    );
    sh("ip", &["-n", ns, "link", "set", inside, "up"]);
    sh(
        "ip",
        &[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ],
    );
}

/// A machine on a routed LAN with no Docker and no linkdns: a VM in the VPC, or a machine of
/// the LAN that is not in the cluster. Its namespace goes when it is dropped.
pub struct Vm {
    pub ns: String,
    pub addr: Ipv4Addr,
    pub lan: Lan,
}

impl Vm {
    pub fn on(lan: Lan) -> Vm {
        let index = NEXT_HOST.fetch_add(1, Ordering::SeqCst);
        assert!(index < 200, "too many test machines");
        let run = {
            let mut shared = shared();
            let run = prepare(&mut shared);
            shared.hosts += 1;
            routed_up(&mut shared, &run);
            run
        };
        let vm = Vm {
            ns: run.vm(index),
            addr: Ipv4Addr::new(172, run.octet, lan.third_octet(), index),
            lan,
        };
        sh("ip", &["netns", "add", &vm.ns]);
        attach_routed(
            &run,
            &vm.ns,
            lan,
            index,
            &run.veth(index, 'o'),
            &run.veth(index, 'i'),
        );
        vm
    }

    /// Runs a command inside the VM's namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", self.ns.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "delete", &self.ns]);
        let mut shared = shared();
        shared.hosts -= 1;
        if let Some(run) = shared.run.clone() {
            routed_down(&mut shared, &run);
        }
        if shared.hosts == 0 {
            if let Some(run) = shared.run.take() {
                release_run(&run);
            }
            shared.prepared = false;
        }
    }
}

/// BIRD 2 as the router of the routed LANs: in the router's namespace, with a BGP protocol per
/// LAN that takes every host of the LAN as an internal neighbour without listing them
/// (`neighbor range … internal`, dynamic), imports what they announce and puts it into the
/// router's kernel table (`ip -n <router> route` shows it). Its own config, control socket,
/// pid file and log in the run's directory; stopped (by its pid) when dropped.
pub struct Bird {
    child: Option<Child>,
    dir: PathBuf,
}

impl Bird {
    /// Starts BIRD on the router (a routed host or VM must exist) and waits until it answers.
    pub fn start() -> Bird {
        let (ns, base) = {
            let shared = shared();
            let run = shared
                .run
                .as_ref()
                .expect("Bird::start: make a routed host first");
            assert!(shared.routed > 0, "Bird::start: make a routed host first");
            (run.router(), run.base.clone())
        };
        let found = run("sh", &["-c", "command -v bird"]);
        assert!(
            found.status.success(),
            "e2e prerequisite `bird` is missing: install bird2 (see scripts/test)"
        );
        let dir = base.join("bird");
        std::fs::create_dir_all(&dir).expect("bird dir");
        let (a, b) = (Lan::A.router(), Lan::B.router());
        let protocol = |name: &str, local: Ipv4Addr, lan: Lan, dynamic: &str| {
            format!(
                "protocol bgp {name} {{\n  local {local} as 64512;\n  neighbor range {} internal;\n  direct;\n  dynamic name \"{dynamic}\";\n  hold time 30;\n  ipv4 {{ import all; export none; gateway direct; }};\n}}\n",
                lan.subnet()
            )
        };
        let config = format!(
            "router id {a};\nlog \"{}\" all;\nprotocol device {{ }}\nprotocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; }}\n{}{}",
            dir.join("bird.log").display(),
            protocol("lana", a, Lan::A, "a"),
            protocol("lanb", b, Lan::B, "b"),
        );
        std::fs::write(dir.join("bird.conf"), config).expect("bird.conf");
        let mut bird = Bird { child: None, dir };
        bird.spawn(&ns);
        bird
    }

    fn spawn(&mut self, ns: &str) {
        let d = |p: &str| self.dir.join(p).to_string_lossy().into_owned();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "bird", "-f"])
            .args([
                "-c",
                &d("bird.conf"),
                "-s",
                &d("bird.ctl"),
                "-P",
                &d("bird.pid"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bird");
        self.child = Some(child);
        wait_until(Duration::from_secs(20), "bird to answer", || {
            self.birdc(&["show", "status"])
                .contains("Daemon is up and running")
        });
    }

    /// `birdc -s <its socket> ARGS…`, output and errors.
    pub fn birdc(&self, args: &[&str]) -> String {
        let ctl = self.dir.join("bird.ctl");
        let mut full = vec!["-s", ctl.to_str().unwrap_or_default()];
        full.extend_from_slice(args);
        let out = run("birdc", &full);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// BIRD's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
    }

    /// Kills BIRD at once (a router that dies: no NOTIFICATION, sessions just drop).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts BIRD again after [`Bird::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(&router_ns());
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::io::stderr()
                .write_all(format!("--- bird log ---\n{}\n", self.log()).as_bytes());
        }
        self.kill();
    }
}

/// An address on this run's LAN that no host has (a member that is down, say).
pub fn lan_unused() -> Ipv4Addr {
    let octet = shared()
        .run
        .as_ref()
        .map(|r| r.octet)
        .expect("lan_unused: make a host first");
    Ipv4Addr::new(172, octet, 0, 250)
}

/// The root namespace's address on this run's LAN (where a process of the root namespace
/// serves hosts).
pub fn lan_root() -> Ipv4Addr {
    shared()
        .run
        .as_ref()
        .map(Run::lan_root)
        .expect("lan_root: make a host first")
}

/// Held while a run claims: the directory `ROOT/.lock` (made by one process at a time), with
/// the holder's pid in it; one whose holder died is broken.
struct RootLock(PathBuf);

impl RootLock {
    fn take() -> RootLock {
        let path = Path::new(ROOT).join(".lock");
        for _ in 0..600 {
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    let _ = std::fs::write(path.join("pid"), std::process::id().to_string());
                    return RootLock(path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(path.join("pid"))
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok());
                    let dead = match holder {
                        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
                        // A holder that died before writing its pid: the lock is old.
                        None => std::fs::metadata(&path)
                            .and_then(|m| m.modified())
                            .is_ok_and(|t| {
                                t.elapsed().unwrap_or_default() > Duration::from_secs(5)
                            }),
                    };
                    if dead {
                        // Moved aside first: of two runs that found it dead, one moves it
                        // (the other's rename fails) and neither removes a new lock.
                        let aside =
                            Path::new(ROOT).join(format!(".lock.dead.{}", std::process::id()));
                        if std::fs::rename(&path, &aside).is_ok() {
                            let _ = std::fs::remove_dir_all(&aside);
                        }
                        continue;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                // The root went with the last run meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(ROOT).expect("test bed root");
                }
                Err(e) => panic!("cannot lock {}: {e}", path.display()),
            }
        }
        panic!("{} stayed locked for 30 s", path.display());
    }
}

impl Drop for RootLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Claims this run's names and addresses, under [`RootLock`] (another run may be claiming at
/// the same moment), after clearing what runs that died left.
fn claim_run() -> Run {
    std::fs::create_dir_all(ROOT).expect("test bed root");
    let _lock = RootLock::take();
    let mut taken = Vec::new();
    if let Ok(dirs) = std::fs::read_dir(ROOT) {
        let runs = dirs
            .flatten()
            .filter(|d| d.path().is_dir() && !d.file_name().to_string_lossy().starts_with('.'));
        for dir in runs {
            let path = dir.path();
            let owner = std::fs::read_to_string(path.join("owner"))
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok());
            // A run of this very pid is an earlier process's (a reused pid): dead.
            let me = std::process::id();
            match owner {
                Some(pid) if pid != me && Path::new(&format!("/proc/{pid}")).exists() => {
                    if let Some(octet) = std::fs::read_to_string(path.join("octet"))
                        .ok()
                        .and_then(|t| t.trim().parse::<u8>().ok())
                    {
                        taken.push(octet);
                    }
                }
                Some(pid) => cleanup_run(&path, &pid.to_string()),
                // A directory of the test bed from before runs had their own names.
                None => cleanup_run(&path, "-"),
            }
        }
    }
    let addrs = sh("ip", &["-o", "-4", "addr", "show"]);
    let octet = (16..=31u8)
        .rev()
        .find(|o| !taken.contains(o) && !addrs.contains(&format!(" 172.{o}.")))
        .expect("no free 172.16-31.x.x range left for the test bed");
    let tag = std::process::id().to_string();
    let base = Path::new(ROOT).join(&tag);
    std::fs::create_dir_all(&base).expect("run dir");
    std::fs::write(base.join("owner"), &tag).expect("owner file");
    std::fs::write(base.join("octet"), octet.to_string()).expect("octet file");
    Run { tag, base, octet }
}

/// Releases the claim once the run's last host is gone: its directory goes, and the root too
/// if nothing else is in it.
fn release_run(run: &Run) {
    let _ = std::fs::remove_dir_all(&run.base);
    // Only if empty: another run's directory or lock keeps it.
    let _ = std::fs::remove_dir(ROOT);
}

fn shared() -> MutexGuard<'static, Shared> {
    // A test that panicked while holding it left it whole: every change is one assignment.
    SHARED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The port every test node's peer transport uses (each host has its own namespace).
pub const PEER_PORT: u16 = 7380;

pub fn linkdns_bin() -> &'static str {
    LINKDNS_BIN.get_or_init(|| {
        // Cargo builds the binary beside the test or bench it runs: target/<profile>/linkdns
        // for target/<profile>/deps/<test>-<hash>.
        std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("linkdns")))
            .filter(|bin| bin.exists())
            .map(|bin| bin.to_string_lossy().into_owned())
            .unwrap_or_else(|| {
                panic!("no linkdns binary beside this test; call use_linkdns_bin(env!(\"CARGO_BIN_EXE_linkdns\")) first")
            })
    })
}

/// Which `linkdns` binary the test bed runs: a test or bench of the `linkdns` package passes
/// `env!("CARGO_BIN_EXE_linkdns")` (else the one Cargo built beside it is used).
pub fn use_linkdns_bin(path: &str) {
    let _ = LINKDNS_BIN.set(path.to_string());
}

static LINKDNS_BIN: OnceLock<String> = OnceLock::new();

/// Runs a command; panics with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    if !out.status.success() {
        panic!(
            "`{program} {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is it installed? see .ci/run)"))
}

/// Checks the prerequisites (once per process), claims this run's names and addresses
/// (clearing what runs that died left), then builds the image tar if it is not there. Called
/// with the shared state locked.
fn prepare(shared: &mut Shared) -> Run {
    CHECKED.get_or_init(|| {
        let uid = sh("id", &["-u"]);
        assert_eq!(uid.trim(), "0", "the e2e tests need root (network namespaces, dockerd)");
        for tool in ["ip", "nsenter", "dockerd", "docker", "dig", "busybox", "iptables", "setpriv", "docker-compose", "systemd-analyze"] {
            let found = run("sh", &["-c", &format!("command -v {tool}")]);
            assert!(
                found.status.success(),
                "e2e prerequisite `{tool}` is missing: install it (see scripts/test: docker.io docker-compose iproute2 iptables busybox-static dnsutils util-linux systemd bird2)"
            );
        }
        if let Some(dir) = engine_dir() {
            let dockerd = Path::new(&dir).join("dockerd");
            let version = run(&dockerd.to_string_lossy(), &["--version"]);
            assert!(
                version.status.success(),
                "{ENGINE_VAR}={dir}, but {} does not run: unpack an engine there with scripts/current-docker",
                dockerd.display()
            );
            // "Docker version 28.5.2+dfsg4, build …"
            let text = String::from_utf8_lossy(&version.stdout);
            let number = text
                .split_whitespace()
                .nth(2)
                .map(|v| v.trim_end_matches(',').to_string())
                .unwrap_or_else(|| panic!("cannot read the version of {}: {text}", dockerd.display()));
            let _ = ENGINE_VERSION.set(number);
        }
    });
    let run = shared.run.get_or_insert_with(claim_run).clone();
    let base = run.base.clone();
    if !shared.prepared {
        std::fs::create_dir_all(&base).expect("create test bed dir");
        // busybox, statically linked, as the whole image.
        let rootfs = base.join("rootfs");
        let bin = rootfs.join("bin");
        std::fs::create_dir_all(&bin).expect("rootfs");
        let busybox = sh("sh", &["-c", "command -v busybox"]);
        std::fs::copy(busybox.trim(), bin.join("busybox")).expect("copy busybox");
        for applet in [
            "sh", "sleep", "nc", "nslookup", "ping", "httpd", "cat", "echo", "ls", "wget",
            "hostname", "test", "touch", "rm", "true", "false", "dd", "wc", "netstat",
        ] {
            let link = bin.join(applet);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink("busybox", &link).expect("applet link");
        }
        for dir in ["etc", "tmp"] {
            std::fs::create_dir_all(rootfs.join(dir)).expect("rootfs dir");
        }
        let tar = base.join("image.tar");
        sh(
            "tar",
            &[
                "-C",
                &rootfs.to_string_lossy(),
                "-cf",
                &tar.to_string_lossy(),
                ".",
            ],
        );
        shared.prepared = true;
    }
    run
}

/// The directory of the engine the hosts run, when it is not the machine's (see
/// [`ENGINE_VAR`]).
pub fn engine_dir() -> Option<String> {
    std::env::var(ENGINE_VAR).ok().filter(|d| !d.is_empty())
}

/// The `PATH` a host's engine runs with: the engine's directory first, if one is named.
fn engine_path() -> String {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    match engine_dir() {
        Some(dir) => format!("{dir}:{path}"),
        None => path,
    }
}

/// The pid files a host of the test bed writes: its dockerd's, the containerd that dockerd
/// starts, and its linkdns's.
fn pid_files(dir: &Path) -> [PathBuf; 3] {
    [
        dir.join("linkdns.pid"),
        dir.join("docker.pid"),
        dir.join("exec/containerd/containerd.pid"),
    ]
}

/// Kills the process of a pid file if it is still one of the test bed's (its command line
/// names the run's directory `base`; a pid reused by another process is left alone).
fn kill_by_pid_file(path: &Path, base: &Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(&format!("{}/", base.display())) {
        let _ = run("kill", &["-9", &pid.to_string()]);
    }
}

/// Unmounts everything mounted inside `dir` (a dead run's Docker data roots, overlays and
/// network namespace files), deepest first.
fn unmount_under(dir: &Path) {
    let inside = format!("{}/", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&inside))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = run("umount", &["-l", point]);
    }
}

/// Kills the processes whose command line names a path inside `base` (a dead run's
/// directory: only its daemons and their shims do).
fn kill_processes_naming(base: &Path) {
    let inside = format!("{}/", base.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&inside) {
            let _ = run("kill", &["-9", pid]);
        }
    }
}

/// The pid files of containerd's shims under `dir` (`shim.pid`), and of the containers they
/// run (`init.pid`, in a directory named after the container), at most `depth` levels down.
fn shim_pid_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match path.file_name().and_then(|n| n.to_str()) {
            Some("shim.pid" | "init.pid") => out.push(path),
            _ if depth > 0 && path.is_dir() && !path.is_symlink() => {
                shim_pid_files(&path, depth - 1, out)
            }
            _ => {}
        }
    }
}

/// Kills a container's process named by its `init.pid` if that pid is still the container's
/// (its cgroup names the container, whose id is the pid file's directory).
fn kill_container_by_pid_file(path: &Path) {
    let (Ok(text), Some(id)) = (
        std::fs::read_to_string(path),
        path.parent()
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_str()),
    ) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return;
    };
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    if id.len() == 64 && cgroup.contains(id) {
        let _ = run("kill", &["-9", &pid.to_string()]);
    }
}

/// Removes the daemons, namespaces, links, rules and files a run that died left: the run of
/// directory `base` and tag `tag` (`-` for a test bed from before runs had their own names,
/// whose names all start `ldt-`).
fn cleanup_run(base: &Path, tag: &str) {
    if let Ok(dirs) = std::fs::read_dir(base) {
        for dir in dirs.flatten() {
            for file in pid_files(&dir.path()) {
                kill_by_pid_file(&file, base);
            }
            let mut shims = Vec::new();
            shim_pid_files(&dir.path().join("exec"), 6, &mut shims);
            for file in shims {
                if file.ends_with("init.pid") {
                    kill_container_by_pid_file(&file);
                } else {
                    kill_by_pid_file(&file, base);
                }
            }
        }
        // containerd's shims write no pid file of their own; each names the run's directory
        // (its containerd socket) on its command line, which no other process does.
        kill_processes_naming(base);
        std::thread::sleep(Duration::from_millis(500));
    }
    let (ns_prefix, link_prefix, bridge) = if tag == "-" {
        (
            "ldt-".to_string(),
            "ldt-".to_string(),
            "ldt-lan".to_string(),
        )
    } else {
        (
            format!("ldt{tag}-"),
            format!("l{tag}-"),
            format!("l{tag}-lan"),
        )
    };
    let rule = ["FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT"];
    let mut delete = vec!["-D"];
    delete.extend_from_slice(&rule);
    while run("iptables", &delete).status.success() {}
    let list = sh("ip", &["netns", "list"]);
    for line in list.lines() {
        if let Some(name) = line.split_whitespace().next() {
            if name.starts_with(&ns_prefix) {
                let _ = run("ip", &["netns", "delete", name]);
            }
        }
    }
    let links = sh("ip", &["-o", "link", "show"]);
    for line in links.lines() {
        if let Some(name) = line.split(": ").nth(1) {
            let name = name.split('@').next().unwrap_or(name);
            if name.starts_with(&link_prefix) {
                let _ = run("ip", &["link", "delete", name]);
            }
        }
    }
    unmount_under(base);
    let _ = std::fs::remove_dir_all(base);
}

/// One host of the test bed.
pub struct Host {
    pub index: u8,
    pub ns: String,
    /// The host's address on its veth (reachable from the root namespace).
    pub addr: Ipv4Addr,
    /// The root namespace's end of the veth.
    pub outside: Ipv4Addr,
    /// The Docker bridge's gateway (where containers find DNS by default).
    pub gateway: Ipv4Addr,
    pub dir: PathBuf,
    /// Where it is: alone, on the shared LAN or on a routed LAN.
    attach: Attach,
    /// On a LAN: the veth end inside the namespace (to cut in a partition).
    pub lan_if: Option<String>,
    /// A command linkdns is started under (e.g. `setpriv` to drop a capability).
    pub wrapper: Vec<String>,
    dockerd: Option<Child>,
    /// A daemon.json the engine runs with (instead of `--bip 192.168.N.1/24`).
    daemon_config: Option<PathBuf>,
    linkdns: Option<Child>,
    linkdns_args: Vec<String>,
    /// The subcommand of the next start (`run`, or a `join` with its peer and token).
    subcommand: Vec<String>,
    /// Started as a service is: these arguments exactly, with this environment.
    service: Option<(Vec<String>, Environment)>,
    /// The root namespace's end of its veth.
    veth_out: String,
}

/// Variables added to a process's environment.
type Environment = Vec<(String, String)>;

/// Where a host is linked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attach {
    /// Alone on a link to the root namespace.
    Alone,
    /// On the shared LAN bridge of the root namespace.
    Lan,
    /// On a routed LAN, behind the router.
    Routed(Lan),
}

/// Brings this run's LAN bridge and its FORWARD rule up for the first LAN host (with the
/// shared state locked).
fn lan_up(shared: &mut Shared, run: &Run) {
    if shared.lan.is_some() {
        return;
    }
    let bridge = run.lan_bridge();
    sh("ip", &["link", "add", &bridge, "type", "bridge"]);
    let root = format!("{}/24", run.lan_root());
    sh("ip", &["addr", "add", &root, "dev", &bridge]);
    sh("ip", &["link", "set", &bridge, "up"]);
    let rule = run.lan_rule();
    let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
    let mut check = vec!["-C"];
    check.extend_from_slice(&rule);
    let added = !self::run("iptables", &check).status.success();
    if added {
        let mut insert = vec!["-I"];
        insert.extend_from_slice(&rule);
        sh("iptables", &insert);
    }
    shared.lan = Some(added);
}

/// Takes the LAN bridge and the rule this process added down, after the last LAN host.
fn lan_down(shared: &mut Shared, run: &Run) {
    if let Some(added) = shared.lan.take() {
        if added {
            let rule = run.lan_rule();
            let mut delete = vec!["-D"];
            delete.extend(rule.iter().map(String::as_str));
            let _ = self::run("iptables", &delete);
        }
        let _ = self::run("ip", &["link", "delete", &run.lan_bridge()]);
    }
}

impl Host {
    /// A new host with a running Docker engine that has the busybox image, alone on its own
    /// link to the root namespace (172.R.N.2, the root side being 172.R.N.1, R the run's
    /// octet).
    // No `Default`: a host is a namespace, a Docker engine and a directory, never a default.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Host {
        Host::create(Attach::Alone)
    }

    /// A new host on the shared LAN (172.R.0.N/24, the root namespace at 172.R.0.254), where
    /// the hosts reach each other.
    pub fn on_lan() -> Host {
        Host::create(Attach::Lan)
    }

    /// A new host on routed LAN `lan` (172.R.20x.N/24), its default route via the router:
    /// hosts on the other LAN are reached through the router only.
    pub fn on_routed(lan: Lan) -> Host {
        Host::create(Attach::Routed(lan))
    }

    fn create(attach: Attach) -> Host {
        let index = NEXT_HOST.fetch_add(1, Ordering::SeqCst);
        assert!(index < 200, "too many test hosts");
        let on_lan = attach == Attach::Lan;
        let run = {
            let mut shared = shared();
            let run = prepare(&mut shared);
            // Counted from here: the host below is made before anything can fail, and its
            // drop counts it out.
            shared.hosts += 1;
            match attach {
                Attach::Lan => {
                    lan_up(&mut shared, &run);
                    shared.lan_hosts += 1;
                }
                Attach::Routed(_) => routed_up(&mut shared, &run),
                Attach::Alone => {}
            }
            run
        };
        let base = run.base.clone();
        let ns = run.ns(index);
        let dir = base.join(format!("h{index}"));
        let (addr, outside) = match attach {
            Attach::Lan => (Ipv4Addr::new(172, run.octet, 0, index), run.lan_root()),
            Attach::Routed(lan) => (
                Ipv4Addr::new(172, run.octet, lan.third_octet(), index),
                Ipv4Addr::new(172, run.octet, lan.third_octet(), 254),
            ),
            Attach::Alone => (
                Ipv4Addr::new(172, run.octet, index, 2),
                Ipv4Addr::new(172, run.octet, index, 1),
            ),
        };
        let (veth_out, veth_in) = (run.veth(index, 'o'), run.veth(index, 'i'));
        // Made before anything else, so that dropping it (also after a panic below) takes
        // down whatever part of it was set up.
        let mut host = Host {
            index,
            ns: ns.clone(),
            addr,
            outside,
            gateway: Ipv4Addr::new(192, 168, index, 1),
            dir,
            attach,
            lan_if: (attach != Attach::Alone).then_some(veth_in.clone()),
            wrapper: Vec::new(),
            dockerd: None,
            daemon_config: None,
            linkdns: None,
            linkdns_args: Vec::new(),
            subcommand: vec!["run".to_string()],
            service: None,
            veth_out: veth_out.clone(),
        };
        std::fs::create_dir_all(&host.dir).expect("host dir");
        sh("ip", &["netns", "add", &ns]);
        if let Attach::Routed(lan) = attach {
            attach_routed(&run, &ns, lan, index, &veth_out, &veth_in);
            host.start_dockerd();
            host.docker(&["import", &base.join("image.tar").to_string_lossy(), IMAGE]);
            return host;
        }
        sh(
            "ip",
            &[
                "link", "add", &veth_out, "type", "veth", "peer", "name", &veth_in,
            ],
        );
        sh("ip", &["link", "set", &veth_in, "netns", &ns]);
        if on_lan {
            sh(
                "ip",
                &["link", "set", &veth_out, "master", &run.lan_bridge()],
            );
        } else {
            sh(
                "ip",
                &["addr", "add", &format!("{outside}/24"), "dev", &veth_out],
            );
        }
        sh("ip", &["link", "set", &veth_out, "up"]);
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", ns.as_str()];
            full.extend_from_slice(args);
            sh("ip", &full);
        };
        in_ns(&["ip", "link", "set", "lo", "up"]);
        in_ns(&["ip", "addr", "add", &format!("{addr}/24"), "dev", &veth_in]);
        in_ns(&["ip", "link", "set", &veth_in, "up"]);
        host.start_dockerd();
        host.docker(&["import", &base.join("image.tar").to_string_lossy(), IMAGE]);
        host
    }

    pub fn docker_sock(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("linkdns")
    }

    /// Starts this host's Docker engine and waits until it answers.
    pub fn start_dockerd(&mut self) {
        // A second engine on the same dirs fails at once, and the first one's handle would be
        // lost: it would outlive the host.
        assert!(
            self.dockerd.is_none(),
            "dockerd already runs on {}: stop_dockerd first",
            self.ns
        );
        let log = std::fs::File::create(self.dir.join("dockerd.log")).expect("dockerd log");
        let d = |p: &str| self.dir.join(p).to_string_lossy().into_owned();
        let child = Command::new("nsenter")
            .env("PATH", engine_path())
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .args([
                "dockerd",
                "--data-root",
                &d("data"),
                "--exec-root",
                &d("exec"),
                "--pidfile",
                &d("docker.pid"),
            ])
            .args(["-H", &format!("unix://{}", d("docker.sock"))])
            .args(match &self.daemon_config {
                Some(file) => vec!["--config-file".to_string(), file.display().to_string()],
                None => vec!["--bip".to_string(), format!("{}/24", self.gateway)],
            })
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        self.dockerd = Some(child);
        wait_until(Duration::from_secs(60), "dockerd to answer", || {
            self.try_docker(&["info", "--format", "{{.ID}}"])
                .status
                .success()
        });
        if let Some(want) = ENGINE_VERSION.get() {
            let have = self.engine_version();
            assert_eq!(
                &have, want,
                "{} runs another engine than {ENGINE_VAR} names",
                self.ns
            );
        }
    }

    /// The version of the engine this host runs (`20.10.24+dfsg1`, `28.5.2+dfsg4`).
    pub fn engine_version(&self) -> String {
        self.docker(&["version", "--format", "{{.Server.Version}}"])
    }

    /// Restarts the Docker engine with `daemon_json` as its /etc/docker/daemon.json (as an
    /// administrator applies `linkdns docker-config`); the bridge's gateway follows its `bip`.
    pub fn restart_dockerd_with(&mut self, daemon_json: &str) {
        let file = self.dir.join("daemon.json");
        std::fs::write(&file, daemon_json).expect("write daemon.json");
        self.daemon_config = Some(file);
        self.stop_dockerd();
        self.start_dockerd();
        let gateway = self.docker(&[
            "network",
            "inspect",
            "bridge",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        ]);
        self.gateway = gateway.parse().expect("the bridge's IPv4 gateway");
    }

    /// `docker-compose -p <project> up -d` of `compose_yml` against this host's engine, as a
    /// user runs it; panics with its output if it fails.
    pub fn compose_up(&self, project: &str, compose_yml: &str) {
        let file = self.dir.join(format!("{project}.compose.yml"));
        std::fs::write(&file, compose_yml).expect("write compose file");
        let out = Command::new("docker-compose")
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.docker_sock().display()),
            )
            .args(["-p", project, "-f", &file.to_string_lossy(), "up", "-d"])
            .output()
            .expect("run docker-compose");
        assert!(
            out.status.success(),
            "docker-compose -p {project} up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Kills the Docker engine (SIGKILL), as a crash would: its containerd, the shims and the
    /// containers keep running (`start_dockerd` takes them back; the host's drop kills them
    /// otherwise).
    pub fn kill_dockerd(&mut self) {
        if let Some(mut child) = self.dockerd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the Docker engine (SIGTERM) and waits for it to exit.
    pub fn stop_dockerd(&mut self) {
        if let Some(mut child) = self.dockerd.take() {
            let _ = run("kill", &["-TERM", &child.id().to_string()]);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn try_docker(&self, args: &[&str]) -> Output {
        let host = format!("unix://{}", self.docker_sock().display());
        let mut full = vec!["-H", host.as_str()];
        full.extend_from_slice(args);
        run("docker", &full)
    }

    /// Runs a docker CLI command against this host's engine; panics on failure.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = self.try_docker(args);
        assert!(
            out.status.success(),
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `docker run -d` of the busybox image with `flags`, running `sleep`; returns the id.
    pub fn run_container(&self, name: &str, flags: &[&str]) -> String {
        let mut args = vec!["run", "-d", "--name", name];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[IMAGE, "sleep", "3600"]);
        self.docker(&args)
    }

    /// The container's IPv4 address on its networks, as Docker reports it.
    pub fn container_ip(&self, name: &str) -> String {
        self.docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            name,
        ])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
    }

    /// Starts `linkdns run` inside the namespace with this host's data dir and Docker socket.
    pub fn start_linkdns(&mut self, extra: &[&str]) {
        self.linkdns_args = extra.iter().map(|s| s.to_string()).collect();
        self.spawn_linkdns();
        self.wait_for_dns();
    }

    /// Starts `linkdns join <via's peer address> --token-file FILE` (the token in a file of
    /// mode 0600, as the README says) with the same options as `start_linkdns`; the process
    /// continues as `linkdns run`, and later restarts are plain `linkdns run`.
    pub fn join_linkdns(&mut self, via: &Host, token: &str, extra: &[&str]) {
        let path = self.write_token_file(token);
        self.subcommand = vec![
            "join".into(),
            via.peer_addr(),
            "--token-file".into(),
            path.to_string_lossy().into_owned(),
        ];
        self.start_linkdns(extra);
    }

    /// Starts a service's command, `linkdns run --join PEERS --token-file FILE`, and returns
    /// at once (it asks until a member admits it; see [`Host::wait_linkdns_answers`]). Restarts
    /// run the same command.
    pub fn start_linkdns_joining(&mut self, peers: &[String], token: &str, extra: &[&str]) {
        let path = self.write_token_file(token);
        self.linkdns_args = extra.iter().map(|s| s.to_string()).collect();
        self.linkdns_args.extend([
            "--join".into(),
            peers.join(","),
            "--token-file".into(),
            path.to_string_lossy().into_owned(),
        ]);
        self.spawn_linkdns();
    }

    /// Writes `token` to a file of mode 0600 in this host's directory.
    pub fn write_token_file(&self, token: &str) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join("join.token");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .expect("token file");
        std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes()).expect("token");
        path
    }

    /// Starts linkdns as a service manager would: `args` exactly (no data dir, node name or
    /// Docker socket added) with `env` added to the environment, under this host's wrapper.
    /// Returns at once; restarts run the same.
    pub fn start_linkdns_service(&mut self, args: &[String], env: &[(String, String)]) {
        self.service = Some((args.to_vec(), env.to_vec()));
        self.spawn_linkdns();
    }

    /// Waits until the running linkdns answers DNS (panics if it exits first).
    pub fn wait_linkdns_answers(&mut self) {
        self.wait_for_dns();
    }

    /// Restarts linkdns (after a kill or a stop) with the options it had.
    pub fn restart_linkdns(&mut self) {
        self.spawn_linkdns();
        self.wait_for_dns();
    }

    /// Where peers reach this host's node.
    pub fn peer_addr(&self) -> String {
        format!("{}:{PEER_PORT}", self.addr)
    }

    /// Runs a `linkdns` subcommand inside the namespace, on this host's data dir.
    pub fn linkdns(&self, args: &[&str]) -> Output {
        let data_dir = self.data_dir();
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--data-dir", data_dir.to_str().unwrap_or_default()]);
        self.exec(linkdns_bin(), &full)
    }

    /// `linkdns token` of this host's cluster.
    pub fn token(&self) -> String {
        let out = self.linkdns(&["token"]);
        assert!(
            out.status.success(),
            "token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Cuts this host off the LAN (both directions), leaving loopback and its containers.
    pub fn partition(&self) {
        let lan_if = self.lan_if.as_deref().expect("a LAN host");
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let out = self.exec("iptables", &["-I", chain, dir, lan_if, "-j", "DROP"]);
            assert!(out.status.success(), "iptables: {out:?}");
        }
    }

    pub fn heal(&self) {
        let lan_if = self.lan_if.as_deref().expect("a LAN host");
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let out = self.exec("iptables", &["-D", chain, dir, lan_if, "-j", "DROP"]);
            assert!(out.status.success(), "iptables: {out:?}");
        }
    }

    fn spawn_linkdns(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("linkdns.log"))
            .expect("linkdns log");
        let data_dir = self.data_dir();
        let docker = format!("unix://{}", self.docker_sock().display());
        // A join happens once; every later start is `run`.
        let mut args: Vec<String> = std::mem::replace(&mut self.subcommand, vec!["run".into()]);
        args.extend([
            "--data-dir".into(),
            data_dir.to_string_lossy().into_owned(),
            "--node-name".into(),
            format!("h{}", self.index),
        ]);
        if !self.linkdns_args.iter().any(|a| a == "--docker") {
            args.extend(["--docker".to_string(), docker]);
        }
        args.extend(self.linkdns_args.iter().cloned());
        let mut env = vec![(
            "LINKDNS_LOG".to_string(),
            "info,raft=info,linkdns=debug".to_string(),
        )];
        if let Some((service_args, service_env)) = &self.service {
            args = service_args.clone();
            env.extend(service_env.iter().cloned());
        }
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns))
            .args(&self.wrapper)
            .arg(linkdns_bin())
            .args(&args)
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start linkdns");
        // nsenter execs linkdns: the child's pid is linkdns's (see cleanup_run).
        let _ = std::fs::write(self.dir.join("linkdns.pid"), child.id().to_string());
        self.linkdns = Some(child);
    }

    fn wait_for_dns(&mut self) {
        wait_until(Duration::from_secs(30), "linkdns to answer DNS", || {
            if let Some(child) = self.linkdns.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("linkdns exited early ({status}); log:\n{}", self.log());
                }
            }
            self.dig(&["@127.0.0.1", "cluster", "SOA", "+time=1", "+tries=1"])
                .status
                == "NOERROR"
        });
    }

    /// Stops linkdns with SIGTERM (a clean shutdown) and waits for it.
    pub fn stop_linkdns(&mut self) -> std::process::ExitStatus {
        let mut child = self.linkdns.take().expect("linkdns is running");
        let _ = run("kill", &["-TERM", &child.id().to_string()]);
        child.wait().expect("wait linkdns")
    }

    /// Waits for linkdns to exit on its own; panics after `timeout`.
    pub fn wait_linkdns_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.linkdns.take().expect("linkdns is running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "linkdns did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The running linkdns process's pid.
    pub fn linkdns_pid(&self) -> Option<u32> {
        self.linkdns.as_ref().map(Child::id)
    }

    /// Kills linkdns with SIGKILL.
    pub fn kill_linkdns(&mut self) {
        if let Some(mut child) = self.linkdns.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("linkdns.log")).unwrap_or_default()
    }

    /// Runs a command inside this host's namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", self.ns.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `dig` from inside the host, parsed.
    pub fn dig(&self, args: &[&str]) -> Dig {
        let mut full = vec![
            "+time=2",
            "+tries=1",
            "+noall",
            "+comments",
            "+answer",
            "+authority",
        ];
        full.extend_from_slice(args);
        let out = self.exec("dig", &full);
        Dig::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// `linkdns status --json` from inside the host.
    pub fn status_json(&self) -> serde_json::Value {
        let data_dir = self.data_dir();
        let out = self.exec(
            linkdns_bin(),
            &[
                "status",
                "--json",
                "--data-dir",
                &data_dir.to_string_lossy(),
            ],
        );
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Sends one UDP datagram to `addr` from the root namespace and returns the reply, if any.
    pub fn udp_exchange(to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(700)))
            .expect("timeout");
        socket.send_to(payload, to).expect("send");
        let mut buf = vec![0u8; 65535];
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => Some(buf[..n].to_vec()),
            Err(_) => None,
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_linkdns();
        if std::thread::panicking() {
            let _ = std::io::stderr().write_all(
                format!("--- linkdns log of {} ---\n{}\n", self.ns, self.log()).as_bytes(),
            );
        }
        let ids = self.try_docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.try_docker(&["rm", "-f", id]);
        }
        self.stop_dockerd();
        // What an engine killed and not started again left: its containerd, the shims and
        // their containers (by their pid files, each checked to be still this host's).
        if let Some(base) = self.dir.parent() {
            for file in pid_files(&self.dir) {
                kill_by_pid_file(&file, base);
            }
            let mut shims = Vec::new();
            shim_pid_files(&self.dir.join("exec"), 6, &mut shims);
            for file in shims {
                if file.ends_with("init.pid") {
                    kill_container_by_pid_file(&file);
                } else {
                    kill_by_pid_file(&file, base);
                }
            }
            // The shims write no pid file; each names this host's directory on its command
            // line, which no process of another host or run does.
            kill_processes_naming(&self.dir);
        }
        let _ = run("ip", &["netns", "delete", &self.ns]);
        let _ = run("ip", &["link", "delete", &self.veth_out]);
        // The data dir's tmpfs (a test's), and whatever Docker left mounted.
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        let mut shared = shared();
        shared.hosts -= 1;
        match self.attach {
            Attach::Lan => {
                shared.lan_hosts -= 1;
                if shared.lan_hosts == 0 {
                    if let Some(run) = shared.run.clone() {
                        lan_down(&mut shared, &run);
                    }
                }
            }
            Attach::Routed(_) => {
                if let Some(run) = shared.run.clone() {
                    routed_down(&mut shared, &run);
                }
            }
            Attach::Alone => {}
        }
        if shared.hosts == 0 {
            if let Some(run) = shared.run.take() {
                release_run(&run);
            }
            shared.prepared = false;
        }
    }
}

/// Polls `check` until it holds; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A parsed `dig +noall +comments +answer +authority` output.
#[derive(Debug, Default, Clone)]
pub struct Dig {
    pub status: String,
    pub flags: Vec<String>,
    /// Answer records as `name ttl class type rdata`, whitespace-normalized.
    pub answers: Vec<String>,
    pub authority: Vec<String>,
    pub edns_udp: Option<u16>,
    pub raw: String,
}

impl Dig {
    pub fn parse(text: &str) -> Dig {
        let mut dig = Dig {
            raw: text.to_string(),
            ..Dig::default()
        };
        let mut section = "";
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.split("status: ").nth(1) {
                dig.status = rest.split(',').next().unwrap_or("").to_string();
            } else if let Some(rest) = line.strip_prefix(";; flags: ") {
                let flags = rest.split(';').next().unwrap_or("");
                dig.flags = flags.split_whitespace().map(str::to_string).collect();
            } else if let Some(rest) = line.split("udp: ").nth(1) {
                dig.edns_udp = rest.trim().parse().ok();
            } else if line.starts_with(";; ANSWER SECTION") {
                section = "answer";
            } else if line.starts_with(";; AUTHORITY SECTION") {
                section = "authority";
            } else if line.is_empty() || line.starts_with(';') {
                if line.is_empty() {
                    section = "";
                }
            } else {
                let record = line.split_whitespace().collect::<Vec<_>>().join(" ");
                match section {
                    "answer" => dig.answers.push(record),
                    "authority" => dig.authority.push(record),
                    _ => {}
                }
            }
        }
        dig
    }

    /// The rdata of the answers, sorted (`192.168.1.2`, `web.cluster.`).
    pub fn rdata(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .answers
            .iter()
            .filter_map(|r| r.split_whitespace().nth(4).map(str::to_string))
            .collect();
        v.sort();
        v
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}
