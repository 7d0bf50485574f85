"""Diagnostics: what a model folder holds and needs before loading (`diagnostic.py`), the memory estimate and
limit (`memory.py`), the `refllama inspect` report (`report.py`) and throughput measurement (`benchmark.py`)."""
