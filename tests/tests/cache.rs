//! The distributed cache on real task manager processes: acknowledged writes survive
//! SIGKILLed members, re-replication restores the backups, simultaneous losses are reported
//! exactly, writes in flight are never acknowledged and lost, and a joining member takes its
//! partitions while writers run. Routing, the memory limit and malformed frames are also
//! covered in process by `engine::cache::tests`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::cache::{CacheClient, CacheError};
use serde_json::Value;
use weir_tests::cluster::{Cluster, ClusterOptions};

fn cluster(taskmanagers: usize) -> Cluster {
    let c = Cluster::start(ClusterOptions {
        taskmanagers,
        ..ClusterOptions::default()
    });
    c.wait_cache_settled(taskmanagers);
    c
}

fn cache(c: &Cluster) -> Value {
    let (status, body) = c.get("/cache");
    assert_eq!(status, 200, "{body}");
    body
}

fn member_addrs(c: &Cluster) -> Vec<String> {
    cache(c)["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["addr"].as_str().map(str::to_string))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn client(c: &Cluster) -> CacheClient {
    CacheClient::connect(&member_addrs(c), Duration::from_secs(20))
        .await
        .expect("cache client")
}

fn key(i: u32) -> Vec<u8> {
    format!("key-{i:06}").into_bytes()
}

fn value(i: u32) -> Vec<u8> {
    format!("value-{i}-{}", "x".repeat((i % 40) as usize)).into_bytes()
}

/// A 100-byte list item naming its list and index.
fn item(list: u32, index: u64) -> Vec<u8> {
    let mut v = format!("{list}:{index}:").into_bytes();
    v.resize(100, b'.');
    v
}

const ENTRIES: u32 = 100_000;
const LISTS: u32 = 100;
const ITEMS: u64 = 10_000;

async fn write_all(client: &CacheClient) {
    for chunk in (0..ENTRIES).collect::<Vec<_>>().chunks(1000) {
        let results = client
            .put_many("m", chunk.iter().map(|i| (key(*i), value(*i))).collect())
            .await;
        for (i, r) in chunk.iter().zip(results) {
            assert_eq!(r, Ok(1), "put of key {i}");
        }
    }
    for l in 0..LISTS {
        let name = format!("list-{l}");
        let p = client.list_partition(&name);
        for b in 0..ITEMS / 1000 {
            let items = (b * 1000..(b + 1) * 1000).map(|i| item(l, i)).collect();
            assert_eq!(client.append(p, &name, items).await, Ok(b * 1000));
        }
    }
}

/// Reads back everything `write_all` wrote; every entry and item must be there.
async fn verify_all(client: &CacheClient) {
    for chunk in (0..ENTRIES).collect::<Vec<_>>().chunks(2000) {
        let got = client
            .get_many("m", chunk.iter().map(|i| key(*i)).collect())
            .await;
        for (i, r) in chunk.iter().zip(got) {
            assert_eq!(r, Ok(Some((value(*i), 1))), "key {i}");
        }
    }
    for l in 0..LISTS {
        let name = format!("list-{l}");
        let p = client.list_partition(&name);
        assert_eq!(client.len(p, &name).await, Ok((0, ITEMS)), "{name}");
        for from in (0..ITEMS).step_by(2500) {
            let (first, items) = client.range(p, &name, from, 2500).await.expect("range");
            assert_eq!(first, from);
            assert_eq!(items.len(), 2500, "{name} from {from}");
            for (k, it) in items.iter().enumerate() {
                assert_eq!(*it, item(l, from + k as u64), "{name}[{}]", from + k as u64);
            }
        }
    }
}

#[test]
fn acknowledged_writes_survive_two_successive_member_kills() {
    let mut c = cluster(4);
    let rt = runtime();
    let client = rt.block_on(client(&c));
    rt.block_on(write_all(&client));
    // Heartbeats carry the stats; wait for one after the writes.
    c.wait_until(Duration::from_secs(5), "stats reported", |c| {
        let v = cache(c);
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["map_entries"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 2 * ENTRIES as u64
    });

    c.kill_taskmanager(0);
    wait_members(&c, 3);
    rt.block_on(verify_all(&client));
    assert_eq!(cache(&c)["lost_partitions"], serde_json::json!([]));

    // After re-replication every partition has a backup again: a second kill loses nothing.
    c.wait_cache_settled(3);
    c.kill_taskmanager(1);
    wait_members(&c, 2);
    rt.block_on(verify_all(&client));
    assert_eq!(cache(&c)["lost_partitions"], serde_json::json!([]));
}

fn wait_members(c: &Cluster, n: usize) {
    c.wait_until(
        Duration::from_secs(10),
        &format!("{n} cache members"),
        |c| cache(c)["members"].as_array().map(Vec::len) == Some(n),
    );
}

#[test]
fn two_simultaneous_kills_report_exactly_the_lost_partitions() {
    let mut c = cluster(4);
    let rt = runtime();
    let client = rt.block_on(client(&c));
    let n = 20_000u32;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let r =
            rt.block_on(client.put_many("m", chunk.iter().map(|i| (key(*i), value(*i))).collect()));
        assert!(r.iter().all(|r| r == &Ok(1)));
    }
    let (a, b) = (c.taskmanager_id(0), c.taskmanager_id(2));
    let table = client.table();
    let owners = |p: usize| -> BTreeSet<String> {
        table.owners[p]
            .iter()
            .map(|i| table.members[*i as usize].id.to_string())
            .collect()
    };
    let expected: BTreeSet<u32> = (0..table.partitions() as usize)
        .filter(|p| owners(*p).is_subset(&[a.clone(), b.clone()].into()))
        .map(|p| p as u32)
        .collect();
    assert!(
        !expected.is_empty(),
        "some partitions live only on the two victims"
    );
    c.kill_taskmanagers(&[0, 2]);
    wait_members(&c, 2);
    let lost: BTreeSet<u32> = cache(&c)["lost_partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["partition"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        lost, expected,
        "exactly the partitions whose every copy died"
    );
    // Reads of lost partitions fail fast with the partition named; the rest are intact.
    rt.block_on(async {
        let started = std::time::Instant::now();
        for i in 0..n {
            let p = client.map_partition("m", &key(i));
            let r = client.get("m", &key(i)).await;
            if expected.contains(&p) {
                assert_eq!(r, Err(CacheError::Lost { partition: p }), "key {i}");
            } else {
                assert_eq!(r, Ok(Some((value(i), 1))), "key {i}");
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no hang");
    });
    // After the operator clears the losses, the partitions serve again, empty.
    let (s, body) = c.request("DELETE", "/cache/lost", None, None);
    assert_eq!(s, 200, "{body}");
    let mut cleared: Vec<u32> = body["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    cleared.sort();
    assert_eq!(cleared, expected.iter().copied().collect::<Vec<_>>());
    let i = (0..n)
        .find(|i| expected.contains(&client.map_partition("m", &key(*i))))
        .unwrap();
    // The cleared table reaches the members with the master's next push (every 100 ms):
    // until then the partition still answers Lost, never a wrong value.
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let got = rt.block_on(client.get("m", &key(i)));
        if !matches!(got, Err(CacheError::Lost { .. })) || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(got, Ok(None));
}

/// What each write answered, by key.
type Written = Vec<(u32, Result<u64, CacheError>)>;

/// Writers put unique keys until told to stop; returns what each write answered.
fn start_writers(
    rt: &tokio::runtime::Runtime,
    client: &CacheClient,
    writers: u32,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Written>> {
    (0..writers)
        .map(|w| {
            let (client, stop) = (client.clone(), stop.clone());
            rt.spawn(async move {
                let mut out = Vec::new();
                let mut i = w * 10_000_000;
                while !stop.load(Ordering::Relaxed) {
                    let keys: Vec<u32> = (i..i + 20).collect();
                    i += 20;
                    let results = client
                        .put_many(
                            "inflight",
                            keys.iter().map(|k| (key(*k), value(*k))).collect(),
                        )
                        .await;
                    out.extend(keys.into_iter().zip(results));
                }
                out
            })
        })
        .collect()
}

/// Every acknowledged write is readable; returns (acknowledged, failed).
fn check_acknowledged(
    rt: &tokio::runtime::Runtime,
    client: &CacheClient,
    written: Written,
) -> (usize, usize) {
    let acked: Vec<u32> = written
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(k, _)| *k)
        .collect();
    let failed = written.len() - acked.len();
    rt.block_on(async {
        for chunk in acked.chunks(2000) {
            let got = client
                .get_many("inflight", chunk.iter().map(|k| key(*k)).collect())
                .await;
            for (k, r) in chunk.iter().zip(got) {
                assert_eq!(r, Ok(Some((value(*k), 1))), "acknowledged key {k} lost");
            }
        }
    });
    (acked.len(), failed)
}

/// Runs four writers for 1.5 s, then `fault`, then 1.5 s more; checks that every
/// acknowledged write is readable. Returns (acknowledged, failed).
fn with_writers(
    c: &mut Cluster,
    rt: &tokio::runtime::Runtime,
    client: &CacheClient,
    fault: impl FnOnce(&mut Cluster),
) -> (usize, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(rt, client, 4, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    fault(c);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let written: Vec<_> = writers
        .into_iter()
        .flat_map(|w| rt.block_on(w).expect("writer"))
        .collect();
    check_acknowledged(rt, client, written)
}

#[test]
fn writes_in_flight_during_a_kill_are_never_acknowledged_and_lost() {
    let mut c = cluster(3);
    let rt = runtime();
    let client = rt.block_on(client(&c));
    let (acked, failed) = with_writers(&mut c, &rt, &client, |c| {
        c.kill_taskmanager(1);
        wait_members(c, 2);
    });
    println!("in-flight test: {acked} writes acknowledged, {failed} failed");
    assert!(acked > 1000, "writers made progress: {acked}");
    assert_eq!(cache(&c)["lost_partitions"], serde_json::json!([]));
}

#[test]
fn a_joining_member_takes_partitions_while_writers_run() {
    let mut c = cluster(3);
    let rt = runtime();
    let client = rt.block_on(client(&c));
    let (acked, failed) = with_writers(&mut c, &rt, &client, |c| {
        c.add_taskmanager();
        c.wait_cache_settled(4);
    });
    println!("migration test: {acked} writes acknowledged, {failed} failed");
    assert!(acked > 1000, "writers made progress: {acked}");
    let v = cache(&c);
    let per_member: BTreeMap<String, u64> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["addr"].as_str().unwrap().to_string(),
                m["primaries"].as_u64().unwrap(),
            )
        })
        .collect();
    let (min, max) = (
        per_member.values().min().copied().unwrap(),
        per_member.values().max().copied().unwrap(),
    );
    assert!(
        min > 0 && max <= 2 * min,
        "partitions rebalanced: {per_member:?}"
    );
}

#[test]
fn rest_reports_members_entries_and_metrics_and_nodes_survive_garbage() {
    use std::io::Write;
    let c = cluster(3);
    let rt = runtime();
    let client = rt.block_on(client(&c));
    for i in 0..250u32 {
        rt.block_on(client.put("users", format!("u{i:03}").as_bytes(), vec![0; 10], None))
            .unwrap();
    }
    let p = client.list_partition("log");
    rt.block_on(client.append(p, "log", vec![vec![1; 100]; 50]))
        .unwrap();
    let v = cache(&c);
    assert_eq!(v["partitions"], 271);
    assert_eq!(v["backup_count"], 1);
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let primaries: u64 = members
        .iter()
        .map(|m| m["primaries"].as_u64().unwrap())
        .sum();
    let backups: u64 = members.iter().map(|m| m["backups"].as_u64().unwrap()).sum();
    assert_eq!((primaries, backups), (271, 271));
    // Paged listing by prefix.
    let (s, page) = c.get("/cache/entries?prefix=users/u1&limit=60");
    assert_eq!(s, 200, "{page}");
    let names: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 60);
    assert_eq!(names[0], "users/u100");
    let next = page["next"].as_str().unwrap().to_string();
    let (_, page2) = c.get(&format!(
        "/cache/entries?prefix=users/u1&limit=60&after={next}"
    ));
    assert_eq!(page2["entries"].as_array().unwrap().len(), 40);
    assert!(page2["next"].is_null());
    let (_, lists) = c.get("/cache/entries?prefix=log");
    assert_eq!(lists["entries"][0][0], "log[]");
    // Prometheus.
    c.wait_until(Duration::from_secs(5), "cache bytes in /metrics", |c| {
        let (_, text) = c.request_text("GET", "/metrics", None, None);
        text.contains("weir_cache_bytes{member=")
            && text.contains("weir_cache_operations_by_latency")
    });
    // Garbage to a member's cache port closes that connection; the member keeps serving.
    let addr = member_addrs(&c)[0].clone();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(&[7, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    let mut s2 = std::net::TcpStream::connect(&addr).unwrap();
    s2.write_all(&u32::MAX.to_le_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..250u32 {
        let r = rt.block_on(client.get("users", format!("u{i:03}").as_bytes()));
        assert_eq!(r, Ok(Some((vec![0; 10], 1))));
    }
    assert_eq!(c.alive_taskmanagers().len(), 3);
}
