#!/bin/bash
# A/B at 1,000 agents: main (070a0ca, a thread per agent) vs cell3 with 8 loops per host.
for round in 1 2; do
  for v in base k8; do
    cd /tmp/cell3/$v
    echo "[ab] $(date -u +%H:%M:%S) $v round $round, load $(cut -d' ' -f1-3 /proc/loadavg)"
    PYTHONPATH=$PWD python3 bench/cell_scaling.py --agents 1000 --duration 20 --allocator equal --topology --simulate --decide --keep /tmp/cell3/keep_${v}_r$round --out /tmp/cell3/ab_${v}_r$round.jsonl > /tmp/cell3/ab_${v}_r$round.log 2>&1
  done
done
