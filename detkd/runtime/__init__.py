"""Process plumbing, the bottom layer: distributed helpers, fault points, checkpoint I/O, atomic writes,
rank-0 printing and seeding. It imports nothing else of detkd, so every other layer may use it."""
