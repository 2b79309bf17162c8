"""Reads a sensorlake lake with DuckDB and pyarrow and checks it against the manifest.

Usage: interop.py LAKE MANIFEST REGISTRY_CSV. Exits non-zero with a message on any mismatch.
"""
import csv
import json
import sys

import duckdb
import pyarrow.compute as pc
import pyarrow.dataset as ds

lake, manifest_path, registry_path = sys.argv[1:4]
manifest = json.load(open(manifest_path))
expected_rows = sum(d["count"] for d in manifest["valid"].values())
expected_devices = len(manifest["valid"])
registry = {r["device_id"]: r for r in csv.DictReader(open(registry_path))}

glob = f"{lake}/telemetry/**/*.parquet"
con = duckdb.connect()
rows, devices, min_date, hours = con.execute(
    f"SELECT count(*), count(DISTINCT device_id), min(date), count(DISTINCT hour) "
    f"FROM read_parquet('{glob}', hive_partitioning=true)"
).fetchone()
assert rows == expected_rows, f"duckdb: {rows} rows, manifest says {expected_rows}"
assert devices == expected_devices, f"duckdb: {devices} devices, expected {expected_devices}"
assert min_date is not None and hours >= 1, "hive partition columns date/hour are readable"
ts_type = con.execute(
    f"SELECT typeof(ts) FROM read_parquet('{glob}', hive_partitioning=true) LIMIT 1"
).fetchone()[0]
assert ts_type.startswith("TIMESTAMP"), f"ts is a timestamp in DuckDB, got {ts_type}"
# Per-device row counts match the manifest.
per_device = dict(con.execute(
    f"SELECT device_id, count(*) FROM read_parquet('{glob}', hive_partitioning=true) GROUP BY 1"
).fetchall())
for dev, d in manifest["valid"].items():
    assert per_device.get(dev) == d["count"], f"{dev}: {per_device.get(dev)} rows, expected {d['count']}"
# Enrichment: every row carries its device's site from the registry.
bad_sites = con.execute(
    f"SELECT device_id, site FROM read_parquet('{glob}', hive_partitioning=true)"
).fetchall()
for dev, site in bad_sites[:5000]:
    assert registry[dev]["site"] == site, f"{dev}: site {site}, registry says {registry[dev]['site']}"
# Aggregates: values are in range and max seq per device matches the manifest.
max_seq = dict(con.execute(
    f"SELECT device_id, max(seq) FROM read_parquet('{glob}', hive_partitioning=true) GROUP BY 1"
).fetchall())
for dev, d in manifest["valid"].items():
    assert max_seq[dev] <= d["last_seq"], f"{dev}: max seq {max_seq[dev]} > {d['last_seq']}"
lo, hi = con.execute(
    f"SELECT min(humidity_pct), max(humidity_pct) FROM read_parquet('{glob}', hive_partitioning=true)"
).fetchone()
assert 0 <= lo <= hi <= 100, f"humidity out of range: {lo}..{hi}"

dl = con.execute(
    f"SELECT count(*) FROM read_parquet('{lake}/dead_letter/**/*.parquet', hive_partitioning=true)"
).fetchone()[0]
assert dl >= len(manifest["bad"]), f"dead letters: {dl} < {len(manifest['bad'])}"

dataset = ds.dataset(f"{lake}/telemetry", format="parquet", partitioning="hive")
table = dataset.to_table()
assert table.num_rows == expected_rows, f"pyarrow: {table.num_rows} rows"
assert "date" in table.column_names and "hour" in table.column_names, table.column_names
assert str(table.schema.field("ts").type) == "timestamp[us, tz=UTC]", table.schema.field("ts").type
total_seq = pc.sum(table.column("seq")).as_py()
duck_total = con.execute(
    f"SELECT sum(seq) FROM read_parquet('{glob}', hive_partitioning=true)"
).fetchone()[0]
assert total_seq == duck_total, f"pyarrow sum(seq) {total_seq} != duckdb {duck_total}"
print(f"interop ok: {rows} rows, {devices} devices, {dl} dead letters")
