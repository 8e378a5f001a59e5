# two process substitutions read by one remote command (a known race: see the test)
diff <(seq 3) <(seq 3) && echo same
