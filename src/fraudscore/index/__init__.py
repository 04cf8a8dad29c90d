"""The index: built once from the reference file, memory-mapped, searched exactly."""
