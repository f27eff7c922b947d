//! The write-ahead log of committed usage records, for the sled backend: one line per record, its
//! sequence number and its JSON, appended with one `write` per commit. A record is safe from a
//! process crash the moment `commit_usages` returns, before the sled trees hold it; the trees take
//! records in batches (`ledger_books`: the balances of a batch in one transaction, which also
//! notes the last sequence number applied), and once they are flushed the log's sealed part is
//! deleted. At open, what the log still holds past that number is applied again. Request ids
//! cannot serve for this: a client may send the same `x-request-id` twice, and both requests are
//! charged.
//!
//! Two files: `ledger.log` takes appends; `seal` renames it to `ledger.log.sealed` (and starts a
//! new one) as a batch takes every record it holds, and `drop_sealed` deletes that once the batch
//! is in the trees and they are flushed.
//!
//! Beside records, the log notes requests in flight, so that a crash leaves none unbilled: an
//! `o HOLD JSON` line when a request goes to its first upstream, `p HOLD BYTES` lines as a stream
//! delivers text, and the record that settles the request names the hold (`SEQ @HOLD JSON`).
//! A request opened and never settled when the gateway starts again is charged by the rule of
//! a cut stream (`flow::recover`). Opened requests still in flight at a seal are noted again in
//! the new log.
//!
//! Durability: with `server.ledger_sync = "none"` the log is written to the operating system,
//! not synced, so a killed or crashed gateway loses nothing and a crash of the machine itself can
//! lose the records of the last moments. With `"batch"`, `ledger_sync` syncs it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use std::collections::{HashMap, HashSet};

use super::{OpenedRequest, StoreError, UsageRecord};

/// One record read back from the log.
pub struct Logged {
    /// Its sequence number; `None` for a line written before records were numbered, which is
    /// applied unless the trees know its request id.
    pub seq: Option<u64>,
    /// The record.
    pub record: UsageRecord,
    /// The hold of the opened request it settles.
    pub settles: Option<String>,
}

/// What the log files hold, oldest first.
#[derive(Default)]
pub struct LogContents {
    /// Usage records.
    pub records: Vec<Logged>,
    /// Opened requests by hold id: the request as noted, and the text bytes its last progress
    /// mark says it delivered.
    pub opened: HashMap<String, (OpenedRequest, u64)>,
}

impl LogContents {
    /// The opened requests no record settles.
    pub fn unsettled(&self) -> Vec<(OpenedRequest, u64)> {
        let settled: HashSet<&str> = self
            .records
            .iter()
            .filter_map(|logged| logged.settles.as_deref())
            .collect();
        let mut unsettled: Vec<(OpenedRequest, u64)> = self
            .opened
            .iter()
            .filter(|(hold, _)| !settled.contains(hold.as_str()))
            .map(|(_, opened)| opened.clone())
            .collect();
        unsettled.sort_by_key(|(opened, _)| opened.unix_ms);
        unsettled
    }
}

/// The log file, open for appending.
pub struct LedgerLog {
    path: PathBuf,
    file: File,
    /// Records appended since the log was last sealed.
    records: usize,
    /// The lines of one append, kept between appends: every commit writes one.
    lines: Vec<u8>,
}

fn io_error(path: &Path, error: std::io::Error) -> StoreError {
    StoreError::Backend(format!("ledger log {}: {error}", path.display()))
}

impl LedgerLog {
    /// Opens (or creates) the log at `path`; returns it with what it and its sealed part still
    /// hold.
    pub fn open(path: &Path) -> Result<(Self, LogContents), StoreError> {
        let mut contents = LogContents::default();
        read_lines(&sealed_path(path), &mut contents)?;
        let sealed_records = contents.records.len();
        read_lines(path, &mut contents)?;
        let records = contents.records.len() - sealed_records;
        let file = append_to(path)?;
        Ok((
            Self {
                path: path.to_owned(),
                file,
                records,
                lines: Vec::new(),
            },
            contents,
        ))
    }

    /// Appends records already encoded as JSON (without line breaks), each with its sequence
    /// number and the hold of the opened request it settles, in one write.
    pub fn append<'a>(
        &mut self,
        encoded: impl Iterator<Item = (u64, Option<&'a str>, &'a [u8])>,
    ) -> Result<(), StoreError> {
        self.lines.clear();
        let mut records = 0;
        for (seq, settles, record) in encoded {
            // Writing into a `Vec` cannot fail.
            let _ = match settles {
                Some(hold) => write!(self.lines, "{seq} @{hold} "),
                None => write!(self.lines, "{seq} "),
            };
            self.lines.extend_from_slice(record);
            self.lines.push(b'\n');
            records += 1;
        }
        self.write_lines()?;
        self.records += records;
        Ok(())
    }

    /// Notes a request that went to an upstream (`opened` is its JSON), and the text bytes it
    /// delivered so far when that is not zero, in one write.
    pub fn append_opened(
        &mut self,
        hold: &str,
        opened: &[u8],
        delivered: u64,
    ) -> Result<(), StoreError> {
        self.lines.clear();
        let _ = write!(self.lines, "o {hold} ");
        self.lines.extend_from_slice(opened);
        self.lines.push(b'\n');
        if delivered > 0 {
            let _ = writeln!(self.lines, "p {hold} {delivered}");
        }
        self.write_lines()
    }

    /// Notes that an opened request's stream delivered `delivered` bytes of text so far.
    pub fn append_progress(&mut self, hold: &str, delivered: u64) -> Result<(), StoreError> {
        self.lines.clear();
        let _ = writeln!(self.lines, "p {hold} {delivered}");
        self.write_lines()
    }

    fn write_lines(&mut self) -> Result<(), StoreError> {
        self.file
            .write_all(&self.lines)
            .map_err(|error| io_error(&self.path, error))
    }

    /// The file appends go to, for the thread that syncs it.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Records appended since the log was last sealed.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Seals the records appended so far (each one in the trees or in the batch being applied)
    /// and starts an empty log; `true` when it did. While an earlier sealed part is still there,
    /// nothing is sealed: the log keeps its records until a later batch. With `sync`, the sealed
    /// part is synced first and the new file's directory entry after: a sync of the new file
    /// covers only what it holds.
    pub fn seal(&mut self, sync: bool) -> Result<bool, StoreError> {
        let sealed = sealed_path(&self.path);
        if sealed.exists() {
            return Ok(false);
        }
        if sync {
            self.file
                .sync_data()
                .map_err(|error| io_error(&self.path, error))?;
        }
        std::fs::rename(&self.path, &sealed).map_err(|error| io_error(&sealed, error))?;
        self.file = append_to(&self.path)?;
        if sync {
            sync_directory(&self.path)?;
        }
        self.records = 0;
        Ok(true)
    }

    /// Whether a sealed part is waiting to be dropped.
    pub fn has_sealed(path: &Path) -> bool {
        sealed_path(path).exists()
    }

    /// Deletes the sealed part once the trees holding its records are flushed.
    pub fn drop_sealed(path: &Path) -> Result<(), StoreError> {
        let sealed = sealed_path(path);
        match std::fs::remove_file(&sealed) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(io_error(&sealed, error))
            }
            _ => Ok(()),
        }
    }
}

fn sealed_path(path: &Path) -> PathBuf {
    let mut sealed = path.as_os_str().to_owned();
    sealed.push(".sealed");
    PathBuf::from(sealed)
}

fn append_to(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| io_error(path, error))
}

/// Syncs the directory holding `path`, so that a file just created there survives a power loss.
pub fn sync_directory(path: &Path) -> Result<(), StoreError> {
    let directory = path.parent().unwrap_or_else(|| Path::new("."));
    File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(|error| io_error(directory, error))
}

/// Reads one log file's lines into `contents`. A last line cut short by a crash is dropped: its
/// commit never returned, so no client was answered for it.
fn read_lines(path: &Path, contents: &mut LogContents) -> Result<(), StoreError> {
    let mut text = Vec::new();
    match File::open(path) {
        Ok(mut file) => {
            file.read_to_end(&mut text)
                .map_err(|error| io_error(path, error))?;
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io_error(path, error)),
    }
    let complete = text
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |last| last + 1);
    for line in text[..complete]
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
    {
        read_line(line, contents)?;
    }
    Ok(())
}

/// The first space-separated field of a line and the rest.
fn field(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = bytes.iter().position(|byte| *byte == b' ')?;
    Some((&bytes[..space], &bytes[space + 1..]))
}

/// `SEQ [@HOLD] JSON` (a record), `o HOLD JSON` (an opened request), `p HOLD BYTES` (its
/// progress), or a JSON record line of before records were numbered.
fn read_line(line: &[u8], contents: &mut LogContents) -> Result<(), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        keyspace: "ledger log",
        reason,
    };
    if line.first() == Some(&b'{') {
        let record = serde_json::from_slice(line).map_err(|error| corrupt(error.to_string()))?;
        contents.records.push(Logged {
            seq: None,
            record,
            settles: None,
        });
        return Ok(());
    }
    let text = |bytes: &[u8]| {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| corrupt("a line that is not UTF-8".to_owned()))
    };
    let Some((kind, rest)) = field(line) else {
        return Err(corrupt("a line of one field".to_owned()));
    };
    match kind {
        b"o" | b"p" => {
            let (hold, value) =
                field(rest).ok_or_else(|| corrupt("a note without its hold".to_owned()))?;
            let hold = text(hold)?;
            if kind == b"o" {
                let opened =
                    serde_json::from_slice(value).map_err(|error| corrupt(error.to_string()))?;
                contents.opened.insert(hold, (opened, 0));
            } else {
                let delivered = text(value)?
                    .parse()
                    .map_err(|_| corrupt("a progress mark without its byte count".to_owned()))?;
                if let Some((_, marked)) = contents.opened.get_mut(&hold) {
                    *marked = delivered;
                }
            }
        }
        seq => {
            let seq = text(seq)?
                .parse()
                .map_err(|_| corrupt("a line without its sequence number".to_owned()))?;
            let (settles, json) = match rest.strip_prefix(b"@").and_then(field) {
                Some((hold, json)) => (Some(text(hold)?), json),
                None => (None, rest),
            };
            let record =
                serde_json::from_slice(json).map_err(|error| corrupt(error.to_string()))?;
            contents.records.push(Logged {
                seq: Some(seq),
                record,
                settles,
            });
        }
    }
    Ok(())
}
