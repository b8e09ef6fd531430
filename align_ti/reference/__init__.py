"""fp32 plain-PyTorch definitions of every op: the oracles the fast paths are tested against.

A leaf: each module imports only torch (and the other references), checks no argument and
shares no code with the ops, so that a bug in shared code cannot hide on both sides of a
comparison. Tests and benchmarks import it; the fast paths never do. Each function is
written for clarity, not speed.
"""
