//! A multiplexed request/response connection to a cache node.
//!
//! [`Conn::send`] enqueues a request without waiting (so a primary can queue replication
//! messages in the order it applied them, under its partition lock) and returns a receiver
//! for the answer. One task connects and writes, batching frames into few syscalls; another
//! reads responses and hands them to their waiters by id. Once the connection fails every
//! waiter gets the reason, telling whether its request can have reached the node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rkyv::util::AlignedVec;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::codec::Encoder;
use crate::protocol::cache::{CacheMsg, Request, Response};
use crate::protocol::frame::{buffered, read_msg, write_frame};

/// Why a request got no response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// The connection was never established: the request did not reach the node.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The connection broke after it was up: the node may have received the request.
    #[error("connection lost: {0}")]
    Lost(String),
}

type Waiter = oneshot::Sender<Result<Response, ConnError>>;

struct Shared {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Waiter>>,
    dead: AtomicBool,
}

impl Shared {
    fn fail_all(&self, err: ConnError) {
        self.dead.store(true, Ordering::Release);
        let waiters: Vec<Waiter> = match self.pending.lock() {
            Ok(mut p) => p.drain().map(|(_, w)| w).collect(),
            Err(_) => Vec::new(),
        };
        for w in waiters {
            let _ = w.send(Err(err.clone()));
        }
    }
}

/// A connection to one node. Cheap to clone.
#[derive(Clone)]
pub struct Conn {
    addr: Arc<str>,
    tx: mpsc::UnboundedSender<(u64, Request)>,
    shared: Arc<Shared>,
}

impl Conn {
    /// Starts connecting to `addr` (within `connect_timeout`); must run inside a tokio
    /// runtime. Requests sent meanwhile wait in order.
    pub fn open(addr: &str, connect_timeout: Duration) -> Conn {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        let conn = Conn {
            addr: addr.into(),
            tx,
            shared: shared.clone(),
        };
        tokio::spawn(run(addr.to_string(), connect_timeout, rx, shared));
        conn
    }

    /// Whether the connection failed (a new one must be opened).
    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::Acquire)
    }

    /// Enqueues `req`; the receiver yields its response or why there is none.
    pub fn send(&self, req: Request) -> oneshot::Receiver<Result<Response, ConnError>> {
        let (w, r) = oneshot::channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.shared.pending.lock() {
            p.insert(id, w);
        }
        if self.tx.send((id, req)).is_err() || self.is_dead() {
            if let Some(w) = self
                .shared
                .pending
                .lock()
                .ok()
                .and_then(|mut p| p.remove(&id))
            {
                let _ = w.send(Err(ConnError::NotSent(format!(
                    "connection to {} is closed",
                    self.addr
                ))));
            }
        }
        r
    }

    /// Sends `req` and waits up to `timeout` for the response.
    pub async fn call(&self, req: Request, timeout: Duration) -> Result<Response, ConnError> {
        let r = self.send(req);
        match tokio::time::timeout(timeout, r).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(ConnError::Lost(format!(
                "connection to {} closed",
                self.addr
            ))),
            Err(_) => Err(ConnError::Lost(format!(
                "no response from {} within {} ms",
                self.addr,
                timeout.as_millis()
            ))),
        }
    }
}

async fn run(
    addr: String,
    connect_timeout: Duration,
    mut rx: mpsc::UnboundedReceiver<(u64, Request)>,
    shared: Arc<Shared>,
) {
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return shared.fail_all(ConnError::NotSent(format!("cannot connect to {addr}: {e}")))
        }
        Err(_) => {
            return shared.fail_all(ConnError::NotSent(format!(
                "cannot connect to {addr} within {} ms",
                connect_timeout.as_millis()
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let reader_shared = shared.clone();
    let reader_addr = addr.clone();
    let mut reader = tokio::spawn(async move {
        let mut read = buffered(read);
        let mut buf = AlignedVec::new();
        loop {
            match read_msg::<_, CacheMsg>(&mut read, &mut buf).await {
                Ok(Some(CacheMsg::Response(id, resp))) => {
                    let w = reader_shared
                        .pending
                        .lock()
                        .ok()
                        .and_then(|mut p| p.remove(&id));
                    if let Some(w) = w {
                        let _ = w.send(Ok(resp));
                    }
                }
                Ok(Some(CacheMsg::Request(..))) => {
                    return format!("{reader_addr} sent a request on a client connection")
                }
                Ok(None) => return format!("{reader_addr} closed the connection"),
                Err(e) => return format!("reading from {reader_addr}: {e}"),
            }
        }
    });
    let mut out = BufWriter::with_capacity(256 << 10, write);
    let mut encoder = Encoder::default();
    let why = loop {
        tokio::select! {
            biased;
            why = &mut reader => break why.unwrap_or_else(|e| e.to_string()),
            msg = rx.recv() => {
                let Some((id, req)) = msg else { break "closed by its owner".to_string() };
                if let Err(e) = write_one(&mut out, &mut encoder, id, req).await {
                    break format!("writing to {addr}: {e}");
                }
                // Batch whatever else is queued into the same flush.
                let mut failed = None;
                while let Ok((id, req)) = rx.try_recv() {
                    if let Err(e) = write_one(&mut out, &mut encoder, id, req).await {
                        failed = Some(format!("writing to {addr}: {e}"));
                        break;
                    }
                }
                if let Some(f) = failed {
                    break f;
                }
                if let Err(e) = out.flush().await {
                    break format!("writing to {addr}: {e}");
                }
            }
        }
    };
    debug!(node = %addr, reason = %why, "Cache connection closed.");
    reader.abort();
    rx.close();
    shared.fail_all(ConnError::Lost(why));
}

async fn write_one(
    out: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    encoder: &mut Encoder,
    id: u64,
    req: Request,
) -> Result<(), String> {
    let bytes = encoder
        .encode(&CacheMsg::Request(id, req))
        .map_err(|e| e.to_string())?;
    write_frame(out, bytes).await.map_err(|e| e.to_string())
}
