"""Process plumbing, the bottom layer: distributed helpers, fault points, checkpoint I/O, atomic writes,
rank-0 printing, seeding, RNG state, byte transport between ranks and state fingerprints. It imports
nothing else of detkd but :mod:`detkd.errors`, so every other layer may use it."""
