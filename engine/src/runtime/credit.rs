//! `credit::channel`: a single-producer, single-consumer queue (of stream events, as
//! [`Delivery`]s, unless said otherwise) with credit-based flow control and batched credit
//! announcements.
//!
//! The receiver grants `credits` slots; each event sent uses one. Consumed slots are handed
//! back to the sender in groups of half the credits (or when the queue runs empty), so a
//! sender that ran out of credits is woken once per group rather than once per event: with a
//! pipeline bound by its consumer, the consumer pays one wake-up per `credits / 2` batches
//! instead of one per batch. This is how Flink announces credits too; the network data plane
//! sends the same grants in frames.
//!
//! Invariant: events in the queue + credits held back by the receiver + free credits ==
//! `credits`, so at most `credits` events are ever buffered.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::record::Delivery;

/// The other side is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnected;

/// Why a sender closed the channel before `EndOfStream`, when it says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseCause {
    /// The deployment was released (canceled): the receiver should stop quietly.
    Released,
    /// The channel broke (e.g. the connection to the sending task manager was lost).
    Failed(String),
    /// The sending subtask failed, and reports why itself: the receiver's stop is only a
    /// consequence.
    UpstreamFailed,
}

struct State<T> {
    queue: VecDeque<T>,
    /// Credits the sender may use now.
    free: usize,
    /// Credits consumed by the receiver but not yet announced to the sender.
    held: usize,
    /// Parked receiver, woken by the next send.
    receiver: Option<Waker>,
    /// Parked sender, woken when credits are announced.
    sender: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
    /// Set by `Sender::close`.
    cause: Option<CloseCause>,
}

/// Called with the number of credits announced, for a sender in another process.
pub type Announcer = Box<dyn Fn(usize) + Send + Sync>;

/// Called with the seq below which the receiver logged its input (DCAS), for a sender in
/// another process.
pub type Acker = Box<dyn Fn(u64) + Send + Sync>;

struct Shared<T> {
    state: Mutex<State<T>>,
    credits: usize,
    /// Announce held credits once this many accumulated.
    announce_at: usize,
    /// Also tells a remote sender about announced credits (network channels).
    announcer: Option<Announcer>,
    /// DCAS: the receiver logged every record below this seq ([`Receiver::ack_logged`]).
    logged: AtomicU64,
    /// Also tells a remote sender about `logged` (network channels).
    acker: Option<Acker>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // The critical sections never panic, so the lock cannot be poisoned; recover anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Creates a channel granting `credits` events (at least 1).
pub fn channel<T>(credits: usize) -> (Sender<T>, Receiver<T>) {
    make(credits, None, None)
}

/// Creates a channel whose announcements are also passed to `announcer`, and its
/// receiver's log acks to `acker`: the receiving end of a network channel, fed by the
/// connection reader through the `Sender`, with the remote sender's credits mirroring this
/// channel's.
pub fn channel_with_announcer<T>(
    credits: usize,
    announcer: Announcer,
    acker: Acker,
) -> (Sender<T>, Receiver<T>) {
    make(credits, Some(announcer), Some(acker))
}

fn make<T>(
    credits: usize,
    announcer: Option<Announcer>,
    acker: Option<Acker>,
) -> (Sender<T>, Receiver<T>) {
    let credits = credits.max(1);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::with_capacity(credits),
            free: credits,
            held: 0,
            receiver: None,
            sender: None,
            sender_gone: false,
            receiver_gone: false,
            cause: None,
        }),
        credits,
        announce_at: (credits / 2).max(1),
        announcer,
        logged: AtomicU64::new(0),
        acker,
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// Sending half (of a channel carrying [`Delivery`]s unless said otherwise).
pub struct Sender<T = Delivery> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Sends `event` if a credit is free; gives it back otherwise.
    pub fn try_send(&self, event: T) -> Result<Result<(), T>, Disconnected> {
        let mut st = self.shared.lock();
        if st.receiver_gone {
            return Err(Disconnected);
        }
        if st.free == 0 {
            return Ok(Err(event));
        }
        st.free -= 1;
        st.queue.push_back(event);
        let wake = st.receiver.take();
        drop(st);
        if let Some(w) = wake {
            w.wake();
        }
        Ok(Ok(()))
    }

    /// Sends `event`, waiting for a credit.
    pub async fn send(&self, event: T) -> Result<(), Disconnected> {
        let mut event = Some(event);
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            if st.receiver_gone {
                return Poll::Ready(Err(Disconnected));
            }
            if st.free == 0 {
                st.sender = Some(cx.waker().clone());
                return Poll::Pending;
            }
            st.free -= 1;
            // `event` is taken exactly once: this branch returns Ready.
            if let Some(ev) = event.take() {
                st.queue.push_back(ev);
            }
            let wake = st.receiver.take();
            drop(st);
            if let Some(w) = wake {
                w.wake();
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Closes the channel for the receiver, saying why (events already queued are still
    /// delivered first).
    pub fn close(&self, cause: CloseCause) {
        let mut st = self.shared.lock();
        st.cause.get_or_insert(cause);
        st.sender_gone = true;
        let wake = st.receiver.take();
        drop(st);
        if let Some(w) = wake {
            w.wake();
        }
    }

    /// Events buffered or held back (credits in use).
    pub fn in_flight(&self) -> usize {
        self.shared.credits - self.shared.lock().free
    }

    /// DCAS: the seq below which the receiver has logged every record (its acks; 0 before
    /// any).
    pub fn receiver_logged(&self) -> u64 {
        self.shared.logged.load(Ordering::Acquire)
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.sender_gone = true;
        let wake = st.receiver.take();
        drop(st);
        if let Some(w) = wake {
            w.wake();
        }
    }
}

/// Receiving half.
pub struct Receiver<T = Delivery> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next event; `Ready(None)` once the sender is gone and the queue is empty.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut st = self.shared.lock();
        match st.queue.pop_front() {
            Some(ev) => {
                st.held += 1;
                let mut wake = None;
                let mut announced = 0;
                if st.held >= self.shared.announce_at || st.queue.is_empty() {
                    announced = st.held;
                    st.free += st.held;
                    st.held = 0;
                    wake = st.sender.take();
                }
                drop(st);
                if let Some(w) = wake {
                    w.wake();
                }
                if let (Some(announce), true) = (&self.shared.announcer, announced > 0) {
                    announce(announced);
                }
                Poll::Ready(Some(ev))
            }
            None if st.sender_gone => Poll::Ready(None),
            None => {
                st.receiver = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// DCAS: every record below `next_seq` is in this receiver's input log. Tells the
    /// sender (through the acker of a network channel) when it moves the ack forward.
    pub fn ack_logged(&self, next_seq: u64) {
        if self.shared.logged.fetch_max(next_seq, Ordering::AcqRel) < next_seq {
            if let Some(ack) = &self.shared.acker {
                ack(next_seq);
            }
        }
    }

    /// Why the sender closed the channel, if it said.
    pub fn close_cause(&self) -> Option<CloseCause> {
        self.shared.lock().cause.clone()
    }

    /// The next event, waiting for one.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.receiver_gone = true;
        st.queue.clear();
        let wake = st.sender.take();
        drop(st);
        if let Some(w) = wake {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::StreamEvent;
    use std::time::Duration;

    fn wm(n: i64) -> StreamEvent {
        StreamEvent::Watermark(n)
    }

    /// Ensures a sender never has more than `credits` events outstanding, and that credits
    /// come back in groups.
    #[tokio::test]
    async fn credits_bound_the_queue() {
        let (tx, mut rx) = channel(4);
        for i in 0..4 {
            tx.send(wm(i)).await.unwrap();
        }
        assert_eq!(tx.in_flight(), 4);
        assert!(matches!(tx.try_send(wm(9)), Ok(Err(_))), "no fifth credit");
        assert_eq!(rx.recv().await, Some(wm(0)));
        assert_eq!(tx.in_flight(), 4, "one consumed credit is held back");
        assert_eq!(rx.recv().await, Some(wm(1)));
        assert_eq!(tx.in_flight(), 2, "two are announced together");
        tx.send(wm(4)).await.unwrap();
        tx.send(wm(5)).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_millis(30), tx.send(wm(6))).await;
        assert!(blocked.is_err(), "sender waits without credits");
        for i in 2..6 {
            assert_eq!(rx.recv().await, Some(wm(i)));
        }
        assert_eq!(tx.in_flight(), 0, "an empty queue announces everything");
    }

    /// Ensures a blocked sender is woken by announced credits, across threads.
    #[test]
    fn blocked_sender_resumes() {
        let (tx, mut rx) = channel(2);
        let producer = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                for i in 0..10_000 {
                    tx.send(wm(i)).await.unwrap();
                }
            });
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let mut n = 0;
            while let Some(ev) = rx.recv().await {
                assert_eq!(ev, wm(n));
                n += 1;
            }
            n
        });
        producer.join().unwrap();
        assert_eq!(got, 10_000);
    }

    #[tokio::test]
    async fn closing_either_side_is_seen() {
        let (tx, mut rx) = channel(2);
        tx.send(wm(1)).await.unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(wm(1)));
        assert_eq!(rx.recv().await, None);

        let (tx, rx) = channel(1);
        tx.send(wm(1)).await.unwrap();
        let waiting = tokio::spawn(async move { tx.send(wm(2)).await });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(Disconnected));
    }
}
