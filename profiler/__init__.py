"""`profile`: measure what forward passes of a real model cost on a device (needs torch)."""
