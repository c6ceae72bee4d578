//! Deterministic synthetic click events, and a producer that writes them to Kafka (the
//! `weir produce` command and the Kafka tests use it).
//!
//! Event `i` is a pure function of `i` and the settings: the same command writes the same
//! records, so a test can compute the expected result without reading the topic back.

use std::time::{Duration, Instant};

use std::sync::Arc;

use engine::kafka::{client_config, send_waiting, Deliveries, DeliveryContext, PRODUCER_TUNING};
use engine::value::{mix64, Value};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// What to generate.
#[derive(Debug, Clone)]
pub struct Clicks {
    /// Number of distinct users (keys).
    pub users: u64,
    /// Event time of event 0, ms since the epoch.
    pub start_ts: i64,
    /// Event-time distance between consecutive events, in microseconds.
    pub spacing_us: i64,
}

impl Default for Clicks {
    fn default() -> Self {
        Clicks {
            users: 100,
            start_ts: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            spacing_us: 1000,
        }
    }
}

const PAGES: [&str; 6] = ["/", "/search", "/product", "/cart", "/checkout", "/help"];

impl Clicks {
    /// The user (the Kafka key) of event `i`.
    pub fn user(&self, i: u64) -> String {
        format!("user-{}", mix64(i ^ 0x5eed) % self.users.max(1))
    }

    /// Event time of event `i`.
    pub fn ts(&self, i: u64) -> i64 {
        self.start_ts + (i as i64 * self.spacing_us) / 1000
    }

    /// Event `i` as a value: `{user, page, amount, ts, seq}`.
    pub fn event(&self, i: u64) -> Value {
        let h = mix64(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        Value::map([
            ("user", Value::str(&self.user(i))),
            ("page", Value::str(PAGES[(h % PAGES.len() as u64) as usize])),
            ("amount", Value::Int((h >> 8) as i64 % 100)),
            ("ts", Value::Int(self.ts(i))),
            ("seq", Value::Int(i as i64)),
        ])
    }
}

/// Settings of [`produce`].
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// `host:port` of a broker.
    pub bootstrap: String,
    /// Target topic.
    pub topic: String,
    /// Events per second; 0 = as fast as the broker takes them.
    pub rate: u64,
    /// Events `first..first + count` are written.
    pub first: u64,
    /// How many events.
    pub count: u64,
    /// The events.
    pub clicks: Clicks,
}

/// Writes events to Kafka as JSON, keyed by user, with the event time as the Kafka
/// timestamp; returns when every record is acknowledged. Fails with the broker's message.
pub fn produce(o: &ProduceOptions) -> Result<u64, String> {
    let deliveries = Arc::new(Deliveries::default());
    let producer: BaseProducer<DeliveryContext> = client_config(&o.bootstrap, PRODUCER_TUNING)
        // A loader, not a latency path: a broker that stalls under a test suite's load (tansu
        // committing to SQLite while other tests read it) must delay it, not fail it.
        .set("message.timeout.ms", "180000")
        .create_with_context(DeliveryContext(deliveries.clone()))
        .map_err(|e| format!("cannot create a producer for {}: {e}", o.bootstrap))?;
    let started = Instant::now();
    let mut payload = Vec::with_capacity(128);
    for n in 0..o.count {
        let i = o.first + n;
        if o.rate > 0 {
            let due = Duration::from_secs_f64(n as f64 / o.rate as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                producer.poll(due - elapsed);
                std::thread::sleep(due.saturating_sub(started.elapsed()));
            }
        }
        let key = o.clicks.user(i);
        payload.clear();
        serde_json::to_writer(&mut payload, &o.clicks.event(i)).map_err(|e| e.to_string())?;
        let rec = BaseRecord::to(&o.topic)
            .key(key.as_bytes())
            .payload(&payload[..])
            .timestamp(o.clicks.ts(i));
        send_waiting(&producer, rec, Duration::from_secs(60))
            .map_err(|e| format!("producing to '{}' at {}: {e}", o.topic, o.bootstrap))?;
        if let Some(e) = deliveries.first_error() {
            return Err(format!(
                "producing to '{}' at {}: {e}",
                o.topic, o.bootstrap
            ));
        }
        if n % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(180))
        .map_err(|e| format!("flushing to '{}' at {}: {e}", o.topic, o.bootstrap))?;
    match deliveries.first_error() {
        Some(e) => Err(format!(
            "producing to '{}' at {}: {e}",
            o.topic, o.bootstrap
        )),
        None => Ok(o.count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_deterministic_and_spread_over_users() {
        let c = Clicks::default();
        assert_eq!(c.event(7), c.event(7));
        assert_ne!(c.event(7), c.event(8));
        let users: std::collections::BTreeSet<String> = (0..10_000).map(|i| c.user(i)).collect();
        assert_eq!(users.len(), 100);
        assert_eq!(c.ts(1000) - c.ts(0), 1000);
        assert_eq!(
            c.event(3).get("user").and_then(Value::as_str),
            Some(c.user(3).as_str())
        );
    }
}
