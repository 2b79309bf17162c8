//! The Kinesis fixture against the real kinesalite: what its docs claim kinesalite supports,
//! persistence across a restart, and the fault proxy's faults as the SDK reports them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::primitives::{Blob, DateTime};
use aws_sdk_kinesis::types::{
    PutRecordsRequestEntry, ShardFilter, ShardFilterType, ShardIteratorType,
};
use sensorlake_testkit::kinesis::{error_chain, kinesis_config, wait_active};
use sensorlake_testkit::{Kinesalite, KinesisFaultProxy};

fn entry(key: &str, data: &str) -> PutRecordsRequestEntry {
    PutRecordsRequestEntry::builder()
        .partition_key(key)
        .data(Blob::new(data.as_bytes()))
        .build()
        .unwrap()
}

/// Puts `n` records `"{prefix}{i}"` with partition key `key`; returns their sequence numbers.
async fn put(client: &Client, stream: &str, key: &str, prefix: &str, n: usize) -> Vec<String> {
    let out = client
        .put_records()
        .stream_name(stream)
        .set_records(Some(
            (0..n)
                .map(|i| entry(key, &format!("{prefix}{i}")))
                .collect(),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(out.failed_record_count, Some(0));
    out.records
        .into_iter()
        .map(|r| r.sequence_number.unwrap())
        .collect()
}

async fn iterator(
    client: &Client,
    stream: &str,
    shard: &str,
    kind: ShardIteratorType,
    seq: Option<&str>,
) -> String {
    client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard)
        .shard_iterator_type(kind)
        .set_starting_sequence_number(seq.map(str::to_owned))
        .send()
        .await
        .unwrap()
        .shard_iterator
        .unwrap()
}

/// The data of every record from `it` on, following NextShardIterator until a call returns
/// nothing; also whether the shard ended (no NextShardIterator).
async fn read_all(client: &Client, mut it: String) -> (Vec<String>, bool) {
    let mut got = Vec::new();
    loop {
        let out = client
            .get_records()
            .shard_iterator(&it)
            .send()
            .await
            .unwrap();
        let n = out.records.len();
        got.extend(
            out.records
                .into_iter()
                .map(|r| String::from_utf8(r.data.into_inner()).unwrap()),
        );
        match out.next_shard_iterator {
            None => return (got, true),
            Some(next) if n == 0 => {
                let _ = next;
                return (got, false);
            }
            Some(next) => it = next,
        }
    }
}

async fn shard_ids(client: &Client, stream: &str) -> Vec<String> {
    client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap()
        .shards
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.shard_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_put_with_the_sdk_are_read_back_through_every_iterator_type() {
    let k = Kinesalite::start();
    k.create_stream("s", 1).await;
    let c = k.client();
    let shard = "shardId-000000000000";
    let before = DateTime::from_secs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            - 1,
    );
    let seqs = put(&c, "s", "k", "r", 500).await;
    assert_eq!(seqs.len(), 500);
    assert!(
        seqs.iter()
            .all(|s| s.len() == 56 && s.bytes().all(|b| b.is_ascii_digit())),
        "56-digit sequence numbers: {}",
        seqs[0]
    );

    let (all, ended) = read_all(
        &c,
        iterator(&c, "s", shard, ShardIteratorType::TrimHorizon, None).await,
    )
    .await;
    assert_eq!(all.len(), 500);
    assert_eq!(
        (all[0].as_str(), all[499].as_str(), ended),
        ("r0", "r499", false)
    );

    let at = iterator(
        &c,
        "s",
        shard,
        ShardIteratorType::AtSequenceNumber,
        Some(&seqs[10]),
    )
    .await;
    assert_eq!(read_all(&c, at).await.0[0], "r10");
    let after = iterator(
        &c,
        "s",
        shard,
        ShardIteratorType::AfterSequenceNumber,
        Some(&seqs[10]),
    )
    .await;
    assert_eq!(read_all(&c, after).await.0[0], "r11");

    let latest = iterator(&c, "s", shard, ShardIteratorType::Latest, None).await;
    put(&c, "s", "k", "late", 2).await;
    assert_eq!(read_all(&c, latest).await.0, ["late0", "late1"]);

    let ts = c
        .get_shard_iterator()
        .stream_name("s")
        .shard_id(shard)
        .shard_iterator_type(ShardIteratorType::AtTimestamp)
        .timestamp(before)
        .send()
        .await
        .unwrap()
        .shard_iterator
        .unwrap();
    assert_eq!(read_all(&c, ts).await.0.len(), 502);
}

/// The documented hole: AT_TIMESTAMP past every record never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_timestamp_past_the_last_record_never_answers() {
    let k = Kinesalite::start();
    k.create_stream("s", 1).await;
    let c = Client::from_conf(
        kinesis_config(&k.endpoint())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                aws_sdk_kinesis::config::timeout::TimeoutConfig::builder()
                    .operation_timeout(Duration::from_millis(1500))
                    .build(),
            )
            .build(),
    );
    let r = c
        .get_shard_iterator()
        .stream_name("s")
        .shard_id("shardId-000000000000")
        .shard_iterator_type(ShardIteratorType::AtTimestamp)
        .timestamp(DateTime::from_secs(1))
        .send()
        .await;
    let e = r.expect_err("kinesalite 3.3.3 hangs on AT_TIMESTAMP with no record after it");
    assert!(
        matches!(e, aws_sdk_kinesis::error::SdkError::TimeoutError(_)),
        "{}",
        error_chain(&e)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shards_ignores_max_results_and_shard_filter_and_a_next_token_kills_it() {
    let k = Kinesalite::start();
    k.create_stream("s", 4).await;
    let c = k.client();
    let out = c
        .list_shards()
        .stream_name("s")
        .max_results(1)
        .shard_filter(
            ShardFilter::builder()
                .r#type(ShardFilterType::AtLatest)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(out.shards.unwrap_or_default().len(), 4);
    assert_eq!(out.next_token, None);
    let after = c
        .list_shards()
        .stream_name("s")
        .exclusive_start_shard_id("shardId-000000000001")
        .send()
        .await
        .unwrap();
    let ids: Vec<_> = after
        .shards
        .unwrap()
        .into_iter()
        .map(|s| s.shard_id)
        .collect();
    assert_eq!(ids, ["shardId-000000000002", "shardId-000000000003"]);
    // A NextToken kills the server (documented); a restart brings it back with its streams.
    let mut k = k;
    let e = c
        .list_shards()
        .next_token("anything")
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(e, aws_sdk_kinesis::error::SdkError::DispatchFailure(_)),
        "{}",
        error_chain(&e)
    );
    k.restart();
    assert_eq!(shard_ids(&k.client(), "s").await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_close_parents_which_end_without_a_next_iterator() {
    let k = Kinesalite::start();
    k.create_stream("s", 2).await;
    let c = k.client();
    let key = "the-one-key";
    put(&c, "s", key, "before", 3).await;
    let shards = c
        .list_shards()
        .stream_name("s")
        .send()
        .await
        .unwrap()
        .shards
        .unwrap();
    // The shard the key hashes to: find it by reading.
    let mut parent = None;
    for s in &shards {
        let it = iterator(&c, "s", &s.shard_id, ShardIteratorType::TrimHorizon, None).await;
        if !read_all(&c, it).await.0.is_empty() {
            parent = Some(s.clone());
        }
    }
    let parent = parent.unwrap();
    let range = parent.hash_key_range.unwrap();
    let start: u128 = range.starting_hash_key.parse().unwrap();
    let end: u128 = range.ending_hash_key.parse().unwrap();
    c.split_shard()
        .stream_name("s")
        .shard_to_split(&parent.shard_id)
        .new_starting_hash_key((start + (end - start) / 2).to_string())
        .send()
        .await
        .unwrap();
    wait_active(&c, "s").await;
    put(&c, "s", key, "after", 2).await;

    let listed = c
        .list_shards()
        .stream_name("s")
        .send()
        .await
        .unwrap()
        .shards
        .unwrap();
    assert_eq!(
        listed.len(),
        4,
        "two open children and the closed parent, plus the other shard"
    );
    let closed = listed
        .iter()
        .find(|s| s.shard_id == parent.shard_id)
        .unwrap();
    assert!(
        closed
            .sequence_number_range
            .as_ref()
            .unwrap()
            .ending_sequence_number
            .is_some()
    );
    let children: Vec<_> = listed
        .iter()
        .filter(|s| s.parent_shard_id.as_deref() == Some(parent.shard_id.as_str()))
        .collect();
    assert_eq!(children.len(), 2);

    // The parent holds the records from before, then ends: no NextShardIterator.
    let it = iterator(
        &c,
        "s",
        &parent.shard_id,
        ShardIteratorType::TrimHorizon,
        None,
    )
    .await;
    let (old, ended) = read_all(&c, it).await;
    assert_eq!((old.len(), ended), (3, true));
    // The new records went to a child.
    let mut newer = Vec::new();
    for child in &children {
        let it = iterator(
            &c,
            "s",
            &child.shard_id,
            ShardIteratorType::TrimHorizon,
            None,
        )
        .await;
        newer.extend(read_all(&c, it).await.0);
    }
    assert_eq!(newer, ["after0", "after1"]);

    // Merge the two children back: both close, the merged shard names both parents.
    c.merge_shards()
        .stream_name("s")
        .shard_to_merge(&children[0].shard_id)
        .adjacent_shard_to_merge(&children[1].shard_id)
        .send()
        .await
        .unwrap();
    wait_active(&c, "s").await;
    let listed = c
        .list_shards()
        .stream_name("s")
        .send()
        .await
        .unwrap()
        .shards
        .unwrap();
    let merged = listed.last().unwrap();
    assert_eq!(
        merged.parent_shard_id.as_deref(),
        Some(children[0].shard_id.as_str())
    );
    assert_eq!(
        merged.adjacent_parent_shard_id.as_deref(),
        Some(children[1].shard_id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_records_survive_a_restart_on_the_same_directory() {
    let mut k = Kinesalite::start();
    let port = k.port();
    k.create_stream("kept", 2).await;
    put(&k.client(), "kept", "k", "r", 20).await;
    k.restart();
    assert_eq!(k.port(), port);
    let c = k.client();
    assert_eq!(shard_ids(&c, "kept").await.len(), 2);
    let mut n = 0;
    for shard in shard_ids(&c, "kept").await {
        let it = iterator(&c, "kept", &shard, ShardIteratorType::TrimHorizon, None).await;
        n += read_all(&c, it).await.0.len();
    }
    assert_eq!(n, 20);
}

#[test]
fn a_missing_kinesalite_is_named_with_the_fix() {
    // Runs itself as a child with SENSORLAKE_KINESALITE pointing nowhere.
    if std::env::var_os("SENSORLAKE_TESTKIT_CHILD").is_some() {
        let _ = Kinesalite::start();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "a_missing_kinesalite_is_named_with_the_fix",
            "--exact",
            "--nocapture",
        ])
        .env("SENSORLAKE_TESTKIT_CHILD", "1")
        .env("SENSORLAKE_KINESALITE", "/nonexistent/kinesalite")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("scripts/test installs it") && text.contains("/nonexistent/kinesalite"),
        "{text}"
    );
}

/// `env()` is all the SDK's standard configuration needs, in a child process (the test
/// binary runs itself) whose endpoint is the fault proxy: the proxy sees its calls.
#[test]
fn a_child_process_reaches_kinesalite_through_the_proxy_with_env_alone() {
    if let Some(stream) = std::env::var_os("SENSORLAKE_TESTKIT_CHILD_STREAM") {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            sensorlake_testkit::install_crypto_provider();
            let conf = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let c = Client::new(&conf);
            let names = c.list_streams().send().await.unwrap().stream_names;
            assert_eq!(names, [stream.to_string_lossy().into_owned()]);
        });
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let k = Kinesalite::start();
    rt.block_on(k.create_stream("via-proxy", 1));
    let proxy = KinesisFaultProxy::start(k.port(), 1);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "a_child_process_reaches_kinesalite_through_the_proxy_with_env_alone",
            "--exact",
            "--nocapture",
        ])
        .env("SENSORLAKE_TESTKIT_CHILD_STREAM", "via-proxy")
        .env("HOME", "/nonexistent");
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
        child.env_remove(key);
    }
    child.envs(proxy.env());
    let out = child.output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(proxy.faults().forwarded_total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_throttles_and_expires_get_records_as_the_sdk_expects() {
    use aws_sdk_kinesis::operation::get_records::GetRecordsError;
    use std::sync::atomic::Ordering::Relaxed;
    let k = Kinesalite::start();
    k.create_stream("s", 2).await;
    put(&k.client(), "s", "k", "r", 5).await;
    let proxy = KinesisFaultProxy::start(k.port(), 7);
    let f = proxy.faults();
    let no_retries = Client::from_conf(
        kinesis_config(&proxy.endpoint())
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    let shard = "shardId-000000000001";
    let it = iterator(
        &no_retries,
        "s",
        shard,
        ShardIteratorType::TrimHorizon,
        None,
    )
    .await;

    f.throttle_next.store(1, Relaxed);
    let e = no_retries
        .get_records()
        .shard_iterator(&it)
        .send()
        .await
        .unwrap_err();
    let service = e.into_service_error();
    assert!(
        matches!(
            service,
            GetRecordsError::ProvisionedThroughputExceededException(_)
        ),
        "{service:?}"
    );
    assert!(
        service
            .to_string()
            .contains("Rate exceeded for shard shardId-000000000001 in stream s")
    );

    f.expire_next.store(1, Relaxed);
    let e = no_retries
        .get_records()
        .shard_iterator(&it)
        .send()
        .await
        .unwrap_err();
    assert!(matches!(
        e.into_service_error(),
        GetRecordsError::ExpiredIteratorException(_)
    ),);

    // The fault is gone: the same iterator works, and its successor is still tracked.
    let out = no_retries
        .get_records()
        .shard_iterator(&it)
        .send()
        .await
        .unwrap();
    let next = out.next_shard_iterator.unwrap();
    no_retries
        .get_records()
        .shard_iterator(&next)
        .send()
        .await
        .unwrap();
    assert_eq!(f.get_records_total(), 4);
    assert_eq!(
        f.get_records_by_shard().get(&format!("s/{shard}")),
        Some(&4),
        "{:?}",
        f.get_records_by_shard()
    );
    assert_eq!(
        (f.throttled_total(), f.expired_total(), f.faults_total()),
        (1, 1, 2)
    );

    // With the SDK's standard retries (3 attempts), a throttle every time surfaces after 3.
    f.throttle_pct.store(100, Relaxed);
    let e = proxy
        .client()
        .get_records()
        .shard_iterator(&next)
        .send()
        .await
        .unwrap_err();
    assert!(
        e.into_service_error()
            .is_provisioned_throughput_exceeded_exception()
    );
    assert_eq!(f.throttled_total(), 4);
    f.throttle_pct.store(0, Relaxed);
    // A percentage: about that share of calls fail, seeded.
    f.expire_pct.store(50, Relaxed);
    let mut expired = 0;
    for _ in 0..40 {
        if no_retries
            .get_records()
            .shard_iterator(&next)
            .send()
            .await
            .is_err()
        {
            expired += 1;
        }
    }
    assert!((8..=32).contains(&expired), "{expired} of 40 at 50%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_fails_single_put_records_entries_and_only_the_others_land() {
    use std::sync::atomic::Ordering::Relaxed;
    let k = Kinesalite::start();
    k.create_stream("s", 1).await;
    let proxy = KinesisFaultProxy::start(k.port(), 3);
    proxy.faults().put_fail_pct.store(30, Relaxed);
    let out = proxy
        .client()
        .put_records()
        .stream_name("s")
        .set_records(Some(
            (0..100).map(|i| entry("k", &format!("r{i}"))).collect(),
        ))
        .send()
        .await
        .unwrap();
    let failed: Vec<usize> = out
        .records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.error_code.is_some())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(out.failed_record_count, Some(failed.len() as i32));
    assert!(
        (10..=50).contains(&failed.len()),
        "{} of 100 at 30%",
        failed.len()
    );
    assert_eq!(
        proxy.faults().put_entries_failed_total(),
        failed.len() as u64
    );
    assert_eq!(
        out.records[failed[0]].error_code.as_deref(),
        Some("ProvisionedThroughputExceededException")
    );
    assert!(
        out.records
            .iter()
            .all(|r| r.error_code.is_some() != r.sequence_number.is_some())
    );
    let c = k.client();
    let it = iterator(
        &c,
        "s",
        "shardId-000000000000",
        ShardIteratorType::TrimHorizon,
        None,
    )
    .await;
    let landed = read_all(&c, it).await.0;
    let expected: Vec<String> = (0..100)
        .filter(|i| !failed.contains(i))
        .map(|i| format!("r{i}"))
        .collect();
    assert_eq!(landed, expected);
}
