"""What one Ray actor call costs its caller (wall and the calling thread's CPU), beside the
other per-request work of an edge agent: a recorder row per call, 20 rows in one call, the
agent's metrics, an answer's JSON. `python3 bench/results/cell_overhead/ray_call_cost.py`
(a local Ray of its own; output in ray_call_cost.txt)."""
import time, math, json, sys, tempfile
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import ray
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": sys.path[0]}})
from ray_scout.actors.recorder import Recorder
from ray_scout.actors.metrics import AgentMetrics
from ray_scout.core.modes import Mode
rec = ray.remote(Recorder).options(num_cpus=0).remote(tempfile.mkdtemp())
ray.get(rec.counts.remote())
row = dict(request_id=1, agent="a1", policy="adaptive", allocator="equal", t_arrival_s=1.0, context_tokens=256, mode="scout",
 reason="x"*40, bandwidth_estimate_bps=1e6, grant_bps=1e6, payload_bytes=296, expected_latency_s=1.0,
 agent_queue_s=0.0001, edge_s=0.02, prefill_s=0.01, select_s=0.0, encode_s=0.0, tx_s=0.01, tx_send_s=0.0001,
 cloud_queue_s=0.1, cloud_s=1.0, rx_s=0.0, latency_s=1.2, overhead_s=0.002, deadline_s=3.0, deadline_met=True,
 cancelled=False, outcome="hit", error="", quality=0.5, f1=math.nan, em=math.nan, answer="", measured_bps=1e6,
 arrival_unix_s=time.time(), tx_start_unix_s=time.time(), tx_end_unix_s=time.time(), tx_acked_unix_s=time.time(),
 answer_unix_s=time.time(), cloud_model="qwen2.5-7b", done_unix_s=time.time())
m = AgentMetrics("a1", "adaptive", "equal")
def bench(name, f, n=2000):
    f()
    t = time.perf_counter(); c = time.thread_time()
    for _ in range(n): f()
    print(f"{name}: {1e6*(time.perf_counter()-t)/n:.1f} us wall, {1e6*(time.thread_time()-c)/n:.1f} us cpu", flush=True)
bench("recorder.add.remote", lambda: rec.add.remote("requests", row))
bench("metrics.request", lambda: m.request(Mode.SCOUT, "hit", 296, 1.2, 0.5, 1e6, 1e6))
bench("json.loads answer", lambda: json.loads(b'{"text":"abc def","mode":"scout","model":"qwen2.5-7b","cloud":"cloud0","cloud_queue_s":0.1,"cloud_compute_s":1.0,"batch_size":5}'))
bench("json.dumps answer", lambda: json.dumps({"text":"abc def","mode":"scout","model":"qwen2.5-7b","cloud":"cloud0","cloud_queue_s":0.1,"cloud_compute_s":1.0,"batch_size":5}).encode())
rows=[dict(row) for _ in range(20)]
bench("recorder.add_many.remote 20 rows (per call)", lambda: rec.add_many.remote("requests", rows), n=200)
ray.get(rec.counts.remote())
ray.shutdown()
