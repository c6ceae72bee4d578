//! Nodes and clients in one process, on loopback: replication, promotion, stale routing,
//! copies, the memory limit and malformed frames. Crashes of real processes are tested in
//! `tests/tests/cache.rs`.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::testing::Cluster;
use super::*;
use crate::ids::TaskManagerId;
use crate::protocol::cache::{Failure, Mutation, PartitionTable, Request, Response};
use crate::protocol::frame::{read_msg, write_frame};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_backups_and_survive_promotion() {
    let mut c = Cluster::start(3, 1 << 30).await;
    let client = c.client().await;
    let puts = client
        .put_many(
            "m",
            (0..2000u32)
                .map(|i| (i.to_le_bytes().to_vec(), format!("v{i}").into_bytes()))
                .collect(),
        )
        .await;
    assert!(
        puts.iter().all(|r| r == &Ok(1)),
        "{:?}",
        puts.iter().find(|r| r.is_err())
    );
    let lp = client.list_partition("log");
    for b in 0..10u8 {
        let first = client
            .append(lp, "log", vec![vec![b; 100]; 100])
            .await
            .unwrap();
        assert_eq!(first, b as u64 * 100);
    }
    let stats: u64 = c.nodes.iter().map(|(_, n)| n.stats().map_entries).sum();
    assert_eq!(stats, 4000, "every entry on a primary and one backup");
    // Node 0 "dies": the master promotes its backups; the node stops being asked.
    let (dead, _) = c.nodes.remove(0);
    assert!(c.master.leave(dead).is_empty());
    c.push();
    let client = c.client().await;
    for i in (0..2000u32).step_by(7) {
        let v = client.get("m", &i.to_le_bytes()).await.unwrap();
        assert_eq!(v, Some((format!("v{i}").into_bytes(), 1)), "key {i}");
    }
    assert_eq!(client.len(lp, "log").await.unwrap(), (0, 1000));
    // Re-replication, then the write path works on the new owners.
    c.settle().await;
    assert_eq!(client.append(lp, "log", vec![vec![1]]).await.unwrap(), 1000);
    assert_eq!(client.put("m", b"k", b"x".to_vec(), None).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_client_is_redirected_not_served_wrongly() {
    let mut c = Cluster::start(2, 1 << 30).await;
    let stale = c.client().await;
    let stale_table = stale.table();
    // A third member joins; partitions move to it.
    let id = TaskManagerId(99);
    let node = CacheNode::bind(id, "127.0.0.1:0", NodeConfig::default())
        .await
        .unwrap();
    c.master.join(id, node.local_addr().to_string());
    c.nodes.push((id, node));
    c.settle().await;
    let fresh = c.client().await;
    assert!(fresh.table().epoch > stale_table.epoch);
    // Find a key whose primary moved.
    let moved = (0..10_000u32)
        .map(|i| i.to_le_bytes())
        .find(|k| {
            let p = fresh.map_partition("m", k);
            stale_table.primary(p).map(|m| m.id) != fresh.table().primary(p).map(|m| m.id)
        })
        .expect("some partition moved to the newcomer");
    fresh.put("m", &moved, b"new".to_vec(), None).await.unwrap();
    // The stale client's request goes to the old primary, which redirects it.
    assert_eq!(
        stale.get("m", &moved).await.unwrap(),
        Some((b"new".to_vec(), 1))
    );
    assert!(
        stale.table().epoch > stale_table.epoch,
        "the client adopted the newer table"
    );
    // Direct check: a request at an old version is refused with the node's table.
    let p = fresh.map_partition("m", &moved);
    let old_primary = stale_table.primary(p).unwrap().addr.clone();
    let conn = conn::Conn::open(&old_primary, Duration::from_secs(1));
    let r = conn
        .call(
            Request::Ops {
                since: 0,
                ops: vec![(
                    p,
                    stale_table.version(p),
                    crate::protocol::cache::Op::Get {
                        map: "m".into(),
                        key: moved.to_vec(),
                    },
                )],
            },
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    match r {
        Response::Ops(res, Some(t)) => {
            assert_eq!(
                res,
                vec![crate::protocol::cache::OpResult::Failed(
                    crate::protocol::cache::Failure::Moved
                )]
            );
            assert!(t.epoch > stale_table.epoch);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_member_refuses_writes_and_says_so() {
    let c = Cluster::start(2, 64 << 10).await;
    let client = c.client().await;
    let p = client.list_partition("l");
    let mut err = None;
    for _ in 0..100 {
        match client.append(p, "l", vec![vec![0; 1000]; 8]).await {
            Ok(_) => {}
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("64 KiB fill up");
    assert!(matches!(err, CacheError::Full { .. }), "{err}");
    assert!(err.to_string().contains("cache full"), "{err}");
    // A trim goes through on a full member, also one that makes a list (charged more than
    // the room left once one-byte items no longer fit).
    let mut fill = 0;
    while client.append(p, "l", vec![vec![0]]).await.is_ok() {
        fill += 1;
        assert!(fill < 1000, "one-byte items stop fitting");
    }
    client.trim_prefix(p, "fresh", 5).await.unwrap();
    assert_eq!(client.len(p, "fresh").await.unwrap(), (5, 5));
    // Nothing was evicted: everything acknowledged is still there, and trimming frees room.
    let (start, end) = client.len(p, "l").await.unwrap();
    assert_eq!(start, 0);
    assert!(end >= 8);
    client.trim_prefix(p, "l", end).await.unwrap();
    client.append(p, "l", vec![vec![0; 1000]; 8]).await.unwrap();
}

/// A write the primary applied but a backup refused is not acknowledged, and the primary's
/// length alone does not make it so: retrying the `AppendAt` replicates it again, and once
/// it succeeds the backup holds it (read after the primary's loss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_append_at_reaches_the_backup_that_refused_it() {
    let mut c = Cluster::start_with_limits(&[1 << 30, 64 << 10]).await;
    let client = c.client().await;
    let (big, small) = (c.nodes[0].0, c.nodes[1].0);
    let p = client.partition_avoiding("log", small);
    let item = |b: u8| vec![vec![b; 40 << 10]];
    assert_eq!(client.append_at(p, "log", 0, item(0)).await, Ok(Ok(0)));
    // The backup has no room for a second 40 KiB item; the primary applied it. The
    // refusal names the backup, as a full member (a writer waits for room and retries).
    let backup = c.nodes[1].1.local_addr().to_string();
    let err = client.append_at(p, "log", 1, item(1)).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::Full { member, limit, .. } if *member == backup && *limit == 64 << 10),
        "{err}"
    );
    assert_eq!(client.len(p, "log").await.unwrap(), (0, 2));
    let err = client.append_at(p, "log", 1, item(1)).await.unwrap_err();
    assert!(matches!(err, CacheError::Full { .. }), "{err}");
    // A trim (replicated) frees the backup; the retry lands there too.
    client.trim_prefix(p, "log", 1).await.unwrap();
    assert_eq!(client.append_at(p, "log", 1, item(1)).await, Ok(Ok(1)));
    // The single writer's guard: other items, or another index, are refused with the end.
    assert_eq!(client.append_at(p, "log", 1, item(7)).await, Ok(Err(2)));
    assert_eq!(client.append_at(p, "log", 5, item(1)).await, Ok(Err(2)));
    // The primary "dies": the backup is promoted and holds the retried item.
    c.nodes.retain(|(id, _)| *id != big);
    assert!(c.master.leave(big).is_empty());
    c.push();
    let client = c.client().await;
    assert_eq!(client.range(p, "log", 0, 10).await.unwrap(), (1, item(1)));
}

/// A plain append the primary applied but a backup refused for room is answered as of
/// unknown outcome, not as a full cache: its retry would append the items a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_append_a_full_backup_refused_is_not_called_full() {
    let c = Cluster::start_with_limits(&[1 << 30, 64 << 10]).await;
    let client = c.client().await;
    let small = c.nodes[1].0;
    let p = client.partition_avoiding("log", small);
    let item = || vec![vec![0u8; 40 << 10]];
    assert_eq!(client.append(p, "log", item()).await, Ok(0));
    let err = client.append(p, "log", item()).await.unwrap_err();
    assert!(
        matches!(&err, CacheError::Unacknowledged(why) if why.contains("is full")),
        "{err}"
    );
    assert_eq!(
        client.len(p, "log").await.unwrap(),
        (0, 2),
        "the primary has it"
    );
}

/// The same for a conditional put (how DCAS records where a log lives): the retry finds
/// its own write on the primary, where before it was refused as a conflict and the backup
/// never got the entry, which was then gone once the backup was promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_conditional_put_reaches_the_backup_that_refused_it() {
    let mut c = Cluster::start_with_limits(&[1 << 30, 64 << 10]).await;
    let client = c.client().await;
    let (big, small) = (c.nodes[0].0, c.nodes[1].0);
    // A key whose partition's primary is the big member, so the small one is its backup.
    let key = (0u32..)
        .map(|i| i.to_le_bytes().to_vec())
        .find(|k| {
            let p = client.map_partition("m", k);
            client.table().primary(p).is_some_and(|m| m.id != small)
        })
        .unwrap();
    let p = client.map_partition("m", &key);
    let filler = client.partition_avoiding("fill", small);
    client
        .append(filler, "fill", vec![vec![0; 40 << 10]])
        .await
        .unwrap();
    let value = vec![7; 30 << 10];
    let err = client
        .put_if_version("m", &key, value.clone(), 0)
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Full { .. }), "{err}");
    // Room on the backup again; the retry is answered as the put's and replicated.
    client.trim_prefix(filler, "fill", 1).await.unwrap();
    assert_eq!(
        client.put_if_version("m", &key, value.clone(), 0).await,
        Ok(Ok(1))
    );
    // Another writer's value still conflicts.
    assert_eq!(
        client.put_if_version("m", &key, vec![8], 0).await,
        Ok(Err(1))
    );
    c.nodes.retain(|(id, _)| *id != big);
    assert!(c.master.leave(big).is_empty());
    c.push();
    let client = c.client().await;
    assert_eq!(client.table().primary(p).map(|m| m.id), Some(small));
    assert_eq!(client.get("m", &key).await.unwrap(), Some((value, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_closes_only_that_connection() {
    let c = Cluster::start(1, 1 << 30).await;
    let addr = c.nodes[0].1.local_addr();
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    write_frame(&mut raw, b"definitely not rkyv").await.unwrap();
    raw.flush().await.unwrap();
    let mut buf = rkyv::util::AlignedVec::new();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        read_msg::<_, crate::protocol::cache::CacheMsg>(&mut raw, &mut buf),
    )
    .await
    .expect("the node closes the connection");
    assert!(matches!(r, Ok(None) | Err(_)), "{r:?}");
    // A garbage length prefix too.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    // The node still serves others.
    let client = c.client().await;
    client.put("m", b"k", b"v".to_vec(), None).await.unwrap();
    assert_eq!(client.get("m", b"k").await.unwrap().unwrap().0, b"v");
    // A well-formed replication message naming an index far past a list's end would fill
    // the gap with placeholders: it is refused as full, not allocated.
    let p = client.list_partition("l");
    client.append(p, "l", vec![vec![1]]).await.unwrap();
    let conn = conn::Conn::open(&addr.to_string(), Duration::from_secs(1));
    let absurd = Request::Replicate {
        partition: p,
        version: client.table().version(p),
        loss: None,
        mutations: vec![Mutation::ListSet {
            list: "l".into(),
            index: u64::MAX / 2,
            items: vec![vec![2]],
        }],
    };
    let r = conn.call(absurd, Duration::from_secs(2)).await;
    assert!(
        matches!(r, Ok(Response::Replicated(Err(Failure::Full { .. })))),
        "{r:?}"
    );
    assert_eq!(client.len(p, "l").await.unwrap(), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_hint_keeps_a_list_off_a_member() {
    let c = Cluster::start(3, 1 << 30).await;
    let client = c.client().await;
    let table = client.table();
    for (avoid, _) in &c.nodes {
        for i in 0..200 {
            let name = format!("log-{i}");
            let p = client.partition_avoiding(&name, *avoid);
            assert_ne!(table.primary(p).map(|m| m.id), Some(*avoid), "{name}");
            // Deterministic: the same name and table give the same partition.
            assert_eq!(p, client.partition_avoiding(&name, *avoid));
        }
    }
    // The hint only moves names whose own partition's primary is the avoided member.
    let (avoid, _) = c.nodes[0];
    let name = (0..1000)
        .map(|i| format!("log-{i}"))
        .find(|n| table.primary(client.list_partition(n)).map(|m| m.id) != Some(avoid))
        .unwrap();
    assert_eq!(
        client.partition_avoiding(&name, avoid),
        client.list_partition(&name)
    );
    let p = client.partition_avoiding("log-x", avoid);
    assert_eq!(client.append(p, "log-x", vec![vec![1]]).await.unwrap(), 0);
    assert_eq!(client.len(p, "log-x").await.unwrap(), (0, 1));
}

/// Ensures a member keeps a copy that reached it before the table that dropped it from the
/// partition (the master dropped it, then chose it again for a copy at the new version),
/// while a member that leaves a partition drops what it held there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_arrives_before_its_table_is_kept() {
    let c = Cluster::start(2, 1 << 30).await;
    let client = c.client().await;
    assert_eq!(client.put("m", b"k", b"v".to_vec(), None).await.unwrap(), 1);
    let t1 = client.table();
    let p = client.map_partition("m", b"k");
    let [a, b] = [0, 1].map(|i| t1.owners[p as usize][i]);
    let node = |i: u16| {
        let id = t1.members[i as usize].id;
        &c.nodes.iter().find(|(n, _)| *n == id).expect("node").1
    };
    // The next table as the master would write it: partition `p` owned by `owners`.
    let next = |t: &PartitionTable, owners: Vec<u16>| {
        let mut t = t.clone();
        t.epoch += 1;
        t.owners[p as usize] = owners;
        t.versions[p as usize] = t.epoch;
        t
    };
    // The master drops the backup from `p` and copies `p` to it again; the copy arrives
    // before the table that dropped it.
    let t2 = next(&t1, vec![a]);
    node(a).set_table(t2.clone());
    let target = t1.members[b as usize].clone();
    let target_addr = target.addr.clone();
    node(a)
        .copy_to(p, t2.version(p), target)
        .await
        .expect("copy");
    // The backup, still on the old table, refuses a write of the old version over the copy
    // (a deposed primary's).
    let conn = conn::Conn::open(&target_addr, Duration::from_secs(2));
    let r = conn
        .call(
            Request::Replicate {
                partition: p,
                version: t1.version(p),
                loss: None,
                mutations: vec![Mutation::MapSet {
                    map: "m".into(),
                    key: b"k".to_vec(),
                    value: b"stale".to_vec(),
                    version: 2,
                    expires_ms: None,
                }],
            },
            Duration::from_secs(2),
        )
        .await;
    assert!(
        matches!(r, Ok(Response::Replicated(Err(Failure::Moved)))),
        "an old version's write over a newer copy: {r:?}"
    );
    node(b).set_table(t2.clone());
    assert_eq!(node(b).stats().map_entries, 1, "the copy is kept");
    // The copy is confirmed: the target becomes a backup; then the primary is lost.
    let t3 = next(&t2, vec![a, b]);
    node(a).set_table(t3.clone());
    node(b).set_table(t3.clone());
    let t4 = next(&t3, vec![b]);
    node(a).set_table(t4.clone());
    node(b).set_table(t4.clone());
    assert_eq!(
        node(a).stats().map_entries,
        0,
        "a member that left `p` drops it"
    );
    let survivor = CacheClient::connect(
        &[t4.members[b as usize].addr.clone()],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(
        survivor.get("m", b"k").await.unwrap(),
        Some((b"v".to_vec(), 1)),
        "the promoted copy holds the write"
    );
}

/// A retry waiting for a newer table wakes when the client adopts one (the task manager
/// hands each table from the master to its client), not at the end of its pause; an older
/// or equal table does not wake it, and with none it waits out the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_wakes_when_a_newer_table_arrives() {
    let c = Cluster::start(2, 1 << 30).await;
    let client = c.client().await;
    let table = client.table();
    let epoch = table.epoch;
    let long = Duration::from_secs(30);
    // Already newer than the epoch asked about: no wait at all.
    tokio::time::timeout(Duration::from_secs(5), client.table_after(epoch - 1, long))
        .await
        .expect("a newer table is already there");
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.table_after(epoch, long).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.update_table((*table).clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "the same table again wakes nobody");
    let mut newer = (*table).clone();
    newer.epoch += 1;
    client.update_table(newer);
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken by the newer table, well before its 30 s pause")
        .unwrap();
    assert_eq!(client.table().epoch, epoch + 1);
    // Nothing newer coming: the pause is waited out.
    let started = std::time::Instant::now();
    client
        .table_after(epoch + 1, Duration::from_millis(30))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(30));
}

/// Ensures a loss beyond the backups fails only the writers whose entries date from before
/// it: a client scoped to the epoch of the loss (a deployment started after it) reads and
/// writes the lost partitions, which hold only what was written since (nothing from before
/// comes back, and later tables do not empty them again), while an older writer is told
/// the partition was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_fails_only_writers_from_before_it() {
    let mut c = Cluster::start(4, 1 << 30).await;
    let old = c.client().await;
    let keys: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_be_bytes().to_vec()).collect();
    for k in &keys {
        old.put("m", k, b"before".to_vec(), None).await.unwrap();
    }
    let (a, b) = (c.nodes[1].0, c.nodes[2].0);
    let mut lost = c.master.leave(a);
    lost.extend(c.master.leave(b));
    assert!(!lost.is_empty(), "two of four members with one backup each");
    c.push();
    let table = c.master.table();
    let loss = table
        .lost
        .iter()
        .map(|(_, e)| *e)
        .max()
        .expect("losses recorded");
    old.update_table(table.clone());
    let in_lost = |k: &Vec<u8>| lost.contains(&old.map_partition("m", k));
    let (gone, kept): (Vec<&Vec<u8>>, Vec<&Vec<u8>>) = keys.iter().partition(|k| in_lost(k));
    let newer = old.since(loss);
    let older = old.since(loss - 1);
    for k in &gone {
        let p = old.map_partition("m", k);
        assert_eq!(
            old.get("m", k).await,
            Err(CacheError::Lost { partition: p })
        );
        assert_eq!(
            older.get("m", k).await,
            Err(CacheError::Lost { partition: p })
        );
        assert_eq!(
            newer.get("m", k).await,
            Ok(None),
            "nothing from before the loss"
        );
        newer.put("m", k, b"after".to_vec(), None).await.unwrap();
    }
    for k in &kept {
        assert_eq!(old.get("m", k).await, Ok(Some((b"before".to_vec(), 1))));
    }
    // The survivors copy partitions to restore backups: new tables, new versions.
    c.settle().await;
    newer.update_table(c.master.table());
    assert!(newer.table().epoch > loss);
    for k in &gone {
        assert_eq!(
            newer.get("m", k).await,
            Ok(Some((b"after".to_vec(), 1))),
            "written after the loss, kept through later tables"
        );
        let p = old.map_partition("m", k);
        assert_eq!(
            old.get("m", k).await,
            Err(CacheError::Lost { partition: p })
        );
    }
}

/// Ensures a member that held part of a partition from before its loss (a copy was
/// reaching it) and owns it afterwards serves nothing from before: a writer from the loss
/// on reads the partition empty, and what it writes stays through later tables. And a node
/// whose table is older than the writer's epoch takes none of its writes (it may not know
/// the loss): it answers "behind".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_owns_a_lost_partition_forgets_what_it_held_before() {
    let c = Cluster::start(3, 1 << 30).await;
    let client = c.client().await;
    assert_eq!(
        client.put("m", b"k", b"old".to_vec(), None).await.unwrap(),
        1
    );
    let t1 = client.table();
    let p = client.map_partition("m", b"k");
    let [a, b] = [0, 1].map(|i| t1.owners[p as usize][i]);
    let r = (0..3u16)
        .find(|i| *i != a && *i != b)
        .expect("a third member");
    let node = |i: u16| {
        let id = t1.members[i as usize].id;
        &c.nodes.iter().find(|(n, _)| *n == id).expect("node").1
    };
    // A copy of `p` reaches the third member; before the table naming it an owner, both
    // owners are lost and the master gives `p`, empty, to the third member.
    node(a)
        .copy_to(p, t1.version(p), t1.members[r as usize].clone())
        .await
        .expect("copy");
    assert_eq!(node(r).stats().map_entries, 1, "the copy arrived");
    let mut t2 = (*t1).clone();
    t2.epoch += 1;
    t2.owners[p as usize] = vec![r];
    t2.versions[p as usize] = t2.epoch;
    t2.lost = vec![(p, t2.epoch)];
    let writer = client.since(t2.epoch);
    writer.update_table(t2.clone());
    // The old primary, declared dead but running (paused, say), never sees the loss: it
    // takes no write of the writer's, which would be gone from the partition's owner.
    let conn = conn::Conn::open(&t1.members[a as usize].addr, Duration::from_secs(2));
    let put = crate::protocol::cache::Op::Put {
        map: "m".into(),
        key: b"k".to_vec(),
        value: b"new".to_vec(),
        ttl_ms: None,
    };
    let asked = conn
        .call(
            Request::Ops {
                since: t2.epoch,
                ops: vec![(p, t1.version(p), put)],
            },
            Duration::from_secs(2),
        )
        .await;
    assert!(
        matches!(&asked, Ok(Response::Ops(r, _)) if r == &[crate::protocol::cache::OpResult::Failed(Failure::Behind)]),
        "{asked:?}"
    );
    node(r).set_table(t2.clone());
    assert_eq!(
        writer.get("m", b"k").await,
        Ok(None),
        "nothing from before the loss"
    );
    assert_eq!(writer.put("m", b"k", b"new".to_vec(), None).await, Ok(1));
    let mut t3 = t2.clone();
    t3.epoch += 1;
    node(r).set_table(t3.clone());
    writer.update_table(t3);
    assert_eq!(
        writer.get("m", b"k").await,
        Ok(Some((b"new".to_vec(), 1))),
        "written after the loss, kept through a later table"
    );
}
