//! An export's or import's data stream: the disk dump between the OS
//! script (in the appliance, or trusted on the host) and the operator.
//!
//! A dump is far too big for the channel's messages, so it has a stream of
//! its own, held by its job and gone with it:
//!
//! - **export**: what the script prints goes, chunk by chunk, through a
//!   bounded queue ([`QUEUE_CHUNKS`]) to the admin API's answer, which the
//!   operator's `cradle instance export` reads. A slow reader slows the
//!   script (the queue is full, the appliance's upload waits, TCP pushes
//!   back); nothing is held whole. The stream is taken once
//!   ([`DataStream::take_export`]), counted, hashed (SHA-256) and refused
//!   past its cap ([`Sink::send`]).
//! - **import**: the operator's dump was spooled to a file on the host and
//!   checked against the SHA-256 the operator gave before the job started;
//!   the script reads that file, once ([`DataStream::open_import`]).
//!
//! Either way the agent reports the length and SHA-256 of what it sent or
//! fed its script, and the job succeeds only when both ends agree.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cradle_model::job::{StreamCounter, StreamDigest};

/// Chunks queued between the script and the operator: with the appliance's
/// and hyper's chunk sizes, a few MiB at most.
pub const QUEUE_CHUNKS: usize = 16;

/// What flows where.
enum Flow {
    /// The sending half, until the script's end takes it.
    Export(Option<tokio::sync::mpsc::Sender<Bytes>>),
    /// The spooled dump, and what it holds.
    Import { path: PathBuf, digest: StreamDigest },
}

/// An export's or import's stream, held by its job.
pub struct DataStream {
    flow: Mutex<Flow>,
    /// The largest dump taken (`[install] stream_max_bytes`).
    pub cap: u64,
    state: Mutex<Counted>,
}

#[derive(Default)]
struct Counted {
    taken: bool,
    counted: StreamCounter,
    /// Set when the export's whole stream has been sent.
    done: Option<StreamDigest>,
    /// Why the stream failed (past its cap): the job ends on it.
    failed: Option<String>,
}

/// Why a chunk was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    #[error("the dump passed its cap of {0} bytes ([install] stream_max_bytes)")]
    Cap(u64),
    #[error("the export's reader went away")]
    Gone,
}

/// The answer's end of an export: the dump's chunks as they come.
pub type Source = tokio::sync::mpsc::Receiver<Bytes>;

impl DataStream {
    /// An export's stream, and the end the operator reads.
    pub fn export(cap: u64) -> (DataStream, Source) {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_CHUNKS);
        (
            DataStream {
                flow: Mutex::new(Flow::Export(Some(tx))),
                cap,
                state: Mutex::new(Counted::default()),
            },
            rx,
        )
    }

    /// An import's stream over a spooled, checked dump.
    pub fn import(path: PathBuf, digest: StreamDigest) -> DataStream {
        DataStream {
            cap: digest.bytes,
            flow: Mutex::new(Flow::Import { path, digest }),
            state: Mutex::new(Counted::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Counted> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn flow(&self) -> std::sync::MutexGuard<'_, Flow> {
        self.flow.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_export(&self) -> bool {
        matches!(*self.flow(), Flow::Export(_))
    }

    /// Whether the script's side has begun (an import's disk may then have
    /// been written).
    pub fn is_taken(&self) -> bool {
        self.state().taken
    }

    /// The export's sending end, once: a second upload is refused.
    pub fn take_export(self: &Arc<Self>) -> Result<Sink, String> {
        let Flow::Export(tx) = &mut *self.flow() else {
            return Err("this job imports: its stream is read, not written".into());
        };
        let mut st = self.state();
        match (st.taken, tx.take()) {
            (false, Some(tx)) => {
                st.taken = true;
                Ok(Sink {
                    stream: self.clone(),
                    tx,
                })
            }
            _ => Err("the export's stream was sent already".into()),
        }
    }

    /// The import's dump, once, with its length and SHA-256.
    pub fn open_import(&self) -> Result<(std::fs::File, StreamDigest), String> {
        let (path, digest) = match &*self.flow() {
            Flow::Import { path, digest } => (path.clone(), digest.clone()),
            Flow::Export(_) => return Err("this job exports: its stream is written".into()),
        };
        let mut st = self.state();
        if st.taken {
            return Err("the import's stream was read already".into());
        }
        let f = std::fs::File::open(&path).map_err(|e| format!("the spooled dump: {e}"))?;
        st.taken = true;
        Ok((f, digest))
    }

    /// The spooled dump of an import, which the job's end removes.
    pub fn spool(&self) -> Option<PathBuf> {
        match &*self.flow() {
            Flow::Import { path, .. } => Some(path.clone()),
            Flow::Export(_) => None,
        }
    }

    /// What the host counted: an export's bytes so far (all of them once
    /// sent), an import's dump.
    pub fn digest(&self) -> Option<StreamDigest> {
        if let Flow::Import { digest, .. } = &*self.flow() {
            return Some(digest.clone());
        }
        let st = self.state();
        match &st.done {
            Some(d) => Some(d.clone()),
            None if st.taken => Some(StreamDigest {
                bytes: st.counted.bytes(),
                sha256: String::new(),
            }),
            None => None,
        }
    }

    /// The whole stream's digest: an export's once all of it was sent.
    pub fn complete(&self) -> Option<StreamDigest> {
        if let Flow::Import { digest, .. } = &*self.flow() {
            return Some(digest.clone());
        }
        self.state().done.clone()
    }

    /// The stream failed (its dump passed the cap): the job ends on it.
    pub fn fail(&self, reason: String) {
        self.state().failed.get_or_insert(reason);
    }

    pub fn failure(&self) -> Option<String> {
        self.state().failed.clone()
    }

    /// Close the stream (the job ended): a sender not taken yet goes, so
    /// the reader sees the end.
    pub fn close(&self) {
        if let Flow::Export(tx) = &mut *self.flow() {
            tx.take();
        }
    }
}

/// The export's sending end: counts, hashes, caps, then queues.
pub struct Sink {
    stream: Arc<DataStream>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

impl Sink {
    /// Count and hash `chunk`; refused whole when it would pass the cap.
    fn count(&self, chunk: &[u8]) -> Result<(), SinkError> {
        let mut st = self.stream.state();
        if st.counted.bytes().saturating_add(chunk.len() as u64) > self.stream.cap {
            return Err(SinkError::Cap(self.stream.cap));
        }
        st.counted.update(chunk);
        Ok(())
    }

    /// Send a chunk, waiting while the queue is full.
    pub async fn send(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        self.count(&chunk)?;
        self.tx.send(chunk).await.map_err(|_| SinkError::Gone)
    }

    /// [`Sink::send`] from a thread outside the runtime.
    pub fn blocking_send(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        self.count(&chunk)?;
        self.tx.blocking_send(chunk).map_err(|_| SinkError::Gone)
    }

    /// All of it was sent: the digest is the job's.
    pub fn finish(self) -> StreamDigest {
        let mut st = self.stream.state();
        let digest = std::mem::take(&mut st.counted).finish();
        st.done = Some(digest.clone());
        digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_of(bytes: &[u8]) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[tokio::test]
    async fn an_export_is_counted_hashed_capped_and_taken_once() {
        let (s, mut rx) = DataStream::export(10);
        let s = Arc::new(s);
        let mut sink = s.take_export().unwrap();
        assert!(s.take_export().is_err());
        sink.send(Bytes::from_static(b"hello ")).await.unwrap();
        assert_eq!(
            sink.send(Bytes::from_static(b"world")).await,
            Err(SinkError::Cap(10))
        );
        sink.send(Bytes::from_static(b"dump")).await.unwrap();
        assert_eq!(s.digest().unwrap().bytes, 10);
        assert!(s.complete().is_none());
        let d = sink.finish();
        // sha256("hello dump")
        assert_eq!(
            d.sha256,
            sha256_of(b"hello dump"),
            "the digest is of what was sent"
        );
        assert_eq!(s.complete(), Some(d));
        assert_eq!(rx.recv().await.unwrap(), "hello ");
        assert_eq!(rx.recv().await.unwrap(), "dump");
        assert!(rx.recv().await.is_none(), "the end of the stream");
    }

    #[tokio::test]
    async fn a_reader_that_goes_stops_the_sender() {
        let (s, rx) = DataStream::export(1 << 20);
        let s = Arc::new(s);
        let mut sink = s.take_export().unwrap();
        drop(rx);
        assert_eq!(
            sink.send(Bytes::from_static(b"x")).await,
            Err(SinkError::Gone)
        );
    }

    #[test]
    fn an_import_is_opened_once() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let digest = StreamDigest {
            bytes: 0,
            sha256: sha256_of(b""),
        };
        let s = Arc::new(DataStream::import(tmp.path().to_path_buf(), digest.clone()));
        assert!(!s.is_taken());
        assert!(s.take_export().is_err());
        let (_f, d) = s.open_import().unwrap();
        assert_eq!(d, digest);
        assert!(s.is_taken());
        assert!(s.open_import().is_err());
    }
}
