# On the lent GPU machine, sourced at the start of a call that carries `.whl`: the project's wheels into /tmp/site
# and, where `.whl/unsloth/` came along, Unsloth's own folder /tmp/unsloth_site (benchmarks/unsloth_site.sh); then
# PYTHONPATH. Nothing is downloaded there. See benchmarks/README.md.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
if [ -d .whl/unsloth ]; then
    bash benchmarks/unsloth_site.sh /tmp/unsloth_site --no-index --find-links .whl/unsloth || return 1
fi
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
