sleep 5 & p=$!
kill -TERM $p; wait $p; echo "term $?"
sleep 5 & p=$!
sleep 0.3; kill -INT $p; sleep 0.2; kill -0 $p && echo "background ignores INT"; kill -KILL $p; wait $p; echo "kill $?"
sh -c 'sleep 0.5; exit 6' & p=$!
kill -STOP $p; sleep 0.2; kill -CONT $p; wait $p; echo "stop cont $?"
trap 'echo trapped USR1' USR1
kill -USR1 $$
echo after trap
sh -c 'kill -STOP $$; echo resumed' & p=$!
sleep 1; kill -CONT $p; wait $p; echo "self stop $?"
sleep 3 & p=$!
kill -STOP $p; sleep 0.5; kill -CONT $p; wait $p; echo "stopped by parent $?"
