//! The processes of a run: started with their output in a log file, waited for until they
//! answer, charged for their CPU from `/proc`, and stopped (TERM, then KILL) when dropped.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process};

/// What a signal to the program must stop or remove before it exits: the processes it
/// started, and what it made (a PostgreSQL schema, a temporary directory). Each is
/// registered when made and forgotten when cleaned up the ordinary way.
#[derive(Debug, Default)]
struct Leftovers {
    pids: Vec<u32>,
    schema: Option<(String, String)>,
    dir: Option<PathBuf>,
    /// Where the watchdog reads the processes to stop (see [`watch_over`]).
    list: Option<PathBuf>,
}

/// The signal that stopped the run (0: none).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

/// The signal that stopped the run, if one did.
pub fn signalled() -> Option<i32> {
    Some(SIGNALLED.load(Ordering::SeqCst)).filter(|s| *s != 0)
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    pids: Vec::new(),
    schema: None,
    dir: None,
    list: None,
});

fn leftovers(f: impl FnOnce(&mut Leftovers)) {
    if let Ok(mut l) = LEFTOVERS.lock() {
        f(&mut l);
        write_list(&l);
    }
}

/// Keeps the watchdog's list of processes up to date: written aside and renamed, so
/// that it is whole whenever this program dies.
fn write_list(l: &Leftovers) {
    let Some(list) = &l.list else { return };
    let text: String = l.pids.iter().map(|p| format!("{p}\n")).collect();
    let aside = list.with_extension("new");
    if fs::write(&aside, text).is_ok() {
        let _ = fs::rename(&aside, list);
    }
}

/// What the watchdog runs (`sh -c`): `$1` this program's pid, `$2` the list of the
/// processes it started (each leads its own process group), `$3` a directory to remove
/// (or empty). Once this program is gone, those still listed are stopped, TERM then
/// KILL, with their groups (nginx's workers).
const WATCHDOG: &str = r#"
while kill -0 "$1" 2>/dev/null; do sleep 1; done
[ -s "$2" ] || exit 0
pids=$(cat "$2")
for p in $pids; do kill -TERM -- "-$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; done
sleep 3
for p in $pids; do kill -KILL -- "-$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; done
rm -f -- "$2"
if [ -n "$3" ]; then rm -rf -- "$3"; fi
"#;

/// Starts a watchdog that outlives this program: if it is killed outright (SIGKILL,
/// which no handler sees; other signals go through [`clean_up_on_signals`]), the servers
/// it started are stopped within a few seconds and `remove` (the run's directory, unless
/// kept) is removed. The list of servers is kept in `dir`; on an ordinary end it is
/// empty and the watchdog leaves without doing anything. (A PostgreSQL schema is left:
/// `fsp_loadtest_<pid>`.)
pub fn watch_over(dir: &Path, remove: Option<&Path>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    leftovers(|l| l.list = Some(dir.join(".servers")));
    Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("fsp-load-watchdog")
        .arg(std::process::id().to_string())
        .arg(dir.join(".servers"))
        .arg(remove.map(Path::as_os_str).unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Not stopped with this program by a Ctrl-C to the terminal's foreground group.
        .process_group(0)
        .spawn()
        .context("cannot start the watchdog (sh)")?;
    Ok(())
}

pub fn register_pid(pid: u32) {
    leftovers(|l| l.pids.push(pid));
}

pub fn forget_pid(pid: u32) {
    leftovers(|l| l.pids.retain(|p| *p != pid));
}

/// A schema (URL, name) to drop, or `None` once dropped or kept.
pub fn register_schema(schema: Option<(String, String)>) {
    leftovers(|l| l.schema = schema);
}

/// A directory to remove, or `None` once removed or kept.
pub fn register_dir(dir: Option<PathBuf>) {
    leftovers(|l| l.dir = dir);
}

/// On SIGINT, SIGTERM or SIGHUP: stops the processes the program started (TERM, KILL
/// after 5 s), drops the schema, removes the directory, and exits 128 + the signal.
pub fn clean_up_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("cannot watch for signals")?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            SIGNALLED.store(signal, Ordering::SeqCst);
            eprintln!("signal {signal}: stopping what the run started");
            let left = LEFTOVERS
                .lock()
                .map(|mut l| {
                    // This handler stops them: the watchdog has nothing left to do.
                    let left = std::mem::take(&mut *l);
                    l.list.clone_from(&left.list);
                    write_list(&l);
                    left
                })
                .unwrap_or_default();
            let alive = |pid: u32| stat_state(pid).is_some_and(|s| s != 'Z' && s != 'X');
            for pid in &left.pids {
                if let Some(p) = Pid::from_raw(*pid as i32) {
                    let _ = kill_process(p, Signal::TERM);
                }
            }
            let start = Instant::now();
            while left.pids.iter().any(|p| alive(*p)) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
            for pid in left.pids.iter().filter(|p| alive(**p)) {
                if let Some(p) = Pid::from_raw(*pid as i32) {
                    let _ = kill_process(p, Signal::KILL);
                }
            }
            if let Some((url, name)) = left.schema
                && let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls)
            {
                let _ = c.batch_execute(&format!("DROP SCHEMA {name} CASCADE"));
            }
            if let Some(dir) = left.dir {
                let _ = fs::remove_dir_all(dir);
            }
            std::process::exit(128 + signal);
        }
    });
    Ok(())
}

/// The state letter of a process (`Z` for a zombie), if it exists.
fn stat_state(pid: u32) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(") ")? + 2..].chars().next()
}

/// A server the run started.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr in `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let out =
            fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            // A group of its own (nginx's workers join it), for the watchdog to stop.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        register_pid(child.id());
        Ok(Self {
            name: name.into(),
            child,
            log: log.into(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the log, for an error message.
    pub fn tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Fails, with the log's last lines, if the process has stopped.
    pub fn check_alive(&mut self, when: &str) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} stopped {when} ({status}); last log lines:\n{}",
                self.name,
                self.tail()
            ),
            Err(e) => bail!("{}: cannot check whether it runs: {e}", self.name),
        }
    }

    /// Waits until `port` accepts connections, failing early if the process stops.
    pub fn wait_listening(&mut self, port: u16, within: Duration) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        loop {
            self.check_alive("during start-up")?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > within {
                bail!(
                    "{} does not accept connections on {addr} after {} s; last log lines:\n{}",
                    self.name,
                    within.as_secs(),
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// User + system CPU of the process and its direct children (nginx's workers), in
    /// clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let pid = self.pid();
        let mut total = own_ticks(pid).unwrap_or(0);
        if let Ok(dir) = fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(p) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                if parent(p) == Some(pid) {
                    total += own_ticks(p).unwrap_or(0);
                }
            }
        }
        total
    }

    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Some(pid) = Pid::from_raw(self.pid() as i32) {
            let _ = kill_process(pid, Signal::TERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on TERM within 10 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        forget_pid(self.pid());
    }
}

/// The fields of `/proc/PID/stat` after the command name.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(") ")? + 2..];
    // Field 3 (state) is a letter: count it as 0 so that indexes stay the kernel's - 3.
    Some(
        rest.split_ascii_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

fn own_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)? + f.get(12)?)
}

fn parent(pid: u32) -> Option<u32> {
    Some(*stat_fields(pid)?.get(1)? as u32)
}

/// CPU of this program's waited-for children (the load generator's runs), in clock ticks.
pub fn children_ticks() -> u64 {
    let f = stat_fields(std::process::id()).unwrap_or_default();
    f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0)
}

/// CPU of this program itself (its telemetry sink), in clock ticks.
pub fn self_ticks() -> u64 {
    own_ticks(std::process::id()).unwrap_or(0)
}

/// Busy time of the whole machine (all cores), in clock ticks.
pub fn host_busy_ticks() -> u64 {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().next() else {
        return 0;
    };
    let f: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal: steal is time the hypervisor gave
    // to other machines, not work done here.
    [0, 1, 2, 5, 6].iter().filter_map(|i| f.get(*i)).sum()
}

pub fn clock_ticks() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// `n` different ports on loopback that nothing listens on now (the system's choice: all
/// held until all are chosen, so that none is given twice).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("cannot bind a port on 127.0.0.1"))
        .collect::<Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Whether compilers or linkers run now (figures on a 2-core machine would be noisy).
pub fn compilers_running() -> usize {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            matches!(
                comm.trim(),
                "rustc" | "cc1" | "cc1plus" | "ld" | "lld" | "mold"
            )
        })
        .count()
}

/// Where a program is on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
