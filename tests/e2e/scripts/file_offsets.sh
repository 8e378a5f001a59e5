# A file the script holds open shares one offset with its children: what a child wrote
# or read through it moves the script's offset too (a child on another host included).
out=$(mktemp -p . offsets.XXXXXX)
{ echo first; /bin/echo second; echo third; printf 'x%.0s' 1 2 3 | /bin/cat; echo; } > "$out"
cat "$out"
printf 'one\ntwo\nthree\nfour\nfive\n' > "$out"
{ /usr/bin/head -n 1; read -r line; echo "read: $line"; /usr/bin/head -n 1; /bin/cat; } < "$out"
exec 3> "$out"
echo a >&3
/bin/echo b >&3
echo c >&3
exec 3>&-
cat "$out"
# parallel writers of one `> file` (make -j8 > log): none writes over another
{ for i in 1 2 3 4 5 6; do /bin/echo "line $i" & done; wait; echo end; } > "$out"
sort "$out"
rm -f "$out"
