//! `ResourceManager`: the registry of task managers and the failure detector.
//!
//! Receives `Register`, `Heartbeat` and `Disconnected` from control connections, queries and
//! `KillTaskManager` from the REST API. Emits `TaskManagerLost` to the dispatcher and
//! forwards heartbeat counters to it.
//! Invariant: a task manager is declared dead exactly once, either when its control
//! connection drops or `heartbeat_timeout` after its last heartbeat, whichever is first, and
//! a dead task manager is never offered for scheduling.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use engine::ids::TaskManagerId;
use engine::protocol::control::{SubtaskReport, ToTaskManager};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::now_ms;

/// Child processes started by `jobmanager local`, by pid: "kill" sends them SIGKILL.
pub type LocalProcesses = Arc<Mutex<HashMap<u32, tokio::process::Child>>>;

/// One registered task manager.
struct Entry {
    slots: u32,
    data_addr: String,
    pid: u32,
    registered_ms: u64,
    last_heartbeat: Instant,
    last_heartbeat_ms: u64,
    /// Gaps between the last heartbeats, in ms (for the dashboard).
    heartbeat_gaps: VecDeque<u64>,
    /// Where control messages to it go; None once dead.
    tx: Option<mpsc::UnboundedSender<ToTaskManager>>,
    /// The control connection it registered on.
    conn: u64,
    /// Closes that connection (a task manager declared dead must notice and stop).
    close: Arc<tokio::sync::Notify>,
    died_ms: Option<u64>,
    death_reason: Option<String>,
}

/// What the REST API and scheduler see of a task manager.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TaskManagerView {
    /// Task manager id.
    pub id: String,
    /// Slots offered.
    pub slots: u32,
    /// Data-plane address.
    pub data_addr: String,
    /// Process id.
    pub pid: u32,
    /// `ALIVE` or `DEAD`.
    pub state: &'static str,
    /// Registration time (ms since the epoch).
    pub registered: u64,
    /// Last heartbeat (ms since the epoch).
    pub last_heartbeat: u64,
    /// Milliseconds since the last heartbeat.
    pub heartbeat_age_ms: u64,
    /// Recent gaps between heartbeats, in ms, oldest first.
    pub heartbeat_gaps_ms: Vec<u64>,
    /// When it was declared dead (ms since the epoch).
    pub died: Option<u64>,
    /// Why it was declared dead.
    pub death_reason: Option<String>,
    /// Started by this job manager (`jobmanager local`).
    pub local_process: bool,
}

/// A task manager event, kept for the REST API.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ClusterEvent {
    /// When (ms since the epoch).
    pub at: u64,
    /// Which task manager.
    pub taskmanager: String,
    /// `REGISTERED` or `LOST`.
    pub kind: &'static str,
    /// Details (why it was lost).
    pub detail: String,
}

/// The registry actor.
pub struct ResourceManager {
    tms: BTreeMap<TaskManagerId, Entry>,
    timeout: Duration,
    events: Vec<ClusterEvent>,
    lost: Vec<Recipient<TaskManagerLost>>,
    reports: Option<Recipient<Reports>>,
    local: LocalProcesses,
    /// When heartbeats were last checked.
    last_check: Option<Instant>,
}

impl ResourceManager {
    /// A registry declaring task managers dead after `timeout` without heartbeats.
    pub fn new(timeout: Duration, local: LocalProcesses) -> ResourceManager {
        ResourceManager {
            tms: BTreeMap::new(),
            timeout,
            events: Vec::new(),
            lost: Vec::new(),
            reports: None,
            local,
            last_check: None,
        }
    }

    fn view(&self, id: &TaskManagerId, e: &Entry) -> TaskManagerView {
        TaskManagerView {
            id: id.to_string(),
            slots: e.slots,
            data_addr: e.data_addr.clone(),
            pid: e.pid,
            state: if e.tx.is_some() { "ALIVE" } else { "DEAD" },
            registered: e.registered_ms,
            last_heartbeat: e.last_heartbeat_ms,
            heartbeat_age_ms: e.last_heartbeat.elapsed().as_millis() as u64,
            heartbeat_gaps_ms: e.heartbeat_gaps.iter().copied().collect(),
            died: e.died_ms,
            death_reason: e.death_reason.clone(),
            local_process: self
                .local
                .lock()
                .map(|l| l.contains_key(&e.pid))
                .unwrap_or(false),
        }
    }

    /// How often heartbeats are checked: often relative to the timeout, so detection lands
    /// within about the timeout + 25 ms.
    fn check_every(&self) -> Duration {
        (self.timeout / 20).clamp(Duration::from_millis(5), Duration::from_millis(25))
    }

    /// Declares dead every live task manager silent for longer than the timeout at `now`.
    ///
    /// A check that comes late means this process stalled (stopped, starved of CPU, a long
    /// blocking call): the heartbeats that arrived meanwhile are still unread, so the time
    /// of the stall is not counted against any task manager. Without that, one stall of a
    /// timeout would declare every task manager dead at once, and with them every copy of
    /// the cache. Declaring a task manager dead later than its timeout is safe: its lease
    /// (shorter than the timeout, counted from its heartbeat) has made it stop before.
    fn check_heartbeats(&mut self, now: Instant) {
        let every = self.check_every();
        let stall = self
            .last_check
            .replace(now)
            .map(|last| now.saturating_duration_since(last).saturating_sub(every))
            .unwrap_or_default();
        if stall > every {
            warn!(stall_ms = stall.as_millis() as u64, "The job manager stalled: not counting the stall against task managers' heartbeats.");
            for e in self.tms.values_mut().filter(|e| e.tx.is_some()) {
                e.last_heartbeat = (e.last_heartbeat + stall).min(now);
            }
        }
        let expired: Vec<TaskManagerId> = self
            .tms
            .iter()
            .filter(|(_, e)| {
                e.tx.is_some() && now.saturating_duration_since(e.last_heartbeat) > self.timeout
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let ms = self.timeout.as_millis();
            self.declare_dead(id, format!("no heartbeat for {ms} ms"));
        }
    }

    fn declare_dead(&mut self, id: TaskManagerId, reason: String) {
        let Some(e) = self.tms.get_mut(&id) else {
            return;
        };
        if e.tx.is_none() {
            return;
        }
        e.tx = None;
        // A silent (paused, partitioned) task manager must not keep running its subtasks:
        // closing its connection makes it stop them when it wakes up.
        e.close.notify_one();
        e.died_ms = Some(now_ms());
        e.death_reason = Some(reason.clone());
        let silent_ms = e.last_heartbeat.elapsed().as_millis() as u64;
        warn!(tm = %id, reason = %reason, silent_ms, "Task manager declared dead.");
        self.events.push(ClusterEvent {
            at: now_ms(),
            taskmanager: id.to_string(),
            kind: "LOST",
            detail: reason.clone(),
        });
        for lost in &self.lost {
            lost.do_send(TaskManagerLost {
                tm: id,
                reason: reason.clone(),
            });
        }
    }
}

impl Actor for ResourceManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.check_every(), |act, _| {
            act.check_heartbeats(Instant::now())
        });
    }
}

/// Subscribers to task manager losses and heartbeat counters.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    /// Told about lost task managers.
    pub lost: Vec<Recipient<TaskManagerLost>>,
    /// Given every heartbeat's counters.
    pub reports: Recipient<Reports>,
}

impl Handler<Subscribe> for ResourceManager {
    type Result = ();
    fn handle(&mut self, msg: Subscribe, _ctx: &mut Self::Context) {
        self.lost = msg.lost;
        self.reports = Some(msg.reports);
    }
}

/// A task manager registered over a control connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    /// Its id.
    pub tm: TaskManagerId,
    /// Slots it offers.
    pub slots: u32,
    /// Its data-plane address.
    pub data_addr: String,
    /// Its process id.
    pub pid: u32,
    /// Control messages to it.
    pub tx: mpsc::UnboundedSender<ToTaskManager>,
    /// Serial number of the control connection.
    pub conn: u64,
    /// Notified to close that connection.
    pub close: Arc<tokio::sync::Notify>,
}

impl Handler<Register> for ResourceManager {
    type Result = ();
    fn handle(&mut self, msg: Register, _ctx: &mut Self::Context) {
        self.register(msg);
    }
}

impl ResourceManager {
    fn register(&mut self, msg: Register) {
        info!(tm = %msg.tm, slots = msg.slots, data = %msg.data_addr, pid = msg.pid, "Task manager registered.");
        self.events.push(ClusterEvent {
            at: now_ms(),
            taskmanager: msg.tm.to_string(),
            kind: "REGISTERED",
            detail: format!("{} slots, data plane {}", msg.slots, msg.data_addr),
        });
        self.tms.insert(
            msg.tm,
            Entry {
                slots: msg.slots,
                data_addr: msg.data_addr,
                pid: msg.pid,
                registered_ms: now_ms(),
                last_heartbeat: Instant::now(),
                last_heartbeat_ms: now_ms(),
                heartbeat_gaps: VecDeque::new(),
                tx: Some(msg.tx),
                conn: msg.conn,
                close: msg.close,
                died_ms: None,
                death_reason: None,
            },
        );
    }
}

/// Counters from a heartbeat, for the dispatcher.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reports(pub Vec<SubtaskReport>);

/// A heartbeat arrived.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Heartbeat {
    /// From whom.
    pub tm: TaskManagerId,
    /// Its subtasks' counters.
    pub subtasks: Vec<SubtaskReport>,
}

impl Handler<Heartbeat> for ResourceManager {
    type Result = ();
    fn handle(&mut self, msg: Heartbeat, _ctx: &mut Self::Context) {
        let Some(e) = self.tms.get_mut(&msg.tm) else {
            return;
        };
        if e.tx.is_none() {
            return; // declared dead: late heartbeats do not revive it
        }
        let gap = e.last_heartbeat.elapsed().as_millis() as u64;
        e.heartbeat_gaps.push_back(gap);
        if e.heartbeat_gaps.len() > 60 {
            e.heartbeat_gaps.pop_front();
        }
        e.last_heartbeat = Instant::now();
        e.last_heartbeat_ms = now_ms();
        if let (Some(r), false) = (&self.reports, msg.subtasks.is_empty()) {
            r.do_send(Reports(msg.subtasks));
        }
    }
}

/// A control connection closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected {
    /// Whose.
    pub tm: TaskManagerId,
    /// Which connection (a late close of an older one must not kill a newer registration).
    pub conn: u64,
}

impl Handler<Disconnected> for ResourceManager {
    type Result = ();
    fn handle(&mut self, msg: Disconnected, _ctx: &mut Self::Context) {
        if self.tms.get(&msg.tm).is_some_and(|e| e.conn == msg.conn) {
            self.declare_dead(msg.tm, "control connection closed".into());
        }
    }
}

/// A task manager was declared dead.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct TaskManagerLost {
    /// Which.
    pub tm: TaskManagerId,
    /// Why.
    pub reason: String,
}

/// Alive task managers with their senders, for scheduling.
#[derive(Clone)]
pub struct Alive {
    /// Id.
    pub id: TaskManagerId,
    /// Slots offered.
    pub slots: u32,
    /// Data-plane address.
    pub data_addr: String,
    /// Control messages to it.
    pub tx: mpsc::UnboundedSender<ToTaskManager>,
}

/// Lists alive task managers.
#[derive(Message)]
#[rtype(result = "Vec<Alive>")]
pub struct GetAlive;

impl Handler<GetAlive> for ResourceManager {
    type Result = MessageResult<GetAlive>;
    fn handle(&mut self, _msg: GetAlive, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.tms
                .iter()
                .filter_map(|(id, e)| {
                    e.tx.as_ref().map(|tx| Alive {
                        id: *id,
                        slots: e.slots,
                        data_addr: e.data_addr.clone(),
                        tx: tx.clone(),
                    })
                })
                .collect(),
        )
    }
}

/// Lists every task manager (alive and dead).
#[derive(Message)]
#[rtype(result = "Vec<TaskManagerView>")]
pub struct ListTaskManagers;

impl Handler<ListTaskManagers> for ResourceManager {
    type Result = MessageResult<ListTaskManagers>;
    fn handle(&mut self, _msg: ListTaskManagers, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.tms.iter().map(|(id, e)| self.view(id, e)).collect())
    }
}

/// Recent task manager events.
#[derive(Message)]
#[rtype(result = "Vec<ClusterEvent>")]
pub struct GetEvents;

impl Handler<GetEvents> for ResourceManager {
    type Result = MessageResult<GetEvents>;
    fn handle(&mut self, _msg: GetEvents, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.events.clone())
    }
}

/// Crash a task manager: SIGKILL for one this job manager started, `Abort` otherwise.
#[derive(Message)]
#[rtype(result = "Result<&'static str, String>")]
pub struct KillTaskManager(pub TaskManagerId);

impl Handler<KillTaskManager> for ResourceManager {
    type Result = Result<&'static str, String>;
    fn handle(&mut self, msg: KillTaskManager, _ctx: &mut Self::Context) -> Self::Result {
        let Some(e) = self.tms.get(&msg.0) else {
            return Err("unknown task manager".into());
        };
        if e.tx.is_none() {
            return Err("task manager is already dead".into());
        }
        let mut local = self
            .local
            .lock()
            .map_err(|_| "process table poisoned".to_string())?;
        if let Some(child) = local.get_mut(&e.pid) {
            error!(tm = %msg.0, pid = e.pid, "Killing task manager process (SIGKILL).");
            child
                .start_kill()
                .map_err(|err| format!("kill failed: {err}"))?;
            return Ok("SIGKILL");
        }
        drop(local);
        error!(tm = %msg.0, "Asking remote task manager to abort.");
        if let Some(tx) = &e.tx {
            let _ = tx.send(ToTaskManager::Abort);
        }
        Ok("ABORT")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry with one live task manager whose last heartbeat was at `at`.
    fn one_registered(timeout: Duration, at: Instant) -> (ResourceManager, TaskManagerId) {
        let mut rm = ResourceManager::new(timeout, LocalProcesses::default());
        let id = TaskManagerId::random();
        let (tx, _rx) = mpsc::unbounded_channel();
        rm.register(Register {
            tm: id,
            slots: 1,
            data_addr: "127.0.0.1:1".into(),
            pid: 0,
            tx,
            conn: 0,
            close: Arc::default(),
        });
        rm.tms.get_mut(&id).expect("registered").last_heartbeat = at;
        (rm, id)
    }

    fn alive(rm: &ResourceManager, id: TaskManagerId) -> bool {
        rm.tms[&id].tx.is_some()
    }

    /// Checks every `step` from `from` to `to` (inclusive of `from`).
    fn check_steadily(rm: &mut ResourceManager, from: Instant, to: Instant, step: Duration) {
        let mut t = from;
        while t <= to {
            rm.check_heartbeats(t);
            t += step;
        }
    }

    #[test]
    fn a_silent_task_manager_is_declared_dead_after_the_timeout() {
        let timeout = Duration::from_millis(1000);
        let t0 = Instant::now();
        let (mut rm, id) = one_registered(timeout, t0);
        let every = rm.check_every();
        check_steadily(&mut rm, t0, t0 + timeout, every);
        assert!(alive(&rm, id), "not before the timeout");
        rm.check_heartbeats(t0 + timeout + every);
        assert!(!alive(&rm, id));
        assert_eq!(
            rm.tms[&id].death_reason.as_deref(),
            Some("no heartbeat for 1000 ms")
        );
    }

    #[test]
    fn a_stall_of_the_job_manager_is_not_counted_against_heartbeats() {
        let timeout = Duration::from_millis(1000);
        let t0 = Instant::now();
        let (mut rm, id) = one_registered(timeout, t0);
        let every = rm.check_every();
        check_steadily(&mut rm, t0, t0 + timeout / 2, every);
        // Stopped for twice the timeout: the heartbeats sent meanwhile are still unread.
        let resumed = t0 + timeout / 2 + 2 * timeout;
        rm.check_heartbeats(resumed);
        assert!(
            alive(&rm, id),
            "the stall is not the task manager's silence"
        );
        // Silent after the stall too: dead once the rest of its timeout has passed.
        check_steadily(&mut rm, resumed, resumed + timeout / 2 - every, every);
        assert!(alive(&rm, id));
        check_steadily(&mut rm, resumed + timeout / 2, resumed + timeout, every);
        assert!(
            !alive(&rm, id),
            "declared dead a timeout after its heartbeat, plus the stall"
        );
    }
}
