"""Speculative decoding: drafters propose a chain of tokens per request (NGRAM:
a tree, tree.py), one target forward verifies them all (verify.py), and the
scheduler keeps the accepted run (worker.py). Flags: spec_args.py."""
