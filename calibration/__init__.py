"""Profiles and the cost model fitted from them. No torch here: the simulator imports this."""
