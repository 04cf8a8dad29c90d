"""The HTTP service: the contract's endpoints over uvloop and httptools."""
