#!/bin/bash
# One 1,000-agent run of the base tree with py-spy sampling GIL holders of both edge hosts and the cloud.
cd /tmp/cell5/base
PYTHONPATH=$PWD python3 bench/cell_scaling.py --agents 1000 --duration 20 --allocator equal --topology --simulate --decide --keep /tmp/cell5/keep_prof --out /tmp/cell5/prof.jsonl > /tmp/cell5/prof.log 2>&1 &
run=$!
pids=""
for i in $(seq 120); do
  sleep 1
  pids=$(for p in $(pgrep -f "ray::EdgeHost|ray::CloudActor"); do grep -qz "PYTHONPATH=/tmp/cell5/base" /proc/$p/environ 2>/dev/null && echo $p; done)
  [ $(echo $pids | wc -w) -ge 3 ] && break
done
echo "pids: $pids"; sleep 12  # into the trial's arrivals
for p in $pids; do
  py-spy record --gil -r 250 -d 15 -f raw -o /tmp/cell5/spy_$p.txt -p $p > /tmp/cell5/spy_$p.log 2>&1 &
done
wait $run
echo "run rc $?"
