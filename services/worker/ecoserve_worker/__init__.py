"""EcoServe worker: runs a Hugging Face causal LM over a scheduler-assigned paged KV cache.

The worker keeps no scheduling state; the scheduler names every sequence's block table, so a
worker that dies can have its requests recomputed elsewhere.
"""
