"""servesim's simulator: scenarios, workloads, batching schedulers and the SimPy deployment.

Nothing in this package imports torch: `simulate` must start fast on a machine without it.
"""
