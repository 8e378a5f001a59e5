# two process substitutions read by one remote command: the second one's process inherits
# the first pipe's read end and must take nothing from it (pull-mode relays, docs/run.md)
diff <(seq 3) <(seq 3) && echo same
