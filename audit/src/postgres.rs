//! The PostgreSQL audit sink: every gateway of a cluster writes its records into one
//! database, where operators can query them with SQL.
//!
//! # The table
//!
//! One table, `fsp_audit`, whose columns are the contract's field names (section 6) with
//! the record's extensions (`fault`, `detail`, `phase`, `certificate_sha256`), plus `seq`
//! (the record's place in its node's chain: 1, 2, 3...) and `written_at` (when the writer
//! committed it). It is partitioned by month of `written_at` (`fsp_audit_y2026m12`); the
//! writer creates this month's and next month's partitions at start and once a day, and
//! there is no default partition: a row with nowhere to go is an error, never silently
//! kept elsewhere. Indexes serve the questions operators ask: by `message_id`, by
//! `(consumer, timestamp)`, `(service, timestamp)`, `end_user` and `timestamp`. The view
//! `fsp_audit_calls` gives one row per call: the outcome line when there is one, else the
//! request line (`phase` `request`, `status` 0: the gateway stopped before the call
//! ended), else the call's single complete line. The schema is made and migrated at start
//! (`fsp_schema_migrations`), in one transaction under an advisory lock, so that gateways
//! starting together do not race. A reader ([`PostgresTrail`]) does not migrate: it reads
//! a database a gateway of this version has not migrated yet (no `certificate_sha256`
//! column, migration 3) as a trail whose records have none.
//!
//! # The chain
//!
//! Each node's records are sealed into its hash chain ([`crate::chain`]) by its writer, in
//! the order of `seq`; the writer continues after the node's last row (or its retention
//! anchor) when it starts. Only one writer per node: the writer holds a session advisory
//! lock on its node's chain for as long as it is connected, and a second gateway started
//! with the same node name is refused. [`PostgresTrail::verify`] reads every row again,
//! ordered by node and `seq`, rebuilds each record from its columns and names the first
//! that does not fit (an altered column, a removed, inserted or moved row, a gap in `seq`)
//! as `node/seq`.
//!
//! # Group commit
//!
//! `submit` takes a record without touching the network: it is checked (its timestamp
//! must be RFC 3339), appended to one of a few striped queues, and the writer thread is
//! woken if it sleeps. The writer takes everything waiting as one batch (less what it
//! holds back, below), seals it, and inserts it with ONE statement (`INSERT ... SELECT
//! FROM UNNEST(...)`, its own transaction): one round trip per batch, whatever its size. Callers waiting in
//! `submit_durable` are completed once it is committed. A batch nobody waits for gathers
//! for [`GROUP_COMMIT_WINDOW`]; a waiting caller ends that window at once. While callers
//! wait, a commit carries only their records: the records nobody waits for are held back
//! for that window (plus the commit in progress; longer only while PostgreSQL is away)
//! and go with a later commit (with the statistics' upsert), or alone when the window
//! ends, so that most commits insert a few rows and update no roll-up. Records nobody
//! waits for were never durable when taken; held, they may be lost in a crash a few
//! milliseconds longer.
//!
//! # When PostgreSQL is away
//!
//! A failed batch fails its waiting callers at once (their calls are refused), marks the
//! sink unhealthy (a fail-closed gateway then refuses calls, `/readyz` says why), and is
//! retried, sealed as it was (same `seq`, same hashes), reconnecting with a backoff of
//! 50 ms doubling to 2 s, until it is committed. A commit whose answer was lost is not
//! written twice: on reconnecting, the writer reads the node's last row, and when it is
//! the batch's last the batch is taken as written. When idle, the writer checks its
//! connection every second, so a lost connection shows in the health and a recovered one
//! clears it without a restart.
//!
//! # Retention
//!
//! With `retention_days`, once a day (and at start) partitions whose whole month lies
//! before `now - retention_days` are dropped. In the same transaction, for every node
//! with rows in a dropped partition, the `seq` and hash of its last row there are kept in
//! `fsp_audit_anchor`, and verification continues the node's chain from it.
//!
//! Retention drops trail partitions only: the statistics roll-ups below hold no personal
//! data (no end user, no message, no address) and are kept.
//!
//! # Statistics
//!
//! `fsp stats` and `GET /admin/stats` answer from two roll-up tables (what a cell, a call,
//! an error and the latency histogram are is explained in [`crate::stats`]), never from
//! the trail:
//!
//! - `fsp_audit_daily`: one row per `(day, node, consumer, service, version, code,
//!   decision)`, `day` the UTC date of the call's `timestamp`, `code` the HTTP status sent
//!   (0: none), with `calls`, `errors` and `latency`;
//! - `fsp_audit_monthly`: the same keyed by `month` (its first day) instead of `day`, the
//!   sum of the node's days of that month (this month's row is the month so far).
//!
//! `latency` is the sparse histogram as JSON (`json`: PostgreSQL's JSON functions read it),
//! `[[bucket,count],...]` in increasing bucket order, the counts adding up to `calls` (the
//! file backend's format, `fsp-stats/1`).
//! A missing consumer, service or version (a call refused before identification or
//! routing) is stored as `''`, since a primary key cannot hold NULL; an empty name is
//! counted as a missing one.
//!
//! The writer counts each batch's calls (write-ahead `request` lines are not calls) and
//! writes the cells the batch changed, day and month, with their full values, **in the
//! same statement** as the batch's records: the trail and its statistics are committed
//! together or not at all, so a crash, a lost connection or a retried batch neither loses
//! nor doubles a call. For that the writer holds the stored cells of its node for the days
//! and months it writes to (yesterday, today and their months, in practice), read from the
//! tables the first time a batch needs them and again after every reconnect (only the
//! node's writer writes its rows). A call's record that comes in for an older day (a call
//! that lasted over a day) reads that day and month, adds to them, and forgets them again.
//!
//! What it costs a batch: one day row and one month row upserted per cell the batch
//! changed (no more than its calls, nor than the cells of a day), in the batch's one round
//! trip; a batch of write-ahead `request` lines alone writes none.
//!
//! A query reads the month rows of the finished months it takes whole and the day rows of
//! its other days ([`crate::stats::plan`]), every node's, and only the key columns it
//! groups by; months and days side by side on two connections sharing one snapshot. The
//! first start of a gateway with this schema (migration 2) counts the trail already in
//! `fsp_audit` into both tables.
//!
//! # What an operator can query
//!
//! ```sql
//! -- One call, as `GET /admin/audit/{id}` shows it:
//! SELECT * FROM fsp_audit_calls WHERE message_id = '0193f0c4-...';
//! -- A consumer's calls of a day:
//! SELECT timestamp, service, operation, decision, status FROM fsp_audit_calls
//!  WHERE consumer = 'city-ghent' AND timestamp >= '2026-12-01' AND timestamp < '2026-12-02'
//!  ORDER BY timestamp;
//! -- Calls and errors per consumer in November 2026, every node:
//! SELECT consumer, sum(calls) AS calls, sum(errors) AS errors FROM fsp_audit_monthly
//!  WHERE month = '2026-11-01' GROUP BY consumer ORDER BY calls DESC;
//! -- A day's calls by HTTP status; '' is a consumer the gateway could not identify:
//! SELECT code, sum(calls) FROM fsp_audit_daily
//!  WHERE day = '2026-12-01' AND consumer <> '' GROUP BY code ORDER BY code;
//! ```
//!
//! The `postgres` client blocks: use [`PostgresTrail`] and [`AuditSink::lookup`] where
//! blocking is allowed (a CLI, `spawn_blocking`), never on an async worker thread. The
//! connection is made without TLS.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::postgres::fallible_iterator::FallibleIterator;
use ::postgres::types::ToSql;
use ::postgres::{Client, IsolationLevel, NoTls, Row, Statement, Transaction};
use time::format_description::BorrowedFormatItem;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, UtcOffset};

use crate::chain::{Break, Chain, Verifier};
use crate::export::{Filter, Writer as ExportWriter};
use crate::file::{Verified, VerifyError};
use crate::seal::{Seal, Seals, SigningKey, TrustedKeys};
use crate::stats::{self, Cell, CellKey, Histogram, Query, Rollup, StoredCell, Tally};
use crate::{AuditError, AuditSink, Durable, DurableTicket, Phase, Record};

/// Records that may wait to be written before `submit` refuses them.
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Group commit: a batch nobody waits for gathers the records that arrive within this
/// window, so that one round trip covers many records.
pub const GROUP_COMMIT_WINDOW: Duration = Duration::from_millis(10);
/// Records nobody waits for that the writer holds back while callers wait, at most (see
/// `Writer::run`); past this many, they go with the next commit.
const HOLD_MAX: usize = 4096;

/// Queues records are spread over, so that threads submitting at once rarely share one.
const STRIPES: usize = 8;
/// How often an idle writer checks its connection (or tries to make a new one).
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_RETRY: Duration = Duration::from_millis(50);
const LAST_RETRY: Duration = Duration::from_secs(2);
const MAINTENANCE_EVERY: Duration = Duration::from_secs(24 * 60 * 60);
/// A failed maintenance (a lock not granted in time, the database away) is tried again
/// after this long.
const MAINTENANCE_RETRY: Duration = Duration::from_secs(10 * 60);
/// Unless the URL says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Unless the URL says otherwise: sent data unacknowledged this long ends the
/// connection (a server gone without a word is noticed, not waited for forever).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// Rows fetched at a time when the trail is read as a stream.
const FETCH_ROWS: i32 = 10_000;

/// The writer's session: the server notices a gateway gone without a word within about
/// a minute (and releases its node's lock); a statement that hangs (waiting for a lock)
/// fails, so the batch is retried instead of waited for forever.
const WRITER_SESSION: &str = "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; \
     SET tcp_keepalives_count = 3; SET statement_timeout = '60s'";

/// The schema's migrations, in order; each is applied once, in the transaction that
/// records it in `fsp_schema_migrations`.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, SCHEMA_V1),
    (2, SCHEMA_V2),
    (3, SCHEMA_V3),
    (4, SCHEMA_V4),
    (5, SCHEMA_V5),
];

const SCHEMA_V1: &str = r#"
CREATE TABLE fsp_audit (
    message_id     text NOT NULL,
    "timestamp"    timestamptz NOT NULL,
    consumer       text,
    credential     text,
    credential_id  text,
    source_ip      text NOT NULL,
    service        text,
    version        text,
    operation      text NOT NULL,
    purpose        text,
    authorisation  text,
    legal_basis    text,
    end_user       text,
    consumer_ref   text,
    decision       text NOT NULL,
    status         integer NOT NULL,
    duration_ms    double precision NOT NULL,
    request_bytes  bigint NOT NULL,
    response_bytes bigint NOT NULL,
    trace_id       text,
    node           text NOT NULL,
    fault          text,
    detail         text,
    phase          text CHECK (phase IN ('request', 'outcome')),
    prev_hash      text,
    hash           text NOT NULL,
    seq            bigint NOT NULL,
    written_at     timestamptz NOT NULL,
    UNIQUE (node, seq, written_at)
) PARTITION BY RANGE (written_at);
CREATE INDEX fsp_audit_message_id ON fsp_audit (message_id);
CREATE INDEX fsp_audit_consumer ON fsp_audit (consumer, "timestamp");
CREATE INDEX fsp_audit_service ON fsp_audit (service, "timestamp");
CREATE INDEX fsp_audit_end_user ON fsp_audit (end_user);
CREATE INDEX fsp_audit_timestamp ON fsp_audit ("timestamp");
COMMENT ON TABLE fsp_audit IS
    'FSP audit trail: one row per record, each node''s rows a hash chain in the order of seq';
CREATE TABLE fsp_audit_anchor (
    node            text PRIMARY KEY,
    retired_through timestamptz NOT NULL,
    last_seq        bigint NOT NULL,
    last_hash       text
);
COMMENT ON TABLE fsp_audit_anchor IS
    'Where each node''s chain goes on after its oldest partitions were dropped by retention';
CREATE VIEW fsp_audit_calls AS
    SELECT a.* FROM fsp_audit a
     WHERE a.phase IS DISTINCT FROM 'request'
        OR NOT EXISTS (SELECT 1 FROM fsp_audit o
                        WHERE o.message_id = a.message_id AND o.node = a.node
                          AND o.phase = 'outcome');
COMMENT ON VIEW fsp_audit_calls IS
    'One row per call: its outcome line, else its request line (the call''s end was never recorded), else its single line';
"#;

/// The statistics roll-ups (see the module documentation), and the trail already written
/// counted into them: a call is a line that is not a write-ahead `request`; its bucket is
/// [`stats::bucket_of`] in SQL (NaN, which sorts above every number in SQL, in bucket 0).
/// `latency` is `json`, not `jsonb`: kept as written, it is sent as it is, where `jsonb`
/// would be printed again for every row a query reads (half the time of a long query).
const SCHEMA_V2: &str = r#"
CREATE TABLE fsp_audit_daily (
    day      date    NOT NULL,
    node     text    NOT NULL,
    consumer text    NOT NULL,
    service  text    NOT NULL,
    version  text    NOT NULL,
    code     integer NOT NULL CHECK (code BETWEEN 0 AND 65535),
    decision text    NOT NULL,
    calls    bigint  NOT NULL CHECK (calls > 0),
    errors   bigint  NOT NULL CHECK (errors BETWEEN 0 AND calls),
    latency  json    NOT NULL CHECK (json_typeof(latency) = 'array'),
    PRIMARY KEY (day, node, consumer, service, version, code, decision)
);
COMMENT ON TABLE fsp_audit_daily IS
    'FSP usage statistics: each node''s calls per UTC day of their timestamp, consumer, service, version, HTTP status (code) and decision; '''' is a missing consumer, service or version; latency is [[bucket, count], ...] (fsp-stats/1 buckets)';
CREATE TABLE fsp_audit_monthly (
    month    date    NOT NULL CHECK (extract(day FROM month) = 1),
    node     text    NOT NULL,
    consumer text    NOT NULL,
    service  text    NOT NULL,
    version  text    NOT NULL,
    code     integer NOT NULL CHECK (code BETWEEN 0 AND 65535),
    decision text    NOT NULL,
    calls    bigint  NOT NULL CHECK (calls > 0),
    errors   bigint  NOT NULL CHECK (errors BETWEEN 0 AND calls),
    latency  json    NOT NULL CHECK (json_typeof(latency) = 'array'),
    PRIMARY KEY (month, node, consumer, service, version, code, decision)
);
COMMENT ON TABLE fsp_audit_monthly IS
    'FSP usage statistics: fsp_audit_daily summed by month (its first day); the current month is the month so far';
WITH calls AS (
    SELECT ("timestamp" AT TIME ZONE 'UTC')::date AS day, node,
           coalesce(consumer, '') AS consumer, coalesce(service, '') AS service,
           coalesce(version, '') AS version, status AS code, decision,
           CASE WHEN duration_ms = 'NaN' OR duration_ms < 0.01 THEN 0
                WHEN duration_ms >= 600000 THEN 369
                ELSE least(floor(ln(duration_ms / 0.01) / ln(1.05))::integer + 1, 368)
           END AS bucket,
           count(*) AS calls,
           count(*) FILTER (WHERE decision <> 'allowed' OR status = 0 OR status >= 500) AS errors
      FROM fsp_audit
     WHERE phase IS DISTINCT FROM 'request'
     GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
), daily AS (
    INSERT INTO fsp_audit_daily
    SELECT day, node, consumer, service, version, code, decision,
           sum(calls)::bigint, sum(errors)::bigint,
           ('[' || string_agg('[' || bucket || ',' || calls || ']', ',' ORDER BY bucket) || ']')::json
      FROM calls
     GROUP BY day, node, consumer, service, version, code, decision
)
INSERT INTO fsp_audit_monthly
SELECT month, node, consumer, service, version, code, decision,
       sum(calls)::bigint, sum(errors)::bigint,
       ('[' || string_agg('[' || bucket || ',' || calls || ']', ',' ORDER BY bucket) || ']')::json
  FROM (SELECT date_trunc('month', day::timestamp)::date AS month, node, consumer, service, version,
               code, decision, bucket, sum(calls)::bigint AS calls, sum(errors)::bigint AS errors
          FROM calls
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8) m
 GROUP BY month, node, consumer, service, version, code, decision;
"#;

/// The record's `certificate_sha256` extension: a nullable column, so that the rows
/// already written (and the gateways of earlier versions, whose inserts name their
/// columns) go on unchanged; adding it changes no row, whatever the table's size. The
/// view `fsp_audit_calls` is made again to have it: its `a.*` was expanded when it was
/// made (`CREATE OR REPLACE VIEW` may add columns at the end, and keeps the view's
/// comment and grants). Partitions take the column from their parent. `IF NOT EXISTS`:
/// applying it twice changes nothing.
const SCHEMA_V3: &str = r#"
ALTER TABLE fsp_audit ADD COLUMN IF NOT EXISTS certificate_sha256 text;
COMMENT ON COLUMN fsp_audit.certificate_sha256 IS
    'Extension: the SHA-256 of the client certificate the connection presented when the call was identified by an OAuth token (credential oauth); NULL otherwise';
CREATE OR REPLACE VIEW fsp_audit_calls AS
    SELECT a.* FROM fsp_audit a
     WHERE a.phase IS DISTINCT FROM 'request'
        OR NOT EXISTS (SELECT 1 FROM fsp_audit o
                        WHERE o.message_id = a.message_id AND o.node = a.node
                          AND o.phase = 'outcome');
"#;

/// Version 4: each node's head, the last record its writer committed (as of at most
/// [`HEAD_EVERY`] ago, and at a clean stop), so that rows removed from the end of a
/// node's chain (or all of them) fail `verify` instead of passing as a shorter chain.
const SCHEMA_V4: &str = r#"
CREATE TABLE IF NOT EXISTS fsp_audit_head (
    node       text PRIMARY KEY,
    last_seq   bigint NOT NULL,
    message_id text NOT NULL,
    last_hash  text NOT NULL,
    written_at timestamptz NOT NULL
);
COMMENT ON TABLE fsp_audit_head IS
    'The last record each node''s writer committed (rewritten at most once a second, after the rows it names): verify fails when a node''s chain does not reach it';
"#;

/// Version 5: heads and anchors signed by the writer when it has a signing key (see
/// [`crate::seal`]): the key's id and the signature, `NULL` when written without one.
const SCHEMA_V5: &str = r#"
ALTER TABLE fsp_audit_head ADD COLUMN IF NOT EXISTS key_id text,
                           ADD COLUMN IF NOT EXISTS signature text;
ALTER TABLE fsp_audit_anchor ADD COLUMN IF NOT EXISTS key_id text,
                             ADD COLUMN IF NOT EXISTS signature text;
COMMENT ON COLUMN fsp_audit_head.signature IS
    'Ed25519 signature (hex) by key key_id over node, last_seq, message_id and last_hash; see fsp audit verify';
COMMENT ON COLUMN fsp_audit_anchor.signature IS
    'Ed25519 signature (hex) by key key_id over node, retired_through, last_seq and last_hash; see fsp audit verify';
"#;

/// What a head's signature covers (see [`crate::seal::message`]).
const HEAD_LABEL: &str = "pg-head";
/// What an anchor's signature covers.
const ANCHOR_LABEL: &str = "pg-anchor";

fn head_fields(node: &str, seq: i64, message_id: &str, hash: &str) -> [String; 4] {
    [
        node.to_owned(),
        seq.to_string(),
        message_id.to_owned(),
        hash.to_owned(),
    ]
}

fn anchor_fields(a: &Anchor) -> [String; 4] {
    [
        a.node.clone(),
        a.retired_through.unix_timestamp().to_string(),
        a.last_seq.to_string(),
        a.last_hash.clone().unwrap_or_default(),
    ]
}

/// Signs a node's anchor as it is in `anchor`.
fn sign_anchor(
    tx: &mut Transaction<'_>,
    anchor: &Anchor,
    key: &SigningKey,
) -> Result<(), ::postgres::Error> {
    let seal = key.seal(
        ANCHOR_LABEL,
        &anchor_fields(anchor).each_ref().map(String::as_str),
    );
    tx.execute(
        "UPDATE fsp_audit_anchor SET key_id = $2, signature = $3 WHERE node = $1",
        &[&anchor.node, &seal.key, &seal.signature],
    )?;
    Ok(())
}

/// Checks a head's or an anchor's signature (`key_id`, `signature`) against `trusted`.
fn check_seal(
    trusted: &TrustedKeys,
    key: Option<String>,
    signature: Option<String>,
    label: &str,
    fields: &[String],
) -> Result<(), crate::seal::SealError> {
    let seal = match (key, signature) {
        (Some(key), Some(signature)) => Some(Seal { key, signature }),
        _ => None,
    };
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    trusted.check(seal.as_ref(), label, &fields)
}

/// How often, at most, the writer updates its node's head (`fsp_audit_head`).
const HEAD_EVERY: Duration = Duration::from_secs(1);

/// The text columns of `fsp_audit`, in the order [`texts`] gives a record's values.
const TEXT_COLUMNS: [&str; 22] = [
    "message_id",
    "consumer",
    "credential",
    "credential_id",
    "source_ip",
    "service",
    "version",
    "operation",
    "purpose",
    "authorisation",
    "legal_basis",
    "end_user",
    "consumer_ref",
    "decision",
    "trace_id",
    "node",
    "fault",
    "detail",
    "phase",
    "certificate_sha256",
    "prev_hash",
    "hash",
];

/// Where `node` is in [`TEXT_COLUMNS`] (and in a row read with [`SELECT_LIST`]).
const NODE_COLUMN: usize = 15;

/// The other columns a record is rebuilt from, after the text columns, with their types.
const OTHER_COLUMNS: [(&str, &str); 6] = [
    ("\"timestamp\"", "timestamptz"),
    ("status", "integer"),
    ("duration_ms", "double precision"),
    ("request_bytes", "bigint"),
    ("response_bytes", "bigint"),
    ("seq", "bigint"),
];

/// The column list a record is read with: the text columns, then the others.
static SELECT_LIST: LazyLock<String> = LazyLock::new(|| {
    TEXT_COLUMNS
        .iter()
        .copied()
        .chain(OTHER_COLUMNS.iter().map(|(c, _)| *c))
        .collect::<Vec<_>>()
        .join(", ")
});

/// [`SELECT_LIST`] for a database not migrated to version 3 yet (by a gateway of this
/// version): `certificate_sha256` is read as NULL, as its records have none.
static SELECT_LIST_BEFORE_V3: LazyLock<String> = LazyLock::new(|| {
    TEXT_COLUMNS
        .iter()
        .map(|c| match *c {
            "certificate_sha256" => "NULL::text",
            c => c,
        })
        .chain(OTHER_COLUMNS.iter().map(|(c, _)| *c))
        .collect::<Vec<_>>()
        .join(", ")
});

/// The one statement a batch is written with: one array per column, `written_at` the
/// transaction's time.
static INSERT: LazyLock<String> = LazyLock::new(|| {
    let arrays: Vec<String> = (1..=TEXT_COLUMNS.len())
        .map(|i| format!("${i}::text[]"))
        .chain(
            OTHER_COLUMNS
                .iter()
                .enumerate()
                .map(|(i, (_, ty))| format!("${}::{ty}[]", TEXT_COLUMNS.len() + 1 + i)),
        )
        .collect();
    format!(
        "INSERT INTO fsp_audit ({}, written_at) SELECT *, now() FROM UNNEST({})",
        SELECT_LIST.as_str(),
        arrays.join(", ")
    )
});

/// The number of parameters of [`INSERT`]: one array per column.
const TRAIL_PARAMS: usize = TEXT_COLUMNS.len() + OTHER_COLUMNS.len();

/// A batch with calls is written with this one statement: its records as [`INSERT`] writes
/// them, then the node (`$29`) and the cells the batch changed, with their full values,
/// upserted into the day roll-ups (`$30`..`$38`) and the month roll-ups (`$39`..`$47`), one
/// array per column of [`CellColumns`]. One statement: the trail and its statistics are
/// committed together or not at all.
static INSERT_COUNTED: LazyLock<String> = LazyLock::new(|| {
    let node = TRAIL_PARAMS + 1;
    let upsert = |table: &str, at: &str, first: usize| {
        let arrays: Vec<String> = CellColumns::TYPES
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("${}::{ty}[]", first + i))
            .collect();
        format!(
            "INSERT INTO {table} ({at}, node, {CELL_COLUMNS}) \
             SELECT c.at, ${node}::text, c.consumer, c.service, c.version, c.code, c.decision, \
             c.calls, c.errors, c.latency::json \
             FROM UNNEST({}) AS c(at, consumer, service, version, code, decision, calls, errors, latency) \
             ON CONFLICT ({at}, node, consumer, service, version, code, decision) DO UPDATE \
             SET calls = EXCLUDED.calls, errors = EXCLUDED.errors, latency = EXCLUDED.latency",
            arrays.join(", ")
        )
    };
    let days = node + 1;
    let months = days + CellColumns::TYPES.len();
    format!(
        "WITH trail AS ({}), daily AS ({}) {}",
        INSERT.as_str(),
        upsert("fsp_audit_daily", "day", days),
        upsert("fsp_audit_monthly", "month", months)
    )
});

/// The columns of a roll-up row after its `day` (or `month`) and `node`.
const CELL_COLUMNS: &str = "consumer, service, version, code, decision, calls, errors, latency";

/// The record's `timestamp` text: RFC 3339, UTC, milliseconds.
const MILLIS: &[BorrowedFormatItem<'_>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
);

/// How to reach the database and what to write there.
#[derive(Clone)]
pub struct Settings {
    /// `postgres://user:password@host:port/database` or `host=... user=...` (libpq forms).
    pub url: String,
    /// The schema the trail's tables live in (made if missing); `None`: the connection's
    /// default (`public`, usually).
    pub schema: Option<String>,
    /// The gateway instance: its records form one chain.
    pub node: String,
    /// Drop partitions whose whole month is older than this many days (`None`: keep
    /// everything).
    pub retention_days: Option<u32>,
    /// Records that may wait to be written before `submit` refuses them (they wait in a
    /// few queues, shared by the threads that submit, each taking its share).
    pub capacity: usize,
    /// Signs heads and anchors, and which signatures a starting writer accepts (see
    /// [`crate::seal`]); default: none.
    pub seals: Seals,
}

impl Settings {
    /// The settings for `node`'s records at `url`: the default schema and capacity, kept
    /// forever.
    pub fn new(url: &str, node: &str) -> Self {
        Self {
            url: url.to_owned(),
            schema: None,
            node: node.to_owned(),
            retention_days: None,
            capacity: DEFAULT_CAPACITY,
            seals: Seals::default(),
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &display_url(&self.url))
            .field("schema", &self.schema)
            .field("node", &self.node)
            .field("retention_days", &self.retention_days)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Why the trail in PostgreSQL cannot be read (or prepared).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrailError {
    #[error("cannot connect to the audit database at {at}: {}", describe(.source))]
    Connect {
        at: String,
        source: ::postgres::Error,
    },
    #[error("cannot connect to the audit database at {at}: {why}")]
    Tls { at: String, why: String },
    #[error("the audit database failed: {}", describe(.0))]
    Database(#[from] ::postgres::Error),
    #[error("the audit database's schema: {0}")]
    Schema(String),
    #[error(
        "another gateway is writing the audit trail as node {0:?} (it holds the node's lock): \
         two gateways must not share a node name (the lock of a gateway that is gone is \
         released once the database notices, within about a minute)"
    )]
    NodeTaken(String),
    #[error("row {at} of the audit trail is not a record: {why}")]
    Row { at: String, why: String },
    #[error("the statistics row {at} is not a valid cell: {why}")]
    Cell { at: String, why: String },
    #[error("cannot write the export: {0}")]
    Write(#[source] std::io::Error),
    /// The node's rows end before its head, or its head or anchor is not signed by a
    /// trusted key: see [`check_head`].
    #[error("{0}")]
    CutShort(String),
}

/// A `postgres` error with its cause (its `Display` alone says only "db error").
fn describe(e: &::postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The database a URL names, for messages: `postgres://user@host:port/database`, never
/// its password.
pub fn display_url(url: &str) -> String {
    use ::postgres::config::Host;
    let Ok(config) = crate::pg_tls::target(url)
        .map_err(drop)
        .and_then(|t| t.url.parse::<::postgres::Config>().map_err(drop))
    else {
        return "(an audit database URL that does not parse)".to_owned();
    };
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(h) => format!("{h}:{port}"),
                Host::Unix(p) => format!("{}:{port}", p.display()),
            }
        })
        .collect();
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or_default();
    format!("postgres://{user}{}/{db}", hosts.join(","))
}

/// `"name"`, quoted for SQL.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Connects as `application_name`, in `schema` when one is given.
fn open(url: &str, schema: Option<&str>, application_name: &str) -> Result<Client, TrailError> {
    let at = display_url(url);
    let target = crate::pg_tls::target(url).map_err(|why| TrailError::Tls {
        at: at.clone(),
        why,
    })?;
    let mut config: ::postgres::Config =
        target.url.parse().map_err(|source| TrailError::Connect {
            at: at.clone(),
            source,
        })?;
    config.application_name(application_name);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    let connected = match target.tls {
        Some(tls) => config.connect(crate::pg_tls::MakeRustls(tls)),
        None => config.connect(NoTls),
    };
    let mut client = connected.map_err(|source| TrailError::Connect { at, source })?;
    if let Some(schema) = schema {
        client.batch_execute(&format!("SET search_path TO {}", quote_ident(schema)))?;
    }
    Ok(client)
}

/// Makes the schema (and `schema` itself, when given) or brings it up to date, once,
/// whichever gateway comes first.
fn migrate(client: &mut Client, schema: Option<&str>) -> Result<(), TrailError> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('fsp_audit'), \
         hashtext(coalesce($1::text, current_schema()::text, '')))",
        &[&schema],
    )?;
    if let Some(schema) = schema {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))?;
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS fsp_schema_migrations \
         (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM fsp_schema_migrations",
            &[],
        )?
        .try_get(0)?;
    let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > known {
        return Err(TrailError::Schema(format!(
            "it is at version {current}, newer than this gateway knows ({known}): upgrade the gateway"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO fsp_schema_migrations (version, applied_at) VALUES ($1, now())",
            &[version],
        )?;
        tracing::info!(version, "audit database schema migrated");
    }
    Ok(tx.commit()?)
}

/// A month of `written_at`: one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Month {
    year: i32,
    month: u8,
}

impl Month {
    fn of(t: OffsetDateTime) -> Self {
        let t = t.to_offset(UtcOffset::UTC);
        Self {
            year: t.year(),
            month: u8::from(t.month()),
        }
    }

    fn next(self) -> Self {
        if self.month == 12 {
            Self {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Self {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The partition's name.
    fn table(self) -> String {
        format!("fsp_audit_y{:04}m{:02}", self.year, self.month)
    }

    /// The month a partition's name says, if it is one of ours.
    fn of_table(name: &str) -> Option<Self> {
        let (year, month) = name.strip_prefix("fsp_audit_y")?.split_once('m')?;
        let ok = year.len() == 4 && month.len() == 2;
        let month = Self {
            year: year.parse().ok()?,
            month: month.parse().ok()?,
        };
        (ok && (1..=12).contains(&month.month)).then_some(month)
    }

    /// The month's first instant (UTC), as SQL text.
    fn start(self) -> String {
        format!("{:04}-{:02}-01 00:00:00+00", self.year, self.month)
    }
}

/// The months of the partitions of `fsp_audit` (ours by name), oldest first.
fn partitions(tx: &mut Transaction<'_>) -> Result<Vec<Month>, ::postgres::Error> {
    let rows = tx.query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'fsp_audit'::regclass",
        &[],
    )?;
    let mut months = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(m) = Month::of_table(row.try_get(0)?) {
            months.push(m);
        }
    }
    months.sort();
    Ok(months)
}

/// Creates this month's and next month's partitions when missing and, with
/// `retention_days`, drops the partitions older than that, keeping each node's anchor;
/// one transaction, under the schema's advisory lock, giving up on a lock not granted
/// within 5 s (readers may hold the table; the next attempt will do).
fn maintain(
    client: &mut Client,
    schema: Option<&str>,
    retention_days: Option<u32>,
    seals: &Seals,
) -> Result<(), ::postgres::Error> {
    let mut tx = client.transaction()?;
    tx.batch_execute("SET LOCAL lock_timeout = '5s'")?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('fsp_audit'), \
         hashtext(coalesce($1::text, current_schema()::text, '')))",
        &[&schema],
    )?;
    let now: OffsetDateTime = tx.query_one("SELECT now()", &[])?.try_get(0)?;
    let existing = partitions(&mut tx)?;
    let this = Month::of(now);
    for month in [this, this.next()] {
        if !existing.contains(&month) {
            tx.batch_execute(&format!(
                "CREATE TABLE {} PARTITION OF fsp_audit FOR VALUES FROM ('{}') TO ('{}')",
                month.table(),
                month.start(),
                month.next().start()
            ))?;
            tracing::info!(partition = %month.table(), "audit partition created");
        }
    }
    if let Some(days) = retention_days {
        // A month lies wholly before the cutoff when the next one begins by then.
        let cutoff = Month::of(before(now, days));
        for month in existing {
            if month.next() > cutoff {
                continue;
            }
            if !retire(&mut tx, month, seals)? {
                // Months are retired in order: a later one retired first would move
                // the anchors past the rows of the one kept.
                break;
            }
            tracing::info!(partition = %month.table(), retention_days = days, "audit partition retired");
        }
    }
    tx.commit()
}

/// Drops a partition, keeping first, for every node with rows in it, the `seq` and hash
/// of its last row there: its chain goes on from them.
fn retire(
    tx: &mut Transaction<'_>,
    month: Month,
    seals: &Seals,
) -> Result<bool, ::postgres::Error> {
    let table = month.table();
    if seals.required()
        && let Some(why) = unfit_to_retire(tx, &table, &seals.trusted)?
    {
        // Signing the anchor would vouch for rows nobody checked: keep the partition.
        tracing::error!(partition = %table, "audit partition not retired: {why}. Run `fsp audit verify`");
        return Ok(false);
    }
    let key = seals.key.as_deref();
    let moved = tx.query(
        &format!(
            "INSERT INTO fsp_audit_anchor (node, retired_through, last_seq, last_hash) \
             SELECT DISTINCT ON (node) node, $1::text::timestamptz, seq, hash FROM {table} \
             ORDER BY node, seq DESC \
             ON CONFLICT (node) DO UPDATE SET retired_through = EXCLUDED.retired_through, \
             last_seq = EXCLUDED.last_seq, last_hash = EXCLUDED.last_hash, \
             key_id = NULL, signature = NULL \
             WHERE fsp_audit_anchor.last_seq < EXCLUDED.last_seq \
             RETURNING node, retired_through, last_seq, last_hash"
        ),
        &[&month.next().start()],
    )?;
    // Each anchor moved is signed as it now is, in the same transaction.
    if let Some(key) = key {
        for row in moved {
            let anchor = Anchor {
                node: row.try_get(0)?,
                retired_through: row.try_get(1)?,
                last_seq: row.try_get(2)?,
                last_hash: row.try_get(3)?,
                key_id: None,
                signature: None,
            };
            sign_anchor(tx, &anchor, key)?;
        }
    }
    tx.batch_execute(&format!("DROP TABLE {table}"))?;
    Ok(true)
}

/// With signed anchors: why the last row of each node in a partition about to be
/// retired cannot be vouched for, if it cannot. The anchor made from it would be signed,
/// so its place must be one the node's signed head and its remaining rows confirm: at
/// or before the head (the head's own row, or one whose successor is still there and
/// links to it), after the node's present anchor. A row planted in an old partition
/// (any `seq` and hash) fails this.
fn unfit_to_retire(
    tx: &mut Transaction<'_>,
    table: &str,
    trusted: &TrustedKeys,
) -> Result<Option<String>, ::postgres::Error> {
    let lasts = tx.query(
        &format!("SELECT DISTINCT ON (node) node, seq, hash FROM {table} ORDER BY node, seq DESC"),
        &[],
    )?;
    for row in lasts {
        let (node, seq, hash): (String, i64, Option<String>) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let Some(head) = tx.query_opt(
            "SELECT last_seq, message_id, last_hash, key_id, signature \
             FROM fsp_audit_head WHERE node = $1",
            &[&node],
        )?
        else {
            return Ok(Some(format!("node {node} has rows there and no head")));
        };
        let (head_seq, message_id, head_hash): (i64, String, String) =
            (head.try_get(0)?, head.try_get(1)?, head.try_get(2)?);
        if let Err(why) = check_seal(
            trusted,
            head.try_get(3)?,
            head.try_get(4)?,
            HEAD_LABEL,
            &head_fields(&node, head_seq, &message_id, &head_hash),
        ) {
            return Ok(Some(format!("the head of node {node} {why}")));
        }
        let fits = if seq == head_seq {
            hash.as_deref() == Some(head_hash.as_str())
        } else if seq < head_seq {
            let next: Option<Option<String>> = tx
                .query_opt(
                    &format!(
                        "SELECT prev_hash FROM fsp_audit WHERE node = $1 AND seq = $2 \
                         AND tableoid <> '{table}'::regclass"
                    ),
                    &[&node, &(seq + 1)],
                )?
                .map(|r| r.try_get(0))
                .transpose()?;
            next.is_some_and(|prev| prev.is_some() && prev == hash)
        } else {
            // Rows after the head: a writer that stopped without a clean stop (a pod
            // killed, a node lost) leaves up to a second of them. They are vouched for
            // as the writer's own start vouches for them: each follows the head.
            follows(tx, &node, head_seq, &head_hash, seq, hash.as_deref())?
        };
        if !fits {
            return Ok(Some(format!(
                "the last row of node {node} there (seq {seq}) is not on the chain its signed head (seq {head_seq}) ends"
            )));
        }
        let anchored: Option<i64> = tx
            .query_opt(
                "SELECT last_seq FROM fsp_audit_anchor WHERE node = $1",
                &[&node],
            )?
            .map(|r| r.try_get(0))
            .transpose()?;
        if anchored.is_some_and(|a| a >= seq) {
            return Ok(Some(format!(
                "node {node}'s rows there (up to seq {seq}) were retired already"
            )));
        }
    }
    Ok(None)
}

/// Where a node's chain ends in the database: its last row, else its anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tail {
    seq: i64,
    hash: Option<String>,
}

fn tail(client: &mut Client, node: &str) -> Result<Tail, ::postgres::Error> {
    let last = client.query_opt(
        "SELECT seq, hash FROM fsp_audit WHERE node = $1 ORDER BY seq DESC LIMIT 1",
        &[&node],
    )?;
    let last = match last {
        Some(row) => Some(row),
        None => client.query_opt(
            "SELECT last_seq, last_hash FROM fsp_audit_anchor WHERE node = $1",
            &[&node],
        )?,
    };
    Ok(match last {
        Some(row) => Tail {
            seq: row.try_get(0)?,
            hash: row.try_get(1)?,
        },
        None => Tail { seq: 0, hash: None },
    })
}

/// A writer starting on a database that no longer holds the last record its node wrote
/// (its head) does not write on: rows were removed while the gateway was stopped, and
/// writing on would move the head past them, the only trace of them. The head is the
/// node's last row, a row still there with its hash, or one retention retired.
fn check_head(
    client: &mut Client,
    node: &str,
    tail: &Tail,
    seals: &Seals,
) -> Result<(), TrailError> {
    // Signed heads and anchors (see `crate::seal`): one not signed by a trusted key was
    // written without the key, or by someone who does not hold it. Writing on would sign
    // whatever the database holds now.
    let unsealed = |what: &str, why: Option<crate::seal::SealError>| {
        TrailError::CutShort(format!(
            "{what} of node {node} {}: {}",
            why.as_ref()
                .map_or_else(|| "is missing".to_owned(), ToString::to_string),
            crate::seal::advice(why.as_ref(), &format!("the rows of node {node}"))
        ))
    };
    if seals.required()
        && let Some(row) = client.query_opt(
            "SELECT node, retired_through, last_seq, last_hash, key_id, signature \
             FROM fsp_audit_anchor WHERE node = $1",
            &[&node],
        )?
    {
        let anchor = Anchor::from_row(&row)?;
        anchor
            .check_seal(&seals.trusted)
            .map_err(|why| unsealed("fsp_audit_anchor", Some(why)))?;
    }
    let Some(head) = client.query_opt(
        "SELECT last_seq, message_id, last_hash, written_at, key_id, signature \
         FROM fsp_audit_head WHERE node = $1",
        &[&node],
    )?
    else {
        if seals.required() && tail.seq > 0 {
            return Err(unsealed("fsp_audit_head", None));
        }
        return Ok(());
    };
    let (seq, message_id, hash, written_at): (i64, String, String, OffsetDateTime) = (
        head.try_get(0)?,
        head.try_get(1)?,
        head.try_get(2)?,
        head.try_get(3)?,
    );
    check_seal(
        &seals.trusted,
        head.try_get(4)?,
        head.try_get(5)?,
        HEAD_LABEL,
        &head_fields(node, seq, &message_id, &hash),
    )
    .map_err(|why| unsealed("fsp_audit_head", Some(why)))?;
    if seq == tail.seq && tail.hash.as_deref() == Some(hash.as_str()) {
        return Ok(());
    }
    let retired: Option<(i64, Option<String>)> = client
        .query_opt(
            "SELECT last_seq, last_hash FROM fsp_audit_anchor WHERE node = $1",
            &[&node],
        )?
        .map(|r| Ok::<_, ::postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
        .transpose()?;
    // Where the node's remaining rows go on from: its anchor when retention retired the
    // head's row, else the head's row itself, if it is still there.
    let from = match retired {
        Some((r, h)) if r >= seq => Some((r, h.unwrap_or_default())),
        _ => {
            let held: Option<String> = client
                .query_opt(
                    "SELECT hash FROM fsp_audit WHERE node = $1 AND seq = $2",
                    &[&node, &seq],
                )?
                .map(|r| r.try_get(0))
                .transpose()?;
            (held.as_deref() == Some(hash.as_str())).then(|| (seq, hash.clone()))
        }
    };
    if let Some((from_seq, from_hash)) = from {
        // With signed heads, every row after that must follow it (the rows a crash left
        // after the last head written), so that rows planted after the others (a higher
        // `seq`, a chain of their own) are not taken for the node's end and signed over.
        if seals.required()
            && let Some(why) = rows_after_head(client, node, from_seq, &from_hash, tail)?
        {
            return Err(TrailError::CutShort(format!(
                "the rows of node {node} after its signed head (seq {seq}) do not follow it: {why}. Run `fsp audit verify`"
            )));
        }
        return Ok(());
    }
    let at = written_at
        .format(&Rfc3339)
        .unwrap_or_else(|_| written_at.to_string());
    Err(TrailError::CutShort(format!(
        "the audit database does not hold record {message_id} (seq {seq}) of node {node}, which fsp_audit_head says was written by {at}: rows were removed while the gateway was stopped. Run `fsp audit verify`; once the loss is accounted for, delete the node's row of fsp_audit_head, and the gateway writes on"
    )))
}

/// Whether the rows of `node` from its head's (`head_seq`, `head_hash`) up to `seq` are
/// there, one after the other, each linked to the one before, the last one's hash
/// `hash`.
fn follows(
    tx: &mut Transaction<'_>,
    node: &str,
    head_seq: i64,
    head_hash: &str,
    seq: i64,
    hash: Option<&str>,
) -> Result<bool, ::postgres::Error> {
    let rows = tx.query(
        "SELECT seq, prev_hash, hash FROM fsp_audit WHERE node = $1 AND seq >= $2 AND seq <= $3 \
         ORDER BY seq LIMIT 1000001",
        &[&node, &head_seq, &seq],
    )?;
    let (mut expected, mut prev) = (head_seq, None::<String>);
    for row in &rows {
        let (at, row_prev, row_hash): (i64, Option<String>, Option<String>) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let linked = if at == head_seq {
            row_hash.as_deref() == Some(head_hash)
        } else {
            row_prev.is_some() && row_prev == prev
        };
        if at != expected || !linked {
            return Ok(false);
        }
        expected = at + 1;
        prev = row_hash;
    }
    Ok(expected == seq + 1 && prev.as_deref() == hash && hash.is_some())
}

/// Why the rows of `node` after its head (`seq`, `hash`) up to `tail` are not a chain
/// that goes on from it, if they are not: each `seq` once, one after the other, each
/// row's `prev_hash` the hash of the row before.
fn rows_after_head(
    client: &mut Client,
    node: &str,
    seq: i64,
    hash: &str,
    tail: &Tail,
) -> Result<Option<String>, ::postgres::Error> {
    if tail.seq < seq {
        return Ok(Some(format!("the node's last row has seq {}", tail.seq)));
    }
    let mut tx = client.transaction()?;
    let portal = tx.bind(
        "SELECT seq, prev_hash, hash FROM fsp_audit WHERE node = $1 AND seq > $2 ORDER BY seq",
        &[&node, &seq],
    )?;
    let (mut expected, mut prev) = (seq + 1, Some(hash.to_owned()));
    loop {
        let rows = tx.query_portal(&portal, FETCH_ROWS)?;
        for row in &rows {
            let (at, row_prev, row_hash): (i64, Option<String>, Option<String>) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            if at != expected {
                return Ok(Some(format!("seq {expected} is followed by seq {at}")));
            }
            if row_prev != prev {
                return Ok(Some(format!(
                    "the row of seq {at} does not link to the one before"
                )));
            }
            expected = at + 1;
            prev = row_hash;
        }
        if rows.len() < FETCH_ROWS as usize {
            break;
        }
    }
    tx.commit()?;
    Ok(None)
}

/// What a writer that connects again finds at its node's end in the database, against
/// the batch it is writing (`before`: the end before the batch, `after`: its last row).
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// The batch is there: its commit went through and only the answer was lost.
    Written,
    /// The database ends where the batch begins: it is to be written.
    Pending,
    /// The database ends before the batch begins: rows were removed behind the writer's
    /// back. The chain goes on as sealed, and `verify` shows the gap.
    Removed,
    /// The database ends elsewhere: another writer wrote as this node. The batch is
    /// sealed again after its rows, so that nothing is lost and the chain stays whole.
    Foreign,
}

fn found(tail: &Tail, before: &Tail, after: &Tail) -> Found {
    if tail == after && before != after {
        Found::Written
    } else if tail == before {
        Found::Pending
    } else if tail.seq < before.seq {
        Found::Removed
    } else {
        Found::Foreign
    }
}

/// A record taken, with its instant, and its place in the chain once sealed.
#[derive(Debug)]
struct Line {
    record: Record,
    at: OffsetDateTime,
    seq: i64,
    /// A caller waits for this record to be committed.
    waited: bool,
}

/// Puts the records held back in front of `batch` (they came first), leaving none held.
fn release(held: &mut Vec<Line>, batch: &mut Vec<Line>) {
    if !held.is_empty() {
        held.append(batch);
        std::mem::swap(batch, held);
    }
}

/// Checks a record and makes it storable: the `timestamp` is parsed and written as the
/// table gives it back (RFC 3339, UTC, milliseconds), NUL characters (which PostgreSQL
/// text cannot hold) become U+FFFD, byte counts beyond `bigint` are capped. All before it
/// is sealed, so the hash covers what is stored.
fn admit(mut record: Record) -> Result<Line, AuditError> {
    let at = OffsetDateTime::parse(&record.timestamp, &Rfc3339).map_err(|e| {
        AuditError::Unavailable(format!(
            "record {} has a timestamp that is not RFC 3339 ({:?}: {e}); it was not taken",
            record.message_id, record.timestamp
        ))
    })?;
    let at = at.to_offset(UtcOffset::UTC);
    let at = at
        .replace_nanosecond(at.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(at);
    record.timestamp = at.format(MILLIS).map_err(|e| {
        AuditError::Unavailable(format!(
            "record {} has a timestamp that cannot be stored ({:?}: {e}); it was not taken",
            record.message_id, record.timestamp
        ))
    })?;
    for s in [
        &mut record.message_id,
        &mut record.source_ip,
        &mut record.operation,
        &mut record.decision,
        &mut record.node,
    ] {
        storable(s);
    }
    for s in [
        &mut record.consumer,
        &mut record.credential,
        &mut record.credential_id,
        &mut record.service,
        &mut record.version,
        &mut record.purpose,
        &mut record.authorisation,
        &mut record.legal_basis,
        &mut record.end_user,
        &mut record.consumer_ref,
        &mut record.trace_id,
        &mut record.fault,
        &mut record.detail,
        &mut record.certificate_sha256,
    ]
    .into_iter()
    .flatten()
    {
        storable(s);
    }
    const MAX_BYTES: u64 = i64::MAX as u64;
    record.request_bytes = record.request_bytes.min(MAX_BYTES);
    record.response_bytes = record.response_bytes.min(MAX_BYTES);
    Ok(Line {
        record,
        at,
        seq: 0,
        waited: false,
    })
}

fn storable(s: &mut String) {
    if s.contains('\0') {
        *s = s.replace('\0', "\u{fffd}");
    }
}

/// A record's text columns, in the order of [`TEXT_COLUMNS`].
fn texts(r: &Record) -> [Option<&str>; 22] {
    [
        Some(&r.message_id),
        r.consumer.as_deref(),
        r.credential.as_deref(),
        r.credential_id.as_deref(),
        Some(&r.source_ip),
        r.service.as_deref(),
        r.version.as_deref(),
        Some(&r.operation),
        r.purpose.as_deref(),
        r.authorisation.as_deref(),
        r.legal_basis.as_deref(),
        r.end_user.as_deref(),
        r.consumer_ref.as_deref(),
        Some(&r.decision),
        r.trace_id.as_deref(),
        Some(&r.node),
        r.fault.as_deref(),
        r.detail.as_deref(),
        r.phase.map(Phase::as_str),
        r.certificate_sha256.as_deref(),
        r.prev_hash.as_deref(),
        r.hash.as_deref(),
    ]
}

/// Writes a sealed batch with one statement (its own transaction): [`INSERT`], or with
/// `counted` (the node and the changed cells of its days and months)
/// [`INSERT_COUNTED`].
fn insert(
    client: &mut Client,
    statement: &Statement,
    batch: &[Line],
    counted: Option<(&str, &CellColumns<'_>, &CellColumns<'_>)>,
) -> Result<(), ::postgres::Error> {
    let mut text: Vec<Vec<Option<&str>>> =
        vec![Vec::with_capacity(batch.len()); TEXT_COLUMNS.len()];
    let mut at = Vec::with_capacity(batch.len());
    let mut status = Vec::with_capacity(batch.len());
    let mut duration = Vec::with_capacity(batch.len());
    let mut request_bytes = Vec::with_capacity(batch.len());
    let mut response_bytes = Vec::with_capacity(batch.len());
    let mut seq = Vec::with_capacity(batch.len());
    for line in batch {
        let r = &line.record;
        for (column, value) in text.iter_mut().zip(texts(r)) {
            column.push(value);
        }
        at.push(line.at);
        status.push(i32::from(r.status));
        duration.push(r.duration_ms);
        request_bytes.push(i64::try_from(r.request_bytes).unwrap_or(i64::MAX));
        response_bytes.push(i64::try_from(r.response_bytes).unwrap_or(i64::MAX));
        seq.push(line.seq);
    }
    let mut params: Vec<&(dyn ToSql + Sync)> = text.iter().map(|c| c as _).collect();
    params.extend([
        &at as &(dyn ToSql + Sync),
        &status,
        &duration,
        &request_bytes,
        &response_bytes,
        &seq,
    ]);
    let node;
    if let Some((name, days, months)) = counted {
        node = name;
        params.push(&node);
        params.extend(days.params());
        params.extend(months.params());
    }
    client.execute(statement, &params).map(drop)
}

/// Rebuilds a record (and its `seq`) from a row read with [`SELECT_LIST`].
fn record_from(row: &Row) -> Result<(Record, i64), String> {
    let get_err = |e: ::postgres::Error| describe(&e);
    let mut texts: [Option<String>; 22] = Default::default();
    for (i, t) in texts.iter_mut().enumerate() {
        *t = row.try_get(i).map_err(get_err)?;
    }
    let [
        message_id,
        consumer,
        credential,
        credential_id,
        source_ip,
        service,
        version,
        operation,
        purpose,
        authorisation,
        legal_basis,
        end_user,
        consumer_ref,
        decision,
        trace_id,
        node,
        fault,
        detail,
        phase,
        certificate_sha256,
        prev_hash,
        hash,
    ] = texts;
    let n = TEXT_COLUMNS.len();
    let at: OffsetDateTime = row.try_get(n).map_err(get_err)?;
    let status: i32 = row.try_get(n + 1).map_err(get_err)?;
    let request_bytes: i64 = row.try_get(n + 3).map_err(get_err)?;
    let response_bytes: i64 = row.try_get(n + 4).map_err(get_err)?;
    let record = Record {
        message_id: message_id.unwrap_or_default(),
        timestamp: at
            .to_offset(UtcOffset::UTC)
            .format(MILLIS)
            .map_err(|e| format!("timestamp {at}: {e}"))?,
        consumer,
        credential,
        credential_id,
        source_ip: source_ip.unwrap_or_default(),
        service,
        version,
        operation: operation.unwrap_or_default(),
        purpose,
        authorisation,
        legal_basis,
        end_user,
        consumer_ref,
        decision: decision.unwrap_or_default(),
        status: u16::try_from(status).map_err(|_| format!("status {status}"))?,
        duration_ms: row.try_get(n + 2).map_err(get_err)?,
        request_bytes: u64::try_from(request_bytes)
            .map_err(|_| format!("request_bytes {request_bytes}"))?,
        response_bytes: u64::try_from(response_bytes)
            .map_err(|_| format!("response_bytes {response_bytes}"))?,
        trace_id,
        node: node.unwrap_or_default(),
        fault,
        detail,
        phase: match phase.as_deref() {
            None => None,
            Some("request") => Some(Phase::Request),
            Some("outcome") => Some(Phase::Outcome),
            Some(other) => return Err(format!("phase {other:?}")),
        },
        certificate_sha256,
        prev_hash,
        hash,
    };
    Ok((record, row.try_get(n + 5).map_err(get_err)?))
}

/// Where a row is, as `node/seq`, for a row that cannot be rebuilt.
fn place(row: &Row) -> String {
    let node: Option<String> = row.try_get(NODE_COLUMN).ok().flatten();
    let seq: Option<i64> = row.try_get(TEXT_COLUMNS.len() + 5).ok();
    format!(
        "{}/{}",
        node.unwrap_or_default(),
        seq.map_or_else(|| "?".to_owned(), |s| s.to_string())
    )
}

// ---------------------------------------------------------------------------------------
// Statistics: the writer's side
// ---------------------------------------------------------------------------------------

/// A missing consumer, service or version as the roll-up tables keep it (a primary key
/// cannot hold NULL).
const MISSING: &str = "";

/// A name as read from a roll-up table: `''` is a missing one.
fn read_name(name: &str) -> Option<&str> {
    (name != MISSING).then_some(name)
}

/// The cells of a batch's calls (its write-ahead `request` lines are not calls). An empty
/// consumer, service or version is a missing one, as the roll-up tables keep both alike:
/// two cells of a batch never fall on one row.
fn count(batch: &[Line]) -> Rollup {
    let mut cells = Rollup::new();
    let mut empty_names = false;
    for line in batch {
        let r = &line.record;
        if cells.add(r) {
            empty_names |= [&r.consumer, &r.service, &r.version]
                .into_iter()
                .any(|n| n.as_deref() == Some(""));
        }
    }
    if !empty_names {
        return cells;
    }
    let mut named = Rollup::new();
    for (k, c) in cells.cells() {
        named.insert(
            CellKey {
                consumer: k.consumer.and_then(read_name),
                service: k.service.and_then(read_name),
                version: k.version.and_then(read_name),
                ..k
            },
            c,
        );
    }
    named
}

/// A day roll-up's cells put on their months' first days: what a batch adds to the month
/// roll-ups.
fn by_month(days: &Rollup) -> Rollup {
    let mut months = Rollup::new();
    for (k, c) in days.cells() {
        months.insert(
            CellKey {
                day: stats::month_of(k.day),
                ..k
            },
            c,
        );
    }
    months
}

/// A histogram as the roll-up tables keep it: `[[bucket,count],...]`.
fn latency_json(h: &Histogram) -> String {
    let mut out = String::with_capacity(2 + 10 * h.buckets().len());
    out.push('[');
    for (i, (b, n)) in h.buckets().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "[{b},{n}]");
    }
    out.push(']');
    out
}

/// The rows of cells to upsert into a roll-up table, one array per column (the types of
/// [`CellColumns::TYPES`]).
#[derive(Debug, Default)]
struct CellColumns<'a> {
    at: Vec<Date>,
    consumer: Vec<&'a str>,
    service: Vec<&'a str>,
    version: Vec<&'a str>,
    code: Vec<i32>,
    decision: Vec<&'a str>,
    calls: Vec<i64>,
    errors: Vec<i64>,
    latency: Vec<String>,
}

impl<'a> CellColumns<'a> {
    /// The SQL types of the arrays, in the order of [`CellColumns::params`].
    const TYPES: [&'static str; 9] = [
        "date", "text", "text", "text", "integer", "text", "bigint", "bigint", "text",
    ];

    /// The cells of `changes` with their full values: what `stored` holds for them (the
    /// whole of their day or month), plus the change.
    fn of(changes: &'a Rollup, stored: &HashMap<Date, Rollup>) -> Self {
        let n = changes.len();
        let mut columns = Self {
            at: Vec::with_capacity(n),
            consumer: Vec::with_capacity(n),
            service: Vec::with_capacity(n),
            version: Vec::with_capacity(n),
            code: Vec::with_capacity(n),
            decision: Vec::with_capacity(n),
            calls: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            latency: Vec::with_capacity(n),
        };
        for (k, change) in changes.cells() {
            let mut whole = stored
                .get(&k.day)
                .and_then(|r| r.get(k))
                .cloned()
                .unwrap_or_default();
            whole.merge(change);
            columns.at.push(k.day);
            columns.consumer.push(k.consumer.unwrap_or(MISSING));
            columns.service.push(k.service.unwrap_or(MISSING));
            columns.version.push(k.version.unwrap_or(MISSING));
            columns.code.push(i32::from(k.code));
            columns.decision.push(k.decision);
            columns
                .calls
                .push(i64::try_from(whole.calls()).unwrap_or(i64::MAX));
            columns
                .errors
                .push(i64::try_from(whole.errors()).unwrap_or(i64::MAX));
            columns.latency.push(latency_json(whole.latency()));
        }
        columns
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.at,
            &self.consumer,
            &self.service,
            &self.version,
            &self.code,
            &self.decision,
            &self.calls,
            &self.errors,
            &self.latency,
        ]
    }
}

/// The stored cells of the writer's node for the days and months it writes to, as
/// committed: read from the roll-up tables the first time a batch touches a day or month,
/// updated with every batch committed, forgotten after a reconnect (the connection that
/// was lost may have committed a batch whose answer never came). Only the node's writer
/// writes its rows, so what it holds stays what is stored.
#[derive(Debug, Default)]
struct Counted {
    /// Whole days, by day.
    days: HashMap<Date, Rollup>,
    /// Whole months, by their first day (each cell on that day).
    months: HashMap<Date, Rollup>,
}

impl Counted {
    /// Reads the node's stored cells of the days of `days` and the months of `months` not
    /// held yet. A stored row that is not a valid cell is left out, and said (the batch's
    /// upsert then replaces it): statistics must not stop the trail.
    fn load(
        &mut self,
        client: &mut Client,
        node: &str,
        days: &Rollup,
        months: &Rollup,
    ) -> Result<(), ::postgres::Error> {
        for (table, at, changes, held) in [
            ("fsp_audit_daily", "day", days, &mut self.days),
            ("fsp_audit_monthly", "month", months, &mut self.months),
        ] {
            let missing: Vec<Date> = changes
                .days()
                .into_iter()
                .filter(|d| !held.contains_key(d))
                .collect();
            if missing.is_empty() {
                continue;
            }
            let rows = client.query(
                &format!(
                    "SELECT {} FROM {table} WHERE node = $1 AND {at} = ANY($2)",
                    Layout::WHOLE.select(at)
                ),
                &[&node, &missing],
            )?;
            for d in &missing {
                held.insert(*d, Rollup::new());
            }
            for row in &rows {
                match Layout::WHOLE.read(row) {
                    Ok((key, cell)) => {
                        if let Some(r) = held.get_mut(&key.day) {
                            r.insert(key, &cell);
                        }
                    }
                    Err(why) => {
                        tracing::error!(row = %Layout::WHOLE.place(table, Some(node), row), error = %why, "a statistics row is not a valid cell; it is replaced by this writer's count");
                    }
                }
            }
        }
        Ok(())
    }

    /// A batch's changes are committed: adds them, then forgets the days and months that
    /// batches no longer write to (all but yesterday, today and tomorrow, and their
    /// months; an older one is read again if a call's record comes in late for it).
    fn committed(&mut self, days: &Rollup, months: &Rollup) {
        for (changes, held) in [(days, &mut self.days), (months, &mut self.months)] {
            for (k, c) in changes.cells() {
                held.entry(k.day).or_default().insert(k, c);
            }
        }
        let today = OffsetDateTime::now_utc().date();
        let first = today.previous_day().unwrap_or(today);
        let last = today.next_day().unwrap_or(today);
        self.days.retain(|d, _| (first..=last).contains(d));
        let (first, last) = (stats::month_of(first), stats::month_of(last));
        self.months.retain(|m, _| (first..=last).contains(m));
    }

    /// Forgets everything (after a reconnect).
    fn forget(&mut self) {
        self.days.clear();
        self.months.clear();
    }
}

/// Reads a stored histogram, `[[bucket,count],...]`: the form the writer stores is read
/// by hand (a long query reads hundreds of thousands), anything else by a JSON parser,
/// whose error says what is wrong. Buckets and counts are checked by the cell.
fn parse_latency(text: &str) -> Result<Vec<(u16, u64)>, String> {
    fn number(b: &[u8], i: &mut usize) -> Option<u64> {
        let start = *i;
        let mut n: u64 = 0;
        while let Some(d) = b.get(*i).filter(|d| d.is_ascii_digit()) {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            *i += 1;
        }
        (*i > start).then_some(n)
    }
    fn expect(b: &[u8], i: &mut usize, c: u8) -> Option<()> {
        (b.get(*i) == Some(&c)).then(|| *i += 1)
    }
    fn compact(b: &[u8]) -> Option<Vec<(u16, u64)>> {
        let mut pairs = Vec::with_capacity(b.len() / 8);
        let mut i = 0;
        expect(b, &mut i, b'[')?;
        if expect(b, &mut i, b']').is_some() {
            return (i == b.len()).then_some(pairs);
        }
        loop {
            expect(b, &mut i, b'[')?;
            let bucket = u16::try_from(number(b, &mut i)?).ok()?;
            expect(b, &mut i, b',')?;
            let count = number(b, &mut i)?;
            expect(b, &mut i, b']')?;
            pairs.push((bucket, count));
            if expect(b, &mut i, b',').is_none() {
                expect(b, &mut i, b']')?;
                return (i == b.len()).then_some(pairs);
            }
        }
    }
    compact(text.as_bytes()).map_or_else(
        || {
            serde_json::from_str(text)
                .map_err(|e| format!("latency {text:?} is not [[bucket,count],...]: {e}"))
        },
        Ok,
    )
}

/// The key columns of a roll-up row after its `day` (or `month`) and `node`, in the order
/// a [`Layout`] reads them.
const KEY_COLUMNS: [&str; 5] = ["consumer", "service", "version", "code", "decision"];

/// The columns a roll-up row is read with: `day` (or `month`), the key columns asked for,
/// then `calls`, `errors` and `latency` (as text). A query reads only the key columns it
/// groups by (it would drop the others): half the time of a long query goes into sending
/// and receiving columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// Whether each of [`KEY_COLUMNS`] is read.
    keys: [bool; 5],
}

impl Layout {
    /// Every column: the writer holds whole cells.
    const WHOLE: Layout = Layout { keys: [true; 5] };

    /// The columns `query` needs.
    fn of(query: &Query) -> Self {
        use stats::Dim;
        Layout {
            keys: [
                Dim::Consumer,
                Dim::Service,
                Dim::Version,
                Dim::Code,
                Dim::Decision,
            ]
            .map(|d| query.by.contains(&d)),
        }
    }

    /// The select list, `at` being the table's `day` or `month`.
    fn select(&self, at: &str) -> String {
        let mut columns = vec![at];
        columns.extend(
            KEY_COLUMNS
                .iter()
                .zip(self.keys)
                .filter_map(|(c, read)| read.then_some(*c)),
        );
        columns.extend(["calls", "errors", "latency::text"]);
        columns.join(", ")
    }

    /// The place of each key column in a row (`None`: not read).
    fn places(&self) -> [Option<usize>; 5] {
        let mut next = 0;
        self.keys.map(|read| {
            read.then(|| {
                next += 1;
                next
            })
        })
    }

    /// A row's key (a key column not read is blank: a missing name, code 0, decision `""`)
    /// and its checked cell.
    fn read<'r>(&self, row: &'r Row) -> Result<(CellKey<'r>, Cell), String> {
        let get_err = |e: ::postgres::Error| describe(&e);
        let [consumer, service, version, code, decision] = self.places();
        let name = |at: Option<usize>| -> Result<Option<&'r str>, String> {
            at.map_or(Ok(None), |i| {
                row.try_get::<_, &str>(i).map(read_name).map_err(get_err)
            })
        };
        let day: Date = row.try_get(0).map_err(get_err)?;
        let (consumer, service, version) = (name(consumer)?, name(service)?, name(version)?);
        let code: i32 = code.map_or(Ok(0), |i| row.try_get(i).map_err(get_err))?;
        let decision: &str = decision.map_or(Ok(""), |i| row.try_get(i).map_err(get_err))?;
        let n = 1 + self.keys.iter().filter(|read| **read).count();
        let calls: i64 = row.try_get(n).map_err(get_err)?;
        let errors: i64 = row.try_get(n + 1).map_err(get_err)?;
        let latency: &str = row.try_get(n + 2).map_err(get_err)?;
        let latency = parse_latency(latency)?;
        let code = u16::try_from(code).map_err(|_| format!("code {code} is not an HTTP status"))?;
        let cell = StoredCell {
            day,
            consumer: consumer.map(Cow::Borrowed),
            service: service.map(Cow::Borrowed),
            version: version.map(Cow::Borrowed),
            code,
            decision: Cow::Borrowed(decision),
            calls: u64::try_from(calls).map_err(|_| format!("calls {calls}"))?,
            errors: u64::try_from(errors).map_err(|_| format!("errors {errors}"))?,
            latency: Cow::Owned(latency),
        }
        .cell()?;
        Ok((
            CellKey {
                day,
                consumer,
                service,
                version,
                code,
                decision,
            },
            cell,
        ))
    }

    /// Where a row that is not a valid cell is, as far as it was read: its table, day (or
    /// month), node when known, and the key columns read.
    fn place(&self, table: &str, node: Option<&str>, row: &Row) -> String {
        let mut parts = vec![
            row.try_get::<_, Date>(0)
                .map_or_else(|_| "?".to_owned(), |d| d.to_string()),
        ];
        if let Some(node) = node {
            parts.push(format!("node {node:?}"));
        }
        for (name, at) in KEY_COLUMNS.iter().zip(self.places()) {
            let Some(i) = at else { continue };
            let value = if *name == "code" {
                row.try_get::<_, i32>(i).map(|c| c.to_string())
            } else {
                row.try_get::<_, &str>(i).map(|s| format!("{s:?}"))
            };
            parts.push(format!(
                "{name} {}",
                value.unwrap_or_else(|_| "?".to_owned())
            ));
        }
        format!("{table} ({})", parts.join(", "))
    }
}

#[derive(Debug)]
struct Shared {
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Records waiting to be written, spread over a few queues.
    stripes: [Mutex<Pending>; STRIPES],
    /// The sink was dropped: the writer drains what is left and stops.
    closed: AtomicBool,
    /// The writer is waiting for work: the next record must wake it.
    idle: AtomicBool,
    /// The writer lets a batch nobody waits for gather: a record someone waits for
    /// wakes it.
    gathering: AtomicBool,
    writer: OnceLock<std::thread::Thread>,
    /// Records the writer holds back (see `Writer::run`), for the queue-depth metric.
    held: AtomicUsize,
}

impl Shared {
    fn new() -> Self {
        Self {
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            stripes: Default::default(),
            closed: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            gathering: AtomicBool::new(false),
            writer: OnceLock::new(),
            held: AtomicUsize::new(0),
        }
    }

    fn wake_writer(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }
}

#[derive(Debug, Default)]
struct Pending {
    lines: Vec<Line>,
    /// The callers waiting for some of these lines to be committed.
    tickets: Vec<DurableTicket>,
}

/// The audit sink that writes into PostgreSQL (see the module documentation).
#[derive(Debug)]
pub struct PostgresSink {
    shared: Arc<Shared>,
    /// Records one stripe may hold.
    stripe_capacity: usize,
    capacity: usize,
    url: String,
    schema: Option<String>,
}

/// Waits for the writer thread to drain and stop, once the [`PostgresSink`] is gone.
#[derive(Debug)]
pub struct PostgresSinkHandle {
    thread: Option<JoinHandle<()>>,
}

impl PostgresSinkHandle {
    /// Blocks until every record taken is committed. Call after dropping the sink. While
    /// the database is away, this waits for it.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PostgresSink {
    /// Connects to `url`, makes or migrates the schema, and starts the writer thread for
    /// records of `node`, continuing its chain; partitions older than `retention_days`
    /// are dropped (once a day, and at start). Fails, naming the database (never its
    /// password), when it cannot be reached.
    pub fn start(
        url: &str,
        node: &str,
        retention_days: u32,
    ) -> Result<(Self, PostgresSinkHandle), AuditError> {
        Self::start_with(Settings {
            retention_days: Some(retention_days),
            ..Settings::new(url, node)
        })
    }

    /// As [`PostgresSink::start`], with every setting given. Blocks until the writer is
    /// connected (the connection is made on the writer's own thread, so this may be
    /// called from async code at start-up).
    pub fn start_with(settings: Settings) -> Result<(Self, PostgresSinkHandle), AuditError> {
        let shared = Arc::new(Shared::new());
        let sink = Self {
            shared: shared.clone(),
            stripe_capacity: settings.capacity.max(1).div_ceil(STRIPES),
            capacity: settings.capacity.max(1),
            url: settings.url.clone(),
            schema: settings.schema.clone(),
        };
        let at = display_url(&settings.url);
        let (started_tx, started) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("fsp-audit-postgres".into())
            .spawn(move || {
                let marked = shared.clone();
                let _guard = crate::WriterGuard(move |why: &str| {
                    let mut last = marked.last_error.lock().unwrap_or_else(|p| p.into_inner());
                    *last = Some(why.to_owned());
                    marked.healthy.store(false, Ordering::Release);
                });
                match Writer::connect(settings, shared) {
                    Ok(writer) => {
                        let _ = started_tx.send(Ok(()));
                        writer.run();
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| AuditError::Unavailable(format!("cannot start audit writer: {e}")))?;
        let _ = sink.shared.writer.set(thread.thread().clone());
        let handle = PostgresSinkHandle {
            thread: Some(thread),
        };
        match started.recv() {
            Ok(Ok(())) => Ok((sink, handle)),
            Ok(Err(e)) => {
                handle.join();
                Err(AuditError::Unavailable(format!(
                    "cannot start the audit trail in PostgreSQL: {e}"
                )))
            }
            Err(_) => Err(AuditError::Unavailable(format!(
                "the audit writer for PostgreSQL at {at} stopped while starting"
            ))),
        }
    }

    /// Queues a record with the ticket of a caller that waits for it to be committed.
    fn take(&self, record: Record, ticket: Option<DurableTicket>) -> Result<(), AuditError> {
        thread_local! {
            static STRIPE: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES
            };
        }
        let durable = ticket.is_some();
        let mut line = admit(record)?;
        line.waited = durable;
        let stripe = &self.shared.stripes[STRIPE.with(|s| *s)];
        let first = {
            let mut p = stripe.lock().unwrap_or_else(|e| e.into_inner());
            if p.lines.len() >= self.stripe_capacity {
                return Err(AuditError::Backlog(self.capacity));
            }
            p.lines.push(line);
            if let Some(t) = ticket {
                p.tickets.push(t);
            }
            p.lines.len() == 1
        };
        // A quiet writer is woken by the first record; a busy one comes by itself, and
        // one gathering a batch is woken by a caller that waits.
        if (first
            && self.shared.idle.load(Ordering::Acquire)
            && self.shared.idle.swap(false, Ordering::AcqRel))
            || (durable
                && self.shared.gathering.load(Ordering::Acquire)
                && self.shared.gathering.swap(false, Ordering::AcqRel))
        {
            self.shared.wake_writer();
        }
        Ok(())
    }
}

impl Drop for PostgresSink {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake_writer();
    }
}

impl AuditSink for PostgresSink {
    fn submit(&self, record: Record) -> Result<(), AuditError> {
        self.take(record, None)
    }

    fn submit_durable(&self, record: &Record) -> Result<Durable, AuditError> {
        let (durable, ticket) = Durable::pending();
        self.take(record.clone(), Some(ticket))?;
        Ok(durable)
    }

    fn queue_depth(&self) -> usize {
        self.shared
            .stripes
            .iter()
            .map(|stripe| stripe.lock().map(|p| p.lines.len()).unwrap_or(0))
            .sum::<usize>()
            + self.shared.held.load(Ordering::Relaxed)
    }

    fn health(&self) -> Result<(), AuditError> {
        if self.shared.healthy.load(Ordering::Acquire) {
            return Ok(());
        }
        let why = self
            .shared
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "the audit database cannot be written".into());
        Err(AuditError::Unavailable(why))
    }

    /// Opens a connection of its own for the lookup (the writer's is never borrowed),
    /// and closes it after.
    fn lookup(&self, message_id: &str) -> Result<Option<Record>, AuditError> {
        PostgresTrail::connect(&self.url, self.schema.as_deref())
            .and_then(|mut trail| trail.lookup(message_id))
            .map_err(|e| AuditError::Unavailable(e.to_string()))
    }

    /// Answers from the roll-up tables ([`PostgresTrail::stats`]) on a connection of its
    /// own, closed after.
    fn stats(&self, query: &Query) -> Result<Vec<stats::Row>, AuditError> {
        PostgresTrail::connect(&self.url, self.schema.as_deref())
            .and_then(|mut trail| trail.stats(query))
            .map_err(|e| AuditError::Unavailable(format!("cannot read the statistics: {e}")))
    }
}

/// The writer's connection and its prepared inserts: of a batch without calls (only
/// write-ahead request lines), and of a batch with calls and their statistics.
struct Connection {
    client: Client,
    insert: Statement,
    insert_counted: Statement,
}

struct Writer {
    settings: Settings,
    /// The database, for messages.
    at: String,
    shared: Arc<Shared>,
    conn: Option<Connection>,
    /// The node's chain, after the last record sealed.
    chain: Chain,
    /// The `seq` of the last record sealed.
    seq: i64,
    /// When retention and partitions are next seen to.
    maintenance_due: Instant,
    /// When the database last answered.
    last_contact: Instant,
    /// The node's stored statistics of the days and months being written.
    counted: Counted,
    /// The last record committed (`seq`, message id, hash) not yet in the node's head,
    /// and when the head was last written.
    head: Option<(i64, String, String)>,
    head_at: Option<Instant>,
    /// With signed heads: why the node's rows are no longer the chain this writer wrote
    /// (found when it connected again). It then signs no more heads and stays unhealthy
    /// (a fail-closed gateway refuses calls) until an operator has looked (a restart
    /// checks the trail again); records still come (refusals, outcomes) are written on,
    /// so none is lost, after the rows found.
    tampered: Option<String>,
}

impl Writer {
    /// Connects (making or migrating the schema) and continues the node's chain.
    fn connect(settings: Settings, shared: Arc<Shared>) -> Result<Self, TrailError> {
        let (conn, tail) = Self::session(&settings, true)?;
        Ok(Self {
            at: display_url(&settings.url),
            settings,
            shared,
            conn: Some(conn),
            chain: Chain::after(tail.hash),
            seq: tail.seq,
            maintenance_due: Instant::now(),
            last_contact: Instant::now(),
            counted: Counted::default(),
            head: None,
            head_at: None,
            tampered: None,
        })
    }

    /// A writer's connection: its session settings, its node's lock, this month's
    /// partitions, and where the node's chain ends in the database.
    fn session(settings: &Settings, migrating: bool) -> Result<(Connection, Tail), TrailError> {
        let schema = settings.schema.as_deref();
        let name = format!("fsp-audit-writer-{}", settings.node);
        let mut client = open(&settings.url, schema, &name)?;
        if migrating {
            migrate(&mut client, schema)?;
        }
        client.batch_execute(WRITER_SESSION)?;
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('fsp_audit_node'), \
                 hashtext(current_schema()::text || '/' || $1))",
                &[&settings.node],
            )?
            .try_get(0)?;
        if !locked {
            return Err(TrailError::NodeTaken(settings.node.clone()));
        }
        maintain(&mut client, schema, None, &Seals::default())?;
        let insert = client.prepare(&INSERT)?;
        let insert_counted = client.prepare(&INSERT_COUNTED)?;
        let tail = tail(&mut client, &settings.node)?;
        if migrating {
            check_head(&mut client, &settings.node, &tail, &settings.seals)?;
        }
        Ok((
            Connection {
                client,
                insert,
                insert_counted,
            },
            tail,
        ))
    }

    fn run(mut self) {
        let mut batch: Vec<Line> = Vec::new();
        let mut tickets: Vec<DurableTicket> = Vec::new();
        // Records nobody waits for, held back while callers wait (see below), since when.
        let mut held: Vec<Line> = Vec::new();
        let mut held_since = Instant::now();
        let mut scratch: Vec<Line> = Vec::new();
        loop {
            self.maintain();
            let closing = self.shared.closed.load(Ordering::Acquire);
            if self.collect(&mut batch, &mut tickets) == 0 {
                if !held.is_empty() {
                    let left = GROUP_COMMIT_WINDOW.saturating_sub(held_since.elapsed());
                    if !closing && !left.is_zero() {
                        // Quiet: what is held waits out its window (a caller that comes
                        // meanwhile ends the wait and is committed first).
                        self.shared.gathering.store(true, Ordering::SeqCst);
                        if !self.any_ticket_waits() {
                            std::thread::park_timeout(left);
                        }
                        self.shared.gathering.store(false, Ordering::SeqCst);
                        continue;
                    }
                    // Their window is over: what is held is the batch (below).
                } else {
                    if closing {
                        // The head names the last record before the gateway stops.
                        self.write_head();
                        self.let_go_of_node();
                        break;
                    }
                    // Announce idleness, then look once more: a record that came in
                    // between was not told to wake us.
                    self.shared.idle.store(true, Ordering::SeqCst);
                    if self.collect(&mut batch, &mut tickets) == 0 {
                        std::thread::park_timeout(PROBE_EVERY);
                        self.shared.idle.store(false, Ordering::SeqCst);
                        self.probe();
                        // Quiet: the head names the last record within a probe or two.
                        if self.head.is_some()
                            && self.head_at.is_none_or(|at| at.elapsed() >= HEAD_EVERY)
                        {
                            self.write_head();
                        }
                        continue;
                    }
                    self.shared.idle.store(false, Ordering::SeqCst);
                }
            }
            let waited = !tickets.is_empty();
            if waited && !closing {
                // Callers wait: this commit carries only their records. The others (the
                // outcomes of calls already answered, refusals) are held back for at most
                // a window and go with a later batch, so that most commits insert a few
                // rows and update no statistics (measured: the per-batch roll-up upsert
                // cost a third of the throughput with audit on). Their order among
                // themselves is kept; the chain is sealed in the order written.
                if held.is_empty() {
                    held_since = Instant::now();
                }
                for line in batch.drain(..) {
                    if line.waited {
                        scratch.push(line);
                    } else {
                        held.push(line);
                    }
                }
                std::mem::swap(&mut batch, &mut scratch);
                if held_since.elapsed() >= GROUP_COMMIT_WINDOW || held.len() >= HOLD_MAX {
                    release(&mut held, &mut batch);
                }
            } else {
                release(&mut held, &mut batch);
            }
            self.shared.held.store(held.len(), Ordering::Relaxed);
            self.seal(&mut batch);
            self.write(&mut batch, &mut tickets);
            batch.clear();
            // A batch nobody waited for lets the next one gather for a window (one wait,
            // not a polling loop); a caller that waits ends it.
            if !waited && !self.shared.closed.load(Ordering::Acquire) {
                self.shared.gathering.store(true, Ordering::SeqCst);
                if !self.any_ticket_waits() {
                    std::thread::park_timeout(GROUP_COMMIT_WINDOW);
                }
                self.shared.gathering.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Writes the node's head (see [`SCHEMA_V4`]): the last record committed, in a
    /// statement of its own after the rows it names. A failure is logged; the next
    /// batch tries again.
    fn write_head(&mut self) {
        if self.tampered.is_some() {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let Some((seq, message_id, hash)) = self.head.take() else {
            return;
        };
        let seal = self.settings.seals.key.as_ref().map(|key| {
            let fields = head_fields(&self.settings.node, seq, &message_id, &hash);
            key.seal(HEAD_LABEL, &fields.each_ref().map(String::as_str))
        });
        let (key_id, signature) = (
            seal.as_ref().map(|s| s.key.as_str()),
            seal.as_ref().map(|s| s.signature.as_str()),
        );
        let written = conn.client.execute(
            "INSERT INTO fsp_audit_head \
             (node, last_seq, message_id, last_hash, written_at, key_id, signature) \
             VALUES ($1, $2, $3, $4, now(), $5, $6) \
             ON CONFLICT (node) DO UPDATE SET last_seq = EXCLUDED.last_seq, \
             message_id = EXCLUDED.message_id, last_hash = EXCLUDED.last_hash, \
             written_at = EXCLUDED.written_at, key_id = EXCLUDED.key_id, \
             signature = EXCLUDED.signature \
             WHERE fsp_audit_head.last_seq < EXCLUDED.last_seq",
            &[
                &self.settings.node,
                &seq,
                &message_id,
                &hash,
                &key_id,
                &signature,
            ],
        );
        match written {
            Ok(_) => self.head_at = Some(Instant::now()),
            Err(e) => {
                tracing::warn!(database = %self.at, error = %describe(&e), "the audit trail's head could not be written");
                self.head = Some((seq, message_id, hash));
            }
        }
    }

    /// At a clean stop, lets go of the node's lock at once rather than when the database
    /// notices the connection closed: a gateway started again straight away with the
    /// same node name (a container restarted in its pod) then finds it free. Not when the
    /// head could not be written (the connection is in doubt: closing it is enough).
    fn let_go_of_node(&mut self) {
        if self.head.is_some() {
            return;
        }
        if let Some(mut conn) = self.conn.take()
            && let Err(e) = conn.client.batch_execute("SELECT pg_advisory_unlock_all()")
        {
            tracing::debug!(database = %self.at, error = %describe(&e), "the node's lock is let go of when the connection closes");
        }
    }

    /// Takes every stripe's waiting records into `batch`; returns how many.
    fn collect(&self, batch: &mut Vec<Line>, tickets: &mut Vec<DurableTicket>) -> usize {
        for stripe in &self.shared.stripes {
            let mut p = stripe.lock().unwrap_or_else(|e| e.into_inner());
            batch.append(&mut p.lines);
            tickets.append(&mut p.tickets);
        }
        batch.len()
    }

    /// Whether a caller waits for a record not yet taken (checked after announcing a
    /// gathering window: one that came before was not told to wake us).
    fn any_ticket_waits(&self) -> bool {
        self.shared.stripes.iter().any(|s| {
            !s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .tickets
                .is_empty()
        })
    }

    /// Seals the batch into the node's chain, in order. A record names the node whose
    /// chain it is in: the writer's.
    fn seal(&mut self, batch: &mut [Line]) {
        for line in batch {
            if line.record.node != self.settings.node {
                line.record.node.clone_from(&self.settings.node);
            }
            self.seq += 1;
            line.seq = self.seq;
            self.chain.seal(&mut line.record);
        }
    }

    /// Writes a sealed batch with its statistics, retrying until it is committed;
    /// callers waiting for it are told of the first failure at once.
    fn write(&mut self, batch: &mut [Line], tickets: &mut Vec<DurableTicket>) {
        let days = count(batch);
        let months = by_month(&days);
        let mut delay = FIRST_RETRY;
        loop {
            match self.try_write(batch, &days, &months) {
                Ok(()) => {
                    self.last_contact = Instant::now();
                    self.healthy();
                    for t in tickets.drain(..) {
                        t.done();
                    }
                    if let Some(last) = batch.last() {
                        let hash = last.record.hash.clone().unwrap_or_default();
                        self.head = Some((last.seq, last.record.message_id.clone(), hash));
                    }
                    if self.head_at.is_none_or(|at| at.elapsed() >= HEAD_EVERY) {
                        self.write_head();
                    }
                    return;
                }
                Err(why) => {
                    for t in tickets.drain(..) {
                        t.failed(why.clone());
                    }
                    tracing::warn!(error = %why, records = batch.len(), retry_in_ms = delay.as_millis(), "audit batch not written; retrying");
                    self.unhealthy(why);
                    self.conn = None;
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(LAST_RETRY);
                }
            }
        }
    }

    /// Writes the batch once, with the cells it changes (`days`, and `months`: the same on
    /// their months' first days): the node's stored cells of those days and months are read
    /// first when not held, and the upsert gives each cell its full value.
    fn try_write(
        &mut self,
        batch: &mut [Line],
        days: &Rollup,
        months: &Rollup,
    ) -> Result<(), String> {
        if self.conn.is_none() && self.reconnect(batch)? {
            return Ok(());
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(format!(
                "no connection to the audit database at {}",
                self.at
            ));
        };
        let failed = |e: ::postgres::Error| {
            format!("the audit database at {} failed: {}", self.at, describe(&e))
        };
        if days.is_empty() {
            return insert(&mut conn.client, &conn.insert, batch, None).map_err(failed);
        }
        let node = self.settings.node.as_str();
        self.counted
            .load(&mut conn.client, node, days, months)
            .map_err(failed)?;
        let day_rows = CellColumns::of(days, &self.counted.days);
        let month_rows = CellColumns::of(months, &self.counted.months);
        insert(
            &mut conn.client,
            &conn.insert_counted,
            batch,
            Some((node, &day_rows, &month_rows)),
        )
        .map_err(failed)?;
        self.counted.committed(days, months);
        Ok(())
    }

    /// Makes a new connection and squares the chain with the database; returns whether
    /// the batch is already there (its commit was answered by a connection that was
    /// lost before the answer came).
    fn reconnect(&mut self, batch: &mut [Line]) -> Result<bool, String> {
        let (conn, tail) = Self::session(&self.settings, false).map_err(|e| e.to_string())?;
        self.conn = Some(conn);
        self.counted.forget();
        tracing::info!(database = %self.at, "audit writer reconnected");
        Ok(self.reconcile(tail, batch))
    }

    /// Squares the node's end in the database with the batch being written (see
    /// [`Found`]); returns whether the batch is already there.
    fn reconcile(&mut self, tail: Tail, batch: &mut [Line]) -> bool {
        let after = Tail {
            seq: self.seq,
            hash: self.chain.last().map(str::to_owned),
        };
        let before = match batch.first() {
            Some(l) => Tail {
                seq: l.seq - 1,
                hash: l.record.prev_hash.clone(),
            },
            None => after.clone(),
        };
        let node = &self.settings.node;
        let found = found(&tail, &before, &after);
        // Rows at the end that this writer did not write (another chain taken for the
        // node's): going on from them would sign heads over them. (Rows missing at the
        // end, as after a failover to a standby that lost the last commits, are not
        // adopted: the writer goes on with its own chain, and verify shows the gap.)
        if self.settings.seals.required() && found == Found::Foreign {
            let why = format!(
                "the audit trail of node {node} in {} no longer ends where this gateway left it (seq {} there, {} written): its rows were changed behind the gateway's back. Nothing more is written or signed; run `fsp audit verify`, then restart the gateway",
                self.at, tail.seq, before.seq
            );
            tracing::error!(%node, database_seq = tail.seq, written_seq = before.seq, "{why}");
            self.unhealthy(why.clone());
            self.tampered = Some(why);
        }
        match found {
            Found::Written => true,
            Found::Pending => false,
            Found::Removed => {
                tracing::error!(%node, database_seq = tail.seq, written_seq = before.seq, "the audit trail in the database ends before the last record this writer committed: rows were removed; verify will show where");
                false
            }
            Found::Foreign => {
                tracing::error!(%node, database_seq = tail.seq, written_seq = before.seq, "another writer wrote audit records as this node; this writer's records are sealed after them");
                self.chain = Chain::after(tail.hash);
                self.seq = tail.seq;
                self.seal(batch);
                false
            }
        }
    }

    /// When idle: checks the connection every [`PROBE_EVERY`], and makes a new one when
    /// it is lost, so that the health follows the database without a batch to write.
    fn probe(&mut self) {
        if self.last_contact.elapsed() < PROBE_EVERY {
            return;
        }
        self.last_contact = Instant::now();
        if let Some(conn) = self.conn.as_mut() {
            match conn.client.is_valid(PROBE_TIMEOUT) {
                Ok(()) => return,
                Err(e) => {
                    self.conn = None;
                    self.unhealthy(format!(
                        "lost the connection to the audit database at {}: {}",
                        self.at,
                        describe(&e)
                    ));
                }
            }
        }
        match self.reconnect(&mut []) {
            Ok(_) => self.healthy(),
            Err(why) => self.unhealthy(why),
        }
    }

    /// Partitions ahead and retention, once a day (and at start).
    fn maintain(&mut self) {
        if Instant::now() < self.maintenance_due {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let schema = self.settings.schema.as_deref();
        self.maintenance_due = match maintain(
            &mut conn.client,
            schema,
            self.settings.retention_days,
            &self.settings.seals,
        ) {
            Ok(()) => Instant::now() + MAINTENANCE_EVERY,
            Err(e) => {
                tracing::error!(error = %describe(&e), "audit partitions and retention not seen to; trying again in 10 minutes");
                Instant::now() + MAINTENANCE_RETRY
            }
        };
    }

    fn healthy(&self) {
        if let Some(why) = &self.tampered {
            if let Ok(mut last) = self.shared.last_error.lock() {
                *last = Some(why.clone());
            }
            return;
        }
        if !self.shared.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!(database = %self.at, "audit database written and reachable again");
        }
    }

    fn unhealthy(&self, why: String) {
        metrics::counter!("fsp_audit_backend_errors_total", "backend" => "postgres").increment(1);
        if self.shared.healthy.load(Ordering::Acquire) {
            tracing::error!(error = %why, "audit trail cannot be written; calls are refused by a fail-closed gateway");
        }
        if let Ok(mut last) = self.shared.last_error.lock() {
            *last = Some(why);
        }
        self.shared.healthy.store(false, Ordering::Release);
    }
}

/// The trail in PostgreSQL, read on a connection of its own: lookups, verification and
/// exports, while gateways write.
pub struct PostgresTrail {
    client: Client,
    /// The column list records are read with: [`SELECT_LIST`], or
    /// [`SELECT_LIST_BEFORE_V3`] for a database not migrated to version 3 yet.
    select: &'static str,
    /// Where a second connection is opened (statistics read months and days side by side).
    url: String,
    schema: Option<String>,
}

impl std::fmt::Debug for PostgresTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresTrail").finish_non_exhaustive()
    }
}

/// The column list to read records with from the database `client` is connected to:
/// one not migrated to version 3 yet (made by an earlier gateway, and no gateway of this
/// version started on it since) has no `certificate_sha256`, and its records none. A
/// database without the table gets the whole list (and the error of a missing table).
fn select_list(client: &mut Client) -> Result<&'static str, ::postgres::Error> {
    let current: bool = client
        .query_one(
            "SELECT to_regclass('fsp_audit') IS NULL OR EXISTS (SELECT 1 FROM pg_attribute \
             WHERE attrelid = to_regclass('fsp_audit') AND attname = 'certificate_sha256' \
             AND NOT attisdropped)",
            &[],
        )?
        .try_get(0)?;
    Ok(if current {
        SELECT_LIST.as_str()
    } else {
        SELECT_LIST_BEFORE_V3.as_str()
    })
}

/// The order of a call's lines: its outcome, else its single line, else its request.
const CALL_LINE_ORDER: &str =
    "CASE phase WHEN 'outcome' THEN 0 WHEN 'request' THEN 2 ELSE 1 END, written_at DESC, seq DESC";

impl PostgresTrail {
    /// Connects to `url`, in `schema` when one is given.
    pub fn connect(url: &str, schema: Option<&str>) -> Result<Self, TrailError> {
        let mut client = open(url, schema, "fsp-audit-reader")?;
        let select = select_list(&mut client)?;
        Ok(Self {
            client,
            select,
            url: url.to_owned(),
            schema: schema.map(str::to_owned),
        })
    }

    /// The record of the call with this message id: its outcome line if there is one,
    /// else its request line (`phase` `request`, `status` 0: the call's end was never
    /// recorded), else its single line.
    pub fn lookup(&mut self, message_id: &str) -> Result<Option<Record>, TrailError> {
        let sql = format!(
            "SELECT {} FROM fsp_audit WHERE message_id = $1 ORDER BY {CALL_LINE_ORDER} LIMIT 1",
            self.select
        );
        let Some(row) = self.client.query_opt(&sql, &[&message_id])? else {
            return Ok(None);
        };
        record_from(&row)
            .map(|(r, _)| Some(r))
            .map_err(|why| TrailError::Row {
                at: place(&row),
                why,
            })
    }

    /// Hands `f` one record per call (as the view `fsp_audit_calls` gives them) that `filter` takes, in
    /// the order of their timestamps; the filter is applied by the database, and the
    /// rows are read as a stream. Returns how many calls were given.
    pub fn for_each_call<E: From<TrailError>>(
        &mut self,
        filter: &Filter,
        mut f: impl FnMut(Record) -> Result<(), E>,
    ) -> Result<u64, E> {
        let wanted: [(&str, Option<&(dyn ToSql + Sync)>); 5] = [
            ("\"timestamp\" >=", filter.from.as_ref().map(|v| v as _)),
            ("\"timestamp\" <", filter.to.as_ref().map(|v| v as _)),
            ("consumer =", filter.consumer.as_ref().map(|v| v as _)),
            ("message_id =", filter.message_id.as_ref().map(|v| v as _)),
            ("end_user =", filter.end_user.as_ref().map(|v| v as _)),
        ];
        let mut conditions = Vec::new();
        let mut params = Vec::new();
        for (sql, value) in wanted {
            if let Some(value) = value {
                params.push(value);
                conditions.push(format!("{sql} ${}", params.len()));
            }
        }
        let mut sql = format!("SELECT {} FROM fsp_audit_calls", self.select);
        if !conditions.is_empty() {
            sql = format!("{sql} WHERE {}", conditions.join(" AND "));
        }
        sql.push_str(" ORDER BY \"timestamp\", node, seq");
        let mut given = 0;
        self.stream(&sql, &params, |row| {
            let (record, _) = record_from(row).map_err(|why| TrailError::Row {
                at: place(row),
                why,
            })?;
            given += 1;
            f(record)
        })?;
        Ok(given)
    }

    /// Usage statistics from the roll-up tables, every node's (see the module
    /// documentation): the finished months [`stats::plan`] takes whole from
    /// `fsp_audit_monthly`, the other days from `fsp_audit_daily`, the rows streamed into a
    /// [`Tally`]. The range is kept to the days since the oldest roll-up and ends today
    /// (UTC). When there are both, months and days are read side by side, the months on a
    /// second connection, in the same snapshot (`pg_export_snapshot`): one consistent
    /// answer, in about half the time a long query would take on one connection.
    pub fn stats(&mut self, query: &Query) -> Result<Vec<stats::Row>, TrailError> {
        let today = OffsetDateTime::now_utc().date();
        let mut tx = self
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let oldest: Option<Date> = tx
            .query_one(
                "SELECT least((SELECT min(day) FROM fsp_audit_daily), \
                 (SELECT min(month) FROM fsp_audit_monthly))",
                &[],
            )
            .map_err(no_statistics)?
            .try_get(0)?;
        let plan = stats::plan(query, oldest.unwrap_or(today), today);
        let layout = Layout::of(query);
        let months = Cells {
            table: "fsp_audit_monthly",
            at: "month",
            runs: runs(&plan.months, |m| stats::month_end(m).next_day()),
            layout,
        };
        let days = Cells {
            table: "fsp_audit_daily",
            at: "day",
            runs: runs(&plan.days, Date::next_day),
            layout,
        };
        let mut tally = Tally::new(query);
        if months.runs.is_empty() || days.runs.is_empty() {
            months.read(&mut tx, &mut tally)?;
            days.read(&mut tx, &mut tally)?;
        } else {
            let snapshot: String = tx
                .query_one("SELECT pg_export_snapshot()", &[])?
                .try_get(0)?;
            let (url, schema) = (self.url.as_str(), self.schema.as_deref());
            let from_months = std::thread::scope(|s| {
                let side = s.spawn(|| -> Result<Tally, TrailError> {
                    let mut client = open(url, schema, "fsp-audit-reader")?;
                    let mut tx = client
                        .build_transaction()
                        .isolation_level(IsolationLevel::RepeatableRead)
                        .read_only(true)
                        .start()?;
                    tx.batch_execute(&format!(
                        "SET TRANSACTION SNAPSHOT '{}'",
                        snapshot.replace('\'', "''")
                    ))?;
                    let mut tally = Tally::new(query);
                    months.read(&mut tx, &mut tally)?;
                    tx.commit()?;
                    Ok(tally)
                });
                // The snapshot lives as long as this transaction: read the days before
                // the months are joined, commit after.
                let here = days.read(&mut tx, &mut tally);
                let there = side.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                here.and(there)
            })?;
            tally.merge(&from_months);
        }
        tx.commit()?;
        Ok(tally.rows())
    }

    /// Writes one record per call that `filter` takes (see [`PostgresTrail::for_each_call`]).
    pub fn export<W: Write>(
        &mut self,
        filter: &Filter,
        out: &mut ExportWriter<W>,
    ) -> Result<u64, TrailError> {
        self.for_each_call(filter, |record| {
            out.write(&record).map_err(TrailError::Write)
        })
    }

    /// Checks every node's chain: rows are read as a stream, ordered by node and `seq`,
    /// each rebuilt into its record and checked against the chain ([`Verifier`]); a
    /// node whose oldest partitions were retired starts from its anchor. A gap in `seq`
    /// is a break (a row was removed). With `retention_days`, an anchor that retired rows
    /// younger than that is a break too (partitions dropped before their time).
    /// [`Verified::files`] counts the nodes (chains) read.
    pub fn verify(&mut self, retention_days: Option<u32>) -> Result<Verified, VerifyError> {
        self.verify_sealed(retention_days, &TrustedKeys::default())
    }

    /// As [`PostgresTrail::verify`], and with keys trusted, every node's head and every
    /// anchor must be signed by one of them (see [`crate::seal`]): the chains then cannot
    /// have been written again by someone without the key (a database administrator).
    pub fn verify_sealed(
        &mut self,
        retention_days: Option<u32>,
        trusted: &TrustedKeys,
    ) -> Result<Verified, VerifyError> {
        let mut tx = self
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(TrailError::from)?;
        let (now, anchors) = anchors(&mut tx).map_err(TrailError::from)?;
        let mut chains = Chains::default();
        // (A database a gateway before version 4 wrote, not migrated yet, has no heads.)
        let heads = "SELECT node, last_seq, message_id, last_hash, written_at, \
                     to_jsonb(h)->>'key_id', to_jsonb(h)->>'signature' FROM fsp_audit_head h";
        let has_heads: bool = tx
            .query_one("SELECT to_regclass('fsp_audit_head') IS NOT NULL", &[])
            .and_then(|r| r.try_get(0))
            .map_err(TrailError::from)?;
        let rows = if has_heads {
            tx.query(heads, &[]).map_err(TrailError::from)?
        } else {
            Vec::new()
        };
        for row in rows {
            let get = |e: ::postgres::Error| TrailError::from(e);
            let written_at: OffsetDateTime = row.try_get(4).map_err(get)?;
            let node: String = row.try_get(0).map_err(get)?;
            let (seq, message_id, hash): (i64, String, String) = (
                row.try_get(1).map_err(get)?,
                row.try_get(2).map_err(get)?,
                row.try_get(3).map_err(get)?,
            );
            check_seal(
                trusted,
                row.try_get(5).map_err(get)?,
                row.try_get(6).map_err(get)?,
                HEAD_LABEL,
                &head_fields(&node, seq, &message_id, &hash),
            )
            .map_err(|why| VerifyError::Unsealed {
                what: format!("fsp_audit_head of node {node}"),
                why: why.to_string(),
            })?;
            let head = NodeHead {
                last_seq: row.try_get(1).map_err(get)?,
                message_id: row.try_get(2).map_err(get)?,
                last_hash: row.try_get(3).map_err(get)?,
                written_at: written_at
                    .format(&Rfc3339)
                    .unwrap_or_else(|_| written_at.to_string()),
                seen: false,
            };
            chains.heads.insert(row.try_get(0).map_err(get)?, head);
        }
        for anchor in anchors {
            anchor
                .check_seal(trusted)
                .map_err(|why| VerifyError::Unsealed {
                    what: format!("fsp_audit_anchor of node {}", anchor.node),
                    why: why.to_string(),
                })?;
            if anchor.last_hash.is_some() {
                chains.anchored.insert(anchor.node.clone());
            }
            if let Some(days) = retention_days
                && anchor.retired_through > before(now, days)
            {
                let through = anchor.retired_through;
                return Err(VerifyError::RetiredEarly {
                    anchor: format!("fsp_audit_anchor of node {}", anchor.node),
                    through: through
                        .format(&Rfc3339)
                        .unwrap_or_else(|_| through.to_string()),
                    days,
                });
            }
            chains.after(anchor);
        }
        let sql = format!("SELECT {} FROM fsp_audit ORDER BY node, seq", self.select);
        stream(&mut tx, &sql, &[], |row| {
            let (record, seq) = record_from(row).map_err(|why| TrailError::Row {
                at: place(row),
                why,
            })?;
            Ok::<_, VerifyError>(chains.check(&record, seq)?)
        })?;
        if !trusted.is_empty()
            && let Some(node) = chains
                .named
                .iter()
                .chain(&chains.anchored)
                .find(|n| !chains.heads.contains_key(*n))
        {
            return Err(VerifyError::Unsealed {
                what: format!("fsp_audit_head of node {node}"),
                why: "is missing".into(),
            });
        }
        if let Some((node, head)) = chains.heads.into_iter().find(|(_, h)| !h.seen) {
            return Err(VerifyError::CutShort {
                head: format!("fsp_audit_head of node {node}"),
                node,
                message_id: head.message_id,
                written_at: head.written_at,
            });
        }
        Ok(Verified {
            files: chains.nodes,
            records: chains.verifier.checked(),
        })
    }

    /// `fsp audit seal`: checks the trail as [`PostgresTrail::verify`] does, then signs
    /// every node's head and anchor with `key`, making a head for a node that has rows
    /// and none. For a trail written without a signing key (or after the key changed
    /// without the old one trusted): the operator vouches for the trail as it is now,
    /// and from then on `verify` and the writer require the signatures. Refused while a
    /// gateway writes as any of the nodes (each node's lock is taken). Returns what was
    /// signed, one line each.
    pub fn seal(
        &mut self,
        retention_days: Option<u32>,
        key: &SigningKey,
        trusted: &TrustedKeys,
    ) -> Result<Vec<String>, VerifyError> {
        let db = |e: ::postgres::Error| VerifyError::from(TrailError::from(e));
        // The signatures' columns (version 5) may not be there yet.
        let schema = self.schema.clone();
        migrate(&mut self.client, schema.as_deref())?;
        let nodes: Vec<String> = self
            .client
            .query(
                "SELECT node FROM fsp_audit_head UNION SELECT node FROM fsp_audit_anchor \
                 UNION SELECT DISTINCT node FROM fsp_audit ORDER BY 1",
                &[],
            )
            .map_err(db)?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(db)?;
        let sealed = self.seal_locked(&nodes, retention_days, key, trusted);
        // The locks are the session's: let go of them whatever happened.
        let _ = self.client.batch_execute("SELECT pg_advisory_unlock_all()");
        sealed
    }

    fn seal_locked(
        &mut self,
        nodes: &[String],
        retention_days: Option<u32>,
        key: &SigningKey,
        trusted: &TrustedKeys,
    ) -> Result<Vec<String>, VerifyError> {
        let db = |e: ::postgres::Error| VerifyError::from(TrailError::from(e));
        for node in nodes {
            let locked: bool = self
                .client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext('fsp_audit_node'), \
                     hashtext(current_schema()::text || '/' || $1))",
                    &[node],
                )
                .and_then(|r| r.try_get(0))
                .map_err(db)?;
            if !locked {
                return Err(VerifyError::from(TrailError::NodeTaken(node.clone())));
            }
        }
        self.verify(retention_days)?;
        // What each head and anchor was before: a trusted key's signature that does not
        // fit is tampering, and is not signed over.
        let before = |what: String, state: Result<(), crate::seal::SealError>| match state {
            Ok(()) => Ok((what, "was signed by a trusted key".to_owned())),
            Err(e) if e.is_tampering() => Err(VerifyError::Unsealed {
                what,
                why: format!("{e}; not signed over: this is the mark of tampering"),
            }),
            Err(crate::seal::SealError::Unsigned) => Ok((what, "was not signed".to_owned())),
            Err(e) => Ok((what, format!("was not signed by a trusted key: it {e}"))),
        };
        let mut tx = self.client.transaction().map_err(db)?;
        let mut signed = Vec::new();
        let (_, anchors) = anchors(&mut tx).map_err(db)?;
        for anchor in anchors {
            let (what, was) = before(
                format!("fsp_audit_anchor of node {}", anchor.node),
                anchor.check_seal(trusted),
            )?;
            sign_anchor(&mut tx, &anchor, key).map_err(db)?;
            signed.push(format!("{what} ({was})"));
        }
        for node in nodes {
            let head = tx
                .query_opt(
                    "SELECT last_seq, message_id, last_hash, key_id, signature \
                     FROM fsp_audit_head WHERE node = $1",
                    &[node],
                )
                .map_err(db)?;
            let (seq, message_id, hash, was) = match head {
                Some(row) => {
                    let (seq, message_id, hash): (i64, String, String) = (
                        row.try_get(0).map_err(db)?,
                        row.try_get(1).map_err(db)?,
                        row.try_get(2).map_err(db)?,
                    );
                    let (_, was) = before(
                        format!("fsp_audit_head of node {node}"),
                        check_seal(
                            trusted,
                            row.try_get(3).map_err(db)?,
                            row.try_get(4).map_err(db)?,
                            HEAD_LABEL,
                            &head_fields(node, seq, &message_id, &hash),
                        ),
                    )?;
                    (seq, message_id, hash, was)
                }
                // The node's last row, when it has rows (one only retired has none).
                None => {
                    let Some(row) = tx
                        .query_opt(
                            "SELECT seq, message_id, hash FROM fsp_audit WHERE node = $1 \
                             ORDER BY seq DESC LIMIT 1",
                            &[node],
                        )
                        .map_err(db)?
                    else {
                        continue;
                    };
                    let hash: Option<String> = row.try_get(2).map_err(db)?;
                    let Some(hash) = hash else { continue };
                    (
                        row.try_get(0).map_err(db)?,
                        row.try_get(1).map_err(db)?,
                        hash,
                        "was missing: made".to_owned(),
                    )
                }
            };
            let seal = key.seal(
                HEAD_LABEL,
                &head_fields(node, seq, &message_id, &hash)
                    .each_ref()
                    .map(String::as_str),
            );
            tx.execute(
                "INSERT INTO fsp_audit_head \
                 (node, last_seq, message_id, last_hash, written_at, key_id, signature) \
                 VALUES ($1, $2, $3, $4, now(), $5, $6) \
                 ON CONFLICT (node) DO UPDATE SET key_id = EXCLUDED.key_id, \
                 signature = EXCLUDED.signature \
                 WHERE fsp_audit_head.last_seq = EXCLUDED.last_seq \
                 AND fsp_audit_head.last_hash = EXCLUDED.last_hash",
                &[node, &seq, &message_id, &hash, &seal.key, &seal.signature],
            )
            .map_err(db)?;
            signed.push(format!(
                "fsp_audit_head of node {node} (record {message_id}; {was})"
            ));
        }
        tx.commit().map_err(db)?;
        // What was signed is what was checked: read back with the key alone.
        self.verify_sealed(retention_days, &TrustedKeys::new([key.trusted()]))?;
        Ok(signed)
    }

    /// Runs `sql` in a read-only transaction and hands its rows to `f`, a few thousand
    /// at a time from a portal (the result never sits whole in memory).
    fn stream<E: From<TrailError>>(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        f: impl FnMut(&Row) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut tx = self
            .client
            .build_transaction()
            .read_only(true)
            .start()
            .map_err(TrailError::from)?;
        stream(&mut tx, sql, params, f)?;
        tx.commit().map_err(TrailError::from)?;
        Ok(())
    }
}

/// Hands the rows of `sql` to `f`, fetched [`FETCH_ROWS`] at a time through a portal.
fn stream<E: From<TrailError>>(
    tx: &mut Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    mut f: impl FnMut(&Row) -> Result<(), E>,
) -> Result<(), E> {
    let portal = tx.bind(sql, params).map_err(TrailError::from)?;
    loop {
        let rows = tx
            .query_portal(&portal, FETCH_ROWS)
            .map_err(TrailError::from)?;
        for row in &rows {
            f(row)?;
        }
        if rows.len() < FETCH_ROWS as usize {
            return Ok(());
        }
    }
}

/// The roll-up rows of one table a query reads.
#[derive(Debug)]
struct Cells {
    table: &'static str,
    /// `day` or `month`.
    at: &'static str,
    /// The days (or months) to read, as runs of consecutive ones.
    runs: Vec<(Date, Date)>,
    layout: Layout,
}

impl Cells {
    /// Streams the rows into `tally`, as the server sends them (reading overlaps the
    /// server's work).
    fn read(&self, tx: &mut Transaction<'_>, tally: &mut Tally) -> Result<(), TrailError> {
        if self.runs.is_empty() {
            return Ok(());
        }
        let (table, at, layout) = (self.table, self.at, self.layout);
        // Ranges, not a list of days: one comparison per row.
        let ranges: Vec<String> = (0..self.runs.len())
            .map(|i| format!("{at} BETWEEN ${} AND ${}", 2 * i + 1, 2 * i + 2))
            .collect();
        let sql = format!(
            "SELECT {} FROM {table} WHERE {}",
            layout.select(at),
            ranges.join(" OR ")
        );
        let bounds: Vec<Date> = self.runs.iter().flat_map(|&(a, b)| [a, b]).collect();
        let mut rows = tx.query_raw(&sql, bounds.iter())?;
        while let Some(row) = rows.next()? {
            let (key, cell) = layout.read(&row).map_err(|why| TrailError::Cell {
                at: layout.place(table, None, &row),
                why,
            })?;
            tally.add_cell(key, &cell);
        }
        Ok(())
    }
}

/// Sorted dates as runs, first and last of each: a date is in its predecessor's run when
/// `next` of the predecessor gives it.
fn runs(dates: &[Date], next: impl Fn(Date) -> Option<Date>) -> Vec<(Date, Date)> {
    let mut runs: Vec<(Date, Date)> = Vec::new();
    for &d in dates {
        match runs.last_mut() {
            Some((_, last)) if next(*last) == Some(d) => *last = d,
            _ => runs.push((d, d)),
        }
    }
    runs
}

/// A database without the roll-up tables is one made by a gateway older than statistics.
fn no_statistics(e: ::postgres::Error) -> TrailError {
    if e.code() == Some(&::postgres::error::SqlState::UNDEFINED_TABLE) {
        TrailError::Schema(format!(
            "it has no statistics tables ({}): it was made by an older gateway; start a \
             gateway of this version on it once to add them (the trail already written is \
             counted then)",
            describe(&e)
        ))
    } else {
        TrailError::Database(e)
    }
}

impl From<TrailError> for VerifyError {
    /// A row that is not a record is named as such; anything else is the trail not
    /// being readable.
    fn from(e: TrailError) -> Self {
        match e {
            TrailError::Row { at, why } => VerifyError::NotARecord { at, why },
            e => VerifyError::Io(std::io::Error::other(e.to_string())),
        }
    }
}

/// Where a node's chain goes on after its oldest partitions were dropped.
#[derive(Debug)]
struct Anchor {
    node: String,
    retired_through: OffsetDateTime,
    last_seq: i64,
    last_hash: Option<String>,
    key_id: Option<String>,
    signature: Option<String>,
}

impl Anchor {
    /// Checks its signature against `trusted` (anything passes when nothing is trusted).
    fn check_seal(&self, trusted: &TrustedKeys) -> Result<(), crate::seal::SealError> {
        check_seal(
            trusted,
            self.key_id.clone(),
            self.signature.clone(),
            ANCHOR_LABEL,
            &anchor_fields(self),
        )
    }

    /// An anchor from a row of `node, retired_through, last_seq, last_hash, key_id,
    /// signature`.
    fn from_row(row: &Row) -> Result<Self, ::postgres::Error> {
        Ok(Self {
            node: row.try_get(0)?,
            retired_through: row.try_get(1)?,
            last_seq: row.try_get(2)?,
            last_hash: row.try_get(3)?,
            key_id: row.try_get(4)?,
            signature: row.try_get(5)?,
        })
    }
}

/// The database's time, and every node's anchor.
/// `days` before `now` (the first moment there is, for a span longer than the calendar
/// goes back: then nothing is older).
fn before(now: OffsetDateTime, days: u32) -> OffsetDateTime {
    now.checked_sub(time::Duration::days(i64::from(days)))
        .unwrap_or(OffsetDateTime::new_utc(
            time::Date::MIN,
            time::Time::MIDNIGHT,
        ))
}

fn anchors(tx: &mut Transaction<'_>) -> Result<(OffsetDateTime, Vec<Anchor>), ::postgres::Error> {
    let now = tx.query_one("SELECT now()", &[])?.try_get(0)?;
    // (The signature's columns are read through to_jsonb: a database not migrated to
    // version 5 yet has none.)
    let rows = tx.query(
        "SELECT node, retired_through, last_seq, last_hash, \
         to_jsonb(a)->>'key_id', to_jsonb(a)->>'signature' FROM fsp_audit_anchor a",
        &[],
    )?;
    let anchors = rows
        .iter()
        .map(Anchor::from_row)
        .collect::<Result<_, ::postgres::Error>>()?;
    Ok((now, anchors))
}

/// The chains being verified, node after node.
#[derive(Default)]
struct Chains {
    verifier: Verifier,
    /// The `seq` each retired node's rows go on with.
    next: HashMap<String, i64>,
    /// The node whose rows are being read, and the `seq` its next row must have.
    node: Option<String>,
    expected: i64,
    nodes: usize,
    /// Each node's head: the chain must reach it.
    heads: BTreeMap<String, NodeHead>,
    /// The nodes with rows, and those with an anchor that retired some: each has a head.
    named: std::collections::BTreeSet<String>,
    anchored: std::collections::BTreeSet<String>,
}

/// A node's row of `fsp_audit_head`, and whether its chain reached it.
struct NodeHead {
    last_seq: i64,
    message_id: String,
    last_hash: String,
    written_at: String,
    seen: bool,
}

impl Chains {
    /// Starts a node's chain after its anchor.
    fn after(&mut self, anchor: Anchor) {
        if let Some(head) = self.heads.get_mut(&anchor.node) {
            head.seen |= anchor.last_seq >= head.last_seq;
        }
        if let Some(hash) = anchor.last_hash {
            self.verifier.continue_after(&anchor.node, hash);
        }
        self.next.insert(anchor.node, anchor.last_seq + 1);
    }

    /// Checks a node's next row: its `seq` follows the one before, its record the chain.
    fn check(&mut self, record: &Record, seq: i64) -> Result<(), Break> {
        if self.node.as_deref() != Some(record.node.as_str()) {
            self.nodes += 1;
            self.named.insert(record.node.clone());
            self.expected = self.next.get(&record.node).copied().unwrap_or(1);
            self.node = Some(record.node.clone());
        }
        let at = format!("{}/{seq}", record.node);
        if seq != self.expected {
            return Err(Break::Unlinked {
                at,
                message_id: record.message_id.clone(),
                node: record.node.clone(),
            });
        }
        self.expected = seq + 1;
        self.verifier.check(&at, record)?;
        if let Some(head) = self.heads.get_mut(&record.node)
            && head.last_seq == seq
        {
            head.seen |= record.hash.as_deref() == Some(head.last_hash.as_str());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_database_is_shown_without_its_password() {
        for url in [
            "postgres://fsp:s3cret@db.example:6432/audit?sslmode=disable",
            "host=db.example port=6432 user=fsp password='s3cret' dbname=audit",
            "postgresql://fsp@db.example:6432/audit?password=s3cret",
        ] {
            let s = display_url(url);
            assert_eq!(s, "postgres://fsp@db.example:6432/audit", "{url}");
        }
        assert!(!display_url("postgres://fsp:s3cret@/audit?bogus=1").contains("s3cret"));
        let debug = format!("{:?}", Settings::new("postgres://u:s3cret@h/d", "n"));
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn timestamps_are_kept_as_the_table_gives_them_back() {
        let mut r = Record {
            timestamp: "2026-11-24T11:15:30.123456+01:00".into(),
            end_user: Some("a\0b".into()),
            request_bytes: u64::MAX,
            ..Default::default()
        };
        let line = admit(r.clone()).unwrap();
        assert_eq!(line.record.timestamp, "2026-11-24T10:15:30.123Z");
        assert_eq!(line.record.end_user.as_deref(), Some("a\u{fffd}b"));
        assert_eq!(line.record.request_bytes, i64::MAX as u64);
        assert_eq!(line.at.format(MILLIS).unwrap(), "2026-11-24T10:15:30.123Z");
        r.timestamp = "2026-11-24T10:15:30.123Z".into();
        assert_eq!(admit(r.clone()).unwrap().record.timestamp, r.timestamp);
        r.timestamp = "yesterday".into();
        assert!(matches!(admit(r), Err(AuditError::Unavailable(_))));
    }

    #[test]
    fn partitions_are_named_by_month() {
        let m = Month {
            year: 2026,
            month: 12,
        };
        assert_eq!(m.table(), "fsp_audit_y2026m12");
        assert_eq!(Month::of_table("fsp_audit_y2026m12"), Some(m));
        assert_eq!(m.next().start(), "2027-01-01 00:00:00+00");
        assert_eq!(Month::of_table("fsp_audit_y2026m13"), None);
        assert_eq!(Month::of_table("fsp_audit_old"), None);
        assert_eq!(
            Month::of(time::macros::datetime!(2026-12-31 23:59 -01:00)),
            m.next()
        );
        assert!(m < m.next());
    }

    #[test]
    fn a_writer_that_connects_again_knows_whether_its_batch_was_committed() {
        let at = |seq: i64, hash: Option<&str>| Tail {
            seq,
            hash: hash.map(str::to_owned),
        };
        let (before, after) = (at(3, Some("h3")), at(5, Some("h5")));
        assert_eq!(found(&after, &before, &after), Found::Written);
        assert_eq!(found(&before, &before, &after), Found::Pending);
        assert_eq!(found(&at(2, Some("h2")), &before, &after), Found::Removed);
        assert_eq!(found(&at(0, None), &before, &after), Found::Removed);
        assert_eq!(
            found(&at(5, Some("other")), &before, &after),
            Found::Foreign
        );
        assert_eq!(found(&at(9, Some("h9")), &before, &after), Found::Foreign);
        // Nothing being written: the end is where the writer left it, or not.
        assert_eq!(found(&before, &before, &before), Found::Pending);
        assert_eq!(
            found(&at(0, None), &at(0, None), &at(0, None)),
            Found::Pending
        );
        assert_eq!(found(&after, &before, &before), Found::Foreign);
    }

    /// A schema of the test's own, dropped at the end.
    struct Scratch(String, String);

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Ok(mut c) = Client::connect(&self.0, NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.1));
            }
        }
    }

    #[test]
    fn a_batch_whose_commit_was_not_answered_is_written_once() {
        let Ok(url) = std::env::var("FSP_TEST_POSTGRES_URL") else {
            eprintln!("skipped: FSP_TEST_POSTGRES_URL is not set");
            return;
        };
        let scratch = Scratch(url, format!("fsp_test_unit_{}", std::process::id()));
        let settings = Settings {
            schema: Some(scratch.1.clone()),
            ..Settings::new(&scratch.0, "n")
        };
        let mut writer = Writer::connect(settings, Arc::new(Shared::new())).unwrap();
        let line = |i: usize| {
            admit(Record {
                message_id: format!("m-{i}"),
                timestamp: "2026-11-24T10:15:30.123Z".into(),
                node: "n".into(),
                ..Default::default()
            })
            .unwrap()
        };
        let mut batch = vec![line(1), line(2), line(3)];
        writer.seal(&mut batch);
        // Committed, and the connection lost before the answer came.
        let days = count(&batch);
        writer
            .try_write(&mut batch, &days, &by_month(&days))
            .unwrap();
        writer.conn = None;
        writer.write(&mut batch, &mut Vec::new());
        // A batch that did not make it is written after the reconnect.
        let mut next = vec![line(4)];
        writer.seal(&mut next);
        writer.conn = None;
        writer.write(&mut next, &mut Vec::new());
        drop(writer);
        let mut trail = PostgresTrail::connect(&scratch.0, Some(&scratch.1)).unwrap();
        let rows: i64 = trail
            .client
            .query_one("SELECT count(*) FROM fsp_audit", &[])
            .unwrap()
            .get(0);
        assert_eq!(rows, 4);
        assert_eq!(trail.verify(None).unwrap().records, 4);
        // Counted once each, in the same statements as the records.
        for table in ["fsp_audit_daily", "fsp_audit_monthly"] {
            let calls: i64 = trail
                .client
                .query_one(&format!("SELECT sum(calls)::bigint FROM {table}"), &[])
                .unwrap()
                .get(0);
            assert_eq!(calls, 4, "{table}");
        }
    }

    #[test]
    fn empty_names_are_counted_as_missing_ones_and_latency_is_stored_as_json() {
        let line = |consumer: Option<&str>, ms: f64| {
            admit(Record {
                timestamp: "2026-11-24T10:15:30.123Z".into(),
                consumer: consumer.map(str::to_owned),
                version: Some(String::new()),
                decision: "allowed".into(),
                status: 200,
                duration_ms: ms,
                ..Default::default()
            })
            .unwrap()
        };
        let mut request = line(Some("a"), 1.0);
        request.record.phase = Some(Phase::Request);
        let batch = [
            line(None, 1.0),
            line(Some(""), 1.0),
            line(Some("a"), 2.0),
            request,
        ];
        let days = count(&batch);
        assert_eq!(days.len(), 2);
        let missing = days.cells().find(|(k, _)| k.consumer.is_none()).unwrap();
        assert_eq!((missing.0.version, missing.1.calls()), (None, 2));
        let months = by_month(&days);
        assert_eq!(months.days(), [time::macros::date!(2026 - 11 - 01)]);
        let columns = CellColumns::of(&days, &HashMap::new());
        assert_eq!(columns.consumer.len(), 2);
        assert!(columns.version.iter().all(|v| v.is_empty()));
        let at = columns.consumer.iter().position(|c| c.is_empty()).unwrap();
        let bucket = stats::bucket_of(1.0);
        assert_eq!(columns.latency[at], format!("[[{bucket},2]]"));
        assert_eq!(columns.calls[at], 2);
        // Full values: what is stored plus the change.
        let stored: HashMap<Date, Rollup> = days.split_by_day().into_iter().collect();
        let again = CellColumns::of(&days, &stored);
        assert_eq!(again.calls[at], 4);
        assert_eq!(again.latency[at], format!("[[{bucket},4]]"));
        assert_eq!(latency_json(&Histogram::default()), "[]");
    }

    #[test]
    fn stored_histograms_are_read_in_either_form() {
        assert_eq!(parse_latency("[]").unwrap(), []);
        assert_eq!(
            parse_latency("[[95,2],[97,1]]").unwrap(),
            [(95, 2), (97, 1)]
        );
        // As PostgreSQL prints JSON, or as an operator writes it.
        assert_eq!(
            parse_latency(" [ [95, 2], [97,  1] ] ").unwrap(),
            [(95, 2), (97, 1)]
        );
        assert_eq!(
            parse_latency(&format!("[[1,{}]]", u64::MAX)).unwrap(),
            [(1, u64::MAX)]
        );
        for bad in [
            "",
            "[",
            "[[95,2]",
            "[[95,2],]",
            "[[95]]",
            "[[70000,1]]",
            "[[1,-1]]",
            "[[1,2.5]]",
            "{\"a\":1}",
            "[[1,2]]x",
            "null",
        ] {
            let err = parse_latency(bad).unwrap_err();
            assert!(err.contains("is not [[bucket,count],...]"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_query_reads_the_key_columns_it_groups_by() {
        let q = Query::parse(None, None, Some("version,day,consumer")).unwrap();
        assert_eq!(
            Layout::of(&q).select("day"),
            "day, consumer, version, calls, errors, latency::text"
        );
        assert_eq!(
            Layout::of(&q).places(),
            [Some(1), None, Some(2), None, None]
        );
        assert_eq!(
            Layout::WHOLE.select("month"),
            "month, consumer, service, version, code, decision, calls, errors, latency::text"
        );
        assert_eq!(
            Layout::of(&Query::default()).select("day"),
            "day, calls, errors, latency::text"
        );
    }

    #[test]
    fn plans_are_read_as_runs_of_days_and_months() {
        use time::macros::date;
        let days = [
            date!(2026 - 01 - 30),
            date!(2026 - 01 - 31),
            date!(2026 - 02 - 01),
            date!(2026 - 03 - 05),
        ];
        assert_eq!(
            runs(&days, Date::next_day),
            [
                (date!(2026 - 01 - 30), date!(2026 - 02 - 01)),
                (date!(2026 - 03 - 05), date!(2026 - 03 - 05))
            ]
        );
        let months = [
            date!(2025 - 12 - 01),
            date!(2026 - 01 - 01),
            date!(2026 - 02 - 01),
            date!(2026 - 04 - 01),
        ];
        assert_eq!(
            runs(&months, |m| stats::month_end(m).next_day()),
            [
                (date!(2025 - 12 - 01), date!(2026 - 02 - 01)),
                (date!(2026 - 04 - 01), date!(2026 - 04 - 01))
            ]
        );
        assert!(runs(&[], Date::next_day).is_empty());
    }

    #[test]
    fn the_counted_insert_names_every_parameter_once() {
        let sql = INSERT_COUNTED.as_str();
        for i in 1..=47 {
            assert!(sql.contains(&format!("${i}::")), "${i} in {sql}");
        }
        assert!(!sql.contains("$48"));
        assert_eq!(TRAIL_PARAMS, 28);
    }

    #[test]
    fn the_insert_names_every_column_once() {
        assert!(INSERT.contains("$28::bigint[]"), "{}", INSERT.as_str());
        assert!(!INSERT.contains("$29"));
        assert_eq!(TEXT_COLUMNS[NODE_COLUMN], "node");
        // Read from a database before migration 3: the same places, the extension NULL.
        let before: Vec<&str> = SELECT_LIST_BEFORE_V3.split(", ").collect();
        let now: Vec<&str> = SELECT_LIST.split(", ").collect();
        assert_eq!(before.len(), now.len());
        for (b, n) in before.iter().zip(&now) {
            assert!(
                b == n || (*b, *n) == ("NULL::text", "certificate_sha256"),
                "{b} {n}"
            );
        }
        assert!(before.contains(&"NULL::text"));
    }
}
