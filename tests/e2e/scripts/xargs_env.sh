seq 1 8 | xargs -P 4 -I{} sh -c 'echo item {}' | sort
FOO=bar sh -c 'echo "FOO=$FOO"'
env | grep -c '^DUNIX_TEST_MARK=' || true
pwd
sh -c 'umask'
echo to-stderr >&2
