"""Placement's defaults, importable without torch (the command line's help shows them)."""

PLACE_TOKENS = 4096  # calibration tokens whose wanted sets the placement follows
CHUNK = 512  # tokens per dense pass while recording
PARTNERS = 32  # affinities kept per neuron (order.top_partners)
DECAY = 0.8  # per step, the weight of a placed neuron's affinities in choosing the next one
