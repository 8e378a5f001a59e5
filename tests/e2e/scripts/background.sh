sh -c 'exit 3' & p=$!
sh -c 'sleep 0.3; exit 4' & q=$!
wait $p; echo "p $?"
wait $q; echo "q $?"
sh -c 'sleep 0.2; exit 7' &
sh -c 'sleep 2; exit 8' &
wait -n; echo "first $?"
wait -n; echo "second $?"
