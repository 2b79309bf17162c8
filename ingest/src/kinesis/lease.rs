//! Shard leases in a DynamoDB table, so that several consumers split a stream's shards and
//! never read one shard at the same time.
//!
//! As the Kinesis Client Library does it, without trusting clocks across machines: a lease is
//! an item `{lease_key = "<stream>/<shard>", owner, counter, ended, handoff_to}`. Its owner
//! renews it by incrementing `counter` on the condition that it still owns it. Another worker
//! may take a lease only when it has watched the counter stay the same for a whole lease
//! duration on its own clock, and only with a write conditioned on that counter. The owner
//! stops reading when two thirds of the duration have passed since it *sent* its last
//! successful renewal ([`LeaseClock`]), so it has stopped before anyone can take the lease.
//!
//! Balance: each worker aims at `ceil(open shards / live workers)` leases. It takes free and
//! expired leases first; when there are none and it has fewer than its share, it asks the
//! busiest worker to hand one over (`handoff_to`). The owner stops reading that shard, drops
//! what it had not committed, and only then writes the new owner: a graceful hand-off with no
//! moment where both read. Leases of shards read to their end are marked `ended` and left alone.
//!
//! Correctness of the data does not rest on the leases: every commit of a shard goes through
//! the lake's conditional commit record for that shard's writer, so even two readers of one
//! shard (leases misused, a table deleted by hand) cannot both commit the same position.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus,
};
use tracing::{debug, info, warn};

use super::client::describe;

/// Lease table failures at start-up.
#[derive(Debug, thiserror::Error)]
#[error(
    "DynamoDB lease table {table:?}: {why}. Check AWS_REGION, the credentials (dynamodb:DescribeTable, \
     CreateTable, Scan, PutItem, UpdateItem on the table), and AWS_ENDPOINT_URL_DYNAMODB if you use an emulator"
)]
pub struct LeaseError {
    /// The table.
    pub table: String,
    /// What happened.
    pub why: String,
}

/// When this worker's hold on a lease ends, read by its shard reader before every call.
#[derive(Debug)]
pub struct LeaseClock {
    base: Instant,
    valid_until_ms: AtomicU64,
}

impl LeaseClock {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            valid_until_ms: AtomicU64::new(0),
        }
    }

    fn extend(&self, until: Instant) {
        let ms = until.saturating_duration_since(self.base).as_millis() as u64;
        self.valid_until_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn expire(&self) {
        self.valid_until_ms.store(0, Ordering::Relaxed);
    }

    /// Whether the lease is still held (reading may go on).
    pub fn is_valid(&self) -> bool {
        (self.base.elapsed().as_millis() as u64) < self.valid_until_ms.load(Ordering::Relaxed)
    }
}

/// What one round decided.
#[derive(Debug, Default)]
pub struct LeaseRound {
    /// Shards this worker holds now.
    pub owned: HashSet<String>,
    /// Shards it held and lost (taken after it failed to renew in time).
    pub lost: Vec<String>,
    /// Shards another worker asked for: stop reading them, then [`Leases::release`] to it.
    pub handoff: Vec<(String, String)>,
}

/// A lease as read from the table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lease {
    shard: String,
    owner: String,
    counter: u64,
    ended: bool,
    handoff_to: Option<String>,
}

/// This worker's leases and what it has seen of everyone else's.
#[derive(Debug)]
pub struct Leases {
    client: aws_sdk_dynamodb::Client,
    table: String,
    stream: String,
    worker: String,
    duration: Duration,
    /// Leases held, with their clocks.
    held: HashMap<String, Arc<LeaseClock>>,
    /// Per shard: the (owner, counter) last seen and when it was first seen.
    seen: HashMap<String, (String, u64, Instant)>,
}

impl Leases {
    /// Uses (creating if missing, with on-demand billing) the lease table.
    ///
    /// # Errors
    /// [`LeaseError`] when the table cannot be described or created.
    pub async fn connect(
        client: aws_sdk_dynamodb::Client,
        table: &str,
        stream: &str,
        worker: &str,
        duration: Duration,
    ) -> Result<Self, LeaseError> {
        let err = |why: String| LeaseError {
            table: table.to_owned(),
            why,
        };
        let status = match client.describe_table().table_name(table).send().await {
            Ok(out) => out.table.and_then(|t| t.table_status),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                info!(
                    table,
                    "Creating the DynamoDB lease table (on-demand billing)"
                );
                client
                    .create_table()
                    .table_name(table)
                    .billing_mode(BillingMode::PayPerRequest)
                    .attribute_definitions(
                        AttributeDefinition::builder()
                            .attribute_name("lease_key")
                            .attribute_type(ScalarAttributeType::S)
                            .build()
                            .map_err(|e| err(e.to_string()))?,
                    )
                    .key_schema(
                        KeySchemaElement::builder()
                            .attribute_name("lease_key")
                            .key_type(KeyType::Hash)
                            .build()
                            .map_err(|e| err(e.to_string()))?,
                    )
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| err(describe(&e)))
                    .or_else(|e| {
                        // Another worker created it at the same moment.
                        if e.why.contains("ResourceInUse") {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })?;
                None
            }
            Err(e) => return Err(err(describe(&e))),
        };
        if status != Some(TableStatus::Active) {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let out = client
                    .describe_table()
                    .table_name(table)
                    .send()
                    .await
                    .map_err(|e| err(describe(&e)))?;
                if out.table.and_then(|t| t.table_status) == Some(TableStatus::Active) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(err(
                        "the table did not become ACTIVE within 2 minutes".into()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        info!(
            table,
            stream,
            worker,
            lease_secs = duration.as_secs(),
            "Using shard leases"
        );
        Ok(Self {
            client,
            table: table.to_owned(),
            stream: stream.to_owned(),
            worker: worker.to_owned(),
            duration,
            held: HashMap::new(),
            seen: HashMap::new(),
        })
    }

    /// The clock of a held lease, for its reader.
    pub fn clock(&self, shard: &str) -> Option<Arc<LeaseClock>> {
        self.held.get(shard).cloned()
    }

    /// Whether this worker holds `shard`'s lease.
    pub fn owns(&self, shard: &str) -> bool {
        self.held.contains_key(shard)
    }

    fn key(&self, shard: &str) -> AttributeValue {
        AttributeValue::S(format!("{}/{shard}", self.stream))
    }

    /// How long a reader may go on after the renewal sent at `sent`.
    fn hold_until(&self, sent: Instant) -> Instant {
        sent + self.duration * 2 / 3
    }

    /// One round: renew what is held, note everyone's counters, take free and expired leases
    /// up to this worker's share of `open` (the stream's shards not known to be finished),
    /// and ask the busiest worker for one when short.
    pub async fn round(&mut self, open: &[String]) -> LeaseRound {
        let mut result = LeaseRound::default();
        let leases = match self.scan().await {
            Ok(l) => l,
            Err(e) => {
                warn!(table = %self.table, error = %e, "Could not read the lease table; renewing only");
                // Keep renewing what is held: the table may be answering writes.
                self.renew_held(&mut result, &HashMap::new()).await;
                return result;
            }
        };
        let now = Instant::now();
        for l in leases.values() {
            let entry = self
                .seen
                .entry(l.shard.clone())
                .or_insert_with(|| (l.owner.clone(), l.counter, now));
            if entry.0 != l.owner || entry.1 != l.counter {
                *entry = (l.owner.clone(), l.counter, now);
            }
        }
        // Leases written to this worker by someone else (a hand-off), or held under this
        // worker id before a restart: adopted, then renewed below like the others.
        for l in leases.values() {
            if l.owner == self.worker && !l.ended && !self.held.contains_key(&l.shard) {
                let clock = Arc::new(LeaseClock::new());
                self.held.insert(l.shard.clone(), clock);
                info!(shard = %l.shard, "Took a shard lease (handed over, or held before a restart)");
                metrics::counter!("sensorlake_kinesis_leases_taken_total").increment(1);
            }
        }
        self.renew_held(&mut result, &leases).await;

        let open_set: HashSet<&str> = open.iter().map(String::as_str).collect();
        let expired = |l: &Lease, seen: &HashMap<String, (String, u64, Instant)>| {
            !l.owner.is_empty()
                && seen
                    .get(&l.shard)
                    .is_some_and(|(_, _, since)| since.elapsed() >= self.duration)
        };
        // Live workers: owners of unexpired leases, those asking for hand-offs, and us.
        let mut load: HashMap<String, Vec<String>> = HashMap::new();
        load.entry(self.worker.clone()).or_default();
        for l in leases.values() {
            if l.ended || !open_set.contains(l.shard.as_str()) {
                continue;
            }
            if !l.owner.is_empty() && !expired(l, &self.seen) {
                load.entry(l.owner.clone())
                    .or_default()
                    .push(l.shard.clone());
            }
            if let Some(to) = &l.handoff_to {
                load.entry(to.clone()).or_default();
            }
        }
        let open_count = open
            .iter()
            .filter(|s| leases.get(s.as_str()).is_none_or(|l| !l.ended))
            .count();
        let target = open_count.div_ceil(load.len().max(1));

        // Free shards first (no lease yet, or released), then expired ones.
        let mut candidates: Vec<(String, Option<Lease>)> = Vec::new();
        for shard in open {
            match leases.get(shard) {
                None => candidates.push((shard.clone(), None)),
                Some(l) if l.ended || l.owner == self.worker => {}
                Some(l) if l.owner.is_empty() => candidates.push((shard.clone(), Some(l.clone()))),
                Some(_) => {}
            }
        }
        for shard in open {
            if let Some(l) = leases.get(shard)
                && !l.ended
                && l.owner != self.worker
                && expired(l, &self.seen)
            {
                candidates.push((shard.clone(), Some(l.clone())));
            }
        }
        for (shard, lease) in candidates {
            if self.held.len() >= target {
                break;
            }
            self.take(&shard, lease.as_ref()).await;
        }
        // Still short: ask the busiest worker above its share for one lease.
        if self.held.len() < target
            && let Some((victim, shards)) = load
                .iter()
                .filter(|(w, s)| **w != self.worker && s.len() > target)
                .max_by_key(|(_, s)| s.len())
            && let Some(shard) = shards.iter().find(|s| {
                leases
                    .get(s.as_str())
                    .is_some_and(|l| l.handoff_to.is_none())
            })
        {
            self.request_handoff(shard, victim).await;
        }
        result.owned = self.held.keys().cloned().collect();
        metrics::gauge!("sensorlake_kinesis_leases_held").set(self.held.len() as f64);
        result
    }

    /// Renews the held leases and nothing else (ListShards failing, or shutting down while the
    /// last commits run); losses are noticed at the next full round.
    pub async fn renew_only(&mut self) -> Vec<String> {
        let mut round = LeaseRound::default();
        self.renew_held(&mut round, &HashMap::new()).await;
        round.lost
    }

    /// Renews every held lease; a lease another worker asked for goes to `handoff`.
    async fn renew_held(&mut self, result: &mut LeaseRound, leases: &HashMap<String, Lease>) {
        let held: Vec<String> = self.held.keys().cloned().collect();
        for shard in held {
            if let Some(l) = leases.get(&shard) {
                if l.owner != self.worker {
                    self.lose(&shard, result, "another worker owns it now");
                    continue;
                }
                if let Some(to) = &l.handoff_to {
                    result.handoff.push((shard.clone(), to.clone()));
                }
            }
            let sent = Instant::now();
            let r = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("lease_key", self.key(&shard))
                .update_expression("SET #c = #c + :one")
                .condition_expression("#o = :me")
                .expression_attribute_names("#c", "counter")
                .expression_attribute_names("#o", "owner")
                .expression_attribute_values(":one", AttributeValue::N("1".into()))
                .expression_attribute_values(":me", AttributeValue::S(self.worker.clone()))
                .send()
                .await;
            match r {
                Ok(_) => {
                    let until = self.hold_until(sent);
                    if let Some(c) = self.held.get(&shard) {
                        c.extend(until);
                    }
                }
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
                {
                    self.lose(&shard, result, "another worker took it");
                }
                Err(e) => {
                    metrics::counter!("sensorlake_kinesis_lease_errors_total").increment(1);
                    warn!(shard = %shard, error = %describe(&e), "Could not renew a lease; reading stops if it cannot be renewed in time");
                }
            }
        }
    }

    fn lose(&mut self, shard: &str, result: &mut LeaseRound, why: &str) {
        if let Some(c) = self.held.remove(shard) {
            c.expire();
            warn!(shard = %shard, why, "Lost a shard lease");
            result.lost.push(shard.to_owned());
        }
    }

    /// Takes `shard`'s lease: creates it when missing, else conditioned on the counter seen.
    async fn take(&mut self, shard: &str, lease: Option<&Lease>) {
        let sent = Instant::now();
        let r = match lease {
            None => self
                .client
                .put_item()
                .table_name(&self.table)
                .item("lease_key", self.key(shard))
                .item("stream", AttributeValue::S(self.stream.clone()))
                .item("shard", AttributeValue::S(shard.to_owned()))
                .item("owner", AttributeValue::S(self.worker.clone()))
                .item("counter", AttributeValue::N("0".into()))
                .item("ended", AttributeValue::Bool(false))
                .condition_expression("attribute_not_exists(lease_key)")
                .send()
                .await
                .map(|_| ())
                .map_err(|e| {
                    (
                        e.as_service_error()
                            .is_some_and(|s| s.is_conditional_check_failed_exception()),
                        describe(&e),
                    )
                }),
            Some(l) => self
                .client
                .update_item()
                .table_name(&self.table)
                .key("lease_key", self.key(shard))
                .update_expression("SET #o = :me, #c = #c + :one REMOVE handoff_to")
                .condition_expression("#c = :seen AND #o = :prev")
                .expression_attribute_names("#c", "counter")
                .expression_attribute_names("#o", "owner")
                .expression_attribute_values(":one", AttributeValue::N("1".into()))
                .expression_attribute_values(":me", AttributeValue::S(self.worker.clone()))
                .expression_attribute_values(":seen", AttributeValue::N(l.counter.to_string()))
                .expression_attribute_values(":prev", AttributeValue::S(l.owner.clone()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| {
                    (
                        e.as_service_error()
                            .is_some_and(|s| s.is_conditional_check_failed_exception()),
                        describe(&e),
                    )
                }),
        };
        match r {
            Ok(()) => {
                let clock = Arc::new(LeaseClock::new());
                clock.extend(self.hold_until(sent));
                self.held.insert(shard.to_owned(), clock);
                info!(shard = %shard, from = ?lease.map(|l| l.owner.as_str()).filter(|o| !o.is_empty()), "Took a shard lease");
                metrics::counter!("sensorlake_kinesis_leases_taken_total").increment(1);
            }
            Err((true, _)) => debug!(shard = %shard, "Another worker took the lease first"),
            Err((false, e)) => warn!(shard = %shard, error = %e, "Could not take a lease"),
        }
    }

    async fn request_handoff(&mut self, shard: &str, owner: &str) {
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("lease_key", self.key(shard))
            .update_expression("SET handoff_to = :me")
            .condition_expression("#o = :owner AND attribute_not_exists(handoff_to)")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":me", AttributeValue::S(self.worker.clone()))
            .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
            .send()
            .await;
        match r {
            Ok(_) => info!(shard = %shard, owner, "Asked for a shard lease to balance the load"),
            Err(e) => debug!(shard = %shard, error = %describe(&e), "Hand-off request not placed"),
        }
    }

    /// Gives up `shard` (after its reader stopped and its uncommitted records were dropped):
    /// to `to` when it asked for it, else free for anyone.
    pub async fn release(&mut self, shard: &str, to: Option<&str>) {
        let Some(clock) = self.held.remove(shard) else {
            return;
        };
        clock.expire();
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("lease_key", self.key(shard))
            .update_expression("SET #o = :to, #c = #c + :one REMOVE handoff_to")
            .condition_expression("#o = :me")
            .expression_attribute_names("#c", "counter")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":me", AttributeValue::S(self.worker.clone()))
            .expression_attribute_values(":to", AttributeValue::S(to.unwrap_or("").to_owned()))
            .send()
            .await;
        match r {
            Ok(_) => info!(shard = %shard, to = ?to, "Released a shard lease"),
            Err(e) => {
                debug!(shard = %shard, error = %describe(&e), "Lease not released (it expires instead)")
            }
        }
    }

    /// Releases every held lease (shutdown).
    pub async fn release_all(&mut self) {
        let held: Vec<String> = self.held.keys().cloned().collect();
        for shard in held {
            self.release(&shard, None).await;
        }
    }

    /// Marks `shard` read to its end: nobody takes its lease again.
    pub async fn mark_ended(&mut self, shard: &str) {
        if let Some(clock) = self.held.remove(shard) {
            clock.expire();
        }
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("lease_key", self.key(shard))
            .update_expression("SET ended = :t, #o = :none, #c = #c + :one")
            .expression_attribute_names("#c", "counter")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .expression_attribute_values(":none", AttributeValue::S(String::new()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .send()
            .await;
        if let Err(e) = r {
            debug!(shard = %shard, error = %describe(&e), "Could not mark the lease ended (harmless: the lake's checkpoint says so)");
        }
    }

    /// Every lease of this stream, by shard.
    async fn scan(&self) -> Result<HashMap<String, Lease>, String> {
        let mut out = HashMap::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .filter_expression("#s = :s")
                .expression_attribute_names("#s", "stream")
                .expression_attribute_values(":s", AttributeValue::S(self.stream.clone()))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| describe(&e))?;
            for item in page.items.unwrap_or_default() {
                let s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
                let Some(shard) = s("shard") else { continue };
                let lease = Lease {
                    owner: s("owner").unwrap_or_default(),
                    counter: item
                        .get("counter")
                        .and_then(|v| v.as_n().ok())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0),
                    ended: item
                        .get("ended")
                        .and_then(|v| v.as_bool().ok())
                        .copied()
                        .unwrap_or(false),
                    handoff_to: s("handoff_to").filter(|h| !h.is_empty()),
                    shard: shard.clone(),
                };
                out.insert(shard, lease);
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        Ok(out)
    }
}
