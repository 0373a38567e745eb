#!/bin/bash
# A/B at 1,000 agents, interleaved: base (HEAD + timestamps) and each variant (its tree + timestamps).
# usage: ab.sh TAG ROUNDS VARIANT...
tag=$1; rounds=$2; shift 2
for r in $(seq $rounds); do
  for v in "$@"; do
    cd /tmp/cell5/$v
    echo "[ab] $(date -u +%H:%M:%S) $v round $r, load $(cut -d' ' -f1-3 /proc/loadavg)"
    PYTHONPATH=$PWD python3 bench/cell_scaling.py --agents 1000 --duration 20 --allocator equal --topology --simulate --decide --keep /tmp/cell5/keep_${tag}_${v}_$r --out /tmp/cell5/${tag}_${v}_$r.jsonl > /tmp/cell5/${tag}_${v}_$r.log 2>&1
    tail -1 /tmp/cell5/${tag}_${v}_$r.jsonl | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); print('[ab]', '$v', {k: d[k] for k in ('overhead_p50_ms','overhead_p99_ms','hits','errors','lost','rss_peak_gib')}, d['cpu_s'].get('EdgeHost'), d['box_cpu']['busy'])"
  done
done
echo "[ab] $(date -u +%H:%M:%S) done, load $(cut -d' ' -f1-3 /proc/loadavg)"
