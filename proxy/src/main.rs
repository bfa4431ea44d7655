//! The `fsp` command line. See `fsp --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// glibc's allocator showed up at ~9 % of the gateway's CPU under load; mimalloc keeps
// per-thread heaps that suit a thread-per-core server.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "fsp",
    version,
    about = "Federal service platform gateway: identified, authorised, throttled, versioned and audited calls to authentic sources."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway until SIGTERM/SIGINT (then drain and exit 0). SIGHUP reloads.
    Serve {
        #[arg(long, env = "FSP_CONFIG")]
        config: PathBuf,
    },
    /// Validate the whole configuration; exit 0 if valid, 1 with every problem listed.
    Check {
        #[arg(long, env = "FSP_CONFIG")]
        config: PathBuf,
    },
    /// Make a development PKI and configuration, start sample providers and the gateway.
    Quickstart {
        #[arg(long, default_value = "./fsp-quickstart")]
        dir: PathBuf,
        /// Port of the consumer listener (https://localhost:PORT).
        #[arg(long, default_value_t = 8443)]
        port: u16,
        /// Port of the admin listener (http://127.0.0.1:PORT).
        #[arg(long, default_value_t = 9443)]
        admin_port: u16,
        /// Port of the quickstart's OAuth2 token endpoint (http://127.0.0.1:PORT/token).
        #[arg(long, default_value_t = 9444)]
        oauth_port: u16,
        /// Keep the suspensions left by the last run (by default they are lifted).
        #[arg(long)]
        keep_suspensions: bool,
    },
    /// Certificate management.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Usage statistics from the audit trail's daily roll-ups, up to 13 months back
    /// (and further while the trail is kept).
    Stats {
        #[arg(long, env = "FSP_CONFIG")]
        config: PathBuf,
        /// First day (YYYY-MM-DD, UTC), included.
        #[arg(long)]
        from: Option<String>,
        /// Last day (YYYY-MM-DD, UTC), included.
        #[arg(long)]
        to: Option<String>,
        /// Group by these, comma-separated: consumer, service, version, day, code,
        /// decision. Nothing: one total.
        #[arg(long)]
        by: Option<String>,
        #[arg(long, default_value = "table")]
        format: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Re-check the audit trail's hash chains end to end; exit 0 intact, 4 with the first
    /// broken record named.
    Verify {
        #[arg(long, env = "FSP_CONFIG")]
        config: PathBuf,
        /// An Ed25519 public key (PEM) whose signatures on heads and anchors are
        /// accepted, besides `[audit] signing_key` and `verify_keys`; repeatable. With any
        /// key trusted, every head and anchor must be signed by one of them.
        #[arg(long = "public-key", value_name = "FILE")]
        public_keys: Vec<PathBuf>,
    },
    /// Check the audit trail as `verify` does, then sign every node's head and anchor
    /// with `[audit] signing_key`: once, for a trail written before the key was set
    /// (or after a new key without the old one in `verify_keys`). The gateway must be
    /// stopped. Exit 0 signed, 1 unreadable configuration or no signing key, 4 broken
    /// (nothing signed), 5 the trail cannot be read or written.
    Seal {
        #[arg(long, env = "FSP_CONFIG")]
        config: PathBuf,
    },
    /// Write audit records to stdout in the exchange format (JSON lines, or CSV with a
    /// header row). Every filter given must hold.
    Export {
        #[arg(long, env = "FSP_CONFIG")]
        config: PathBuf,
        /// Calls received at or after this time (RFC 3339, or a day: YYYY-MM-DD).
        #[arg(long)]
        from: Option<String>,
        /// Calls received before this time (RFC 3339, or a day: YYYY-MM-DD).
        #[arg(long)]
        to: Option<String>,
        /// Calls of this consumer (its id).
        #[arg(long)]
        consumer: Option<String>,
        /// The call with this FSP message id.
        #[arg(long)]
        message_id: Option<String>,
        /// Calls made for this end user (the `FSP-End-User` reference).
        #[arg(long)]
        end_user: Option<String>,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// List every certificate the configuration references; exit 3 if any expires soon.
    Inventory {
        #[arg(long, env = "FSP_CONFIG")]
        config: PathBuf,
        /// Warn (exit 3) about certificates expiring within this many days.
        #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(i64).range(0..=36_500))]
        within: i64,
    },
}

fn init_logging() {
    init_logging_with(None);
}

/// Logs to stderr (`FSP_LOG` filter, `FSP_LOG_FORMAT=json`), and with a tracer the
/// calls' spans to OpenTelemetry: the call spans go only to the tracer, never to the log.
///
/// Both filters are target and level filters (no closures), so `tracing` knows at each
/// call site, once, whether anything wants it: the `trace!` and `debug!` lines of the
/// libraries on the request path cost nothing when they are off.
fn init_logging_with(tracer: Option<opentelemetry_sdk::trace::Tracer>) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, filter};
    let mut env = EnvFilter::try_from_env("FSP_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if let Ok(off) = format!("{}=off", proxy::telemetry::CALL_TARGET).parse() {
        env = env.add_directive(off);
    }
    let json = std::env::var("FSP_LOG_FORMAT").is_ok_and(|f| f == "json");
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log = if json {
        log.json().with_filter(env).boxed()
    } else {
        log.with_filter(env).boxed()
    };
    let spans = tracer.map(|t| {
        tracing_opentelemetry::layer().with_tracer(t).with_filter(
            filter::Targets::new().with_target(proxy::telemetry::CALL_TARGET, tracing::Level::INFO),
        )
    });
    tracing_subscriber::registry().with(log).with(spans).init();
}

/// The control runtime: admin API, signals, identity provider keys. Consumers are served
/// by the worker threads, each with a runtime of its own (see `proxy::run::serve`).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match proxy::config::load(&config) {
            Ok(c) => {
                // A listener certificate outside its validity: every consumer's handshake
                // would fail. The gateway still starts with it (and says it is not
                // ready), but a check before a deployment fails.
                let now = time::OffsetDateTime::now_utc();
                let inventory = proxy::state::certificate_inventory(&c.certificate_files);
                if let Some(why) = proxy::state::listener_certificate_unusable(&inventory, now) {
                    eprintln!("{}: listener.server_cert: {why}", config.display());
                    print_warnings(&c.warnings);
                    return ExitCode::from(1);
                }
                let versions: usize = c.catalogue.services().map(|s| s.versions.len()).sum();
                println!(
                    "{}: valid ({} provider(s), {} service(s), {} version(s), {} consumer(s), {} authorisation(s))",
                    config.display(),
                    c.providers.len(),
                    c.catalogue.services().count(),
                    versions,
                    c.consumers.iter().count(),
                    c.authorisations.len()
                );
                // Warnings leave the configuration valid: exit 0.
                print_warnings(&c.warnings);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Serve { config } => {
            let Some(loaded) = proxy::run::load_or_report(&config) else {
                init_logging();
                return ExitCode::from(1);
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("fsp serve: cannot start the runtime: {e}");
                    return ExitCode::from(2);
                }
            };
            // The exporter's connections live on the control runtime.
            let exporting = match &loaded.telemetry {
                Some(t) => {
                    let _entered = rt.enter();
                    match proxy::telemetry::start(t, &loaded.node) {
                        Ok((tracer, exporting)) => {
                            init_logging_with(Some(tracer));
                            Some(exporting)
                        }
                        Err(e) => {
                            eprintln!("fsp serve: telemetry.otlp_endpoint: {e:#}");
                            return ExitCode::from(2);
                        }
                    }
                }
                None => {
                    init_logging();
                    None
                }
            };
            for w in &loaded.warnings {
                tracing::warn!(file = %w.file.display(), key = %w.key, "{}", w.reason);
            }
            let result = rt.block_on(async {
                let shutdown = proxy::run::shutdown_signal()?;
                proxy::run::serve(&config, loaded, shutdown).await
            });
            if let Some(e) = exporting {
                // The exports run on the control runtime, which must go on turning while
                // the batch processor flushes.
                let _ =
                    rt.block_on(
                        async move { tokio::task::spawn_blocking(move || e.shutdown()).await },
                    );
            }
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fsp serve: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Quickstart {
            dir,
            port,
            admin_port,
            oauth_port,
            keep_suspensions,
        } => {
            init_logging();
            let o = proxy::quickstart::Options {
                dir,
                port,
                admin_port,
                oauth_port,
                keep_suspensions,
            };
            match runtime()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(proxy::quickstart::run(o)))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fsp quickstart: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Certs {
            command: CertsCommand::Inventory { config, within },
        } => inventory(&config, within),
        Command::Stats {
            config,
            from,
            to,
            by,
            format,
        } => usage_stats(
            &config,
            from.as_deref(),
            to.as_deref(),
            by.as_deref(),
            &format,
        ),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    config,
                    public_keys,
                },
        } => verify_audit(&config, &public_keys),
        Command::Audit {
            command: AuditCommand::Seal { config },
        } => seal_audit(&config),
        Command::Audit {
            command:
                AuditCommand::Export {
                    config,
                    from,
                    to,
                    consumer,
                    message_id,
                    end_user,
                    format,
                },
        } => {
            let instant =
                |t: Option<String>| t.map(|t| audit::export::parse_instant(&t)).transpose();
            let filter = match (instant(from), instant(to)) {
                (Ok(from), Ok(to)) => audit::export::Filter {
                    from,
                    to,
                    consumer,
                    message_id,
                    end_user,
                },
                (Err(e), _) => {
                    eprintln!("--from: {e}");
                    return ExitCode::from(2);
                }
                (_, Err(e)) => {
                    eprintln!("--to: {e}");
                    return ExitCode::from(2);
                }
            };
            let format = match format {
                ExportFormat::Jsonl => audit::export::Format::Jsonl,
                ExportFormat::Csv => audit::export::Format::Csv,
            };
            export_audit(&config, &filter, format)
        }
    }
}

/// `fsp audit export`: exit 0, 1 unreadable configuration, 4 when some line of the
/// trail is not a record (it is named on stderr; the others are exported), 5 when the
/// trail cannot be read or stdout written.
fn export_audit(
    config: &std::path::Path,
    filter: &audit::export::Filter,
    format: audit::export::Format,
) -> ExitCode {
    let Some(c) = proxy::run::load_or_report(config) else {
        return ExitCode::from(1);
    };
    let stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let mut out = audit::export::Writer::new(stdout, format);
    let mut broken = 0u64;
    // One call by its message id, from the file trail: through the segments' lookup
    // indexes, not a read of the whole trail. When it is not found that way, the trail is
    // read whole, so that a damaged line that could be it is named.
    let indexed = match (&c.audit.backend, filter.message_id.as_deref()) {
        (proxy::config::AuditBackend::File { dir }, Some(id)) => audit::file::find(dir, id)
            .ok()
            .flatten()
            .filter(|r| filter.matches(r)),
        _ => None,
    };
    let (read, place) = match (&c.audit.backend, indexed) {
        (proxy::config::AuditBackend::File { dir }, Some(r)) => (
            out.write(&r).map_err(|e| e.to_string()),
            dir.display().to_string(),
        ),
        (proxy::config::AuditBackend::File { dir }, None) => (
            audit::file::for_each_call(
                dir,
                |r| filter.matches(r),
                |call| out.write(&call),
                |at, why| {
                    broken += 1;
                    eprintln!(
                        "{at} is not a whole audit record (cut short, or edited): {}",
                        audit::stats::printable(&why.to_string())
                    );
                },
            )
            .map(drop)
            .map_err(|e| e.to_string()),
            dir.display().to_string(),
        ),
        (proxy::config::AuditBackend::Postgres { url, .. }, _) => (
            audit::postgres::PostgresTrail::connect(url, None)
                .and_then(|mut trail| trail.export(filter, &mut out))
                .map(drop)
                .map_err(|e| e.to_string()),
            audit::postgres::display_url(url),
        ),
        (proxy::config::AuditBackend::None { .. }, _) => (
            Err("this configuration keeps no audit trail ([audit] backend = \"none\")".into()),
            "nothing".into(),
        ),
    };
    match read.and_then(|()| out.finish().map(drop).map_err(|e| e.to_string())) {
        Ok(()) if broken == 0 => ExitCode::SUCCESS,
        Ok(()) => ExitCode::from(4),
        Err(e) => {
            eprintln!("cannot export the audit trail in {place}: {e}");
            ExitCode::from(5)
        }
    }
}

/// `fsp stats`: exit 0, 1 unreadable configuration, 2 bad arguments, 5 when the
/// statistics cannot be read.
fn usage_stats(
    config: &std::path::Path,
    from: Option<&str>,
    to: Option<&str>,
    by: Option<&str>,
    format: &str,
) -> ExitCode {
    let (query, format) = match (
        audit::stats::Query::parse(from, to, by),
        format.parse::<audit::stats::OutputFormat>(),
    ) {
        (Ok(q), Ok(f)) => (q, f),
        (Err(e), _) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
        (_, Err(e)) => {
            eprintln!("--format: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(c) = proxy::run::load_or_report(config) else {
        return ExitCode::from(1);
    };
    let rows = match &c.audit.backend {
        proxy::config::AuditBackend::File { dir } => {
            audit::file_stats::answer(dir, &query).map_err(|e| e.to_string())
        }
        proxy::config::AuditBackend::Postgres { url, .. } => {
            audit::postgres::PostgresTrail::connect(url, None)
                .and_then(|mut trail| trail.stats(&query))
                .map_err(|e| e.to_string())
        }
        proxy::config::AuditBackend::None { .. } => {
            Err("this configuration keeps no audit trail ([audit] backend = \"none\")".into())
        }
    };
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("cannot read the statistics: {e}");
            return ExitCode::from(5);
        }
    };
    let out = std::io::BufWriter::new(std::io::stdout().lock());
    match audit::stats::write_rows(&rows, &query.by, format, out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot write the statistics: {e}");
            ExitCode::from(5)
        }
    }
}

/// `fsp audit verify`: exit 0 intact, 1 unreadable configuration, 4 broken (the first
/// broken record named), 5 when the trail cannot be read at all.
fn verify_audit(config: &std::path::Path, public_keys: &[PathBuf]) -> ExitCode {
    let Some(c) = proxy::run::load_or_report(config) else {
        return ExitCode::from(1);
    };
    let mut trusted: Vec<audit::seal::PublicKey> = Vec::new();
    for path in public_keys {
        match certs::load::read_regular_file(path, 64 * 1024)
            .map_err(|e| format!("cannot read it: {e}"))
            .and_then(|pem| audit::seal::PublicKey::from_pem(&pem))
        {
            Ok(k) => trusted.push(k),
            Err(why) => {
                eprintln!("--public-key {}: {why}", path.display());
                return ExitCode::from(1);
            }
        }
    }
    let trusted =
        audit::seal::TrustedKeys::new(c.audit.seals.trusted.keys().iter().cloned().chain(trusted));
    let retention = Some(c.audit.retention_days);
    let (verified, place, unit) = match &c.audit.backend {
        proxy::config::AuditBackend::File { dir } => (
            audit::file::verify_dir_sealed(dir, retention, &trusted),
            dir.display().to_string(),
            "files",
        ),
        proxy::config::AuditBackend::Postgres { url, .. } => (
            audit::postgres::PostgresTrail::connect(url, None)
                .map_err(audit::file::VerifyError::from)
                .and_then(|mut trail| trail.verify_sealed(retention, &trusted)),
            audit::postgres::display_url(url),
            "node chains",
        ),
        proxy::config::AuditBackend::None { .. } => (
            Err(audit::file::VerifyError::Io(std::io::Error::other(
                "this configuration keeps no audit trail ([audit] backend = \"none\")",
            ))),
            "nothing".into(),
            "",
        ),
    };
    match verified {
        Ok(v) => {
            println!(
                "audit trail intact: {} records in {} {unit} in {place}",
                v.records, v.files
            );
            if trusted.is_empty() {
                println!(
                    "heads and anchors not signed (no [audit] signing_key): the chain shows records altered, removed or moved, not a trail written again whole"
                );
            } else {
                println!(
                    "every head and anchor signed by a trusted key ({})",
                    trusted.ids().join(", ")
                );
            }
            ExitCode::SUCCESS
        }
        // What a broken trail says comes from the files themselves: printed so that
        // it cannot drive the terminal.
        Err(audit::file::VerifyError::Io(e)) => {
            eprintln!(
                "cannot read the audit trail in {place}: {}",
                audit::stats::printable(&e.to_string())
            );
            ExitCode::from(5)
        }
        Err(e) => {
            eprintln!(
                "audit trail broken: {}",
                audit::stats::printable(&e.to_string())
            );
            ExitCode::from(4)
        }
    }
}

/// `fsp audit seal`: exit 0 signed, 1 unreadable configuration or no signing key, 4 the
/// trail is broken (nothing signed), 5 it cannot be read or written.
fn seal_audit(config: &std::path::Path) -> ExitCode {
    let Some(c) = proxy::run::load_or_report(config) else {
        return ExitCode::from(1);
    };
    let Some(key) = c.audit.seals.key.as_deref() else {
        eprintln!(
            "{}: [audit] signing_key is not set: there is no key to sign the trail with (make one with `openssl genpkey -algorithm ed25519 -out audit-signing.pem`)",
            config.display()
        );
        return ExitCode::from(1);
    };
    let retention = Some(c.audit.retention_days);
    let (signed, place) = match &c.audit.backend {
        proxy::config::AuditBackend::File { dir } => (
            audit::file::seal_dir(dir, retention, key, &c.audit.seals.trusted),
            dir.display().to_string(),
        ),
        proxy::config::AuditBackend::Postgres { url, .. } => (
            audit::postgres::PostgresTrail::connect(url, None)
                .map_err(audit::file::VerifyError::from)
                .and_then(|mut trail| trail.seal(retention, key, &c.audit.seals.trusted)),
            audit::postgres::display_url(url),
        ),
        proxy::config::AuditBackend::None { .. } => {
            eprintln!("this configuration keeps no audit trail ([audit] backend = \"none\")");
            return ExitCode::from(1);
        }
    };
    match signed {
        Ok(list) => {
            for line in &list {
                println!("signed {}", audit::stats::printable(line));
            }
            println!(
                "audit trail in {place} checked and signed with key {} ({} heads and anchors)",
                key.id(),
                list.len()
            );
            ExitCode::SUCCESS
        }
        Err(audit::file::VerifyError::Io(e)) => {
            eprintln!(
                "cannot seal the audit trail in {place}: {}",
                audit::stats::printable(&e.to_string())
            );
            ExitCode::from(5)
        }
        Err(e) => {
            eprintln!(
                "audit trail broken, nothing signed: {}",
                audit::stats::printable(&e.to_string())
            );
            ExitCode::from(4)
        }
    }
}

/// `fsp check`'s warnings, on stderr: `warning: FILE: KEY: reason`.
fn print_warnings(warnings: &[proxy::config::Problem]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

fn inventory(config: &std::path::Path, within: i64) -> ExitCode {
    let Some(c) = proxy::run::load_or_report(config) else {
        return ExitCode::from(1);
    };
    let now = time::OffsetDateTime::now_utc();
    let mut expiring = 0;
    // Wide enough for the longest role (a consumer's pinned file names its entry).
    let width = c
        .certificate_files
        .iter()
        .map(|(role, _)| role.chars().count())
        .max()
        .unwrap_or(0)
        .max(34);
    println!(
        "{:<width$} {:<22} {:<25} {:<64} SUBJECT",
        "ROLE", "DAYS LEFT", "NOT AFTER", "SHA-256"
    );
    for (role, path) in &c.certificate_files {
        match certs::inventory::describe(role, path) {
            Ok(list) => {
                for info in list {
                    let days = info.days_left(now);
                    if info.not_after < now + time::Duration::days(within) {
                        expiring += 1;
                    }
                    let left = info.expired_ago(now).unwrap_or_else(|| days.to_string());
                    println!(
                        "{:<width$} {:<22} {:<25} {:<64} {}",
                        info.role,
                        left,
                        proxy::pipeline::stamp::rfc3339_millis(info.not_after),
                        info.sha256,
                        info.subject
                    );
                }
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        }
    }
    if expiring > 0 {
        eprintln!("{expiring} certificate(s) expire within {within} days");
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}
