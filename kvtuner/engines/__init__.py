"""Export writers: a per-layer KV choice as the command line or config file an engine runs.

One module an engine: `vllm` (serve command and LLM kwargs), `llamacpp` (-ctk/-ctv and
ik_llama.cpp's first/last-N layers), `modelopt` (hf_quant_config.json with a per-layer KV map),
`lmdeploy` (quant_policy). Pure functions build the values; only `write_*` touches the disk.
"""
