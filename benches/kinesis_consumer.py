#!/usr/bin/env python3
"""End-to-end Kinesis consumer benchmark: sensorlake against a hand-written Python consumer.

Starts kinesalite (npm, as scripts/test installs it) on loopback, creates a stream, fills it
with `sensorlake simulate --kinesis` (N readings, part KPL-aggregated, 1% bad), then reads the
whole stream from TRIM_HORIZON twice, one consumer at a time:

  sensorlake  `sensorlake run --kinesis` into a local lake, until its commit records account
              for every reading; CPU time and peak RSS read from /proc.
  python      the consumer users write today: boto3 GetRecords per shard, json.loads, columns,
              pyarrow Parquet per 10,000 rows (no validation, de-duplication, KPL, partitioning
              or commit protocol - it does less work than sensorlake); CPU and peak RSS of a
              child process from getrusage.

kinesalite (node) serves both and is usually the bottleneck for wall time, so the figures to
compare are CPU seconds per million readings and peak RSS. Usage:

  python3 benches/kinesis_consumer.py --sensorlake target/release/sensorlake --readings 200000
"""
import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

NPM = os.path.expanduser(os.environ.get("SENSORLAKE_KINESALITE", "~/.cache/sensorlake-npm/node_modules/kinesalite"))
ENV_BASE = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def python_consumer(endpoint, stream, total, out_dir):
    """Runs in a child process; prints its own CPU seconds and peak RSS as JSON."""
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    k = boto3.client("kinesis", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="bench", aws_secret_access_key="bench")
    shards = [s["ShardId"] for s in k.list_shards(StreamName=stream)["Shards"]]
    its = {s: k.get_shard_iterator(StreamName=stream, ShardId=s,
                                   ShardIteratorType="TRIM_HORIZON")["ShardIterator"] for s in shards}
    cols = {"device_id": [], "seq": [], "ts": [], "payload": []}
    seen, files, t0 = 0, 0, time.time()
    while seen < total and time.time() - t0 < 600:
        for s in shards:
            r = k.get_records(ShardIterator=its[s], Limit=10000)
            its[s] = r["NextShardIterator"]
            for rec in r["Records"]:
                seen += 1
                try:
                    d = json.loads(rec["Data"])
                    cols["device_id"].append(str(d.get("device_id")))
                    cols["seq"].append(int(d.get("seq", 0)))
                    cols["ts"].append(str(d.get("ts")))
                except Exception:
                    cols["device_id"].append(None)
                    cols["seq"].append(None)
                    cols["ts"].append(None)
                cols["payload"].append(rec["Data"])
                if len(cols["seq"]) >= 10000:
                    pq.write_table(pa.table(cols), f"{out_dir}/part-{files}.parquet", compression="zstd")
                    files += 1
                    cols = {k2: [] for k2 in cols}
    if cols["seq"]:
        pq.write_table(pa.table(cols), f"{out_dir}/part-{files}.parquet", compression="zstd")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"records": seen, "cpu": ru.ru_utime + ru.ru_stime, "rss_mib": ru.ru_maxrss / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sensorlake", default="target/release/sensorlake")
    ap.add_argument("--readings", type=int, default=200000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--kpl-share", default="0", help="the Python consumer cannot de-aggregate: keep 0 to compare")
    ap.add_argument("--python-child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.python_child:
        endpoint, stream, out = a.python_child
        python_consumer(endpoint, stream, int(a.readings), out)
        return
    work = tempfile.mkdtemp(prefix="sl-kinesis-bench-")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    js = (f"require({json.dumps(NPM)})({{path: {json.dumps(work + '/db')}, createStreamMs: 0, "
          f"shardLimit: 100}}).listen({port}, '127.0.0.1')")
    node = subprocess.Popen(["node", "-e", js])
    env = dict(os.environ, **ENV_BASE, AWS_ENDPOINT_URL_KINESIS=endpoint)
    try:
        time.sleep(1.5)
        import boto3
        k = boto3.client("kinesis", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id="bench", aws_secret_access_key="bench")
        k.create_stream(StreamName="bench", ShardCount=a.shards)
        time.sleep(0.5)
        t = time.time()
        subprocess.run([a.sensorlake, "simulate", "--kinesis", "bench", "--devices", "500",
                        "--readings", str(a.readings), "--bad-ratio", "0.01", "--seed", "1",
                        "--kpl-share", a.kpl_share, "--manifest", f"{work}/manifest.json"],
                       env=env, check=True, stderr=subprocess.DEVNULL)
        with open(f"{work}/manifest.json") as f:
            messages = json.load(f)["messages"]
        print(f"filled the stream with {a.readings} readings ({messages} records) in {time.time() - t:.1f} s")

        # sensorlake
        lake = f"{work}/lake"
        t = time.time()
        p = subprocess.Popen([a.sensorlake, "run", "--kinesis", "bench", "--lake", lake],
                             env=dict(env, SENSORLAKE_FLUSH__MAX_AGE_MS="1000"),
                             stderr=subprocess.DEVNULL)
        received, cpu, rss = 0, 0.0, 0.0
        while time.time() - t < 600:
            time.sleep(0.2)
            received = 0
            for root, _, names in os.walk(f"{lake}/_sensorlake/commits"):
                for n in names:
                    if n.endswith(".json"):
                        try:
                            with open(os.path.join(root, n)) as f:
                                received += json.load(f)["counts"]["received"]
                        except (OSError, ValueError):
                            pass
            cpu, rss = cpu_secs(p.pid), peak_rss_mib(p.pid)
            if received >= a.readings:
                break
        wall = time.time() - t
        p.terminate()
        p.wait()
        ok = subprocess.run([a.sensorlake, "verify", "--lake", lake, "--manifest", f"{work}/manifest.json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        print(f"sensorlake: {received} readings in {wall:.1f} s wall, {cpu:.2f} CPU s "
              f"({cpu / received * 1e6:.1f} CPU s per million), peak RSS {rss:.0f} MiB, verify exact: {ok}")

        # python
        out = f"{work}/py"
        os.makedirs(out)
        t = time.time()
        r = subprocess.run([sys.executable, __file__, "--readings", str(messages),
                            "--python-child", endpoint, "bench", out],
                           env=env, check=True, capture_output=True, text=True)
        wall = time.time() - t
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"python:     {res['records']} records in {wall:.1f} s wall, {res['cpu']:.2f} CPU s "
              f"({res['cpu'] / res['records'] * 1e6:.1f} CPU s per million records), "
              f"peak RSS {res['rss_mib']:.0f} MiB")
    finally:
        node.terminate()
        node.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
