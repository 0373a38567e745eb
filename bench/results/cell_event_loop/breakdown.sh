#!/bin/bash
# Per-stage breakdown at 1,000 agents: main (070a0ca) and cell3 (bfdfa4d, 8 loops per host; instr_new),
# each with temporary timestamps (cloud compute end, its reply, the kernel's receive stamps).
for v in instr instr_new; do
  cd /tmp/cell3/$v
  echo "[br] $(date -u +%H:%M:%S) $v, load $(cut -d' ' -f1-3 /proc/loadavg)"
  PYTHONPATH=$PWD python3 bench/cell_scaling.py --agents 1000 --duration 20 --allocator equal --topology --simulate --decide --keep /tmp/cell3/keep_br_$v --out /tmp/cell3/br_$v.jsonl > /tmp/cell3/br_$v.log 2>&1
done
