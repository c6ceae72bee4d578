//! An in-process cache cluster on loopback for unit tests: nodes, and the master's state
//! machine driven by the test instead of the job manager.

use std::time::Duration;

use super::*;
use crate::ids::TaskManagerId;

pub(crate) struct Cluster {
    pub(crate) nodes: Vec<(TaskManagerId, CacheNode)>,
    pub(crate) master: Membership,
}

impl Cluster {
    pub(crate) async fn start(n: usize, limit: u64) -> Cluster {
        Cluster::start_with_limits(&vec![limit; n]).await
    }

    /// A cluster of one node per memory limit.
    pub(crate) async fn start_with_limits(limits: &[u64]) -> Cluster {
        let mut master = Membership::new(DEFAULT_PARTITIONS, 1, 64);
        let mut nodes = Vec::new();
        for (i, limit) in limits.iter().enumerate() {
            let id = TaskManagerId(i as u128 + 1);
            let node = CacheNode::bind(
                id,
                "127.0.0.1:0",
                NodeConfig {
                    memory_limit: *limit,
                },
            )
            .await
            .unwrap();
            master.join(id, node.local_addr().to_string());
            nodes.push((id, node));
        }
        let mut c = Cluster { nodes, master };
        c.settle().await;
        c
    }

    pub(crate) fn push(&self) {
        let t = self.master.table();
        for (_, n) in &self.nodes {
            n.set_table(t.clone());
        }
    }

    /// Runs copies until the table matches the ring, as the job manager does.
    pub(crate) async fn settle(&mut self) {
        loop {
            self.push();
            let orders = self.master.plan();
            self.push();
            if orders.is_empty() {
                if self.master.progress().misplaced == 0 {
                    return;
                }
                continue;
            }
            for o in orders {
                let src = &self
                    .nodes
                    .iter()
                    .find(|(id, _)| *id == o.source.id)
                    .unwrap()
                    .1;
                let ok = src.copy_to(o.partition, o.version, o.target.clone()).await;
                assert!(ok.is_ok(), "{ok:?}");
                self.master.sync_done(o.partition, o.copy, true);
            }
        }
    }

    pub(crate) async fn client(&self) -> CacheClient {
        CacheClient::connect(
            &[self.nodes[0].1.local_addr().to_string()],
            Duration::from_secs(5),
        )
        .await
        .unwrap()
    }
}
