//! `fsp-load`, the load program: fsp against the upstream direct and against nginx as an
//! mTLS reverse proxy, and fsp with a feature on against the same fsp with it off, side by
//! side on this machine, in interleaved rounds, medians reported.
//!
//! It makes its certificates with the project's development PKI, writes fsp's
//! configurations through the gateway's own configuration types (checked by the gateway's
//! loader before a run), starts nginx, fsp and what they need on loopback, drives them
//! with `oha`, charges CPU per call from `/proc`, and prints one table. See
//! `load-tests/README.md` for the scenarios and how to read the table.
//!
//! Exit status: 0 when every target ran and every response was 200 (a MISS against a
//! target does not change it); 1 when something failed to start or run; 3 when a run saw
//! errors or responses other than 200; 128 + the signal when stopped by SIGINT, SIGTERM
//! or SIGHUP (what the run started is stopped and removed first).

mod disk;
mod report;
mod scenario;
mod setup;
mod sink;

mod procs;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

use procs::Proc;
use scenario::{Audit, Fsp, Request, ScenarioName, Server, Target};

#[derive(Parser, Debug)]
#[command(
    name = "fsp-load",
    about = "Measures fsp against nginx and direct, and fsp feature on against off, on loopback."
)]
pub struct Args {
    /// Scenarios to measure, comma-separated (their targets run together, each once).
    #[arg(long, short, value_delimiter = ',', default_value = "proxy")]
    scenario: Vec<ScenarioName>,
    /// Connections the load generator keeps open.
    #[arg(long, default_value_t = 32)]
    concurrency: u32,
    /// Seconds measured per target and round.
    #[arg(long, default_value_t = 10)]
    duration: u32,
    /// Seconds of load before each measured run (not counted).
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Rounds over every target; medians are reported. On a small VM the machine drifts by
    /// 10 % or more within a minute: one round per target would compare two moments.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// The gateway binary (default: built now with `cargo build --release -p proxy`).
    #[arg(long)]
    fsp_bin: Option<PathBuf>,
    /// Where latest.json and the raw oha results go.
    #[arg(long, default_value = "load-tests/results")]
    results: PathBuf,
    /// Keep the temporary directory (configurations, logs) and the PostgreSQL schema.
    #[arg(long)]
    keep_tmp: bool,
    /// Redis for the throttle-redis scenario.
    #[arg(
        long,
        env = "FSP_TEST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// PostgreSQL for the audit-postgres scenario (a schema is made for the run and dropped).
    #[arg(
        long,
        env = "FSP_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// Instead of timing, count the instructions fsp executes per call with callgrind (the
    /// first fsp target of the scenarios): repeatable where timings are not.
    #[arg(long)]
    instructions: bool,
    /// Calls counted with --instructions (at 8 connections, after --warmup-calls).
    #[arg(long, default_value_t = 10_000)]
    calls: u64,
    #[arg(long, default_value_t = 1_000)]
    warmup_calls: u64,
    /// The target counted with --instructions (default: the scenarios' first fsp target).
    #[arg(long)]
    target: Option<String>,
}

fn log(msg: impl AsRef<str>) {
    let now = time::OffsetDateTime::now_utc();
    eprintln!(
        "[{:02}:{:02}:{:02}] {}",
        now.hour(),
        now.minute(),
        now.second(),
        msg.as_ref()
    );
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        // Stopped by a signal: what the run started is stopped and removed (here, or by
        // the signal's own clean-up, whichever comes first).
        Err(_) if procs::signalled().is_some() => {
            let signal = procs::signalled().unwrap_or(0);
            log(format!("interrupted by signal {signal}"));
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(1))
        }
        Err(e) => {
            log(format!("ERROR: {e:#}"));
            ExitCode::from(1)
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `program args` to completion, failing with its output if it fails.
fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// oha, nginx and curl (valgrind for --instructions), installed if missing and possible.
fn tools(args: &Args) -> Result<()> {
    if procs::which("oha").is_none() {
        log("installing oha (cargo install oha --locked)");
        run_tool("cargo", &["install", "oha", "--locked"])?;
    }
    let mut packages = Vec::new();
    if procs::which("nginx").is_none() {
        packages.push("nginx-light");
    }
    if procs::which("curl").is_none() {
        packages.push("curl");
    }
    if args.instructions && procs::which("valgrind").is_none() {
        packages.push("valgrind");
    }
    if !packages.is_empty() {
        log(format!("installing {}", packages.join(" ")));
        run_tool("apt-get", &["update", "-qq"])?;
        let mut a = vec!["install", "-y", "-qq"];
        a.extend(&packages);
        run_tool("apt-get", &a)?;
    }
    for t in ["oha", "nginx", "curl"] {
        if procs::which(t).is_none() {
            bail!("{t} is required and could not be installed");
        }
    }
    Ok(())
}

fn fsp_binary(args: &Args) -> Result<PathBuf> {
    if let Some(b) = &args.fsp_bin {
        return Ok(b.clone());
    }
    log("building fsp (cargo build --release -p proxy --bin fsp)");
    let root = repo_root();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "proxy", "--bin", "fsp"])
        .current_dir(&root)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build --release -p proxy failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/fsp"))
}

/// One run at a time on this machine: a second would share the CPUs.
fn lock() -> Result<fs::File> {
    let path = std::env::temp_dir().join("fsp-loadtest.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        anyhow::anyhow!(
            "another load run holds {}; wait for it to finish",
            path.display()
        )
    })?;
    Ok(f)
}

/// The run's temporary directory, removed when dropped unless kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn new(keep: bool) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "fsp-loadtest.{}.{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        // nginx's workers may run as an unprivileged user: let them traverse it.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o711))?;
        procs::register_dir((!keep).then(|| path.clone()));
        procs::watch_over(&path, (!keep).then_some(path.as_path()))?;
        Ok(Self { path, keep })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        procs::register_dir(None);
        if self.keep {
            log(format!("kept {}", self.path.display()));
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A PostgreSQL schema made for the run, dropped at the end unless kept.
struct Schema {
    url: String,
    name: String,
    keep: bool,
}

impl Schema {
    fn create(url: &str, keep: bool) -> Result<Self> {
        let name = format!("fsp_loadtest_{}", std::process::id());
        let mut c = postgres::Client::connect(url, postgres::NoTls)
            .with_context(|| format!("cannot connect to PostgreSQL at {url}"))?;
        c.batch_execute(&format!("CREATE SCHEMA {name}"))
            .with_context(|| format!("cannot create schema {name}"))?;
        procs::register_schema((!keep).then(|| (url.to_string(), name.clone())));
        Ok(Self {
            url: url.into(),
            name,
            keep,
        })
    }

    /// The URL with the schema as search path.
    fn url(&self) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-csearch_path%3D{}", self.url, self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        procs::register_schema(None);
        if self.keep {
            log(format!("kept PostgreSQL schema {}", self.name));
            return;
        }
        if let Ok(mut c) = postgres::Client::connect(&self.url, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

/// The servers of a run and where they listen.
struct Servers {
    upstream: Proc,
    upstream_tls_port: u16,
    nginx: Option<(Proc, u16)>,
    fsps: Vec<(Fsp, Proc, u16)>,
}

impl Servers {
    /// The process serving `s` and its mTLS port (every target's server is started
    /// before the target is used).
    fn place(&self, s: Server) -> (&Proc, u16) {
        match s {
            Server::Upstream => (&self.upstream, self.upstream_tls_port),
            Server::Nginx => self
                .nginx
                .as_ref()
                .map_or((&self.upstream, 0), |n| (&n.0, n.1)),
            Server::Fsp(v) => self
                .fsps
                .iter()
                .find(|f| f.0 == v)
                .map_or((&self.upstream, 0), |f| (&f.1, f.2)),
        }
    }

    fn url(&self, t: &Target) -> String {
        format!("https://localhost:{}{}", self.place(t.server).1, t.path)
    }

    fn front(&self, s: Server) -> &Proc {
        self.place(s).0
    }

    fn all_mut(&mut self) -> impl Iterator<Item = &mut Proc> {
        std::iter::once(&mut self.upstream)
            .chain(self.nginx.as_mut().map(|n| &mut n.0))
            .chain(self.fsps.iter_mut().map(|f| &mut f.1))
    }

    fn all(&self) -> impl Iterator<Item = &Proc> {
        std::iter::once(&self.upstream)
            .chain(self.nginx.as_ref().map(|n| &n.0))
            .chain(self.fsps.iter().map(|f| &f.1))
    }
}

fn start_nginx(name: &str, dir: &Path, conf: &Path) -> Result<Proc> {
    // Its prefix, error log and configuration, the same for the check and the run.
    let nginx = || {
        let mut c = Command::new("nginx");
        c.arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(conf);
        c
    };
    let check = nginx()
        .args(["-t", "-q"])
        .output()
        .context("cannot run nginx -t")?;
    if !check.status.success() {
        bail!(
            "{name}: nginx refuses its configuration:\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    Proc::spawn(name, nginx(), &dir.join("stdout.log"))
}

/// The request files oha and curl send.
struct Bodies {
    json: PathBuf,
    soap: PathBuf,
}

fn request_args(r: Request, bodies: &Bodies) -> Vec<String> {
    let post = |file: &Path, ctype: &str| {
        vec![
            "-m".into(),
            "POST".into(),
            "-D".into(),
            file.display().to_string(),
            "-T".into(),
            ctype.into(),
        ]
    };
    match r {
        Request::Get1KiB | Request::Get1MiB => Vec::new(),
        Request::PostJson => post(&bodies.json, "application/json"),
        Request::PostSoap => post(&bodies.soap, "text/xml"),
    }
}

/// One call with curl: 200 and the expected answer with the client certificate, anything
/// but 200 without it (mTLS is really on).
fn smoke(t: &Target, url: &str, pki: &setup::Pki, bodies: &Bodies, dir: &Path) -> Result<()> {
    let out = dir.join(format!("smoke-{}", t.name));
    let curl = |with_cert: bool| -> Result<String> {
        let mut c = Command::new("curl");
        c.args(["-4", "--silent", "--max-time", "10", "--cacert"])
            .arg(&pki.ca)
            .args(["-H", setup::PURPOSE_HEADER, "-o"])
            .arg(&out)
            .args(["-w", "%{http_code}"])
            .arg(if t.http2 { "--http2" } else { "--http1.1" });
        if with_cert {
            c.arg("--cert")
                .arg(&pki.client_cert)
                .arg("--key")
                .arg(&pki.client_key);
        }
        match t.request {
            Request::PostJson => {
                c.args(["-X", "POST", "-H", "Content-Type: application/json"])
                    .arg("--data-binary")
                    .arg(format!("@{}", bodies.json.display()));
            }
            Request::PostSoap => {
                c.args(["-X", "POST", "-H", "Content-Type: text/xml"])
                    .arg("--data-binary")
                    .arg(format!("@{}", bodies.soap.display()));
            }
            _ => {}
        }
        let o = c.arg(url).stderr(Stdio::null()).output()?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let code = curl(true)?;
    let body = fs::read(&out).unwrap_or_default();
    if code != "200" {
        bail!(
            "{}: {url} answered HTTP {code} (expected 200): {}",
            t.name,
            String::from_utf8_lossy(&body[..body.len().min(2000)])
        );
    }
    let ok = match t.request {
        Request::Get1KiB | Request::PostJson => body == setup::json_body().as_bytes(),
        Request::Get1MiB => body.len() == setup::BIG_BYTES,
        Request::PostSoap => String::from_utf8_lossy(&body).contains("<fsp:MessageID"),
    };
    if !ok {
        bail!(
            "{}: {url} answered 200 with another body than the upstream's ({} bytes)",
            t.name,
            body.len()
        );
    }
    if curl(false)? == "200" {
        bail!(
            "{}: {url} answered 200 without a client certificate",
            t.name
        );
    }
    Ok(())
}

/// What one measured run gave.
#[derive(Debug, Clone)]
pub struct Measured {
    pub round: u32,
    pub raw: PathBuf,
    pub oha: serde_json::Value,
    pub front_ticks: u64,
    pub upstream_ticks: u64,
    pub servers_ticks: u64,
    pub loadgen_ticks: u64,
    pub host_ticks: u64,
}

fn oha_command(
    concurrency: u32,
    t: &Target,
    url: &str,
    pki: &setup::Pki,
    bodies: &Bodies,
) -> Command {
    let mut c = Command::new("oha");
    c.args(["--no-tui", "--ipv4", "-w", "-t", "10s"])
        .args(["--http-version", if t.http2 { "2" } else { "1.1" }])
        .arg("-c")
        .arg(concurrency.to_string())
        .arg("--cacert")
        .arg(&pki.ca)
        .arg("--cert")
        .arg(&pki.client_cert)
        .arg("--key")
        .arg(&pki.client_key)
        .args(["-H", setup::PURPOSE_HEADER])
        .args(request_args(t.request, bodies));
    if t.churn {
        c.arg("--disable-keepalive");
    }
    c.arg(url);
    c
}

/// Forgets a process for the signal clean-up when dropped.
struct Forget(u32);

impl Drop for Forget {
    fn drop(&mut self) {
        procs::forget_pid(self.0);
    }
}

/// Runs oha to completion within `limit`, killing it after; its error output goes to
/// `stderr` (a file: a pipe nobody reads while it runs could fill and stall it).
fn run_oha(mut c: Command, limit: Duration, stderr: &Path) -> Result<()> {
    let err =
        fs::File::create(stderr).with_context(|| format!("cannot create {}", stderr.display()))?;
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .context("cannot start oha")?;
    procs::register_pid(child.id());
    let pid = child.id();
    let _forget = Forget(pid);
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                let err = fs::read_to_string(stderr).unwrap_or_default();
                bail!("oha failed ({status}): {}", err.trim());
            }
            return Ok(());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("oha did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(args: &Args) -> Result<bool> {
    if args.concurrency == 0 || args.duration == 0 || args.rounds == 0 {
        bail!("--concurrency, --duration and --rounds must be at least 1");
    }
    let (targets, comparisons) = scenario::plan_all(&args.scenario);
    let _lock = lock()?;
    procs::clean_up_on_signals()?;
    tools(args)?;
    let fsp_bin = fsp_binary(args)?;
    if !fsp_bin.is_file() {
        bail!("{} not found", fsp_bin.display());
    }
    let fsp_version = Command::new(&fsp_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    // In --instructions mode only the counted fsp and the upstream run.
    let targets: Vec<Target> = if args.instructions {
        let Some(t) = targets.iter().find(|t| {
            matches!(t.server, Server::Fsp(_))
                && args.target.as_deref().is_none_or(|name| name == t.name)
        }) else {
            bail!(
                "--instructions counts an fsp: choose a scenario with an fsp target{}",
                args.target
                    .as_deref()
                    .map(|n| format!(" named {n}"))
                    .unwrap_or_default()
            );
        };
        vec![t.clone()]
    } else {
        targets
    };

    // Dropped last: servers stop first, then the schema and the directory go.
    let tmp = TempDir::new(args.keep_tmp)?;
    let needs_pg = targets.iter().any(|t| t.audit() == Some(Audit::Postgres));
    let schema = if needs_pg {
        Some(Schema::create(&args.postgres_url, args.keep_tmp)?)
    } else {
        None
    };

    log(format!("making a throw-away PKI in {}", tmp.path.display()));
    let pki = setup::pki(&tmp.path.join("pki"))?;
    let bodies = Bodies {
        json: tmp.path.join("rest-request.json"),
        soap: tmp.path.join("soap-request.xml"),
    };
    fs::write(&bodies.json, setup::json_body())?;
    fs::write(&bodies.soap, setup::soap_request())?;

    // Every port of the run, chosen at once: upstream (2), nginx (1), each fsp (2).
    let variants: Vec<Fsp> = targets.iter().fold(Vec::new(), |mut seen, t| {
        if let Server::Fsp(v) = t.server
            && !seen.contains(&v)
        {
            seen.push(v);
        }
        seen
    });
    let mut ports = procs::free_ports(3 + 2 * variants.len())?.into_iter();
    let mut port = move || ports.next().context("no port left");
    let up_dir = tmp.path.join("upstream");
    let (up_http, up_tls) = (port()?, port()?);
    let conf = setup::nginx_upstream(&up_dir, &pki, up_http, up_tls)?;
    let startup = if args.instructions {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(15)
    };
    log(format!(
        "starting the upstream (nginx: HTTP :{up_http}, mTLS :{up_tls})"
    ));
    let mut upstream = start_nginx("upstream", &up_dir, &conf)?;
    upstream.wait_listening(up_tls, startup)?;
    upstream.wait_listening(up_http, startup)?;

    let nginx = if targets.iter().any(|t| t.server == Server::Nginx) {
        let dir = tmp.path.join("nginx-proxy");
        let port = port()?;
        let conf = setup::nginx_proxy(&dir, &pki, port, up_http)?;
        log(format!("starting nginx as an mTLS proxy (:{port})"));
        let mut p = start_nginx("nginx", &dir, &conf)?;
        p.wait_listening(port, startup)?;
        Some((p, port))
    } else {
        None
    };

    let otlp_port = if targets
        .iter()
        .any(|t| matches!(t.server, Server::Fsp(v) if v.telemetry))
    {
        sink::start()?
    } else {
        0
    };
    let pg_url = schema.as_ref().map(Schema::url);
    let mut fsps = Vec::new();
    for v in variants {
        let dir = tmp.path.join(v.name);
        let (port, admin_port) = (port()?, port()?);
        let place = setup::FspPlace {
            dir: &dir,
            port,
            admin_port,
            upstream_port: up_http,
            otlp_port,
            redis_url: &args.redis_url,
            postgres_url: pg_url.as_deref(),
        };
        let conf = setup::write_fsp(&v, &pki, &place)?;
        let mut cmd = if args.instructions {
            let mut c = Command::new("valgrind");
            c.arg("--tool=callgrind")
                .arg(format!(
                    "--callgrind-out-file={}/callgrind.out.%p",
                    dir.display()
                ))
                .arg(&fsp_bin);
            c
        } else {
            Command::new(&fsp_bin)
        };
        cmd.arg("serve").arg("--config").arg(&conf);
        if std::env::var_os("FSP_LOG").is_none() {
            // nginx runs with access_log off; keep fsp's log quiet too.
            cmd.env("FSP_LOG", "warn");
        }
        log(format!(
            "starting {} (mTLS :{port}, admin :{admin_port})",
            v.name
        ));
        let mut p = Proc::spawn(v.name, cmd, &dir.join("fsp.log"))?;
        p.wait_listening(port, startup)?;
        fsps.push((v, p, port));
    }
    let mut servers = Servers {
        upstream,
        upstream_tls_port: up_tls,
        nginx,
        fsps,
    };

    for t in &targets {
        smoke(t, &servers.url(t), &pki, &bodies, &tmp.path)?;
    }
    log(format!(
        "smoke test passed: {} answer 200 with the client certificate and refuse without",
        targets
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", ")
    ));

    if args.instructions {
        return instructions(args, &targets[0], &servers, &pki, &bodies, &fsp_version);
    }

    // What one durable write costs on this disk bounds what a trail written ahead can
    // reach (see `disk`): timed before the load, in the file system the trails are in.
    let disk_write = if targets.iter().any(|t| t.audit() == Some(Audit::File)) {
        match disk::sync_write_latency(&tmp.path, 2000) {
            Ok(w) => {
                log(format!(
                    "disk: a synchronous direct 4 KiB write takes {} us (median of 2000)",
                    w.as_micros()
                ));
                Some(w)
            }
            Err(e) => {
                log(format!("disk: {e:#}"));
                None
            }
        }
    } else {
        None
    };

    let raw_dir = args.results.join("raw");
    let _ = fs::remove_dir_all(&raw_dir);
    fs::create_dir_all(&raw_dir).with_context(|| format!("cannot create {}", raw_dir.display()))?;
    let busy = procs::compilers_running();
    if busy > 0 {
        log(format!(
            "WARNING: {busy} compiler or linker processes run now: figures will be noisy"
        ));
    }
    let loadavg = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    log(format!(
        "workload: {} connections, {} s warm-up + {} s measured per target, {} round(s), targets: {}",
        args.concurrency,
        args.warmup,
        args.duration,
        args.rounds,
        targets.iter().map(|t| t.name).collect::<Vec<_>>().join(" ")
    ));
    let mut results: Vec<Vec<Measured>> = vec![Vec::new(); targets.len()];
    for round in 1..=args.rounds {
        for (i, t) in targets.iter().enumerate() {
            let url = servers.url(t);
            if args.warmup > 0 {
                log(format!(
                    "round {round}/{} {}: warm-up {} s",
                    args.rounds, t.name, args.warmup
                ));
                let mut c = oha_command(args.concurrency, t, &url, &pki, &bodies);
                c.args([
                    "-z",
                    &format!("{}s", args.warmup),
                    "--output-format",
                    "quiet",
                ]);
                run_oha(
                    c,
                    Duration::from_secs(u64::from(args.warmup) + 30),
                    &tmp.path.join("oha.err"),
                )
                .with_context(|| format!("{}: warm-up", t.name))?;
            }
            log(format!(
                "round {round}/{} {}: measuring {} s",
                args.rounds, t.name, args.duration
            ));
            let raw = raw_dir.join(format!("{}-r{round}.json", t.name));
            let snapshot = |s: &Servers| {
                (
                    s.front(t.server).cpu_ticks(),
                    s.upstream.cpu_ticks(),
                    s.all().map(Proc::cpu_ticks).sum::<u64>() + procs::self_ticks(),
                    procs::children_ticks(),
                    procs::host_busy_ticks(),
                )
            };
            let before = snapshot(&servers);
            let mut c = oha_command(args.concurrency, t, &url, &pki, &bodies);
            c.args(["-z", &format!("{}s", args.duration)])
                .args(["--output-format", "json", "-o"])
                .arg(&raw);
            run_oha(
                c,
                Duration::from_secs(u64::from(args.duration) + 60),
                &tmp.path.join("oha.err"),
            )
            .with_context(|| format!("{}: measured run", t.name))?;
            let after = snapshot(&servers);
            for p in servers.all_mut() {
                p.check_alive(&format!("during the {} run", t.name))?;
            }
            let text = fs::read_to_string(&raw)
                .with_context(|| format!("{}: oha wrote no results", t.name))?;
            let oha: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: oha's results are not JSON", t.name))?;
            results[i].push(Measured {
                round,
                raw: raw.clone(),
                oha,
                front_ticks: after.0 - before.0,
                upstream_ticks: after.1 - before.1,
                servers_ticks: after.2 - before.2,
                loadgen_ticks: after.3 - before.3,
                host_ticks: after.4 - before.4,
            });
        }
    }
    for (_, p, _) in &servers.fsps {
        let text = fs::read_to_string(&p.log).unwrap_or_default();
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("panicked"))
            .take(10)
            .collect();
        if !bad.is_empty() {
            log(format!("{} logged errors:\n{}", p.name, bad.join("\n")));
        }
    }
    let context = report::Context {
        args,
        fsp_version: &fsp_version,
        loadavg: &loadavg,
        git: git_describe(),
        clock_ticks: procs::clock_ticks(),
        disk_write,
    };
    report::report(&context, &targets, &comparisons, &results)
}

fn git_describe() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Counts fsp's instructions per call with callgrind: warm-up calls, counters zeroed,
/// counted calls at 8 connections, the total divided by the calls (the TLS handshakes of
/// the 8 connections included: about 2 k instructions per call at 10 000 calls).
fn instructions(
    args: &Args,
    t: &Target,
    servers: &Servers,
    pki: &setup::Pki,
    bodies: &Bodies,
    fsp_version: &str,
) -> Result<bool> {
    let url = servers.url(t);
    let fsp = servers.front(t.server);
    let dir = fsp.log.parent().context("fsp's directory")?.to_path_buf();
    // Every counted call must be a 200: instructions of an error path are not the figure.
    let count = |n: u64| -> Result<()> {
        let raw = dir.join("oha-count.json");
        let mut c = oha_command(8, t, &url, pki, bodies);
        c.args(["-n", &n.to_string(), "--output-format", "json", "-o"])
            .arg(&raw);
        run_oha(c, Duration::from_secs(1800), &dir.join("oha.err"))?;
        let oha: serde_json::Value = serde_json::from_str(&fs::read_to_string(&raw)?)
            .context("oha's results are not JSON")?;
        let ok = oha["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
        if ok != n {
            bail!(
                "{}: {ok} of {n} calls answered 200 (status codes {}, errors {})",
                t.name,
                oha["statusCodeDistribution"],
                oha["errorDistribution"]
            );
        }
        Ok(())
    };
    log(format!(
        "instructions of {}: {} warm-up calls, then {} counted calls (callgrind)",
        t.name, args.warmup_calls, args.calls
    ));
    count(args.warmup_calls)?;
    let pid = fsp.pid().to_string();
    run_tool("callgrind_control", &["-z", &pid])?;
    count(args.calls)?;
    run_tool("callgrind_control", &["-d", &pid])?;
    std::thread::sleep(Duration::from_secs(1));
    let dump = fs::read_dir(&dir)?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("callgrind.out.")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .context("callgrind wrote no dump")?;
    let text = fs::read_to_string(dump.path())?;
    let total: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .context("no instruction total in callgrind's dump")?;
    println!(
        "{} ({fsp_version}, {}): {} instructions per call ({total} instructions over {} calls)",
        t.name,
        git_describe(),
        total / args.calls.max(1),
        args.calls
    );
    Ok(true)
}
