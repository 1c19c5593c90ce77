"""Many sequences on one engine: paged KV memory shared by all of them, batched forward passes, and a
scheduler that interleaves new prompts' prefill chunks with the decode steps of the running ones.

The contract between the parts is :mod:`chatcore.batch.runner` (what a batched forward pass takes and returns).
"""
