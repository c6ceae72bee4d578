//! `DataPlane`: the network side of channels between task managers.
//!
//! Every task manager runs one. Between two task managers there is exactly one TCP
//! connection, opened by the one with the smaller id (the other waits for it), carrying every
//! logical channel between them in both directions as length-prefixed rkyv `DataFrame`s,
//! events inside them packed ([`crate::codec::packed`]).
//!
//! Flow control is the same credit scheme as in process: the receiving task manager grants
//! each channel's sender `credits` events when it registers the channel, and announces more
//! (in `Credit` frames) as its subtask consumes them; a sender without credits waits. The
//! reader of a connection therefore never has to buffer: a frame for a channel without a free
//! credit is a protocol violation and closes the connection.
//!
//! A frame that fails to decode closes that connection with an error log; the process and
//! every other connection keep serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, error, info, warn};

use crate::codec::{encode, encode_sized, packed, CodecError};
use crate::ids::{Generation, JobId, TaskManagerId};
use crate::protocol::data::{ArchivedDataFrame, ChannelId, DataFrame};
use crate::protocol::frame::{buffered, read_frame, read_msg, write_frame, FrameError, MAX_FRAME};
use crate::record::Delivery;
use crate::runtime::credit;

/// How long to wait for a peer's connection (either direction) before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long credits granted to a channel wait for its sender to register: far longer than
/// wiring a deployment takes (its connections time out after [`CONNECT_TIMEOUT`]).
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

/// A live connection to a peer: frames queued here are written in order by its writer task.
/// The queue is unbounded, but what it holds is bounded by the credits of the channels that
/// use it (events) and by events consumed (credit frames).
#[derive(Clone)]
struct Conn {
    /// Distinguishes this connection from an earlier or later one to the same peer.
    id: u64,
    tx: mpsc::UnboundedSender<AlignedVec>,
}

/// State shared by the data plane's tasks.
struct Inner {
    tm: TaskManagerId,
    addr: SocketAddr,
    /// The runtime the data plane's tasks (accept, read, write) run on: the one `bind` was
    /// called on, so a task manager can keep decoding off its control thread.
    rt: tokio::runtime::Handle,
    /// Channels received here: the peer sending them, and where the connection reader
    /// delivers their events.
    inputs: Mutex<HashMap<ChannelId, (TaskManagerId, credit::Sender)>>,
    /// Channels sent from here: the peer receiving them, the credits it granted and what
    /// it acked as logged.
    outputs: Mutex<HashMap<ChannelId, Output>>,
    /// Credits granted to channels no sender here has registered, by when the first
    /// grant came: a sender still being wired (its receiver was quicker), or a sender
    /// released before a late grant came. Forgotten after [`UNCLAIMED_TTL`].
    unclaimed: Mutex<HashMap<ChannelId, Instant>>,
    /// Source of connection ids.
    next_conn: std::sync::atomic::AtomicU64,
    /// Connections by peer (None until established).
    peers: Mutex<HashMap<TaskManagerId, watch::Sender<Option<Conn>>>>,
    /// Serializes outbound connection attempts per peer.
    connecting: tokio::sync::Mutex<()>,
    /// Peers declared dead by the job manager: their frames are refused for good.
    fenced: Mutex<std::collections::HashSet<TaskManagerId>>,
}

/// What the receiving peer of an output channel told this task manager.
#[derive(Clone)]
struct Output {
    peer: TaskManagerId,
    /// Credits granted.
    credits: Arc<Semaphore>,
    /// DCAS: the seq below which the receiver logged every record (`Logged` frames).
    logged: Arc<AtomicU64>,
}

impl Output {
    fn new(peer: TaskManagerId) -> Output {
        Output {
            peer,
            credits: Arc::new(Semaphore::new(0)),
            logged: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// The data plane of one task manager. Cheap to clone.
#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Inner>,
}

/// Error setting up a remote channel.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The peer could not be reached in time.
    #[error("cannot reach task manager {peer} at {addr}: {reason}")]
    Unreachable {
        /// The peer.
        peer: TaskManagerId,
        /// Its data-plane address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer is gone: the job manager declared it dead, or nothing listens at its
    /// address any more (its process died).
    #[error("task manager {peer} at {addr} is gone: {reason}")]
    Gone {
        /// The peer.
        peer: TaskManagerId,
        /// Its data-plane address.
        addr: String,
        /// Why.
        reason: String,
    },
}

impl DataPlane {
    /// Binds the data-plane server on `addr` (port 0 picks one) and starts accepting. The
    /// plane's tasks run on the calling runtime.
    pub async fn bind(tm: TaskManagerId, addr: &str) -> std::io::Result<DataPlane> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let plane = DataPlane {
            inner: Arc::new(Inner {
                tm,
                addr,
                rt: tokio::runtime::Handle::current(),
                inputs: Mutex::default(),
                outputs: Mutex::default(),
                unclaimed: Mutex::default(),
                next_conn: std::sync::atomic::AtomicU64::new(1),
                peers: Mutex::default(),
                connecting: tokio::sync::Mutex::new(()),
                fenced: Mutex::default(),
            }),
        };
        let accepting = plane.clone();
        plane
            .inner
            .rt
            .spawn(async move { accepting.accept_loop(listener).await });
        Ok(plane)
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Registers a channel received here from subtask on `peer`, granting its sender
    /// `credits` events, and returns the receiving end.
    pub async fn register_input(
        &self,
        channel: ChannelId,
        peer: TaskManagerId,
        peer_addr: &str,
        credits: usize,
    ) -> Result<credit::Receiver, NetError> {
        let conn = self.conn(peer, peer_addr).await?;
        let (announce_conn, ack_conn) = (conn.clone(), conn.clone());
        let (tx, rx) = credit::channel_with_announcer(
            credits,
            Box::new(move |n| {
                send_frame(
                    &announce_conn,
                    &DataFrame::Credit {
                        channel,
                        credits: n as u32,
                    },
                )
            }),
            Box::new(move |next_seq| {
                send_frame(&ack_conn, &DataFrame::Logged { channel, next_seq })
            }),
        );
        lock(&self.inner.inputs).insert(channel, (peer, tx));
        send_frame(
            &conn,
            &DataFrame::Credit {
                channel,
                credits: credits as u32,
            },
        );
        Ok(rx)
    }

    /// Registers a channel sent from here to a subtask on `peer` and returns its sender.
    pub async fn register_output(
        &self,
        channel: ChannelId,
        peer: TaskManagerId,
        peer_addr: &str,
    ) -> Result<RemoteSender, NetError> {
        let conn = self.conn(peer, peer_addr).await?;
        let output = output_of(&mut lock(&self.inner.outputs), channel, peer);
        lock(&self.inner.unclaimed).remove(&channel);
        self.forget_unclaimed(Instant::now());
        Ok(RemoteSender {
            channel,
            credits: output.credits,
            logged: output.logged,
            conn,
        })
    }

    /// Forgets every channel of a job's deployment (on cancel, failure or finish): senders
    /// waiting for credits of its remote channels give up, and events still arriving for it
    /// are dropped (late credit grants wait unclaimed until [`Self::forget_unclaimed`]).
    pub fn release(&self, job: JobId, generation: Generation) {
        let of_deployment = |c: &ChannelId| c.job == job && c.generation == generation;
        lock(&self.inner.inputs).retain(|c, (_, tx)| {
            if of_deployment(c) {
                tx.close(credit::CloseCause::Released);
            }
            !of_deployment(c)
        });
        lock(&self.inner.outputs).retain(|c, o| {
            if of_deployment(c) {
                o.credits.close();
            }
            !of_deployment(c)
        });
    }

    /// Forgets the credits of channels no sender claimed within [`UNCLAIMED_TTL`] of
    /// `now`: late grants to senders already released. (A DCAS restart keeps its
    /// deployment's generation, so "released" cannot be told by the deployment: a grant
    /// for a restarted sender may come before it is wired, and must wait for it.)
    fn forget_unclaimed(&self, now: Instant) {
        let mut outputs = lock(&self.inner.outputs);
        lock(&self.inner.unclaimed).retain(|c, since| {
            let keep = now.saturating_duration_since(*since) < UNCLAIMED_TTL;
            if !keep {
                outputs.remove(c);
            }
            keep
        });
    }

    /// Stops listening to `peer` for good (the job manager declared it dead; DESIGN §5): its
    /// channels fail or wait for rewiring, and a frame it sends after resuming from a pause
    /// closes its connection before reaching any channel.
    pub fn fence(&self, peer: TaskManagerId) {
        if !lock(&self.inner.fenced).insert(peer) {
            return;
        }
        warn!(peer = %peer, "Fencing a task manager declared dead.");
        if let Some(w) = lock(&self.inner.peers).get(&peer) {
            w.send_replace(None);
        }
        self.fail_channels_of(peer);
    }

    /// Closes the earlier incarnations of `channel` (same ends, a lower epoch): a sender
    /// waiting for credits its restarted receiver will never grant gives up (and detaches
    /// until rewired), and a receiver of a restarted sender sees its end. An epoch is the
    /// sum of its ends' attempts, which only rise, so a channel wired late from a stale
    /// placement leaves the newer incarnation alone.
    pub fn retire_older(&self, channel: ChannelId) {
        let older = |c: &ChannelId| {
            c.job == channel.job
                && c.generation == channel.generation
                && c.edge == channel.edge
                && c.from == channel.from
                && c.to == channel.to
                && c.epoch < channel.epoch
        };
        lock(&self.inner.outputs).retain(|c, o| {
            if older(c) {
                o.credits.close();
            }
            !older(c)
        });
        lock(&self.inner.inputs).retain(|c, (_, tx)| {
            if older(c) {
                tx.close(credit::CloseCause::Failed("restarted elsewhere".into()));
            }
            !older(c)
        });
    }

    fn is_fenced(&self, peer: TaskManagerId) -> bool {
        lock(&self.inner.fenced).contains(&peer)
    }

    /// Closes every channel through a connection that ended: receivers see their upstream
    /// disconnect and senders stop waiting for credits, so the job fails instead of stalling.
    fn fail_channels_of(&self, peer: TaskManagerId) {
        let why = format!("data-plane connection to task manager {peer} lost");
        lock(&self.inner.inputs).retain(|_, (p, tx)| {
            if *p == peer {
                tx.close(credit::CloseCause::Failed(why.clone()));
            }
            *p != peer
        });
        lock(&self.inner.outputs).retain(|_, o| {
            if o.peer == peer {
                o.credits.close();
            }
            o.peer != peer
        });
    }

    /// The connection to `peer`, establishing it (smaller id connects) or waiting for it.
    async fn conn(&self, peer: TaskManagerId, addr: &str) -> Result<Conn, NetError> {
        let unreachable = |reason: String| NetError::Unreachable {
            peer,
            addr: addr.to_string(),
            reason,
        };
        let gone = |reason: &str| NetError::Gone {
            peer,
            addr: addr.to_string(),
            reason: reason.to_string(),
        };
        const FENCED: &str = "declared dead by the job manager";
        if self.is_fenced(peer) {
            return Err(gone(FENCED));
        }
        if addr.is_empty() {
            // The job manager lists no address for a task manager it dropped from the job:
            // one lost while this deployment was being prepared, whose fencing may follow.
            return Err(gone("the job manager lists no address for it (lost)"));
        }
        let mut watch = self.peer_watch(peer);
        if let Some(c) = watch.borrow().clone() {
            return Ok(c);
        }
        if self.inner.tm < peer {
            let _guard = self.inner.connecting.lock().await;
            if let Some(c) = watch.borrow().clone() {
                return Ok(c);
            }
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| unreachable("connect timed out".into()))?
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => gone(&e.to_string()),
                    _ => unreachable(e.to_string()),
                })?;
            stream
                .set_nodelay(true)
                .map_err(|e| unreachable(e.to_string()))?;
            let hello = DataFrame::Hello { tm: self.inner.tm };
            return Ok(self.start_conn(stream, peer, Some(&hello)));
        }
        // Fencing the peer (declared dead) wakes the wait too ([`DataPlane::fence`]).
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            if let Some(c) = watch.borrow_and_update().clone() {
                return Ok(c);
            }
            if self.is_fenced(peer) {
                return Err(gone(FENCED));
            }
            match tokio::time::timeout_at(deadline, watch.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(unreachable("connection vanished".into())),
                Err(_) => return Err(unreachable("the peer did not connect in time".into())),
            }
        }
    }

    /// Opens (in the background) the connections this task manager is the one to open: to
    /// every peer in `peers` with a larger id. A peer with a smaller id then never waits
    /// for this side to happen to need a channel first (a DCAS restart can leave one side
    /// with nothing to wire to the other).
    pub fn connect_all(&self, peers: impl IntoIterator<Item = (TaskManagerId, String)>) {
        for (peer, addr) in peers {
            if peer <= self.inner.tm || self.is_fenced(peer) {
                continue;
            }
            let plane = self.clone();
            self.inner.rt.spawn(async move {
                if let Err(e) = plane.conn(peer, &addr).await {
                    debug!(peer = %peer, error = %e, "Could not connect ahead of wiring.");
                }
            });
        }
    }

    fn peer_watch(&self, peer: TaskManagerId) -> watch::Receiver<Option<Conn>> {
        lock(&self.inner.peers)
            .entry(peer)
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Starts reader and writer tasks for a connection and publishes it for `peer`, with
    /// `first` (the connecting side's `Hello`) queued before anything another task sends
    /// once the connection is published: queued after publishing, a credit frame of a
    /// channel registered meanwhile could go first, and the peer refuses the connection.
    fn start_conn(
        &self,
        stream: TcpStream,
        peer: TaskManagerId,
        first: Option<&DataFrame>,
    ) -> Conn {
        let (read, write) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self
            .inner
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn = Conn { id, tx };
        if let Some(frame) = first {
            send_frame(&conn, frame);
        }
        let writer = self.inner.rt.spawn(write_loop(write, rx, peer));
        let reader = self.clone();
        self.inner.rt.spawn(async move {
            let mut read = read;
            match reader.read_loop(&mut read, peer).await {
                Ok(()) => {}
                // A peer that died or was fenced: its recovery is the job manager's.
                Err(FrameError::Io(e)) if e.kind() != std::io::ErrorKind::InvalidData => {
                    warn!(peer = %peer, error = %e, "Data-plane connection lost.");
                }
                Err(e) => {
                    error!(peer = %peer, error = %e, "Data-plane connection closed on a bad frame.")
                }
            }
            writer.abort();
            reader.drop_peer(peer, id);
        });
        lock(&self.inner.peers)
            .entry(peer)
            .or_insert_with(|| watch::channel(None).0)
            .send_replace(Some(conn.clone()));
        conn
    }

    /// Forgets connection `id` to `peer` (not a newer one) and fails the channels through it.
    fn drop_peer(&self, peer: TaskManagerId, id: u64) {
        let peers = lock(&self.inner.peers);
        let Some(w) = peers.get(&peer) else { return };
        let current = w.send_if_modified(|c| {
            let matches = c.as_ref().is_some_and(|c| c.id == id);
            if matches {
                *c = None;
            }
            matches
        });
        drop(peers);
        if current {
            self.fail_channels_of(peer);
            debug!(peer = %peer, "Data-plane connection closed.");
        }
    }

    async fn accept_loop(self, listener: TcpListener) {
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "Data-plane accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let plane = self.clone();
            self.inner.rt.spawn(async move {
                if let Err(e) = plane.handshake(stream).await {
                    error!(remote = %from, error = %e, "Data-plane connection refused.");
                }
            });
        }
    }

    /// Reads the `Hello` of an inbound connection, then serves it.
    async fn handshake(&self, stream: TcpStream) -> Result<(), FrameError> {
        stream.set_nodelay(true)?;
        let mut stream = stream;
        let mut buf = AlignedVec::new();
        let hello = tokio::time::timeout(
            CONNECT_TIMEOUT,
            read_msg::<_, DataFrame>(&mut stream, &mut buf),
        )
        .await
        .map_err(|_| {
            FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no hello",
            ))
        })??;
        match hello {
            Some(DataFrame::Hello { tm }) if self.is_fenced(tm) => {
                Err(FrameError::Io(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("task manager {tm} is fenced"),
                )))
            }
            Some(DataFrame::Hello { tm }) => {
                info!(peer = %tm, "Data-plane peer connected.");
                self.start_conn(stream, tm, None);
                Ok(())
            }
            _ => Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "expected a hello frame",
            ))),
        }
    }

    async fn read_loop(
        &self,
        read: &mut tokio::net::tcp::OwnedReadHalf,
        peer: TaskManagerId,
    ) -> Result<(), FrameError> {
        let mut buf = AlignedVec::new();
        let mut read = buffered(read);
        while read_frame(&mut read, &mut buf).await? {
            if self.is_fenced(peer) {
                return Err(FrameError::Io(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("task manager {peer} is fenced"),
                )));
            }
            let frame = rkyv::access::<ArchivedDataFrame, rkyv::rancor::Error>(&buf)
                .map_err(|e| FrameError::Decode(CodecError(format!("invalid frame: {e}"))))?;
            match frame {
                ArchivedDataFrame::Event { channel, packed } => {
                    let bytes = packed.as_slice();
                    let event = Delivery {
                        event: packed::decode_event(bytes)?,
                        // Kept for a DCAS receiver to log as it came. Other receivers pay a
                        // copy of the packed bytes per frame (5 per keyed integer record).
                        packed: Some(bytes::Bytes::copy_from_slice(bytes)),
                    };
                    self.deliver(ChannelId::from_archived(channel), event, peer)?
                }
                ArchivedDataFrame::Credit { channel, credits } => {
                    let channel = ChannelId::from_archived(channel);
                    // The sender may not have registered yet: the grant waits for it.
                    let mut outputs = lock(&self.inner.outputs);
                    if !outputs.contains_key(&channel) {
                        lock(&self.inner.unclaimed).insert(channel, Instant::now());
                    }
                    let sem = output_of(&mut outputs, channel, peer).credits;
                    drop(outputs);
                    let n = credits.to_native() as usize;
                    if sem.available_permits() + n > Semaphore::MAX_PERMITS / 2 {
                        return Err(FrameError::Io(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("peer {peer} granted an absurd number of credits"),
                        )));
                    }
                    sem.add_permits(n);
                }
                ArchivedDataFrame::Logged { channel, next_seq } => {
                    let channel = ChannelId::from_archived(channel);
                    // An ack for a channel not (or no longer) sent to this peer is dropped:
                    // acks only hurry what the progress exchange tells anyway.
                    if let Some(o) = lock(&self.inner.outputs)
                        .get(&channel)
                        .filter(|o| o.peer == peer)
                    {
                        o.logged.fetch_max(next_seq.to_native(), Ordering::AcqRel);
                    }
                }
                ArchivedDataFrame::Hello { .. } => {
                    return Err(FrameError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "unexpected hello",
                    )))
                }
            }
        }
        Ok(())
    }

    fn deliver(
        &self,
        channel: ChannelId,
        event: Delivery,
        peer: TaskManagerId,
    ) -> Result<(), FrameError> {
        let inputs = lock(&self.inner.inputs);
        let Some((_, tx)) = inputs.get(&channel) else {
            debug!(peer = %peer, job = %channel.job, "Event for an unknown channel dropped.");
            return Ok(());
        };
        match tx.try_send(event) {
            Ok(Ok(())) => Ok(()),
            // The subtask is gone (canceled): its remaining input does not matter.
            Err(_) => Ok(()),
            Ok(Err(_)) => Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("peer {peer} sent on channel {channel:?} without a credit"),
            ))),
        }
    }
}

async fn write_loop(
    write: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<AlignedVec>,
    peer: TaskManagerId,
) {
    let mut w = BufWriter::with_capacity(1 << 16, write);
    while let Some(frame) = rx.recv().await {
        if let Err(e) = write_frame(&mut w, &frame).await {
            warn!(peer = %peer, error = %e, "Data-plane write failed.");
            return;
        }
        // Flush only when nothing else is queued: many frames share one syscall.
        while let Ok(frame) = rx.try_recv() {
            if write_frame(&mut w, &frame).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}

/// Output channel `channel` to `peer`. A registration for another peer (the receiver's
/// earlier instance, before a DCAS restart moved it) is replaced, and its waiting sender
/// gives up.
fn output_of(
    outputs: &mut HashMap<ChannelId, Output>,
    channel: ChannelId,
    peer: TaskManagerId,
) -> Output {
    let entry = outputs.entry(channel).or_insert_with(|| Output::new(peer));
    if entry.peer != peer {
        entry.credits.close();
        *entry = Output::new(peer);
    }
    entry.clone()
}

fn send_frame(conn: &Conn, frame: &DataFrame) {
    match encode(frame) {
        // A closed connection drops the frame: its channels fail on their next send.
        Ok(bytes) => {
            let _ = conn.tx.send(bytes);
        }
        Err(e) => error!(error = %e, "Data-plane frame could not be encoded."),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections here never panic; recover from poisoning anyway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sending end of a channel whose receiver is on another task manager.
pub struct RemoteSender {
    channel: ChannelId,
    /// Credits granted by the receiver.
    credits: Arc<Semaphore>,
    /// DCAS: what the receiver acked as logged.
    logged: Arc<AtomicU64>,
    conn: Conn,
}

impl RemoteSender {
    /// DCAS: the seq below which the receiver has logged every record (its acks; 0 before
    /// any).
    pub fn receiver_logged(&self) -> u64 {
        self.logged.load(Ordering::Acquire)
    }

    /// Sends if a credit is free; gives the event back otherwise.
    pub fn try_send(&self, event: Delivery) -> Result<Result<(), Delivery>, credit::Disconnected> {
        match self.credits.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.write(event).map(Ok)
            }
            Err(tokio::sync::TryAcquireError::Closed) => Err(credit::Disconnected),
            Err(tokio::sync::TryAcquireError::NoPermits) => Ok(Err(event)),
        }
    }

    /// Sends, waiting for a credit.
    pub async fn send(&self, event: Delivery) -> Result<(), credit::Disconnected> {
        let permit = self
            .credits
            .acquire()
            .await
            .map_err(|_| credit::Disconnected)?;
        permit.forget();
        self.write(event)
    }

    /// Writes `event` as it was packed, or packs it.
    fn write(&self, event: Delivery) -> Result<(), credit::Disconnected> {
        let packed = event.packed.unwrap_or_else(|| {
            let mut out = Vec::with_capacity(packed::size_hint(&event.event));
            packed::encode_event(&event.event, &mut out);
            out.into()
        });
        let capacity = packed.len() + 64;
        let frame = DataFrame::Event {
            channel: self.channel,
            packed,
        };
        let bytes = encode_sized(&frame, capacity).map_err(|_| credit::Disconnected)?;
        if bytes.len() > MAX_FRAME {
            // The router splits batches to `batch_size`; a single huge record still cannot
            // go: fail this channel rather than the connection every channel shares.
            error!(channel = ?self.channel, bytes = bytes.len(), "Event too large for a frame.");
            return Err(credit::Disconnected);
        }
        self.conn.tx.send(bytes).map_err(|_| credit::Disconnected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Batch, Record, StreamEvent};
    use crate::value::Value;

    fn channel(n: u32) -> ChannelId {
        ChannelId {
            job: JobId(1),
            generation: Generation(1),
            edge: 0,
            from: n,
            to: 0,
            epoch: 0,
        }
    }

    async fn pair() -> (DataPlane, DataPlane) {
        let a = DataPlane::bind(TaskManagerId(1), "127.0.0.1:0")
            .await
            .unwrap();
        let b = DataPlane::bind(TaskManagerId(2), "127.0.0.1:0")
            .await
            .unwrap();
        (a, b)
    }

    /// Ensures events cross task managers in order, and that the sender stops at the
    /// receiver's credits until the receiver consumes.
    #[tokio::test]
    async fn events_flow_under_credits() {
        let (a, b) = pair().await;
        let (a2, b2) = (a.clone(), b.clone());
        let (b_addr, a_addr) = (b.local_addr().to_string(), a.local_addr().to_string());
        let recv = tokio::spawn(async move {
            b2.register_input(channel(0), TaskManagerId(1), &a_addr, 2)
                .await
                .unwrap()
        });
        let send = a2
            .register_output(channel(0), TaskManagerId(2), &b_addr)
            .await
            .unwrap();
        let mut rx = recv.await.unwrap();
        for i in 0..2 {
            let batch = Batch {
                first_seq: i,
                records: vec![Record::new(i as i64, Value::Int(i as i64))],
            };
            send.send(StreamEvent::Data(batch).into()).await.unwrap();
        }
        let third = tokio::time::timeout(
            Duration::from_millis(100),
            send.send(StreamEvent::Watermark(5).into()),
        )
        .await;
        assert!(
            third.is_err(),
            "no third credit before the receiver consumes"
        );
        for i in 0..2 {
            let got = rx.recv().await.unwrap();
            // The receiver keeps the bytes the event came as (a DCAS receiver logs them).
            let packed = got.packed.expect("the frame's bytes");
            assert_eq!(packed::decode_event(&packed).unwrap(), got.event);
            match got.event {
                StreamEvent::Data(b) => assert_eq!(b.first_seq, i),
                other => panic!("{other:?}"),
            }
        }
        let wm = send.send(StreamEvent::Watermark(5).into());
        tokio::time::timeout(Duration::from_secs(5), wm)
            .await
            .unwrap()
            .unwrap();
        let got = rx.recv().await.unwrap();
        assert_eq!(got.event, StreamEvent::Watermark(5));
    }

    /// A receiver's log ack travels back over the connection to its sender, only rising.
    #[tokio::test]
    async fn logged_acks_reach_the_remote_sender() {
        let (a, b) = pair().await;
        let (b2, a_addr) = (b.clone(), a.local_addr().to_string());
        let recv = tokio::spawn(async move {
            b2.register_input(channel(0), TaskManagerId(1), &a_addr, 2)
                .await
                .unwrap()
        });
        let send = a
            .register_output(channel(0), TaskManagerId(2), &b.local_addr().to_string())
            .await
            .unwrap();
        let rx = recv.await.unwrap();
        assert_eq!(send.receiver_logged(), 0);
        rx.ack_logged(42);
        assert!(
            eventually(|| send.receiver_logged() == 42).await,
            "ack not received"
        );
        rx.ack_logged(7);
        rx.ack_logged(50);
        assert!(
            eventually(|| send.receiver_logged() == 50).await,
            "ack not received"
        );
    }

    /// Ensures retiring a channel's older incarnations closes those only: a channel wired
    /// from a stale placement (lower epoch) must not close the one that replaced it.
    #[tokio::test]
    async fn retiring_closes_only_lower_epochs() {
        // The smaller id connects: `a` registers, so it need not wait for `b`.
        let (a, b) = pair().await;
        let b_addr = b.local_addr().to_string();
        let at = |epoch| ChannelId {
            epoch,
            ..channel(3)
        };
        let register = |epoch| a.register_input(at(epoch), TaskManagerId(2), &b_addr, 1);
        let mut newer = register(2).await.unwrap();
        let mut older = register(1).await.unwrap();
        async fn open(rx: &mut credit::Receiver) -> bool {
            let pending = tokio::time::timeout(Duration::from_millis(50), rx.recv());
            pending.await.is_err()
        }
        a.retire_older(at(1));
        assert!(
            open(&mut newer).await,
            "a stale rewire keeps the newer channel"
        );
        assert!(open(&mut older).await, "an epoch does not retire itself");
        a.retire_older(at(2));
        assert!(open(&mut newer).await);
        assert!(!open(&mut older).await, "the older incarnation is closed");
    }

    /// Whether `pred` holds within 5 s, polled every 5 ms.
    async fn eventually(pred: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pred() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pred()
    }

    /// Ensures credits granted before their sender registers wait for it, also in a
    /// deployment released here before (a DCAS restart keeps the generation; its receiver
    /// may be wired first), and that grants nobody claims are forgotten in the end.
    #[tokio::test]
    async fn early_grants_wait_for_their_sender_and_unclaimed_ones_expire() {
        let (a, b) = pair().await;
        let (a_addr, b_addr) = (a.local_addr().to_string(), b.local_addr().to_string());
        let c = channel(4);
        // `a` connects (the smaller id does), with a channel of another deployment.
        let other = ChannelId {
            generation: Generation(2),
            ..c
        };
        let _other = a.register_output(other, TaskManagerId(2), &b_addr).await;
        a.release(c.job, c.generation);
        let restarted = ChannelId { epoch: 1, ..c };
        let _rx = b
            .register_input(restarted, TaskManagerId(1), &a_addr, 1)
            .await
            .unwrap();
        let unclaimed = || lock(&a.inner.unclaimed).contains_key(&restarted);
        assert!(
            eventually(unclaimed).await,
            "the grant came before the sender"
        );
        let send = a
            .register_output(restarted, TaskManagerId(2), &b_addr)
            .await
            .unwrap();
        assert!(!unclaimed(), "claimed by its sender");
        let wm = send.send(StreamEvent::Watermark(1).into());
        let sent = tokio::time::timeout(Duration::from_secs(5), wm).await;
        assert!(sent.is_ok(), "the restarted sender has its credit");
        // A late grant for a sender released here: kept for a while, then forgotten.
        let late = ChannelId { epoch: 2, ..c };
        let _rx = b
            .register_input(late, TaskManagerId(1), &a_addr, 1)
            .await
            .unwrap();
        let held = || lock(&a.inner.outputs).contains_key(&late);
        assert!(eventually(held).await);
        a.forget_unclaimed(Instant::now() + UNCLAIMED_TTL / 2);
        assert!(held(), "not before its time");
        a.forget_unclaimed(Instant::now() + UNCLAIMED_TTL);
        assert!(!held(), "forgotten");
        assert!(lock(&a.inner.unclaimed).is_empty());
    }

    /// Ensures garbage on the data-plane port closes that connection only: the server keeps
    /// accepting and serving well-behaved peers.
    #[tokio::test]
    async fn malformed_frames_close_only_their_connection() {
        let (a, b) = pair().await;
        let addr = b.local_addr();
        let attacks: Vec<Vec<u8>> = vec![
            vec![0xff, 0xff, 0xff, 0x7f],                          // absurd length
            vec![10, 0, 0, 0, 1, 2, 3],                            // truncated
            [8u32.to_le_bytes().to_vec(), vec![0xAB; 8]].concat(), // undecodable hello
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ];
        for bytes in attacks {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            drop(s);
        }
        // A valid hello from an unknown peer, then a bad frame on the open connection: a
        // corrupted one, and a valid frame whose packed event does not decode.
        let mut corrupted = encode(&DataFrame::Credit {
            channel: channel(7),
            credits: 1,
        })
        .unwrap()
        .to_vec();
        let n = corrupted.len();
        corrupted[n / 2] ^= 0xff;
        corrupted.truncate(n - 1);
        let garbage_event = encode(&DataFrame::Event {
            channel: channel(7),
            packed: bytes::Bytes::from_static(&[0, 5, 200, 1, 0xff]),
        })
        .unwrap()
        .to_vec();
        for bad in [corrupted, garbage_event] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let hello = encode(&DataFrame::Hello {
                tm: TaskManagerId(99),
            })
            .unwrap();
            write_frame(&mut s, &hello).await.unwrap();
            write_frame(&mut s, &bad).await.unwrap();
            let mut probe = [0u8; 1];
            let closed = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read(&mut s, &mut probe),
            )
            .await;
            assert!(
                matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
                "the bad connection is closed: {closed:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let a_addr = a.local_addr().to_string();
        let b2 = b.clone();
        let recv = tokio::spawn(async move {
            b2.register_input(channel(1), TaskManagerId(1), &a_addr, 4)
                .await
                .unwrap()
        });
        let send = a
            .register_output(channel(1), TaskManagerId(2), &addr.to_string())
            .await
            .unwrap();
        let mut rx = recv.await.unwrap();
        send.send(StreamEvent::EndOfStream.into()).await.unwrap();
        assert_eq!(rx.recv().await.unwrap().event, StreamEvent::EndOfStream);
    }
}
