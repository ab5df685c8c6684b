//! The call journal (`audit.journal`): a small durable file that says which
//! admitted calls have not been accounted yet, so none is lost to a crash.
//!
//! A call writes a begin line when it is admitted, before it is sent; the
//! audit-log writer writes its end line once the call's record is in the
//! audit log. After a restart, every begin without an end is a call the
//! provider may have served that has no record: `proxy::restart` records
//! and charges each one.
//!
//! Lines are written with one `write(2)` each on an `O_APPEND` file: once
//! written they survive the process being killed (`kill -9`, OOM); a
//! background thread `fdatasync`s every SYNC_EVERY when something changed,
//! which bounds what a power loss can take. The file is rewritten with only
//! the open calls when it passes `MAX_BYTES` and at every start, so it
//! stays a few KiB plus the calls in flight.
//!
//! Format: JSON lines, `{"b":"<id>","v":{…}}` and `{"e":"<id>"}`. A torn
//! last line (a crash mid-write) is ignored.
use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{BufRead, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// How often written lines are flushed to the disk itself.
const SYNC_EVERY: Duration = Duration::from_millis(200);
/// Past this size the file is rewritten with the open calls only.
const MAX_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot use the call journal {path}: {source}\nhint: set audit.journal to a file in a writable directory (the chart uses /var/lib/tollgate/calls.journal), or to \"\" to run without one"
)]
pub struct JournalError {
    path: PathBuf,
    source: std::io::Error,
}

/// A call begun before the restart and never ended: its begin entry.
#[derive(Debug, Clone)]
pub struct Unfinished {
    pub id: String,
    pub entry: serde_json::Value,
}

pub struct Journal {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    size: u64,
    dirty: bool,
    /// Begin lines of the calls not ended yet, by id.
    open: HashMap<String, Vec<u8>>,
    /// A write failed and was reported; reported again only after a success.
    failing: bool,
}

#[derive(Serialize, Deserialize)]
struct Line<'a, V> {
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    b: Option<&'a str>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    e: Option<&'a str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v: Option<V>,
}

impl Journal {
    /// Open the journal at `path`: the calls an earlier run left unfinished,
    /// and the journal, rewritten to hold only those.
    pub fn open(path: &Path) -> Result<(Arc<Journal>, Vec<Unfinished>), JournalError> {
        let err = |source| JournalError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let (open, unfinished) = match File::open(path) {
            Ok(f) => read(std::io::BufReader::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(err(e)),
        };
        let (file, size) = rewrite(path, &open).map_err(err)?;
        let journal = Arc::new(Journal {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                size,
                dirty: false,
                open,
                failing: false,
            }),
        });
        let weak = Arc::downgrade(&journal);
        std::thread::Builder::new()
            .name("tollgate-journal".into())
            .spawn(move || sync_loop(weak))
            .map_err(err)?;
        Ok((journal, unfinished))
    }

    /// Call `id` was admitted: `entry` is what its record would be made of.
    pub fn begin(&self, id: &str, entry: &impl Serialize) {
        let line = Line {
            b: Some(id),
            e: None,
            v: Some(entry),
        };
        let Ok(mut bytes) = serde_json::to_vec(&line) else {
            return;
        };
        bytes.push(b'\n');
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.append(&bytes, &self.path);
        g.open.insert(id.to_string(), bytes);
    }

    /// Call `id` is accounted (its record is in the audit log). Nothing is
    /// written for a call that never began (one refused at admission).
    pub fn end(&self, id: &str) {
        self.end_all(std::iter::once(id));
    }

    /// `end` for several calls at once: one write for all of them.
    pub fn end_all<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut bytes = Vec::new();
        for id in ids {
            if g.open.remove(id).is_none() {
                continue;
            }
            let line = Line::<()> {
                b: None,
                e: Some(id),
                v: None,
            };
            if serde_json::to_writer(&mut bytes, &line).is_ok() {
                bytes.push(b'\n');
            }
        }
        if !bytes.is_empty() {
            g.append(&bytes, &self.path);
        }
    }

    /// Calls begun and not ended.
    pub fn open_calls(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .len()
    }

    /// Bytes in the journal file now.
    pub fn size(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).size
    }
}

impl Inner {
    fn append(&mut self, bytes: &[u8], path: &Path) {
        match self.file.write_all(bytes) {
            Ok(()) => {
                self.size += bytes.len() as u64;
                self.dirty = true;
                self.failing = false;
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(path = %path.display(), error = %e,
                        "writing the call journal failed; calls go on, but a crash now could leave some unrecorded");
                }
            }
        }
    }
}

/// Read a journal: the open begin lines by id, and the same as entries.
fn read(r: impl BufRead) -> (HashMap<String, Vec<u8>>, Vec<Unfinished>) {
    let mut open: HashMap<String, Vec<u8>> = HashMap::new();
    let mut order = Vec::new();
    for line in r.split(b'\n').map_while(Result::ok) {
        let Ok(l) = serde_json::from_slice::<Line<serde_json::Value>>(&line) else {
            continue; // torn by a crash mid-write, or not ours
        };
        match (l.b, l.e) {
            (Some(id), _) => {
                order.push(id.to_string());
                let mut bytes = line.clone();
                bytes.push(b'\n');
                open.insert(id.to_string(), bytes);
            }
            (None, Some(id)) => {
                open.remove(id);
            }
            _ => {}
        }
    }
    let unfinished = order
        .into_iter()
        .filter_map(|id| {
            let line = open.get(&id)?;
            let l: Line<serde_json::Value> = serde_json::from_slice(line).ok()?;
            Some(Unfinished {
                entry: l.v.unwrap_or_default(),
                id,
            })
        })
        .collect();
    (open, unfinished)
}

/// Replace the file at `path` by one holding `open` (temp file, fsync,
/// rename); the new file, opened for appending, and its size.
fn rewrite(path: &Path, open: &HashMap<String, Vec<u8>>) -> std::io::Result<(File, u64)> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    let mut size = 0;
    for line in open.values() {
        f.write_all(line)?;
        size += line.len() as u64;
    }
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename itself is durable once the directory is synced.
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    let file = OpenOptions::new().append(true).open(path)?;
    Ok((file, size))
}

fn sync_loop(journal: Weak<Journal>) {
    loop {
        std::thread::sleep(SYNC_EVERY);
        let Some(j) = journal.upgrade() else {
            return;
        };
        // The file is cloned out of the lock: fsync never holds up a call.
        let (file, compact) = {
            let mut g = j.inner.lock().unwrap_or_else(|e| e.into_inner());
            let file = if std::mem::take(&mut g.dirty) {
                g.file.try_clone().ok()
            } else {
                None
            };
            (file, g.size > MAX_BYTES)
        };
        if let Some(f) = file
            && let Err(e) = f.sync_data()
        {
            tracing::warn!(error = %e, "syncing the call journal failed");
        }
        if compact {
            let mut g = j.inner.lock().unwrap_or_else(|e| e.into_inner());
            match rewrite(&j.path, &g.open) {
                Ok((file, size)) => {
                    g.file = file;
                    g.size = size;
                }
                Err(e) => tracing::warn!(error = %e, "compacting the call journal failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_calls_survive_a_restart_and_ended_ones_do_not() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state/calls.journal");
        let (j, before) = Journal::open(&p).unwrap();
        assert!(before.is_empty());
        for i in 0..5 {
            j.begin(&format!("c{i}"), &serde_json::json!({"n": i}));
        }
        j.end("c1");
        j.end("c3");
        j.end("never-begun");
        assert_eq!(j.open_calls(), 3);
        drop(j);
        // A crash mid-write leaves a torn last line.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"b":"c9","v":{"n""#).unwrap();
        drop(f);
        let (j, after) = Journal::open(&p).unwrap();
        let ids: Vec<_> = after.iter().map(|u| u.id.as_str()).collect();
        assert_eq!(
            ids,
            ["c0", "c2", "c4"],
            "begun order, ended and torn ones left out"
        );
        assert_eq!(after[1].entry["n"], 2);
        // Rewritten at start: only the open calls are in the file.
        assert_eq!(j.open_calls(), 3);
        for u in &after {
            j.end(&u.id);
        }
        drop(j);
        let (_, again) = Journal::open(&p).unwrap();
        assert!(again.is_empty());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
    }

    #[test]
    fn the_file_stays_small_when_calls_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("calls.journal");
        let (j, _) = Journal::open(&p).unwrap();
        let entry = serde_json::json!({"record": "x".repeat(400)});
        let per_call = {
            j.begin("probe", &entry);
            j.end("probe");
            j.size()
        };
        // Enough calls to pass MAX_BYTES several times over.
        let n = (3 * MAX_BYTES / per_call) as usize;
        for i in 0..n {
            let id = format!("call-{i}");
            j.begin(&id, &entry);
            j.end(&id);
        }
        j.begin("in-flight", &entry);
        let grown = wait(|| j.size() < MAX_BYTES);
        assert!(grown, "compacted: {} bytes", j.size());
        drop(j);
        let (_, left) = Journal::open(&p).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, "in-flight");
    }

    fn wait(cond: impl Fn() -> bool) -> bool {
        for _ in 0..50 {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    #[test]
    fn an_unwritable_place_is_a_clear_error() {
        let e = Journal::open(Path::new("/proc/nope/calls.journal"))
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("audit.journal") && msg.contains("/proc/nope"),
            "{msg}"
        );
    }
}
