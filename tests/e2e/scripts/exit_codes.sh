sh -c 'exit 42'; echo "status $?"
false; echo "false $?"
set -o pipefail
false | true; echo "pipefail $?"
true | sh -c 'exit 5' | true; echo "pipefail middle $?"
set +o pipefail
sh -c 'kill -TERM $$'; echo "killed $?"
/nonexistent/program 2>/dev/null; echo "missing $?"
