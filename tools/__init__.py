"""Developer tools and data generators, outside the installed package: the shipped sample data
(make_sample.py, agentic_sample.py) and tokenizers (make_tokenizer.py, o200k.py)."""
