#!/bin/bash
# The demo job: CPU-bound workers started one after another on one host spread over the
# cluster as that host gets busy; each says where it ran. Then a pipeline across hosts.
for i in 1 2 3 4 5 6; do
    sh -c 'awk "BEGIN { t = systime(); while (systime() - t < 4) s++ }"
           read h < /proc/sys/kernel/hostname
           echo "worker '"$i"' (pid $$) ran on $h"' &
    sleep 1
done
wait
seq 1 100000 | sh -c 'read h < /proc/sys/kernel/hostname; echo "counted $(wc -l) lines on $h"'
read h < /proc/sys/kernel/hostname  # a builtin: the script's own host, not a child's
echo "the job's first process ran on $h"
