"""The binaries' plumbing: one-line user errors (`errors`) and T5X-style gin flags and config
lookup (`gin_setup`). Used only by the binaries at the package top and by launch/.
"""
