# Sourced by the recipe scripts' `start` on the device tool's GPU machine: install the carried wheels, join the SmolLM2
# GGUF (/tmp/part_00 from the call before + .carry/b/part_01), and copy ../shared (carried as .whl/shared) and the
# repository to /tmp, so a daemon started from /tmp/repo outlives this call's working tree. Leaves the shell in /tmp/repo.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
cat /tmp/part_00 .carry/b/part_01 > /tmp/model.gguf && sha256sum /tmp/model.gguf
mkdir -p /tmp/repo && cp -r .whl/shared /tmp/shared && tar cf - --exclude=.carry --exclude=.whl . | tar xf - -C /tmp/repo
cd /tmp/repo
