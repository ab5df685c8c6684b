//! The audit log writer: one JSON line per record (`records`), to a file or stdout.
//!
//! Writes happen on a dedicated task fed by a bounded channel: the data path
//! never waits on the disk. When the writer falls behind, records are dropped
//! and counted (`dropped()`), never queued without bound.
use std::{
    io::Write,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::{config::AuditConfig, journal::Journal};

/// Queue depth: a burst of ~4k connection closes between two writer wake-ups
/// is absorbed; beyond that the disk is the bottleneck and dropping beats
/// stalling relays.
const QUEUE: usize = 4096;
/// How long the writer lets records gather after a write: a record reaches
/// the disk at most this much later; at 100k records/s, 2,000 are queued.
/// Each wake-up of the writer costs ~50 µs of CPU on the bench's 2-CPU VM
/// (its thread's schedstat in `cargo xtask bench`); at 5 ms it woke once
/// per call at 200 calls/s, at 20 ms once per ~4.
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// A line for the log, and the call it accounts for (ended in the journal
/// once the line is written).
type Queued = (Vec<u8>, Option<String>);

#[derive(Clone)]
pub struct EventLog {
    tx: mpsc::Sender<Queued>,
    journal: Option<Arc<Journal>>,
    dropped: Arc<AtomicU64>,
    /// `{"node":"<name>",` — every record starts with the node's name.
    prefix: Arc<[u8]>,
    /// Where calls also go as OpenTelemetry spans, when configured.
    spans: Option<Arc<super::otlp::Spans>>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot open audit log {path}: {source}\nhint: set audit.path to a writable file, or `-` for stdout"
)]
pub struct EventLogError {
    path: PathBuf,
    source: std::io::Error,
}

/// Where records are written: stdout, or a file rotated by size.
struct Sink {
    out: Box<dyn Write + Send>,
    file: Option<(PathBuf, u64, u32)>, // path, max bytes, files kept
    size: u64,
}

impl Sink {
    fn open(cfg: &AuditConfig) -> Result<Self, EventLogError> {
        if cfg.path == "-" {
            return Ok(Sink {
                out: Box::new(std::io::stdout()),
                file: None,
                size: 0,
            });
        }
        let path = PathBuf::from(&cfg.path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| EventLogError {
                path: path.clone(),
                source,
            })?;
        }
        let f = Self::append(&path).map_err(|source| EventLogError {
            path: path.clone(),
            source,
        })?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Sink {
            out: Box::new(std::io::BufWriter::new(f)),
            file: Some((path, cfg.max_file_bytes, cfg.max_files)),
            size,
        })
    }

    fn append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        if let Some((path, max, keep)) = &self.file
            && self.size > 0
            && self.size + line.len() as u64 > *max
        {
            self.out.flush()?;
            // path.N-1 → path.N, …, path → path.1; the oldest falls off.
            for i in (1..*keep).rev() {
                let _ = std::fs::rename(rotated(path, i), rotated(path, i + 1));
            }
            std::fs::rename(path, rotated(path, 1))?;
            self.out = Box::new(std::io::BufWriter::new(Self::append(path)?));
            self.size = 0;
        }
        self.out.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn rotated(path: &std::path::Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl EventLog {
    /// Open the log; with a `journal`, each call's end is written there once
    /// its record is in the log (see `record_call`).
    pub fn open(
        cfg: &AuditConfig,
        node: &str,
        journal: Option<Arc<Journal>>,
    ) -> Result<Self, EventLogError> {
        let prefix = format!(
            "{{\"node\":{},",
            serde_json::to_string(node).expect("strings serialise")
        );
        let mut sink = Sink::open(cfg)?;
        let (tx, mut rx) = mpsc::channel::<Queued>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = dropped.clone();
        let ends = journal.clone();
        std::thread::Builder::new()
            .name("tollgate-audit".into())
            .spawn(move || {
                let mut failing = false;
                let mut calls = Vec::new();
                while let Some((first, call)) = rx.blocking_recv() {
                    // Whatever queued meanwhile goes in the same write: one
                    // syscall per burst, not per record, and every record is
                    // on disk before the writer sleeps again.
                    let mut batch = 1u64;
                    let mut result = sink.write(&first);
                    calls.extend(call);
                    while let Ok((line, call)) = rx.try_recv() {
                        batch += 1;
                        result = result.and_then(|()| sink.write(&line));
                        calls.extend(call);
                    }
                    let result = result.and_then(|()| sink.flush());
                    // The records are written (or lost and counted): their
                    // calls are accounted for.
                    if let Some(j) = &ends {
                        j.end_all(calls.iter().map(String::as_str));
                    }
                    calls.clear();
                    match result {
                        Ok(()) => failing = false,
                        Err(e) => {
                            // Disk full, file removed, …: count, say so once, keep serving.
                            lost.fetch_add(batch, Ordering::Relaxed);
                            if !failing {
                                tracing::error!(error = %e, "writing the audit log failed; records are being dropped (tollgate_audit_records_dropped_total)");
                                failing = true;
                            }
                        }
                    }
                    // Let the next records gather rather than wake this
                    // thread one by one (a futex wake and a context switch
                    // per call under load); idle, it sleeps in recv.
                    std::thread::sleep(GATHER);
                }
            })
            .expect("spawn audit log thread");
        Ok(Self {
            tx,
            journal,
            dropped,
            prefix: prefix.into_bytes().into(),
            spans: None,
        })
    }

    /// Also export every call as an OpenTelemetry span.
    pub fn with_spans(mut self, spans: Option<Arc<super::otlp::Spans>>) -> Self {
        self.spans = spans;
        self
    }

    /// Record one finished call: its audit line (see `record_call`) and,
    /// when OTLP export is on, its span.
    pub fn record_request(&self, rec: &super::records::RequestRecord) {
        self.record_call(rec, &rec.id);
        if let Some(s) = &self.spans {
            s.record(rec);
        }
    }

    /// The span exporter, when OTLP export is on.
    pub fn spans(&self) -> Option<&Arc<super::otlp::Spans>> {
        self.spans.as_ref()
    }

    /// Queue one record (serialised here, written by the log thread).
    pub fn record(&self, rec: &impl Serialize) {
        self.queue(rec, None);
    }

    /// Queue the record of call `id`: its journal entry ends once the
    /// record is written, so a crash in between finds it unfinished and
    /// records it then — never both, never neither.
    pub fn record_call(&self, rec: &impl Serialize, id: &str) {
        self.queue(rec, self.journal.as_ref().map(|_| id.to_string()));
    }

    /// The journal calls begin in, when there is one.
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    fn queue(&self, rec: &impl Serialize, call: Option<String>) {
        let json = serde_json::to_vec(rec).expect("records serialise");
        debug_assert!(
            json.len() > 2 && json[0] == b'{',
            "records are non-empty objects"
        );
        let mut line = Vec::with_capacity(self.prefix.len() + json.len());
        line.extend_from_slice(&self.prefix);
        line.extend_from_slice(&json[1..]);
        line.push(b'\n');
        if let Err(e) = self.tx.try_send((line, call)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            // Lost and counted: not to come back as unfinished after a restart.
            if let (Some(j), (_, Some(id))) = (&self.journal, e.into_inner()) {
                j.end(&id);
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(FORMAT)
        .expect("the format fits any date")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::Workload,
        telemetry::records::{
            ClientProtocol, ConnectionRecord, ConnectionResult, Decision, TlsInfo,
        },
    };

    #[test]
    fn rotates_by_size_keeping_max_files() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("audit.jsonl");
        let cfg = AuditConfig {
            path: path.display().to_string(),
            max_file_bytes: 100,
            max_files: 2,
            ..Default::default()
        };
        let mut sink = Sink::open(&cfg).unwrap();
        for i in 0..10 {
            sink.write(format!("{{\"n\":{i:040}}}\n").as_bytes())
                .unwrap(); // 48-byte lines
        }
        sink.flush().unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        // Two lines per file; the current file, .1 and .2 exist, .3 never does.
        assert_eq!(read(path.clone()).lines().count(), 2);
        assert_eq!(read(rotated(&path, 1)).lines().count(), 2);
        assert_eq!(read(rotated(&path, 2)).lines().count(), 2);
        assert!(!rotated(&path, 3).exists());
        assert!(
            read(path).contains(&format!("{:040}", 9)),
            "newest records in the current file"
        );
    }

    #[test]
    fn timestamp_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
    }

    #[tokio::test]
    async fn writes_json_lines_to_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/conn.jsonl");
        let log = EventLog::open(
            &AuditConfig {
                path: p.display().to_string(),
                ..Default::default()
            },
            "node-a",
            None,
        )
        .unwrap();
        log.record(&ConnectionRecord {
            time: now_rfc3339(),
            workload: Workload {
                cgroup: "/x".into(),
                ..Default::default()
            },
            pid: 1,
            comm: "curl".into(),
            provider: "openai".into(),
            destination: "10.0.0.1:443".parse().unwrap(),
            client: "127.0.0.1:5000".parse().unwrap(),
            bytes_sent: 10,
            bytes_received: 20,
            duration_ms: 3,
            result: ConnectionResult::Ok,
            error: None,
            client_protocol: ClientProtocol::Tls,
            decision: Decision::Allow,
            reason: "default".into(),
            tls: Some(TlsInfo {
                sni: Some("api.openai.com".into()),
                alpn: vec![],
            }),
        });
        for _ in 0..100 {
            if std::fs::read_to_string(&p).is_ok_and(|s| s.ends_with('\n')) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let line = std::fs::read_to_string(&p).unwrap();
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(v["node"], "node-a");
        assert_eq!(v["provider"], "openai");
        assert_eq!(v["workload"]["cgroup"], "/x");
        assert_eq!(v["bytes_received"], 20);
        assert_eq!(v["tls"]["sni"], "api.openai.com");
        assert_eq!(log.dropped(), 0);
    }

    #[tokio::test]
    async fn a_calls_journal_entry_ends_once_its_record_is_written() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let (journal, _) = Journal::open(&d.path().join("calls.journal")).unwrap();
        let log = EventLog::open(
            &AuditConfig {
                path: p.display().to_string(),
                ..Default::default()
            },
            "node-a",
            Some(journal.clone()),
        )
        .unwrap();
        journal.begin("call-1", &serde_json::json!({}));
        journal.begin("call-2", &serde_json::json!({}));
        log.record_call(
            &serde_json::json!({"kind": "request", "id": "call-1"}),
            "call-1",
        );
        for _ in 0..100 {
            if journal.open_calls() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(journal.open_calls(), 1, "call-2 has no record yet");
        let written = std::fs::read_to_string(&p).unwrap();
        assert!(written.contains("\"id\":\"call-1\""), "{written}");
    }
}
