seq 1 2000 | grep 7 | sort -r | head -n 5
seq 1 1000 | awk '{s+=$1} END {print s}'
printf 'b\na\nc\n' | sort | tr a-z A-Z
