# stdout and stderr into one pipe or one file (2>&1) keep the order they were written in
sh -c 'for i in 1 2 3 4 5 6; do echo "out $i"; echo "err $i" >&2; done' 2>&1 | cat
out=$(mktemp -p . interleave.XXXXXX)
sh -c 'for i in 1 2 3 4; do echo "out $i"; echo "err $i" >&2; done' > "$out" 2>&1
cat "$out"
rm -f "$out"
