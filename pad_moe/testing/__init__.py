"""Helpers for pad_moe's own tests: run a function on N real gloo ranks in one machine."""
