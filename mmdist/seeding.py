"""Arithmetic seeds, so that reruns and any number of workers give the same results."""

import hashlib


def derive_seed(seed: int, stage: str, *keys: int | str) -> int:
    """A 63-bit seed that depends only on (global seed, stage, keys), e.g. (class, image index)."""
    text = "/".join([str(seed), stage, *map(str, keys)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
