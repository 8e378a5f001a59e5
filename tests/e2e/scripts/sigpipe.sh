yes | head -n 3
seq 1 1000000 | head -n 1
yes hello | sed 's/h/j/' | head -n 2
echo "done"
