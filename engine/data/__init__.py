"""Data pipeline: records (JSONL, JSON, Parquet, datasets) -> validated, rendered, tokenized once into a
memory-mapped store (prepare.py, store.py) -> one global packed order (sampler.py, packing.py) -> each
rank's batches (loader.py; the Batch contract and the Loader protocol in batch.py). synthetic.py is a
learnable token stream that needs no files. The rendering choices are in harmony.py.

Nothing is imported here: `import engine.data.config` stays light (no tokenizers).
"""
