cat <<END
one
two $((1 + 2))
END
tr a-z A-Z <<'END'
quoted $HOME stays
END
seq 5 | while read -r n; do echo "line $n"; done
