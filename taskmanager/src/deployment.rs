//! `DeploymentActor`: the subtasks of one job deployment on this task manager.
//!
//! Created by the `TaskManager` once a `Deployment`'s channels are wired. Starts one
//! `SubtaskActor` per subtask on the task manager's slots, reports each subtask's state to the
//! job manager, and stops when all of them stopped (releasing the deployment's channels).
//! Invariant: every subtask's final state is reported exactly once.

use std::collections::HashMap;

use actix::prelude::*;
use engine::ids::{Generation, JobId};
use engine::net::DataPlane;
use engine::protocol::control::{SubtaskState, ToJobManager};
use engine::runtime::task::{
    Command, Rewire, RewireSubtask, SubtaskActor, SubtaskCommand, SubtaskEvent, SubtaskId,
    SubtaskOutcome, SubtaskRunner,
};
use tokio::sync::mpsc;
use tracing::info;

/// A deployment ended (all its subtasks stopped).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeploymentEnded {
    /// The job.
    pub job: JobId,
    /// The deployment.
    pub generation: Generation,
}

/// Stop every subtask of the deployment, and why.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CancelDeployment(pub &'static str);

/// A command for some subtasks of the deployment (all when `only` is `None`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ToSubtasks {
    /// What to tell them.
    pub command: Command,
    /// (task, subtask) pairs; `None` for every subtask.
    pub only: Option<Vec<(u32, u32)>>,
}

impl Handler<ToSubtasks> for DeploymentActor {
    type Result = ();

    fn handle(&mut self, msg: ToSubtasks, _ctx: &mut Self::Context) {
        for (id, a) in &self.actors {
            let listed = msg
                .only
                .as_ref()
                .is_none_or(|only| only.contains(&(id.task as u32, id.index as u32)));
            if listed {
                a.do_send(SubtaskCommand(msg.command));
            }
        }
    }
}

/// DCAS: subtasks restarted here join the running deployment.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddSubtasks(pub Vec<(SubtaskRunner, ArbiterHandle)>);

impl Handler<AddSubtasks> for DeploymentActor {
    type Result = ();

    fn handle(&mut self, msg: AddSubtasks, ctx: &mut Self::Context) {
        self.start_runners(msg.0, ctx);
    }
}

/// DCAS: new channels for subtasks whose neighbours restarted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RewireSubtasks(pub Vec<(SubtaskId, Rewire)>);

impl Handler<RewireSubtasks> for DeploymentActor {
    type Result = ();

    fn handle(&mut self, msg: RewireSubtasks, _ctx: &mut Self::Context) {
        for (id, rw) in msg.0 {
            if let Some(a) = self.actors.get(&id) {
                a.do_send(RewireSubtask(rw));
            }
        }
    }
}

/// The subtasks of one deployment.
pub struct DeploymentActor {
    job: JobId,
    generation: Generation,
    /// Runners and the slot (arbiter) each goes to, until `started` starts them.
    pending: Vec<(SubtaskRunner, ArbiterHandle)>,
    actors: HashMap<SubtaskId, Addr<SubtaskActor>>,
    /// Control messages to the job manager.
    to_jm: mpsc::UnboundedSender<ToJobManager>,
    /// Told when the deployment ends.
    ended: Recipient<DeploymentEnded>,
    data: DataPlane,
    /// DCAS: the deployment outlives its subtasks (a failed one restarts into it, and its
    /// channels must not be released under the restarted one) until it is canceled.
    linger: bool,
    /// Why the deployment was canceled: the cause of every subtask's cancel from then on,
    /// whichever of its effects (the released channels, the command) a subtask saw first.
    canceled: Option<&'static str>,
}

impl DeploymentActor {
    /// A deployment of `runners`; nothing runs until started.
    pub fn new(
        job: JobId,
        generation: Generation,
        runners: Vec<(SubtaskRunner, ArbiterHandle)>,
        to_jm: mpsc::UnboundedSender<ToJobManager>,
        ended: Recipient<DeploymentEnded>,
        data: DataPlane,
        linger: bool,
    ) -> DeploymentActor {
        DeploymentActor {
            job,
            generation,
            pending: runners,
            actors: HashMap::new(),
            to_jm,
            ended,
            data,
            linger,
            canceled: None,
        }
    }

    fn start_runners(
        &mut self,
        runners: Vec<(SubtaskRunner, ArbiterHandle)>,
        ctx: &mut Context<Self>,
    ) {
        let me = ctx.address().recipient();
        for (runner, arbiter) in runners {
            let id = runner.id.clone();
            let report = me.clone();
            let addr = SubtaskActor::start_in_arbiter(&arbiter, move |_| {
                SubtaskActor::new(runner, report)
            });
            self.report(&id, SubtaskState::Running, None);
            self.actors.insert(id, addr);
        }
    }

    fn report(&self, id: &SubtaskId, state: SubtaskState, message: Option<String>) {
        // A closed control channel means the job manager is gone; the task manager is
        // stopping its subtasks anyway.
        let _ = self.to_jm.send(ToJobManager::SubtaskState {
            job: self.job,
            generation: self.generation,
            task: id.task as u32,
            subtask: id.index as u32,
            state,
            message,
        });
    }
}

impl Actor for DeploymentActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let runners = std::mem::take(&mut self.pending);
        self.start_runners(runners, ctx);
        info!(job = %self.job, generation = %self.generation, subtasks = self.actors.len(), "Deployment started.");
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.data.release(self.job, self.generation);
        self.ended.do_send(DeploymentEnded {
            job: self.job,
            generation: self.generation,
        });
    }
}

impl Handler<SubtaskEvent> for DeploymentActor {
    type Result = ();

    fn handle(&mut self, msg: SubtaskEvent, ctx: &mut Self::Context) {
        if self.actors.remove(&msg.id).is_none() {
            return;
        }
        let (state, message) = match msg.outcome {
            SubtaskOutcome::Finished => (SubtaskState::Finished, None),
            SubtaskOutcome::Canceled(why) => (
                SubtaskState::Canceled,
                Some(self.canceled.unwrap_or(why).to_string()),
            ),
            SubtaskOutcome::Failed(e) => (SubtaskState::Failed, Some(e.to_string())),
        };
        self.report(&msg.id, state, message);
        if self.actors.is_empty() && !self.linger {
            ctx.stop();
        }
    }
}

impl Handler<CancelDeployment> for DeploymentActor {
    type Result = ();

    fn handle(&mut self, msg: CancelDeployment, ctx: &mut Self::Context) {
        self.linger = false;
        self.canceled.get_or_insert(msg.0);
        if self.actors.is_empty() {
            ctx.stop();
        }
        // Release the network channels first: a subtask waiting for remote credits (whose
        // receiver may already be gone) gives up at once instead of never seeing the cancel.
        self.data.release(self.job, self.generation);
        for a in self.actors.values() {
            a.do_send(SubtaskCommand(Command::Cancel(msg.0)));
        }
    }
}
