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
//! Durability: the log is written to the operating system, not synced to the disk on every
//! commit, so a killed or crashed gateway loses nothing; a crash of the machine itself can lose
//! the records of the last moments, as it could with sled's own flush interval before.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{StoreError, UsageRecord};

/// One record read back from the log.
pub struct Logged {
    /// Its sequence number; `None` for a line written before records were numbered, which is
    /// applied unless the trees know its request id.
    pub seq: Option<u64>,
    /// The record.
    pub record: UsageRecord,
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
    /// Opens (or creates) the log at `path`; returns it with the records it and its sealed part
    /// still hold, oldest first.
    pub fn open(path: &Path) -> Result<(Self, Vec<Logged>), StoreError> {
        let mut pending = read_records(&sealed_path(path))?;
        let current = read_records(path)?;
        let records = current.len();
        pending.extend(current);
        let file = append_to(path)?;
        Ok((
            Self {
                path: path.to_owned(),
                file,
                records,
                lines: Vec::new(),
            },
            pending,
        ))
    }

    /// Appends records already encoded as JSON (without line breaks), each with its sequence
    /// number, in one write.
    pub fn append<'a>(
        &mut self,
        encoded: impl Iterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), StoreError> {
        self.lines.clear();
        let mut records = 0;
        for (seq, record) in encoded {
            // Writing into a `Vec` cannot fail.
            let _ = write!(self.lines, "{seq} ");
            self.lines.extend_from_slice(record);
            self.lines.push(b'\n');
            records += 1;
        }
        self.file
            .write_all(&self.lines)
            .map_err(|error| io_error(&self.path, error))?;
        self.records += records;
        Ok(())
    }

    /// Records appended since the log was last sealed.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Seals the records appended so far (each one in the trees or in the batch being applied)
    /// and starts an empty log. While an earlier sealed part is still there, nothing is sealed:
    /// the log keeps its records until a later batch.
    pub fn seal(&mut self) -> Result<(), StoreError> {
        let sealed = sealed_path(&self.path);
        if sealed.exists() {
            return Ok(());
        }
        std::fs::rename(&self.path, &sealed).map_err(|error| io_error(&sealed, error))?;
        self.file = append_to(&self.path)?;
        self.records = 0;
        Ok(())
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

/// The records of one log file, oldest first. A last line cut short by a crash is dropped: its
/// commit never returned, so no client was answered for it.
fn read_records(path: &Path) -> Result<Vec<Logged>, StoreError> {
    let mut text = Vec::new();
    match File::open(path) {
        Ok(mut file) => {
            file.read_to_end(&mut text)
                .map_err(|error| io_error(path, error))?;
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(path, error)),
    }
    let complete = text
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |last| last + 1);
    text[..complete]
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
        .map(read_line)
        .collect()
}

/// `SEQ JSON`, or a JSON line of before records were numbered.
fn read_line(line: &[u8]) -> Result<Logged, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        keyspace: "ledger log",
        reason,
    };
    let (seq, json) = match line.iter().position(|byte| *byte == b' ') {
        Some(space) if line.first() != Some(&b'{') => {
            let seq = std::str::from_utf8(&line[..space])
                .ok()
                .and_then(|digits| digits.parse().ok())
                .ok_or_else(|| corrupt("a line without its sequence number".to_owned()))?;
            (Some(seq), &line[space + 1..])
        }
        _ => (None, line),
    };
    let record = serde_json::from_slice(json).map_err(|error| corrupt(error.to_string()))?;
    Ok(Logged { seq, record })
}
