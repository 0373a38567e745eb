# On the device: one process per (task, length) of the grid, each resuming its own CSV in
# /tmp/rs, for at most $1 seconds; CSVs and logs copied to $OUT.
export PYTHONPATH=/tmp/rs/site:$PWD RAY_SCOUT_CACHE=/tmp/rs/cache
mkdir -p $OUT /tmp/rs/grids
for combo in multi_hop:1024 multi_hop:2048 multi_hop:4096 multi_needle:4096; do
  task=${combo%:*}; len=${combo#*:}
  sed -e "s/^tasks: .*/tasks: [$task]/" -e "s/^context_tokens: .*/context_tokens: [$len]/" \
      experiments/grids/long-tasks-4k.yaml > /tmp/rs/grids/$task-$len.yaml
  csv=/tmp/rs/$task-$len.csv
  [ "$combo" = multi_hop:1024 ] && [ -f /tmp/rs/long-tasks-4k.csv ] && [ ! -f $csv ] && cp /tmp/rs/long-tasks-4k.csv $csv
  timeout "$1" python3 -m ray_scout.cli quality --grid /tmp/rs/grids/$task-$len.yaml \
      --device cuda --dtype float32 --threads 2 --results $csv > /tmp/rs/$task-$len.log 2>&1 &
done
wait
for f in /tmp/rs/multi_*.csv /tmp/rs/multi_*.log; do cp $f $OUT/; done
for f in /tmp/rs/multi_*.log; do echo "$f: $(grep -v '^|' $f | tail -1)"; done
nvidia-smi --query-gpu=name --format=csv,noheader
