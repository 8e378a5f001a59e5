x=$(echo hi | tr a-z A-Z); echo "x=$x"
(cd /; pwd; echo sub $(( 6 * 7 )))
y=$(sh -c 'echo inner; exit 2'); echo "y=$y status $?"
cat <(echo from procsub) | tr a-z A-Z
