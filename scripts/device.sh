# Preamble for runs on the GPU device machine (torch is there; zstandard and lz4 are not, and its transformers
# is 5.17, not the 5.24 we pin): installs the wheels carried in .whl/ (fetch them with
# `../shared/tools/device-wheels.sh transformers==5.24.0`; the nvidia_* ones can go) and zipmoe itself,
# editable and offline. Source it:  `. scripts/device.sh && zipmoe bench e2e ...`  (carry ".whl").
[ "${BASH_SOURCE[0]}" != "$0" ] || { echo "source it: . scripts/device.sh" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . >/dev/null 2>&1 \
  || echo "zipmoe: editable install failed; use python3 -m zipmoe.cli.main" >&2
