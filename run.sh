#!/bin/bash
source /work/main/tools/env.sh
cd /tmp/bench
./bin/br2k testbed --workload payments --users 5 --requests 2223 --rate 4 --fault kill --target leader \
  --interval 20..30 --duration 20 --election-timeout 1000 --seed 20261127 --give-up-after 180 \
  --json-out kill.json > kill.out 2> kill.err
echo rc=$? >> kill.out
./bin/br2k testbed --workload payments --users 5 --requests 2223 --rate 4 --fault partition --target leader \
  --interval 20..30 --duration 20 --election-timeout 1000 --seed 20261128 --give-up-after 180 \
  --json-out partition.json > partition.out 2> partition.err
echo rc=$? >> partition.out
