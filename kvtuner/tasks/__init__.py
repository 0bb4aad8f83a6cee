"""Quality tasks users judge a cache by, each in its own module, each run beside the dense cache.

- `passkey`: pass-key retrieval (a five-digit key planted at a depth of a long filler text).
- `humaneval`: HumanEval pass@1 from greedy completions, executed by `sandbox`.
- `generation`: the greedy decoding both share.
"""
