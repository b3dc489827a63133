"""Benchmarks of tokend: ``python -m bench [--quick] [--only NAME ...]``.

Not part of the test suite. Every figure is printed beside a reference measured in
the same run on the same machine (a plain asyncio echo server, the IdP's own
latency, a bare httpx loop), because absolute times on a shared machine drift and
ratios hold. See BENCHMARKS.md for the recorded results and what each row measures.
"""
