"""Drawing and plotting shared by the commands (:mod:`detkd.viz.draw`)."""
